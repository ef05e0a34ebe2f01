"""RFC 6455 layer (skypty/websocket.py) over real socketpairs: handshake, frames, close codes."""
from __future__ import annotations

import base64
import os
import socket
import struct
import threading

import pytest

from conftest import recv_exact
from skypty import websocket as W


def _ws_pair(pair, **kw):
    a, b = pair
    return W.WebSocket(a, **kw), W.WebSocket(b, client=True)


def _recv_frame(sock):
    """Read one unmasked server frame from a raw socket: (fin, opcode, payload)."""
    b0, b1 = recv_exact(sock, 2)
    assert not b1 & 0x80, "server frames are never masked"
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", recv_exact(sock, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", recv_exact(sock, 8))
    return bool(b0 & 0x80), b0 & 0x0F, recv_exact(sock, n)


def _close_code(payload):
    return struct.unpack("!H", payload[:2])[0]


def _upgrade(host="127.0.0.1:8080", origin=None, version="13", key=None, method="GET", extra=()):
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    lines = [f"{method} /pty?sid=x HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: keep-alive, Upgrade", f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def _read_response(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        c = sock.recv(4096)
        if not c:
            break
        buf += c
    return buf


# ------------------------------------------------------------------ handshake

def test_accept_key_rfc_example():
    # RFC 6455 §1.3
    assert W.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_server_handshake_accepts_and_carries_frames(pair):
    a, b = pair
    req, key = _upgrade(origin="http://127.0.0.1:8080")
    b.sendall(req)
    ws, target, headers = W.server_handshake(a)
    assert target == "/pty?sid=x"
    resp = _read_response(b)
    assert resp.startswith(b"HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {W.accept_key(key)}".encode() in resp
    client = W.WebSocket(b, client=True)
    client.send_text("hello")
    assert ws.recv() == (W.OP_TEXT, b"hello")
    ws.send_binary(b"\x00\xffout")
    assert client.recv() == (W.OP_BINARY, b"\x00\xffout")


def test_client_handshake_against_server_handshake(pair):
    a, b = pair
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ws", W.server_handshake(a)[0]))
    t.start()
    client = W.client_handshake(b, "127.0.0.1:8080", "/", origin="http://127.0.0.1:8080")
    t.join(10)
    client.send_binary(b"x" * 70000)          # 64-bit length form
    assert out["ws"].recv() == (W.OP_BINARY, b"x" * 70000)


@pytest.mark.parametrize("origin,host", [
    ("http://evil.example", "127.0.0.1:8080"),
    ("http://127.0.0.1:8081", "127.0.0.1:8080"),
    ("http://localhost:8080", "127.0.0.1:8080"),
    ("null", "127.0.0.1:8080"),
    ("file://", "127.0.0.1:8080"),
])
def test_cross_origin_upgrade_refused_403(pair, origin, host):
    a, b = pair
    b.sendall(_upgrade(host=host, origin=origin)[0])
    with pytest.raises(W.HandshakeRefused) as ei:
        W.server_handshake(a)
    assert ei.value.status == 403
    assert _read_response(b).startswith(b"HTTP/1.1 403 ")


@pytest.mark.parametrize("origin,host", [
    ("http://127.0.0.1:8080", "127.0.0.1:8080"),
    ("http://LocalHost", "localhost:80"),
    ("https://example.com", "example.com:443"),
    ("http://[::1]:8080", "[::1]:8080"),
])
def test_same_origin_matches(origin, host):
    assert W.origin_matches(origin, host)


def test_missing_origin_is_allowed_for_non_browser_clients(pair):
    a, b = pair
    b.sendall(_upgrade(origin=None)[0])
    W.server_handshake(a)
    assert _read_response(b).startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize("kwargs,status", [
    ({"version": "12"}, 426),
    ({"key": "not base64!"}, 400),
    ({"key": base64.b64encode(b"short").decode()}, 400),
    ({"method": "POST"}, 405),
])
def test_bad_upgrades_refused(pair, kwargs, status):
    a, b = pair
    b.sendall(_upgrade(**kwargs)[0])
    with pytest.raises(W.HandshakeRefused) as ei:
        W.server_handshake(a)
    assert ei.value.status == status
    resp = _read_response(b)
    assert resp.startswith(f"HTTP/1.1 {status} ".encode())
    if status == 426:
        assert b"Sec-WebSocket-Version: 13" in resp


def test_duplicate_key_header_refused(pair):
    a, b = pair
    b.sendall(_upgrade(extra=["Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode()])[0])
    with pytest.raises(W.HandshakeRefused) as ei:
        W.server_handshake(a)
    assert ei.value.status == 400


def test_request_head_is_bounded(pair):
    a, b = pair
    b.sendall(b"GET / HTTP/1.1\r\nX-Junk: " + b"a" * 20000)
    with pytest.raises(W.HandshakeRefused) as ei:
        W.read_request_head(a, limit=4096)
    assert ei.value.status == 431


def test_request_head_times_out(pair):
    a, b = pair
    b.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")      # never finishes
    with pytest.raises(W.HandshakeRefused) as ei:
        W.read_request_head(a, timeout=0.2)
    assert ei.value.status == 408


def test_garbage_request_line_refused(pair):
    a, b = pair
    b.sendall(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    with pytest.raises(W.HandshakeRefused) as ei:
        W.server_handshake(a)
    assert ei.value.status == 400


# ------------------------------------------------------------------ frames

def test_masking_rfc_example():
    # RFC 6455 §5.7: a masked "Hello"
    frame = bytes.fromhex("818537fa213d7f9f4d5158")
    assert W.mask(frame[2:6], frame[6:]) == b"Hello"
    assert W.encode_frame(W.OP_TEXT, b"Hello", masked=True, mask_key=bytes.fromhex("37fa213d")) == frame
    assert W.encode_frame(W.OP_TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 125, 126, 65535, 65536, 300001])
def test_mask_roundtrip_sizes(n):
    data = os.urandom(n)
    key = os.urandom(4)
    m = W.mask(key, data)
    assert len(m) == n
    assert W.mask(key, m) == data
    assert m == bytes(c ^ key[i % 4] for i, c in enumerate(data))


def test_length_forms_roundtrip(pair):
    server, client = _ws_pair(pair)
    for n in (0, 125, 126, 65535, 65536):
        payload = os.urandom(n)
        t = threading.Thread(target=client.send_binary, args=(payload,))
        t.start()
        assert server.recv() == (W.OP_BINARY, payload)
        t.join()


def test_large_message_both_ways(pair):
    server, client = _ws_pair(pair)
    payload = os.urandom(1000 * 1000)
    t = threading.Thread(target=client.send_binary, args=(payload,))
    t.start()
    assert server.recv()[1] == payload
    t.join()
    t = threading.Thread(target=server.send_binary, args=(payload,))
    t.start()
    assert client.recv()[1] == payload
    t.join()


def test_fragmented_text_with_interleaved_control_frames(pair):
    a, b = pair
    server = W.WebSocket(a)
    text = "héllo wörld €".encode()
    cut1, cut2 = 2, 11           # both cuts land inside multi-byte code points
    frames = [
        W.encode_frame(W.OP_TEXT, text[:cut1], fin=False, masked=True),
        W.encode_frame(W.OP_PING, b"p1", masked=True),
        W.encode_frame(W.OP_CONT, text[cut1:cut2], fin=False, masked=True),
        W.encode_frame(W.OP_PONG, b"unsolicited", masked=True),
        W.encode_frame(W.OP_CONT, text[cut2:], fin=True, masked=True),
    ]
    b.sendall(b"".join(frames))
    assert server.recv() == (W.OP_TEXT, text)
    assert _recv_frame(b) == (True, W.OP_PONG, b"p1")


def test_fragmented_binary_from_our_own_client(pair):
    server, client = _ws_pair(pair)
    client.send_frame(W.OP_BINARY, b"ab", fin=False)
    client.send_frame(W.OP_CONT, b"", fin=False)
    client.send_frame(W.OP_CONT, b"cd", fin=True)
    assert server.recv() == (W.OP_BINARY, b"abcd")


def test_ping_pong_both_directions(pair):
    server, client = _ws_pair(pair)
    pongs = []
    server.on_pong = pongs.append
    before = server.last_pong
    server.ping(b"hb")
    client.send_text("after-ping")
    # the client answers our ping while reading for data
    t = threading.Thread(target=lambda: client.recv())
    t.start()
    assert server.recv() == (W.OP_TEXT, b"after-ping")
    server.send_text("wake")
    t.join(10)
    client.ping(b"c")
    client.send_text("x")
    assert server.recv() == (W.OP_TEXT, b"x")
    client.send_text("y")
    server.recv()
    assert pongs == [b"hb"]
    assert server.last_pong >= before


def test_close_handshake_from_client(pair):
    a, b = pair
    server = W.WebSocket(a)
    b.sendall(W.encode_frame(W.OP_CLOSE, struct.pack("!H", 1001) + b"bye", masked=True))
    with pytest.raises(W.ConnectionClosed) as ei:
        server.recv()
    assert (ei.value.code, ei.value.reason) == (1001, "bye")
    fin, op, payload = _recv_frame(b)
    assert op == W.OP_CLOSE and _close_code(payload) == 1001   # echoed
    with pytest.raises(W.ConnectionClosed):
        server.recv()                                          # stays closed
    with pytest.raises(W.ConnectionClosed):
        server.send_text("late")


def test_close_without_status(pair):
    a, b = pair
    server = W.WebSocket(a)
    b.sendall(W.encode_frame(W.OP_CLOSE, b"", masked=True))
    with pytest.raises(W.ConnectionClosed) as ei:
        server.recv()
    assert ei.value.code == W.CLOSE_NO_STATUS
    assert _recv_frame(b) == (True, W.OP_CLOSE, b"")


def test_close_from_server_and_wait_closed(pair):
    server, client = _ws_pair(pair)
    server.close(W.CLOSE_NORMAL, "closed")
    t = threading.Thread(target=lambda: pytest.raises(W.ConnectionClosed, client.recv))
    t.start()
    server.wait_closed(5)
    t.join(10)
    assert server.close_received == (1000, "")          # the echo carries the code only
    assert client.close_received == (1000, "closed")


def test_stream_end_is_abnormal_close(pair):
    a, b = pair
    server = W.WebSocket(a)
    b.sendall(W.encode_frame(W.OP_TEXT, b"hal", fin=True, masked=True)[:5])
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(W.ConnectionClosed) as ei:
        server.recv()
    assert ei.value.code == 1006


def _expect_close(a, b, data, code, **kw):
    server = W.WebSocket(a, **kw)
    b.sendall(data)
    with pytest.raises(W.WebSocketError) as ei:
        server.recv()
    assert ei.value.code == code
    fin, op, payload = _recv_frame(b)
    assert op == W.OP_CLOSE and _close_code(payload) == code
    return ei.value


def test_unmasked_client_frame_refused(pair):
    _expect_close(*pair, W.encode_frame(W.OP_TEXT, b"hi"), 1002)


def test_masked_server_frame_refused_by_client(pair):
    a, b = pair
    client = W.WebSocket(a, client=True)
    b.sendall(W.encode_frame(W.OP_TEXT, b"hi", masked=True))
    with pytest.raises(W.WebSocketError) as ei:
        client.recv()
    assert ei.value.code == 1002


@pytest.mark.parametrize("data", [
    bytes([0x80 | 0x40 | W.OP_TEXT, 0x80]) + b"\0\0\0\0",                # RSV1 without an extension
    bytes([0x80 | 0x3, 0x80]) + b"\0\0\0\0",                             # reserved opcode 3
    bytes([0x80 | 0xB, 0x80]) + b"\0\0\0\0",                             # reserved control opcode
    W.encode_frame(W.OP_CONT, b"x", masked=True),                        # continuation, no message
    W.encode_frame(W.OP_PING, b"x", fin=False, masked=True),             # fragmented control
    bytes([0x89, 0x80 | 126]) + struct.pack("!H", 126) + b"\0" * 4 + b"x" * 126,  # control > 125
    W.encode_frame(W.OP_TEXT, b"a", fin=False, masked=True) + W.encode_frame(W.OP_TEXT, b"b", masked=True),
    W.encode_frame(W.OP_CLOSE, b"\x03", masked=True),                    # 1-byte close payload
    W.encode_frame(W.OP_CLOSE, struct.pack("!H", 1005), masked=True),    # reserved close code
    W.encode_frame(W.OP_CLOSE, struct.pack("!H", 999), masked=True),
    bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 63),              # 64-bit length, top bit
    b"GET / HTTP/1.1\r\n\r\n",                                           # plain garbage
])
def test_garbage_closes_1002(pair, data):
    _expect_close(*pair, data, 1002)


def test_invalid_utf8_text_closes_1007(pair):
    _expect_close(*pair, W.encode_frame(W.OP_TEXT, b"ok \xff\xfe", masked=True), 1007)


def test_truncated_utf8_at_message_end_closes_1007(pair):
    _expect_close(*pair, W.encode_frame(W.OP_TEXT, "€".encode()[:2], masked=True), 1007)


def test_invalid_utf8_close_reason_closes_1007(pair):
    _expect_close(*pair, W.encode_frame(W.OP_CLOSE, struct.pack("!H", 1000) + b"\xc3", masked=True), 1007)


def test_binary_is_not_utf8_checked(pair):
    server, client = _ws_pair(pair)
    client.send_binary(b"\xff\xfe")
    assert server.recv() == (W.OP_BINARY, b"\xff\xfe")


def test_oversize_frame_closes_1009_before_reading_it(pair):
    a, b = pair
    # only the header is sent: the length alone must trigger the close
    head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 10 * 1024 * 1024)
    _expect_close(a, b, head, 1009, max_frame=1024)


def test_oversize_message_closes_1009(pair):
    frames = b"".join(W.encode_frame(W.OP_CONT if i else W.OP_BINARY, b"x" * 1000, fin=False, masked=True)
                      for i in range(5))
    _expect_close(*pair, frames, 1009, max_frame=1024, max_message=4000)


def test_concurrent_senders_do_not_interleave(pair):
    server, client = _ws_pair(pair)
    payloads = [bytes([i]) * 50000 for i in range(8)]
    threads = [threading.Thread(target=client.send_binary, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    got = [server.recv()[1] for _ in payloads]
    for t in threads:
        t.join()
    assert sorted(got) == sorted(payloads)
