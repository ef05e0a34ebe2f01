"""yamux sessions on real loopback TCP: framing, flow control, FIN/RST/GoAway, keepalive, garbage."""
from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time

import pytest

from skypty.transport.dmsg import yamux
from skypty.transport.dmsg.yamux import (FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN, TYPE_DATA, TYPE_GOAWAY,
                                         TYPE_PING, TYPE_WINDOW_UPDATE, Session, encode_header)

pytestmark = pytest.mark.timeout(120)


def _pair():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    ls.close()
    return c, s


@pytest.fixture
def sessions():
    c, s = _pair()
    cs = Session(c, client=True, name="c")
    ss = Session(s, client=False, name="s")
    yield cs, ss
    cs.close()
    ss.close()


@pytest.fixture
def raw_server():
    """A yamux client session facing a raw socket we drive by hand."""
    c, s = _pair()
    cs = Session(c, client=True, name="c")
    s.settimeout(10)
    yield cs, s
    cs.close()
    s.close()


def _read_frame(sock):
    hdr = _recv_exact(sock, 12)
    ver, t, flags, sid, ln = struct.unpack(">BBHII", hdr)
    payload = _recv_exact(sock, ln) if t == TYPE_DATA and ln else b""
    return t, flags, sid, ln, payload


def _recv_exact(sock, n):
    b = b""
    while len(b) < n:
        chunk = sock.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b


def test_vector_open_and_hello(raw_server, vectors):
    """Client opens stream 1 and writes "hello": the exact bytes of crypto-dmsg.md §8.8."""
    cs, s = raw_server
    st = cs.open_stream()
    st.sendall(b"hello")
    got = _recv_exact(s, 12 + 12 + 5)
    assert got == bytes.fromhex("000100010000000100000000" "000000000000000100000005") + b"hello"
    # and the first frame of the recorded dmsg capture (WindowUpdate SYN, stream 1)
    yx = vectors("dmsg_stream.json")["yamux"]
    assert got[:12].hex() == yx["a_to_s_frames"][0]["header_hex"]
    # ACK from the "server", then FIN both ways
    s.sendall(bytes.fromhex(yx["s_to_a_frames"][0]["header_hex"]))
    st.close()
    t, flags, sid, ln, _ = _read_frame(s)
    assert (t, flags, sid, ln) == (TYPE_WINDOW_UPDATE, FLAG_FIN, 1, 0)


def test_headers_roundtrip_vectors(vectors):
    yx = vectors("dmsg_stream.json")["yamux"]
    for fr in yx["a_to_s_frames"] + yx["s_to_a_frames"]:
        hdr = bytes.fromhex(fr["header_hex"])
        ver, t, flags, sid, ln = yamux.decode_header(hdr)
        assert ver == 0 and sid == fr["stream_id"] and ln == fr["length"]
        assert int(fr["type"].split()[0]) == t
        assert encode_header(t, flags, sid, ln) == hdr


def test_echo_both_directions_and_ids(sessions):
    cs, ss = sessions
    a = cs.open_stream()
    a.sendall(b"ping")
    b = ss.accept_stream(timeout=5)
    assert b.stream_id == 1
    assert b.recv_exact(4) == b"ping"
    b.sendall(b"pong")
    a.settimeout(5)
    assert a.recv_exact(4) == b"pong"
    # server-opened streams are even
    c = ss.open_stream()
    c.sendall(b"x")
    d = cs.accept_stream(timeout=5)
    assert d.stream_id == 2 and d.recv(10) == b"x"
    a2 = cs.open_stream()
    assert a2.stream_id == 3


