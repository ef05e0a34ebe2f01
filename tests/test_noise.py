"""skypty.noise: the Go transcripts byte for byte, real-socket round trips, and the failures."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from conftest import load_vector, recv_exact as read_all, trickle
from skypty import limits, noise
from skypty.errors import HandshakeError, KeyFormatError, ProtocolError
from skypty.keys import PubKey, SecKey, generate_keypair
from skypty.noise import (Handshake, RecvCipher, SecureConn, SendCipher, client_handshake, read_frame,
                          server_handshake, write_frame)

XK = load_vector("noise_xk.json")
DS = load_vector("dmsg_stream.json")
needs_pq = pytest.mark.skipif(not noise.pq_available(), reason="ML-KEM-768 unavailable in this cryptography")


def sk(h):
    return SecKey.from_hex(h)


def pk(h):
    return PubKey.from_hex(h)


def xk_pair(pq=False):
    i, r = XK["initiator"], XK["responder"]
    hi = Handshake("XK", True, sk(i["static"]["sk"]), pk(r["static"]["pk"]), ephemeral_sk=sk(i["ephemeral"]["sk"]), pq=pq)
    hr = Handshake("XK", False, sk(r["static"]["sk"]), None, ephemeral_sk=sk(r["ephemeral"]["sk"]), pq=pq)
    return hi, hr


def plaintext(write):
    if write["plaintext_len"] == 0:
        return b""
    if "plaintext_hex" in write:
        return bytes.fromhex(write["plaintext_hex"])
    desc = write["plaintext_desc"]
    salt = 100 if "(i + 100)" in desc else 0
    assert desc in ("70000 bytes, byte[i] = i % 251", "70000 bytes, byte[i] = (i + 100) % 251"), desc
    data = bytes((i + salt) % 251 for i in range(write["plaintext_len"]))
    assert hashlib.sha256(data).hexdigest() == write["plaintext_sha256"]
    return data


def wire(write):
    return b"".join(bytes.fromhex(f["frame_hex"]) for f in write["frames"])


class Thread(threading.Thread):
    """Runs fn, keeps its result or exception for the test to re-raise."""

    def __init__(self, fn, *a, **kw):
        super().__init__(daemon=True)
        self.fn, self.a, self.kw = fn, a, kw
        self.result = self.exc = None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.a, **self.kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.exc = e

    def get(self, timeout=20):
        self.join(timeout)
        assert not self.is_alive(), "worker thread hung"
        if self.exc is not None:
            raise self.exc
        return self.result


# --- XK known answers ------------------------------------------------------------------------

def test_xk_transcript_every_byte():
    hi, hr = xk_pair()
    assert XK["protocol_name"] == noise.PROTOCOL_XK.decode() and XK["prologue_hex"] == ""
    for h in (hi, hr):
        assert h.handshake_hash.hex() == XK["initial_h"] and h.chaining_key.hex() == XK["initial_ck"]
    order = [(hi, hr), (hr, hi), (hi, hr)]
    for (w, r), m in zip(order, XK["handshake_messages"]):
        assert not w.complete and not r.complete
        raw = w.write_message()
        assert raw.hex() == m["raw_hex"] and len(raw) == m["raw_len"]
        assert (struct.pack(">H", len(raw)) + raw).hex() == m["framed_hex"]
        assert r.read_message(raw) == bytes.fromhex(m["payload_hex"])
        for h in (w, r):
            assert h.handshake_hash.hex() == m["h_after"] and h.chaining_key.hex() == m["ck_after"]
    assert hi.complete and hr.complete and not hi.pq and not hr.pq
    assert hi.handshake_hash.hex() == hr.handshake_hash.hex() == XK["handshake_hash"]
    assert hr.remote_pk == pk(XK["initiator"]["static"]["pk"])
    k1, k2 = hi._sym.split()
    sp = XK["split"]
    assert (k1.hex(), k2.hex()) == (sp["cs1_key"], sp["cs2_key"])
    assert sp["initiator_send_key"] == sp["cs2_key"] and sp["responder_send_key"] == sp["cs1_key"]
    # The split rule: XK initiator sends with k2, receives with k1.
    isend, irecv = hi.split()
    rsend, rrecv = hr.split()
    probe = ChaCha20Poly1305(bytes.fromhex(sp["initiator_send_key"])).encrypt(bytes(4) + (1).to_bytes(8, "little"), b"x", None)
    assert isend.seal(b"x")[8:] == probe
    assert rrecv.open((1).to_bytes(8, "big") + probe) == b"x"
    probe = ChaCha20Poly1305(bytes.fromhex(sp["responder_send_key"])).encrypt(bytes(4) + (1).to_bytes(8, "little"), b"y", None)
    assert rsend.seal(b"y")[8:] == probe
    assert irecv.open((1).to_bytes(8, "big") + probe) == b"y"


@pytest.mark.parametrize("into", [True, False], ids=["encrypt_into", "cryptography<47"])
def test_xk_transport_frames_every_byte(into):
    hi, hr = xk_pair()
    hr.read_message(hi.write_message())
    hi.read_message(hr.write_message())
    hr.read_message(hi.write_message())
    for (send, _), (_, recv), direction in ((hi.split(), hr.split(), "initiator_to_responder"),
                                            (hr.split(), hi.split(), "responder_to_initiator")):
        if not into:
            send._into = None   # the path for a cryptography without encrypt_into
        for w in XK["transport"][direction]:
            data = plaintext(w)
            frames = bytes(send.seal_frames(data))
            assert frames == wire(w) and len(frames) == w["wire_total_len"]
            assert len(w["frames"]) == w["frame_count"]
            got = b""
            pos = 0
            for f in w["frames"]:
                (length,) = struct.unpack(">H", frames[pos:pos + 2])
                assert length == f["len_prefix"] and int.from_bytes(frames[pos + 2:pos + 10], "big") == f["nonce"]
                got += recv.open(frames[pos + 2:pos + 2 + length])
                pos += 2 + length
            assert got == data


def _fake_server_replay(conn):
    """Plays the Go responder from the recorded bytes and checks what the client sends."""
    m = XK["handshake_messages"]
    assert read_all(conn, 51) == bytes.fromhex(m[0]["framed_hex"])
    conn.sendall(bytes.fromhex(m[1]["framed_hex"]))
    assert read_all(conn, 67) == bytes.fromhex(m[2]["framed_hex"])
    for w in XK["transport"]["initiator_to_responder"]:
        assert read_all(conn, w["wire_total_len"]) == wire(w)
    for w in XK["transport"]["responder_to_initiator"]:
        conn.sendall(wire(w))
    conn.shutdown(socket.SHUT_WR)
    assert conn.recv(1) == b""


def _fake_client_replay(conn):
    """Plays the Go initiator from the recorded bytes and checks what the server sends."""
    m = XK["handshake_messages"]
    conn.sendall(bytes.fromhex(m[0]["framed_hex"]))
    assert read_all(conn, 51) == bytes.fromhex(m[1]["framed_hex"])
    conn.sendall(bytes.fromhex(m[2]["framed_hex"]))
    for w in XK["transport"]["initiator_to_responder"]:
        conn.sendall(wire(w))
    for w in XK["transport"]["responder_to_initiator"]:
        assert read_all(conn, w["wire_total_len"]) == wire(w)
    conn.shutdown(socket.SHUT_WR)
    assert conn.recv(1) == b""


def _drain(c, n):
    return c.recv_exact(n)


def test_xk_client_on_the_wire_matches_go():
    i, r = XK["initiator"], XK["responder"]
    a, b = socket.socketpair()
    with a, b:
        peer = Thread(_fake_server_replay, b)
        c = client_handshake(a, sk(i["static"]["sk"]), pk(r["static"]["pk"]), timeout=10, pq=False,
                             ephemeral_sk=sk(i["ephemeral"]["sk"]))
        assert c.remote_pk == pk(r["static"]["pk"]) and c.local_pk == pk(i["static"]["pk"]) and not c.pq
        assert a.gettimeout() is None  # cleared after the handshake
        for w in XK["transport"]["initiator_to_responder"]:
            c.sendall(plaintext(w))
        for w in XK["transport"]["responder_to_initiator"]:
            assert c.recv_exact(w["plaintext_len"]) == plaintext(w)
        assert c.recv(10) == b""
        c.shutdown_write()
        peer.get()
        c.close()


def test_xk_server_on_the_wire_matches_go():
    i, r = XK["initiator"], XK["responder"]
    a, b = socket.socketpair()
    with a, b:
        peer = Thread(_fake_client_replay, b)
        c = server_handshake(a, sk(r["static"]["sk"]), timeout=10, pq=True, ephemeral_sk=sk(r["ephemeral"]["sk"]))
        assert c.remote_pk == pk(i["static"]["pk"]) and not c.pq  # Go 2024 sends no ML-KEM key
        for w in XK["transport"]["initiator_to_responder"]:
            assert c.recv_exact(w["plaintext_len"]) == plaintext(w)
        for w in XK["transport"]["responder_to_initiator"]:
            c.sendall(plaintext(w))
        assert c.recv(1) == b""
        c.shutdown_write()
        peer.get()
        c.close()


# --- KK known answers (dmsg stream) ------------------------------------------------------------

def test_kk_stream_transcript():
    kk, keys = DS["kk_stream_handshake"], DS["keys"]
    eph = {e["name"]: e for e in keys["ephemerals"]}
    a_sk, b_sk = sk(keys["client_a"]["sk"]), sk(keys["client_b"]["sk"])
    ha = Handshake("KK", True, a_sk, b_sk.pubkey(), ephemeral_sk=sk(eph["client_a_stream_ephemeral"]["sk"]), pq=False)
    hb = Handshake("KK", False, b_sk, a_sk.pubkey(), ephemeral_sk=sk(eph["client_b_stream_ephemeral"]["sk"]), pq=False)
    m1 = ha.write_message()
    assert m1.hex() == kk["msg1_hex (StreamRequest.NoiseMsg)"]
    hb.read_message(m1)
    m2 = hb.write_message()
    assert m2.hex() == kk["msg2_hex (StreamResponse.NoiseMsg)"]
    ha.read_message(m2)
    assert ha.complete and hb.complete
    assert ha.handshake_hash.hex() == hb.handshake_hash.hex() == kk["handshake_hash"]
    k1, k2 = ha._sym.split()
    assert k1.hex() == kk["a_send_key (cs1)"] and k2.hex() == kk["b_send_key (cs2)"]
    a_send, a_recv = ha.split()
    b_send, b_recv = hb.split()
    sd = DS["stream_data"]
    fa = bytes(a_send.seal_frames(sd["a_to_b"]["plaintext_text"].encode()))
    assert fa.hex() == sd["a_to_b"]["frame"]["frame_hex"]
    fb = bytes(b_send.seal_frames(sd["b_to_a"]["plaintext_text"].encode()))
    assert fb.hex() == sd["b_to_a"]["frame"]["frame_hex"]
    assert b_recv.open(fa[2:]) == b"hello from A" and a_recv.open(fb[2:]) == b"hello from B"


def test_session_handshake_vector_frames():
    sh, keys = DS["session_handshake"], DS["keys"]
    eph = {e["name"]: e for e in keys["ephemerals"]}
    hi = Handshake("XK", True, sk(keys["client_a"]["sk"]), pk(keys["server_s"]["pk"]),
                   ephemeral_sk=sk(eph["client_a_session_ephemeral"]["sk"]), pq=False)
    hr = Handshake("XK", False, sk(keys["server_s"]["sk"]), ephemeral_sk=sk(eph["server_session_ephemeral"]["sk"]), pq=False)
    f1 = hi.write_message()
    assert (struct.pack(">H", len(f1)) + f1).hex() == sh["a_to_s_frames_hex"][0]
    hr.read_message(f1)
    f2 = hr.write_message()
    assert (struct.pack(">H", len(f2)) + f2).hex() == sh["s_to_a_frame_hex"]
    hi.read_message(f2)
    f3 = hi.write_message()
    assert (struct.pack(">H", len(f3)) + f3).hex() == sh["a_to_s_frames_hex"][1]
    hr.read_message(f3)
    assert hi.handshake_hash.hex() == sh["handshake_hash"]
    k1, k2 = hi._sym.split()
    assert k2.hex() == sh["a_send_key"] and k1.hex() == sh["s_send_key"]


# --- PQ hybrid ----------------------------------------------------------------------------------

@needs_pq
def test_pq_hybrid_handshake_sizes_and_keys():
    a, b = generate_keypair()[1], generate_keypair()[1]
    hi = Handshake("XK", True, a, b.pubkey(), pq=True)
    hr = Handshake("XK", False, b, pq=True)
    m1 = hi.write_message()
    assert len(m1) == 33 + noise.MLKEM768_EK_LEN + 16 == 1233
    hr.read_message(m1)
    m2 = hr.write_message()
    assert len(m2) == 33 + noise.MLKEM768_CT_LEN + 16 == 1137
    hi.read_message(m2)
    m3 = hi.write_message()
    assert len(m3) == 65
    hr.read_message(m3)
    assert hi.pq and hr.pq and hi._pq_secret == hr._pq_secret and len(hi._pq_secret) == 32
    h = hi.handshake_hash
    k1, k2 = hi._sym.split()

    def mix(k):
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=h, info=b"skywire-pq-hybrid-v1").derive(k + hi._pq_secret)

    isend, irecv = hi.split()
    rsend, rrecv = hr.split()
    nonce1 = bytes(4) + (1).to_bytes(8, "little")
    body = isend.seal(b"pq")
    assert body[8:] == ChaCha20Poly1305(mix(k2)).encrypt(nonce1, b"pq", None)
    assert rrecv.open(body) == b"pq"
    body = rsend.seal(b"qp")
    assert body[8:] == ChaCha20Poly1305(mix(k1)).encrypt(nonce1, b"qp", None)
    assert irecv.open(body) == b"qp"


@needs_pq
@pytest.mark.parametrize("ipq,rpq", [(True, False), (False, True), (False, False)])
def test_pq_falls_back_to_classical(ipq, rpq):
    a, b = generate_keypair()[1], generate_keypair()[1]
    hi = Handshake("XK", True, a, b.pubkey(), pq=ipq)
    hr = Handshake("XK", False, b, pq=rpq)
    m1 = hi.write_message()
    assert len(m1) == (1233 if ipq else 49)
    hr.read_message(m1)
    m2 = hr.write_message()
    assert len(m2) == 49
    hi.read_message(m2)
    hr.read_message(hi.write_message())
    assert not hi.pq and not hr.pq
    isend, _ = hi.split()
    _, rrecv = hr.split()
    assert rrecv.open(isend.seal(b"classical")) == b"classical"


@needs_pq
def test_pq_responder_ignores_wrong_sized_offer():
    """A payload that is not exactly 1184 bytes is authenticated, ignored, answered with nothing."""
    a, b = generate_keypair()[1], generate_keypair()[1]
    hi = Handshake("XK", True, a, b.pubkey(), pq=False)
    hr = Handshake("XK", False, b, pq=True)
    assert hr.read_message(hi.write_message(b"\x07" * 100)) == b"\x07" * 100
    assert len(hr.write_message()) == 49


@needs_pq
def test_kk_pq_round_trip():
    a, b = generate_keypair()[1], generate_keypair()[1]
    ha = Handshake("KK", True, a, b.pubkey(), pq=True)
    hb = Handshake("KK", False, b, a.pubkey(), pq=True)
    hb.read_message(ha.write_message())
    ha.read_message(hb.write_message())
    assert ha.pq and hb.pq
    asend, arecv = ha.split()
    bsend, brecv = hb.split()
    assert brecv.open(asend.seal(b"1")) == b"1" and arecv.open(bsend.seal(b"2")) == b"2"


# --- real sockets ----------------------------------------------------------------------------

def _pair_tcp():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname(), timeout=10)
    s, _ = srv.accept()
    srv.close()
    return c, s


def _pair(kind):
    return socket.socketpair() if kind == "socketpair" else _pair_tcp()


def _round_trip(kind, pq, payload_size=300_000):
    ck, sk_ = generate_keypair()[1], generate_keypair()[1]
    a, b = _pair(kind)
    try:
        srv = Thread(server_handshake, b, sk_, timeout=10, pq=pq)
        cli = client_handshake(a, ck, sk_.pubkey(), timeout=10, pq=pq)
        s = srv.get()
        assert cli.remote_pk == sk_.pubkey() and s.remote_pk == ck.pubkey()
        assert cli.local_pk == ck.pubkey() and s.local_pk == sk_.pubkey()
        expect_pq = pq and noise.pq_available()
        assert cli.pq == s.pq == expect_pq
        data = os.urandom(payload_size)
        echo = Thread(lambda: [s.sendall(s.recv_exact(len(data))), s.shutdown_write()])
        cli.sendall(data)
        assert cli.recv_exact(len(data)) == data
        assert cli.recv(1) == b""
        echo.get()
        cli.close()
        s.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
@pytest.mark.parametrize("pq", [False, pytest.param(True, marks=needs_pq)])
def test_round_trip(kind, pq):
    _round_trip(kind, pq)


def _handshaken(pq=False):
    """A connected (client SecureConn, server SecureConn) over a socketpair."""
    ck, sk_ = generate_keypair()[1], generate_keypair()[1]
    a, b = socket.socketpair()
    srv = Thread(server_handshake, b, sk_, timeout=10, pq=pq)
    cli = client_handshake(a, ck, sk_.pubkey(), timeout=10, pq=pq)
    return cli, srv.get()


def _keyed_pair():
    """(raw socket, receiving SecureConn, SendCipher that speaks to it) without a handshake."""
    key = os.urandom(32)
    a, b = socket.socketpair()
    conn = SecureConn(b, SendCipher(os.urandom(32)), RecvCipher(key), None, None)
    return a, conn, SendCipher(key)


def _frame(body):
    return struct.pack(">H", len(body)) + body


def test_record_chunking_and_empty_writes():
    cli, srv = _handshaken()
    with cli, srv:
        raw = srv.stream
        for size, frames in ((0, 0), (1, 1), (4070, 1), (4071, 2), (8140, 2), (8141, 3)):
            cli.sendall(b"z" * size)
            got = 0
            for _ in range(frames):
                body = read_frame(raw)
                assert len(body) <= limits.NOISE_MAX_BODY
                got += len(srv._recv.open(body))
            assert got == size
        assert srv._recv.nonce == cli._send.nonce == 9
        # A zero-length record is legal and skipped by the reader.
        cli.stream.sendall(_frame(cli._send.seal(b"")) + _frame(cli._send.seal(b"after")))
        assert srv.recv(100) == b"after"


def test_many_small_records_in_one_read_and_partial_recv():
    a, conn, send = _keyed_pair()
    with a, conn:
        a.sendall(b"".join(_frame(send.seal(bytes([i]) * 3)) for i in range(50)))
        a.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b"\x00"
        assert conn.recv_exact(149) == b"".join(bytes([i]) * 3 for i in range(50))[1:]
        assert conn.recv(5) == b""
        with pytest.raises(EOFError):
            conn.recv_exact(1)


def test_one_record_reads_keep_every_rule():
    """Small reads (rpc) open a read that is exactly one record straight from the read buffer:
    the same rules hold there: a partial recv keeps the rest, an empty record is skipped, a
    tampered or replayed record is fatal and stays so, and an oversize length is refused."""
    a, conn, send = _keyed_pair()
    conn.prefer_small_reads()
    with a, conn:
        a.sendall(_frame(send.seal(b"0123456789")))
        assert conn.recv(4) == b"0123" and conn.recv(100) == b"456789"
        a.sendall(_frame(send.seal(b"")))
        a.sendall(_frame(send.seal(b"after empty")))
        assert conn.recv(100) == b"after empty"
        replay = _frame(send.seal(b"once"))
        a.sendall(replay)
        assert conn.recv(100) == b"once"
        a.sendall(replay)
        with pytest.raises(ProtocolError, match="not larger"):
            conn.recv(100)
        a.sendall(_frame(send.seal(b"later")))
        with pytest.raises(ProtocolError, match="not larger"):   # sticky
            conn.recv(100)
    a, conn, send = _keyed_pair()
    conn.prefer_small_reads()
    with a, conn:
        body = bytearray(send.seal(b"secret"))
        body[-1] ^= 1
        a.sendall(_frame(bytes(body)))
        with pytest.raises(ProtocolError, match="authentication"):
            conn.recv(100)
    a, conn, _ = _keyed_pair()
    conn.prefer_small_reads()
    with a, conn:
        a.sendall(struct.pack(">H", limits.NOISE_MAX_BODY + 1) + b"\x00" * (limits.NOISE_MAX_BODY + 1))
        with pytest.raises(ProtocolError, match="exceeds the maximum"):
            conn.recv(10)
    a, conn, send = _keyed_pair()
    conn.prefer_small_reads()
    with a, conn:
        a.sendall(_frame(send.seal(b"last")))
        a.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b"last"
        assert conn.recv(100) == b""


def test_tampered_frame_is_fatal():
    a, conn, send = _keyed_pair()
    with a, conn:
        body = bytearray(send.seal(b"secret data"))
        body[12] ^= 1
        a.sendall(_frame(bytes(body)))
        with pytest.raises(ProtocolError, match="authentication"):
            conn.recv(100)
        a.sendall(_frame(send.seal(b"later")))
        with pytest.raises(ProtocolError):  # sticky: the stream is dead
            conn.recv(100)


def test_tampered_nonce_field_fails_authentication():
    a, conn, send = _keyed_pair()
    with a, conn:
        body = send.seal(b"x")
        a.sendall(_frame((5).to_bytes(8, "big") + body[8:]))
        with pytest.raises(ProtocolError):
            conn.recv(10)


def test_replayed_nonce_is_fatal():
    a, conn, send = _keyed_pair()
    with a, conn:
        f = _frame(send.seal(b"once"))
        a.sendall(f + f)
        assert conn.recv(100) == b"once"
        with pytest.raises(ProtocolError, match="not larger"):
            conn.recv(100)


def test_decreasing_nonce_is_fatal_but_gaps_are_fine():
    key = os.urandom(32)
    s1 = SendCipher(key)
    b1, b2, b3 = s1.seal(b"1"), s1.seal(b"2"), s1.seal(b"3")
    r = RecvCipher(key)
    assert r.open(b1) == b"1" and r.open(b3) == b"3"  # gap: 2 skipped
    with pytest.raises(ProtocolError):
        r.open(b2)
    zero = SendCipher(key)
    zero._n = -1  # forge a record with nonce 0: never valid
    z = zero.seal(b"0")
    assert int.from_bytes(z[:8], "big") == 0
    with pytest.raises(ProtocolError):
        RecvCipher(key).open(z)
    lax = RecvCipher(key, strict=False)  # dmsg session objects: order free
    assert lax.open(b3) == b"3" and lax.open(b1) == b"1" and lax.open(b1) == b"1"


def test_oversize_length_prefix():
    a, conn, _ = _keyed_pair()
    with a, conn:
        a.sendall(struct.pack(">H", limits.NOISE_MAX_BODY + 1) + b"\x00" * 100)
        with pytest.raises(ProtocolError, match="exceeds the maximum 4094"):
            conn.recv(10)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\xff\xff")
        with pytest.raises(ProtocolError, match="exceeds"):
            read_frame(b)


def test_truncated_stream():
    a, conn, send = _keyed_pair()
    with a, conn:
        f = _frame(send.seal(b"complete")) + _frame(send.seal(b"cut short"))
        a.sendall(f[:-5])
        a.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b"complete"
        with pytest.raises(ProtocolError, match="closed inside a frame"):
            conn.recv(100)
    for cut in (b"\x00", b"\x00\x10abc"):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(cut)
            a.shutdown(socket.SHUT_WR)
            with pytest.raises(ProtocolError, match="unexpected EOF"):
                read_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):
            read_frame(b)


def test_read_write_frame_round_trip():
    a, b = socket.socketpair()
    with a, b:
        for body in (b"", b"x", os.urandom(4094)):
            write_frame(a, body)
            assert read_frame(b) == body


# --- handshake failures -------------------------------------------------------------------------

def test_wrong_pinned_key_fails_clearly():
    ck, real, wrong = generate_keypair()[1], generate_keypair()[1], generate_keypair()[0]
    a, b = socket.socketpair()
    srv = Thread(server_handshake, b, real, timeout=10)
    with pytest.raises(HandshakeError) as ei:
        client_handshake(a, ck, wrong, timeout=10)
    msg = str(ei.value)
    assert msg == f"noise handshake failed (server key pinned to {wrong.hex()}): EOF"
    with pytest.raises(HandshakeError, match="authentication failed"):
        srv.get()
    assert a.fileno() == -1 and b.fileno() == -1  # both sides closed their socket


def test_wrong_pinned_key_over_tcp_names_the_peer():
    ck, real, wrong = generate_keypair()[1], generate_keypair()[1], generate_keypair()[0]
    a, b = _pair_tcp()
    srv = Thread(server_handshake, b, real, timeout=10)
    with pytest.raises(HandshakeError, match="EOF"):
        client_handshake(a, ck, wrong, timeout=10)
    with pytest.raises(HandshakeError, match=r"\(from 127\.0\.0\.1:\d+\)"):
        srv.get()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                       # length prefix 0x4745 > 4094
    _frame(b"\x02" + bytes(32) + bytes(16)),                     # 02 ‖ x=0: not on the curve
    _frame(bytes(49)),                                            # the null point
    _frame(b"\x05" + os.urandom(48)),                             # bad prefix
    _frame(os.urandom(10)),                                       # too short
    _frame(bytes.fromhex(XK["handshake_messages"][0]["raw_hex"])[:-1] + b"\x00"),  # bad tag
    b"\x00\x31" + b"\x02" * 10,                                   # then EOF mid-frame
], ids=["http", "off-curve", "null", "prefix", "short", "tag", "truncated"])
def test_server_rejects_garbage_msg1(garbage):
    a, b = socket.socketpair()
    with a:
        a.sendall(garbage)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(HandshakeError) as ei:
            server_handshake(b, generate_keypair()[1], timeout=5)
        assert str(ei.value).startswith("noise handshake failed (") and "\n" not in str(ei.value)
        try:
            assert a.recv(100) == b""  # nothing was sent back
        except ConnectionResetError:
            pass  # closed with our garbage unread: a reset, still not a byte


def test_client_rejects_garbage_msg2():
    a, b = socket.socketpair()
    with b:
        peer = Thread(lambda: (read_frame(b), b.sendall(_frame(os.urandom(49)))))
        with pytest.raises(HandshakeError, match="pinned to"):
            client_handshake(a, generate_keypair()[1], generate_keypair()[0], timeout=5)
        peer.get()


def test_handshake_timeout_server_side():
    a, b = socket.socketpair()
    with a:
        with pytest.raises(HandshakeError, match="timed out after 0.3s"):
            server_handshake(b, generate_keypair()[1], timeout=0.3)


def test_handshake_timeout_client_side_over_tcp():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with srv:
        a = socket.create_connection(srv.getsockname(), timeout=5)
        silent, _ = srv.accept()
        with silent:
            with pytest.raises(HandshakeError, match=r"pinned to .*: timed out"):
                client_handshake(a, generate_keypair()[1], generate_keypair()[0], timeout=0.3)


def test_handshake_deadline_is_total_not_per_read():
    """A peer dribbling one byte at a time cannot stretch the handshake past its deadline."""
    a, b = socket.socketpair()
    with a, b, trickle(a, b"\x00\x31" + b"\x02" * 47):
        with pytest.raises(HandshakeError, match="timed out"):
            server_handshake(b, generate_keypair()[1], timeout=0.5)


@needs_pq
def test_require_pq_against_classical_peer():
    ck, sk_ = generate_keypair()[1], generate_keypair()[1]
    # client requires PQ, server is classical
    a, b = socket.socketpair()
    srv = Thread(server_handshake, b, sk_, timeout=5, pq=False)
    with pytest.raises(HandshakeError, match="post-quantum"):
        client_handshake(a, ck, sk_.pubkey(), timeout=5, require_pq=True)
    with pytest.raises(HandshakeError):
        srv.get()
    # server requires PQ, client is classical
    a, b = socket.socketpair()
    srv = Thread(server_handshake, b, sk_, timeout=5, require_pq=True)
    with pytest.raises(HandshakeError):
        client_handshake(a, ck, sk_.pubkey(), timeout=5, pq=False)
    with pytest.raises(HandshakeError, match="post-quantum"):
        srv.get()
    # both require it: fine
    a, b = socket.socketpair()
    srv = Thread(server_handshake, b, sk_, timeout=5, require_pq=True)
    c = client_handshake(a, ck, sk_.pubkey(), timeout=5, require_pq=True)
    s = srv.get()
    assert c.pq and s.pq
    c.close()
    s.close()


def test_handshake_api_misuse():
    k = generate_keypair()[1]
    with pytest.raises(KeyFormatError):
        Handshake("XK", True, k, None)
    with pytest.raises(KeyFormatError):
        Handshake("KK", False, k, PubKey.null())
    with pytest.raises(ValueError):
        Handshake("NN", True, k, None)
    hi = Handshake("XK", True, k, generate_keypair()[0], pq=False)
    with pytest.raises(HandshakeError):
        hi.read_message(b"x" * 49)
    with pytest.raises(HandshakeError):
        hi.split()
    hi.write_message()
    with pytest.raises(HandshakeError):
        hi.write_message()


# --- SecureConn behaviour -----------------------------------------------------------------------

def test_concurrent_senders_keep_records_whole_and_ordered():
    cli, srv = _handshaken()
    with cli, srv:
        chunks = {t: bytes([65 + t]) * 100_000 for t in range(4)}
        total = sum(len(c) for c in chunks.values()) * 5
        reader = Thread(srv.recv_exact, total)
        writers = [Thread(lambda d=d: [cli.sendall(d) for _ in range(5)]) for d in chunks.values()]
        for w in writers:
            w.get()
        got = reader.get()
        assert sorted(got) == sorted(b"".join(chunks.values()) * 5)
        # each sendall ≤ one batch is written with one stream.sendall, so never interleaved
        for i in range(0, len(got), 100_000):
            assert len(set(got[i:i + 100_000])) == 1


def test_shutdown_write_timeout_fileno_and_close_wakes_reader():
    cli, srv = _handshaken()
    with cli, srv:
        assert cli.fileno() == cli.stream.fileno()
        srv.settimeout(0.2)
        with pytest.raises(socket.timeout):
            srv.recv(10)
        srv.settimeout(None)
        cli.sendall(b"partial")
        assert srv.recv(3) == b"par" and srv.pending() == 4
        assert srv.recv(100) == b"tial"
        cli.shutdown_write()
        assert srv.recv(10) == b""
        srv.sendall(b"still open the other way")
        assert cli.recv_exact(24) == b"still open the other way"
        blocked = Thread(cli.recv, 10)
        blocked.join(0.2)
        cli.close()
        try:
            assert blocked.get(5) == b""
        except OSError:
            pass  # also acceptable: the reader learns the socket went away
        cli.close()  # idempotent


def test_timeout_mid_frame_loses_nothing():
    a, conn, send = _keyed_pair()
    with a, conn:
        f = _frame(send.seal(b"split across a timeout"))
        a.sendall(f[:7])
        conn.settimeout(0.2)
        with pytest.raises(socket.timeout):
            conn.recv(100)
        a.sendall(f[7:])
        assert conn.recv(100) == b"split across a timeout"


def test_seal_refuses_oversize_record():
    with pytest.raises(ValueError):
        SendCipher(os.urandom(32)).seal(b"x" * 4071)


@needs_pq
def test_pq_responder_survives_an_invalid_mlkem_key():
    """1184 bytes that are not a valid encapsulation key: classical answer, no crash."""
    a, b = generate_keypair()[1], generate_keypair()[1]
    hi = Handshake("XK", True, a, b.pubkey(), pq=False)
    hr = Handshake("XK", False, b, pq=True)
    hr.read_message(hi.write_message(b"\xff" * noise.MLKEM768_EK_LEN))
    hi.read_message(hr.write_message())
    hr.read_message(hi.write_message())
    assert not hr.pq
    isend, _ = hi.split()
    assert hr.split()[1].open(isend.seal(b"ok")) == b"ok"


def test_without_mlkem_pq_degrades_to_classical(monkeypatch):
    monkeypatch.setattr(noise, "_MLKEM", False)
    k = generate_keypair()[1]
    with pytest.raises(HandshakeError, match="ML-KEM-768 is unavailable"):
        Handshake("XK", True, k, generate_keypair()[0], require_pq=True)
    cli, srv = _handshaken(pq=True)
    with cli, srv:
        assert not cli.pq and not srv.pq
        cli.sendall(b"classical")
        assert srv.recv_exact(9) == b"classical"


@needs_pq
def test_an_mlkem_key_that_fails_to_generate_makes_the_handshake_classical(monkeypatch):
    """The direct ML-KEM path trusts the build flags (no self-test at load): should the
    backend refuse after all, the initiator offers no key, unless PQ is required."""
    def refuse():
        raise RuntimeError("backend says no")

    monkeypatch.setattr(noise, "_MLKEM", (refuse, noise._mlkem_ops()[1]))
    cli, srv = _handshaken(pq=True)
    with cli, srv:
        assert not cli.pq and not srv.pq
        cli.sendall(b"classical")
        assert srv.recv_exact(9) == b"classical"
    a, b = generate_keypair()[1], generate_keypair()[1]
    with pytest.raises(HandshakeError, match="ML-KEM-768 failed: backend says no"):
        Handshake("XK", True, a, b.pubkey(), require_pq=True).write_message()


def test_send_nonce_overflow_is_refused_and_nothing_advances():
    key = os.urandom(32)
    s = SendCipher(key)
    s._n = (1 << 64) - 3
    assert int.from_bytes(s.seal(b"a")[:8], "big") == (1 << 64) - 2
    with pytest.raises(ProtocolError, match="exhausted"):
        s.seal_frames(b"x" * (limits.NOISE_MAX_PLAINTEXT + 1))   # needs two nonces, one is left
    assert s.nonce == (1 << 64) - 2
    assert int.from_bytes(s.seal_object(b"b")[:8], "big") == (1 << 64) - 1
    for seal in (s.seal, s.seal_object, s.seal_frames):
        with pytest.raises(ProtocolError, match="exhausted"):
            seal(b"c")
    assert s.nonce == (1 << 64) - 1


def test_concurrent_seals_never_reuse_a_nonce():
    """Callers that forget to serialise must still never get one nonce twice."""
    s = SendCipher(os.urandom(32))
    got = [[] for _ in range(6)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as possible
    try:
        def work(out):
            for _ in range(1500):
                out.append(int.from_bytes(s.seal(b"x")[:8], "big"))
                out.append(int.from_bytes(s.seal_frames(b"y")[2:10], "big"))
        threads = [threading.Thread(target=work, args=(g,)) for g in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    flat = [n for g in got for n in g]
    assert len(flat) == 6 * 3000 and sorted(flat) == list(range(1, 6 * 3000 + 1))


def test_seal_object_is_one_large_record():
    key = os.urandom(32)
    s, r = SendCipher(key), RecvCipher(key, strict=False)
    big = os.urandom(0xFFFF - 8 - 16)
    body = s.seal_object(big)
    assert len(body) == 0xFFFF and r.open(body) == big and s.nonce == 1
    assert r.open(s.seal(b"small")) == b"small"      # one counter for both kinds of record
    with pytest.raises(ValueError):
        s.seal_object(big + b"!")
    assert s.nonce == 2


def test_read_frame_max_len_and_deadline():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">H", 5000) + b"z" * 5000)
        assert read_frame(b, None, max_len=0xFFFF) == b"z" * 5000
        a.sendall(struct.pack(">H", 5000))
        with pytest.raises(ProtocolError, match="exceeds the maximum 4094"):
            read_frame(b)
        with pytest.raises(socket.timeout):
            read_frame(b, deadline=time.monotonic() - 1)


def test_handshake_on_a_dead_socket_is_a_handshake_error():
    """Every failure of the pre-auth step, even the first settimeout, is one catchable class."""
    _, sk = generate_keypair()
    pk, _ = generate_keypair()
    for run in (lambda s: client_handshake(s, sk, pk), lambda s: server_handshake(s, sk)):
        s = socket.socket()
        s.close()
        with pytest.raises(HandshakeError):
            run(s)


# --- SecureConn's receive path: recv_into a reused buffer, recv() for streams without it -------

class _RecvOnly:
    """A socket seen through recv/sendall/close/settimeout/fileno only (no recv_into)."""

    def __init__(self, sock):
        self._s = sock
        self.asked = []

    def recv(self, n):
        self.asked.append(n)
        return self._s.recv(n)

    def sendall(self, data):
        self._s.sendall(data)

    def close(self):
        self._s.close()

    def settimeout(self, t):
        self._s.settimeout(t)

    def fileno(self):
        return self._s.fileno()


def _conn_pair(stream_a, stream_b):
    """Two SecureConns keyed to each other (no handshake) over the given streams."""
    k1, k2 = os.urandom(32), os.urandom(32)
    return (SecureConn(stream_a, SendCipher(k1), RecvCipher(k2), None, None),
            SecureConn(stream_b, SendCipher(k2), RecvCipher(k1), None, None))


def _messages():
    return [b"k", os.urandom(100), os.urandom(4070), os.urandom(4071), os.urandom(300 * 1024 + 17),
            b"after the big one", os.urandom(70000)]


def test_secure_conn_over_a_stream_without_recv_into():
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    wrapped = _RecvOnly(a)
    assert not hasattr(wrapped, "recv_into")
    ca, cb = _conn_pair(wrapped, b)
    with ca, cb:
        msgs = _messages()
        for src, dst in ((cb, ca), (ca, cb)):   # into the wrapped side, and back out of it
            sender = Thread(lambda s=src: [s.sendall(m) for m in msgs])
            for m in msgs:
                assert dst.recv_exact(len(m)) == m
            sender.get()
        assert wrapped.asked and set(wrapped.asked) == {noise._RECV_CHUNK}
        assert noise._RECV_CHUNK == 256 * 1024
        cb.shutdown_write()
        assert ca.recv(1) == b""


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_secure_conn_recv_into_a_large_message_in_pieces(kind):
    """Over a real socket: a > 1 MiB message, sent in uneven pieces with pauses, arrives whole
    and intact while reads switch between the reused small buffer (recv_into) and bulk reads."""
    a, b = _pair(kind)
    a.settimeout(20)
    b.settimeout(20)
    ca, cb = _conn_pair(a, b)
    ca.prefer_small_reads()
    with ca, cb:
        big = os.urandom((1 << 20) + 333_333)

        def send():
            pos, step = 0, 1
            while pos < len(big):
                cb.sendall(big[pos:pos + step])
                pos += step
                step = step * 3 + 1 if step < 200_000 else 150_001
                if step < 5000:
                    time.sleep(0.002)
            cb.sendall(b"tail")
        sender = Thread(send)
        got = bytearray()
        while len(got) < len(big) + 4:
            piece = ca.recv(1 << 20)
            assert piece
            got += piece
        sender.get()
        assert bytes(got) == big + b"tail"
        assert ca._rbuf is not None and len(ca._rbuf) == noise._RECV_SMALL   # the recv_into path
        msgs = _messages()             # and the buffer keeps serving later records
        sender = Thread(lambda: [cb.sendall(m) for m in msgs])
        for m in msgs:
            assert ca.recv_exact(len(m)) == m
        sender.get()


class _CountingSock:
    """A real socket that records which read call SecureConn made, and its size."""

    def __init__(self, sock):
        self._s = sock
        self.calls = []

    def recv(self, n):
        self.calls.append(("recv", n))
        return self._s.recv(n)

    def recv_into(self, buf):
        self.calls.append(("recv_into", len(buf)))
        return self._s.recv_into(buf)

    def __getattr__(self, name):
        return getattr(self._s, name)


def test_keystrokes_never_pay_for_a_bulk_read():
    """Marked for rpc (prefer_small_reads), small records are read with recv_into a 16 KiB
    buffer (a 256 KiB recv() that returns a few bytes costs an mmap+munmap each time); a bulk
    transfer switches to 256 KiB reads, and keystroke-sized traffic afterwards goes back to the
    small buffer. Unmarked, every read is a 256 KiB recv() (what bulk streams want)."""
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    wrapped = _CountingSock(a)
    ca, cb = _conn_pair(wrapped, b)
    with ca, cb:
        cb.sendall(b"unmarked")
        assert ca.recv(100) == b"unmarked"
        assert wrapped.calls == [("recv", noise._RECV_CHUNK)]
        del wrapped.calls[:]
        ca.prefer_small_reads()
        for i in range(20):
            cb.sendall(b"k%d" % i)
            assert ca.recv(100) == b"k%d" % i
        assert wrapped.calls and set(wrapped.calls) == {("recv_into", noise._RECV_SMALL)}
        big = os.urandom(8 << 20)
        sender = Thread(cb.sendall, big)
        assert ca.recv_exact(len(big)) == big
        sender.get()
        assert ("recv", noise._RECV_CHUNK) in wrapped.calls
        del wrapped.calls[:]
        for i in range(5):
            cb.sendall(b"q%d" % i)
            assert ca.recv(100) == b"q%d" % i
        assert wrapped.calls[-3:] == [("recv_into", noise._RECV_SMALL)] * 3


@needs_pq
def test_mlkem_direct_and_public_api_are_the_same_kem():
    """_mlkem_direct calls the functions behind cryptography's public ML-KEM API: keys made
    one way must work with the other, both ways round."""
    direct, public = noise._mlkem_direct(), noise._mlkem_public()
    assert direct is not None and public is not None
    for gen, load in ((direct[0], public[1]), (public[0], direct[1])):
        sk = gen()
        ek = sk.public_key().public_bytes_raw()
        ss, ct = load(ek).encapsulate()
        assert len(ek) == noise.MLKEM768_EK_LEN and len(ct) == noise.MLKEM768_CT_LEN
        assert sk.decapsulate(ct) == ss
        assert sk.decapsulate(bytes([ct[0] ^ 1]) + ct[1:]) != ss   # implicit rejection, not a match


@needs_pq
def test_a_pq_handshake_does_not_load_cryptographys_openssl_backend():
    """The cold-start saving of _mlkem_direct, in a fresh interpreter (conftest may have
    loaded the backend in this one)."""
    code = ("import socket, sys, threading\n"
            "from skypty import noise\n"
            "from skypty.keys import generate_keypair\n"
            "ck, sk = generate_keypair()[1], generate_keypair()[1]\n"
            "a, b = socket.socketpair()\n"
            "out = {}\n"
            "t = threading.Thread(target=lambda: out.update(s=noise.server_handshake(b, sk, timeout=10, pq=True)))\n"
            "t.start()\n"
            "c = noise.client_handshake(a, ck, sk.pubkey(), timeout=10, pq=True)\n"
            "t.join()\n"
            "print(c.pq, out['s'].pq, 'cryptography.hazmat.backends.openssl.backend' in sys.modules)\n")
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.stdout.split() == ["True", "True", "False"], r.stderr


def test_without_the_direct_path_the_public_api_serves(monkeypatch):
    monkeypatch.setattr(noise, "_MLKEM", None)
    monkeypatch.setattr(noise, "_mlkem_direct", lambda: None)
    if noise._mlkem_public() is None:
        pytest.skip("ML-KEM-768 unavailable in this cryptography")
    cli, srv = _handshaken(pq=True)
    with cli, srv:
        assert cli.pq and srv.pq
        cli.sendall(b"hybrid")
        assert srv.recv_exact(6) == b"hybrid"


def test_the_aead_is_cryptographys_chacha20poly1305_checked_by_a_known_answer():
    """noise takes the cipher class from cryptography's binding (cold start) only when RFC
    8439's AEAD example comes out right; on every supported release it is the public class."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert noise.ChaCha20Poly1305 is ChaCha20Poly1305
    assert noise._aead_ok(ChaCha20Poly1305)
    assert not noise._aead_ok(AESGCM)   # same call shape, another cipher: refused
    assert noise._aead_class() is ChaCha20Poly1305


