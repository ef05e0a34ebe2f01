"""The request mux over real socketpairs: accept, reject, garbage, oversize, timeout,
leading slash, query, and the preamble bytes of gob_rpc.json."""
from __future__ import annotations

import socket
import threading

import pytest

from conftest import load_vector
from skypty import mux, rpc
from skypty import gobtypes as T
from skypty.errors import ProtocolError, RejectedError, UsageError

GOB = load_vector("gob_rpc.json")
PEER = mux.Peer(None, "127.0.0.1:1", "control")


class Host:
    """A MuxTable served on one end of a socketpair in a thread; records what handlers saw."""

    def __init__(self, conn, timeout=10.0):
        self.seen = []
        self.closed = threading.Event()
        self.table = mux.MuxTable()
        self.table.add_rpc("dmsgpty/pty", self.pty)
        self.table.add_rpc("dmsgpty/whitelist", self.refuse)
        self.table.add_raw("dmsgpty/proxy", self.raw)
        self.thread = threading.Thread(target=self.table.serve, args=(conn, PEER, timeout), daemon=True)
        self.thread.start()

    def pty(self, conn, query, peer):
        self.seen.append(("pty", query, peer))
        return [("pty", [rpc.Method("Write", T.BYTES, T.INT, len)], self.closed.set)]

    def refuse(self, conn, query, peer):
        raise ValueError("proxy dial failed")

    def raw(self, conn, query, peer):
        self.seen.append(("raw", query, peer))
        conn.sendall(b"raw:" + conn.recv(100))

    def join(self):
        self.thread.join(20)
        assert not self.thread.is_alive()


def test_accept_rpc_and_leading_slash(pair):
    a, b = pair
    host = Host(b)
    mux.request(a, "/dmsgpty/pty")
    client = rpc.RPCClient(a)
    assert client.call("pty.Write", T.BYTES, b"hello", T.INT, timeout=20) == 5
    client.close()
    assert host.closed.wait(20)      # on_close of the service ran at connection end
    host.join()
    assert host.seen == [("pty", {}, PEER)]


def test_raw_handler_query_and_pipelined_bytes(pair):
    a, b = pair
    host = Host(b)
    pk = "02" + "ab" * 32
    uri = f"dmsgpty/proxy?pk={pk}&port=22&port=23&empty="
    # request and the first subsystem bytes in one write: the mux must not eat them
    a.sendall(bytes([len(uri)]) + uri.encode() + b"payload")
    assert a.recv(1) == b"\x00"
    data = b""
    while not data.endswith(b"payload"):
        chunk = a.recv(100)
        assert chunk
        data += chunk
    assert data == b"raw:payload"
    host.join()
    assert host.seen == [("raw", {"pk": pk, "port": "22", "empty": ""}, PEER)]
    assert a.recv(1) == b""          # closed after the handler returned


@pytest.mark.parametrize("sc", [s for s in GOB["scenarios"]], ids=lambda s: s["scenario"])
def test_vector_preambles(sc, pair):
    a, b = pair
    table = mux.MuxTable()
    for path in ("dmsgpty/whitelist", "dmsgpty/pty", "dmsgpty/proxy"):
        table.add_rpc(path, lambda c, q, p: [("pty", [])])
    t = threading.Thread(target=table.serve, args=(b, PEER), daemon=True)
    t.start()
    a.sendall(bytes.fromhex(sc["preamble"]["c2s_hex"]))
    assert a.recv(1).hex() == sc["preamble"]["s2c_hex"]
    a.shutdown(socket.SHUT_WR)
    assert a.recv(1) == b""
    t.join(20)
    assert not t.is_alive()


def test_request_bytes_match_go(pair):
    a, b = pair
    for sc in GOB["scenarios"]:
        t = threading.Thread(target=lambda: b.sendall(bytes.fromhex(sc["preamble"]["s2c_hex"])))
        t.start()
        if sc["preamble"]["s2c_hex"] == "00":
            mux.request(a, sc["uri"])
        else:
            with pytest.raises(RejectedError, match="request rejected by remote dmsgpty-host"):
                mux.request(a, sc["uri"])
        t.join()
        want = sc["preamble"]["c2s_hex"]
        assert b.recv(len(want)).hex() == want


@pytest.mark.parametrize("raw", [
    b"\x0fdmsgpty/unknown",
    b"\x00",                                 # empty URI
    b"\x04\xff\xfe\xfd\xfc",                 # not UTF-8
    b"\x0cdmsgpty/pty\n",                    # control character
    b"\x12http://dmsgpty/pty",               # scheme + host: the path is not dmsgpty/pty
    b"\x0edmsgpty%2Fpty?",                   # escaped slash is a different path
    b"\x0cdmsgpty/pty/",
    b"\xff" + b"a" * 255,                    # longest possible request, no match
])
def test_reject_writes_one_and_closes(raw, pair):
    a, b = pair
    host = Host(b)
    a.sendall(raw)
    assert a.recv(1) == b"\x01"
    assert a.recv(1) == b""
    host.join()
    assert host.seen == []


def test_client_sees_rejection(pair):
    a, b = pair
    host = Host(b)
    with pytest.raises(RejectedError):
        mux.request(a, "dmsgpty/nothing")
    host.join()


def test_factory_failure_closes_without_a_byte(pair):
    a, b = pair
    host = Host(b)
    with pytest.raises(ProtocolError, match="failed to read response: EOF"):
        mux.request(a, "dmsgpty/whitelist")
    host.join()


def test_truncated_request_times_out(pair):
    a, b = pair
    host = Host(b, timeout=0.3)
    a.sendall(b"\x0bdmsg")                   # promises 11 bytes, sends 4, then stalls
    assert a.recv(1) == b"\x01"
    assert a.recv(1) == b""
    host.join()


def test_silent_peer_times_out(pair):
    a, b = pair
    host = Host(b, timeout=0.3)
    assert a.recv(1) == b"\x01"
    host.join()


def test_eof_before_request(pair):
    a, b = pair
    host = Host(b)
    a.shutdown(socket.SHUT_WR)
    assert a.recv(1) in (b"\x01", b"")
    host.join()


def test_request_refuses_oversize_uri(pair):
    a, _ = pair
    with pytest.raises(UsageError):
        mux.request(a, "x" * 256)


def test_request_eof_and_timeout(pair):
    a, b = pair
    with pytest.raises(ProtocolError, match="timeout"):
        mux.request(a, "dmsgpty/pty", timeout=0.2)
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="failed to read response: EOF"):
        mux.request(a, "dmsgpty/pty")
    b.close()
    with pytest.raises(ProtocolError, match="failed to (write request|read response)"):
        mux.request(a, "dmsgpty/pty")


def test_parse_request():
    assert mux.parse_request(b"/dmsgpty/proxy?pk=ab&port=22") == ("dmsgpty/proxy", {"pk": "ab", "port": "22"})
    assert mux.parse_request(b"//dmsgpty/pty")[0] == "/dmsgpty/pty"   # only one slash is stripped
    assert mux.parse_request(b"///dmsgpty/pty") is None
    assert mux.parse_request(b"dmsgpty/pty#frag") == ("dmsgpty/pty", {})
    assert mux.parse_request(b"\xc3") is None