def test_fin_gives_eof_after_data(sessions):
    cs, ss = sessions
    a = cs.open_stream()
    a.sendall(b"last words")
    a.shutdown(socket.SHUT_WR)
    b = ss.accept_stream(timeout=5)
    b.settimeout(5)
    assert b.recv_exact(10) == b"last words"
    assert b.recv(100) == b""
    # half-close: the other direction still works
    b.sendall(b"reply")
    b.close()
    a.settimeout(5)
    assert a.recv_exact(5) == b"reply"
    assert a.recv(10) == b""
    deadline = time.monotonic() + 5
    while (cs.num_streams() or ss.num_streams()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cs.num_streams() == 0 and ss.num_streams() == 0


def test_rst(sessions):
    cs, ss = sessions
    a = cs.open_stream()
    a.sendall(b"x")
    b = ss.accept_stream(timeout=5)
    b.reset()
    a.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while True:
            a.recv(10)
    with pytest.raises(ConnectionResetError):
        a.sendall(b"more")


def test_flow_control_large_transfer(sessions):
    """64 MiB one way while the reader is slow at first: windows hold, nothing is lost."""
    cs, ss = sessions
    total = 64 * 1024 * 1024
    block = bytes(range(256)) * 256          # 64 KiB
    a = cs.open_stream()
    a.settimeout(60)
    sent_hash = hashlib.sha256()
    err = []

    def writer():
        try:
            for _ in range(total // len(block)):
                a.sendall(block)
                sent_hash.update(block)
            a.shutdown(socket.SHUT_WR)
        except Exception as e:  # pragma: no cover - reported below
            err.append(e)

    t = threading.Thread(target=writer)
    t.start()
    b = ss.accept_stream(timeout=5)
    b.settimeout(60)
    time.sleep(0.3)
    # the writer is stuck on the window: at most one window is buffered on the reader side
    assert b._buffered <= yamux.limits.YAMUX_WINDOW
    got = hashlib.sha256()
    n = 0
    while True:
        chunk = b.recv(1 << 20)
        if not chunk:
            break
        got.update(chunk)
        n += len(chunk)
        assert b._buffered <= yamux.limits.YAMUX_WINDOW
    t.join(60)
    assert not err
    assert n == total and got.digest() == sent_hash.digest()


def test_window_overrun_is_session_error(raw_server):
    cs, s = raw_server
    # the "server" opens stream 2 and sends more than 256 KiB without waiting
    s.sendall(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0))
    st = cs.accept_stream(timeout=5)
    big = yamux.limits.YAMUX_WINDOW + 1
    s.sendall(encode_header(TYPE_DATA, 0, 2, big))
    try:
        s.sendall(b"\0" * big)
    except OSError:
        pass
    assert cs.wait_closed(10)
    assert "window" in cs.error
    # a GoAway(protocol error) was sent before closing
    frames = []
    try:
        while True:
            frames.append(_read_frame(s))
    except (EOFError, OSError):
        pass
    assert any(f[0] == TYPE_GOAWAY and f[3] == yamux.GOAWAY_PROTOCOL for f in frames)
    with pytest.raises(ConnectionError):
        st.sendall(b"x")


def test_ping_answered_and_keepalive(raw_server):
    cs, s = raw_server
    s.sendall(encode_header(TYPE_PING, FLAG_SYN, 0, 0xDEADBEEF))
    t, flags, sid, ln, _ = _read_frame(s)
    assert (t, flags, sid, ln) == (TYPE_PING, FLAG_ACK, 0, 0xDEADBEEF)


def test_keepalive_kills_dead_peer():
    c, s = _pair()
    cs = Session(c, client=True, keepalive=0.2, write_timeout=0.5)
    try:
        # the peer reads nothing and answers nothing
        assert cs.wait_closed(10)
        assert "keepalive" in cs.error
    finally:
        cs.close()
        s.close()


def test_session_ping_rtt(sessions):
    cs, ss = sessions
    assert cs.ping() >= 0
    assert ss.ping() >= 0


def test_garbage_closes_session(raw_server):
    cs, s = raw_server
    s.sendall(b"\x01" * 12)    # version 1
    assert cs.wait_closed(10)
    assert "version" in cs.error


def test_bad_type_and_wrong_parity(raw_server):
    cs, s = raw_server
    s.sendall(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))   # odd id from the server side
    assert cs.wait_closed(10)
    assert "parity" in cs.error