def test_while_waiting_runs_once_while_the_responder_is_on_message_2():
    """The initiator's idle hook runs after message 1 went out and before message 2 came in:
    here the responder may only answer once the hook ran, else the handshake times out."""
    ck, sk_ = generate_keypair()[1], generate_keypair()[1]
    a, b = socket.socketpair()
    ran = threading.Event()
    calls = []

    class HeldReplies:   # the responder's socket: its first write waits for the hook
        def __init__(self, sock):
            self._s = sock

        def sendall(self, data):
            assert ran.wait(10), "message 2 was held, but the hook never ran"
            return self._s.sendall(data)

        def __getattr__(self, name):
            return getattr(self._s, name)

    def hook():
        calls.append(1)
        ran.set()

    srv = Thread(server_handshake, HeldReplies(b), sk_, timeout=10)
    cli = client_handshake(a, ck, sk_.pubkey(), timeout=10, while_waiting=hook)
    with cli, srv.get() as s:
        cli.sendall(b"after")
        assert s.recv_exact(5) == b"after"
    assert calls == [1]
    # a failing hook costs nothing but its head start
    a, b = socket.socketpair()
    srv = Thread(server_handshake, b, sk_, timeout=10)
    cli = client_handshake(a, ck, sk_.pubkey(), timeout=10, while_waiting=lambda: 1 / 0)
    with cli, srv.get() as s:
        s.sendall(b"ok")
        assert cli.recv_exact(2) == b"ok"