def test_goaway_refuses_new_streams(raw_server):
    cs, s = raw_server
    s.sendall(encode_header(TYPE_GOAWAY, 0, 0, 0))
    deadline = time.monotonic() + 5
    while not cs.remote_goaway and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ConnectionError):
        cs.open_stream()


def test_backlog_bounded(raw_server):
    c, s = _pair()
    cs = Session(c, client=True, accept_backlog=2)
    try:
        s.settimeout(10)
        for sid in (2, 4, 6):
            s.sendall(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0))
        t, flags, sid, ln, _ = _read_frame(s)
        assert (t, flags, sid) == (TYPE_WINDOW_UPDATE, FLAG_RST, 6)
    finally:
        cs.close()
        s.close()


def test_data_after_close_is_reset(raw_server):
    cs, s = raw_server
    s.sendall(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0))
    st = cs.accept_stream(timeout=5)
    assert _read_frame(s)[:3] == (TYPE_WINDOW_UPDATE, FLAG_ACK, 2)
    st.close()
    assert _read_frame(s)[:3] == (TYPE_WINDOW_UPDATE, FLAG_FIN, 2)
    s.sendall(encode_header(TYPE_DATA, 0, 2, 3) + b"abc")
    assert _read_frame(s)[:3] == (TYPE_WINDOW_UPDATE, FLAG_RST, 2)
    assert not cs.closed


def test_peer_close_wakes_readers(sessions):
    cs, ss = sessions
    a = cs.open_stream()
    a.sendall(b"x")
    b = ss.accept_stream(timeout=5)
    res = []

    def reader():
        try:
            res.append(a.recv(10))
        except Exception as e:
            res.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    ss.close()
    t.join(10)
    assert not t.is_alive()
    assert res and (res[0] == b"" or isinstance(res[0], ConnectionError))


def test_error_goaway_ends_session(raw_server):
    cs, s = raw_server
    s.sendall(encode_header(TYPE_GOAWAY, 0, 0, yamux.GOAWAY_PROTOCOL))
    assert cs.wait_closed(10)
    assert "GoAway" in cs.error


def test_threads_die_with_the_session():
    before = {t.ident for t in threading.enumerate()}
    c, s = _pair()
    cs = Session(c, client=True, name="tc")
    ss = Session(s, client=False, name="ts")
    st = cs.open_stream()
    st.sendall(b"x")
    ss.accept_stream(timeout=5).recv(1)
    cs.close()
    assert ss.wait_closed(10)

    def ours():
        return [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("yamux-")]
    deadline = time.monotonic() + 10
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ours()


def test_server_relay_forwards_fin_and_reset():
    """The dmsg server's relay: FIN passes through as EOF, a reset on one leg resets the other."""
    from skypty.transport.dmsg.server import relay
    pairs = [_pair(), _pair()]
    sess = [(Session(c, client=True), Session(s, client=False)) for c, s in pairs]
    try:
        (ca, sa), (cb, sb) = sess
        for reset in (False, True):
            a = ca.open_stream()
            a.sendall(b"a")
            b = cb.open_stream()
            b.sendall(b"b")
            la, lb = sa.accept_stream(timeout=5), sb.accept_stream(timeout=5)
            t = threading.Thread(target=relay, args=(la, lb), daemon=True)
            t.start()
            a.settimeout(10)
            b.settimeout(10)
            assert b.recv_exact(1) == b"a" and a.recv_exact(1) == b"b"
            if not reset:
                a.shutdown(socket.SHUT_WR)
                assert b.recv(10) == b""
                b.sendall(b"late")
                assert a.recv_exact(4) == b"late"
                b.shutdown(socket.SHUT_WR)
                assert a.recv(10) == b""
            else:
                a.reset()
                with pytest.raises(ConnectionResetError):
                    while b.recv(10):
                        pass
            t.join(10)
            assert not t.is_alive()
    finally:
        for x, y in sess:
            x.close()
            y.close()