class _Pieces:
    """A stream that hands out prepared bytes in pieces of the given sizes (cycled), never
    more than asked: frames cut anywhere, length fields included."""

    def __init__(self, data, sizes, into=False):
        self._data, self._pos, self._sizes, self._i = bytes(data), 0, list(sizes), 0
        if into:
            self.recv_into = self._recv_into

    def recv(self, n):
        k = min(n, self._sizes[self._i % len(self._sizes)], len(self._data) - self._pos)
        self._i += 1
        out = self._data[self._pos:self._pos + k]
        self._pos += k
        return out

    def _recv_into(self, buf):
        piece = self.recv(len(buf))
        buf[:len(piece)] = piece
        return len(piece)

    def sendall(self, data):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("into", [False, True])
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [7], [4095, 1], [4096], [9000, 5], [262144], [11, 70000, 1, 2]])
def test_secure_conn_opens_frames_cut_anywhere(sizes, into):
    """Records of every size, read in pieces that cut frames (and their length fields) at
    every kind of place, come out whole and in order; a forged record later on still lets
    every record before it through, then fails for good."""
    key = os.urandom(32)
    send = SendCipher(key)
    msgs = [b"k", os.urandom(100), os.urandom(4070), os.urandom(4071), os.urandom(65536 + 3), b"z" * 9]
    wire = b"".join(bytes(send.seal_frames(m)) for m in msgs)
    bad = bytearray(send.seal_frames(b"forged"))
    bad[-1] ^= 1
    conn = SecureConn(_Pieces(wire + bytes(bad) + bytes(send.seal_frames(b"never")), sizes, into), None,
                      RecvCipher(key), None, None)
    if into:
        conn.prefer_small_reads()
    for m in msgs:
        assert conn.recv_exact(len(m)) == m
    for _ in range(2):   # sticky
        with pytest.raises(ProtocolError, match="authentication"):
            conn.recv(1)
