"""WebSocket (RFC 6455), stdlib only: the server handshake and a frame reader/writer.

Used by the browser terminal (web.py). Synchronous: one thread reads (`recv`), any number of
threads write (sends are serialised on a lock). Everything the peer sends is bounded: the
request head (`limits.WS_HEADER_MAX`, `limits.WS_HEADER_TIMEOUT`), one frame
(`limits.WS_MAX_FRAME`) and one reassembled message (`limits.WS_MAX_MESSAGE`). A protocol
violation answers with a close frame carrying the RFC status code, then raises `WebSocketError`.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import io
import os
import socket
import struct
import threading
import time
from http.client import HTTPMessage, parse_headers
from typing import Callable, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from skypty import limits
from skypty.errors import ProtocolError

__all__ = [
    "GUID", "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "CLOSE_NORMAL", "CLOSE_GOING_AWAY", "CLOSE_PROTOCOL_ERROR", "CLOSE_UNSUPPORTED",
    "CLOSE_NO_STATUS", "CLOSE_INVALID_DATA", "CLOSE_POLICY", "CLOSE_TOO_BIG", "CLOSE_INTERNAL",
    "WebSocketError", "ConnectionClosed", "HandshakeRefused",
    "accept_key", "mask", "origin_matches", "validate_upgrade", "response_101", "refusal_response",
    "read_request_head", "server_handshake", "client_handshake", "encode_frame", "WebSocket",
]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_NO_STATUS = 1005          # never on the wire: "the close frame had no code"
CLOSE_ABNORMAL = 1006           # never on the wire: "no close frame at all"
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011


class WebSocketError(ProtocolError):
    """The peer broke RFC 6455; `code` is the close status we answered with."""

    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code = code


class ConnectionClosed(ConnectionError):
    """The WebSocket is closed (close frame exchanged, or the stream ended: code 1006)."""

    def __init__(self, code: int = CLOSE_ABNORMAL, reason: str = ""):
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class HandshakeRefused(ProtocolError):
    """The upgrade request is not acceptable; answer with `status` (and `headers`)."""

    def __init__(self, status: int, msg: str, headers: Tuple[Tuple[str, str], ...] = ()):
        super().__init__(msg)
        self.status = status
        self.headers = headers


# ---------------------------------------------------------------- handshake

def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1((key.strip() + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _tokens(value: Optional[str]) -> set:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def _norm_hostport(host: str, scheme: str) -> Optional[Tuple[str, int]]:
    """'Example.com:80' -> ('example.com', 80); the scheme's default port fills a missing one."""
    try:
        parts = urlsplit("//" + host.strip())
        port = parts.port
    except ValueError:
        return None
    name = (parts.hostname or "").lower()
    if not name:
        return None
    if port is None:
        port = 443 if scheme in ("https", "wss") else 80
    return name, port


def origin_matches(origin: str, host: str) -> bool:
    """Is a browser's Origin the same host:port the request was sent to (the Host header)?

    Browsers always send Origin on a WebSocket upgrade; a page from another site gets its own
    origin there, so this refuses cross-site pages driving the local shell (CSWSH).
    """
    try:
        o = urlsplit(origin.strip())
    except ValueError:
        return False
    if o.scheme not in ("http", "https") or not o.netloc:
        return False
    a = _norm_hostport(o.netloc, o.scheme)
    b = _norm_hostport(host, o.scheme)
    return a is not None and a == b


def _one(headers: Mapping, name: str) -> Optional[str]:
    if isinstance(headers, HTTPMessage):
        values = headers.get_all(name) or []
        if len(values) > 1:
            raise HandshakeRefused(400, f"duplicate {name} header")
        return values[0] if values else None
    return headers.get(name)


def validate_upgrade(method: str, headers: Mapping, *, check_origin: bool = True) -> str:
    """Check a WebSocket upgrade request; return the Sec-WebSocket-Accept value.

    `headers` is an `http.client.HTTPMessage` (what http.server hands a handler). Raises
    `HandshakeRefused` with the HTTP status to answer: 405 non-GET, 400 malformed, 426 wrong
    version, 403 cross-origin.
    """
    if method != "GET":
        raise HandshakeRefused(405, f"method {method} is not GET")
    if "websocket" not in _tokens(_one(headers, "Upgrade")):
        raise HandshakeRefused(400, "missing Upgrade: websocket")
    if "upgrade" not in _tokens(_one(headers, "Connection")):
        raise HandshakeRefused(400, "missing Connection: Upgrade")
    version = (_one(headers, "Sec-WebSocket-Version") or "").strip()
    if version != "13":
        raise HandshakeRefused(426, f"unsupported websocket version {version!r}",
                               (("Sec-WebSocket-Version", "13"),))
    key = (_one(headers, "Sec-WebSocket-Key") or "").strip()
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeRefused(400, "bad Sec-WebSocket-Key")
    host = _one(headers, "Host")
    if not host:
        raise HandshakeRefused(400, "missing Host header")
    origin = _one(headers, "Origin")
    if check_origin and origin is not None and not origin_matches(origin, host):
        raise HandshakeRefused(403, f"cross-origin websocket refused (Origin {origin[:100]!r}, Host {host[:100]!r})")
    return accept_key(key)


def response_101(accept: str) -> bytes:
    return ("HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode("ascii")


_REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 426: "Upgrade Required",
            431: "Request Header Fields Too Large", 408: "Request Timeout"}


def refusal_response(err: HandshakeRefused) -> bytes:
    body = (str(err) + "\n").encode("utf-8", "replace")
    head = [f"HTTP/1.1 {err.status} {_REASONS.get(err.status, 'Error')}",
            "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in err.headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def read_request_head(sock: socket.socket, *, limit: int = limits.WS_HEADER_MAX,
                      timeout: float = limits.WS_HEADER_TIMEOUT) -> Tuple[str, str, HTTPMessage, bytes]:
    """Read one HTTP request head from a raw socket: (method, target, headers, extra bytes).

    The whole head must fit in `limit` bytes and arrive within `timeout` seconds (a total
    deadline, so a trickling peer cannot hold the thread).
    """
    deadline = time.monotonic() + timeout
    buf = b""
    old = sock.gettimeout()
    try:
        while b"\r\n\r\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandshakeRefused(408, "request head timed out")
            if len(buf) >= limit:
                raise HandshakeRefused(431, "request head too large")
            sock.settimeout(left)
            try:
                chunk = sock.recv(min(4096, limit - len(buf)))
            except socket.timeout:
                raise HandshakeRefused(408, "request head timed out") from None
            if not chunk:
                raise HandshakeRefused(400, "connection closed during the request head")
            buf += chunk
    finally:
        sock.settimeout(old)
    head, _, extra = buf.partition(b"\r\n\r\n")
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        raise HandshakeRefused(400, "malformed request line")
    if parts[2] != b"HTTP/1.1":
        raise HandshakeRefused(400, "websocket needs HTTP/1.1")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
        headers = parse_headers(io.BytesIO(rest + b"\r\n\r\n"))
    except Exception as e:  # http.client raises several types on garbage
        raise HandshakeRefused(400, f"malformed request head ({type(e).__name__})") from None
    return method, target, headers, extra


def server_handshake(sock: socket.socket, *, check_origin: bool = True,
                     max_frame: int = limits.WS_MAX_FRAME,
                     max_message: int = limits.WS_MAX_MESSAGE) -> Tuple["WebSocket", str, HTTPMessage]:
    """Accept a WebSocket on a raw socket: (websocket, request target, headers).

    A refused request gets its HTTP error answer and `HandshakeRefused` is raised.
    """
    try:
        method, target, headers, extra = read_request_head(sock)
        accept = validate_upgrade(method, headers, check_origin=check_origin)
    except HandshakeRefused as e:
        try:
            sock.sendall(refusal_response(e))
        except OSError:
            pass
        raise
    sock.sendall(response_101(accept))
    return WebSocket(sock, initial=extra, max_frame=max_frame, max_message=max_message), target, headers


def client_handshake(sock: socket.socket, host: str, path: str = "/", *, origin: Optional[str] = None,
                     timeout: float = limits.WS_HEADER_TIMEOUT, **kw) -> "WebSocket":
    """The client side (tests, tools): send the upgrade, check the 101 and the accept key."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    deadline = time.monotonic() + timeout
    buf = b""
    old = sock.gettimeout()
    try:
        while b"\r\n\r\n" not in buf:
            if len(buf) > limits.WS_HEADER_MAX or time.monotonic() > deadline:
                raise ProtocolError("websocket: bad handshake response")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                raise ProtocolError("websocket: connection closed during the handshake")
            buf += chunk
    finally:
        sock.settimeout(old)
    head, _, extra = buf.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status.split(" ")
    if len(fields) < 2 or fields[1] != "101":
        code = int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else 0
        raise HandshakeRefused(code, f"websocket: handshake refused: {status}")
    headers = parse_headers(io.BytesIO(head.partition(b"\r\n")[2] + b"\r\n\r\n"))
    if (headers.get("Sec-WebSocket-Accept") or "").strip() != accept_key(key):
        raise ProtocolError("websocket: bad Sec-WebSocket-Accept")
    return WebSocket(sock, client=True, initial=extra, **kw)


# ---------------------------------------------------------------- frames

def mask(key: bytes, data: bytes) -> bytes:
    """XOR `data` with the 4-byte masking key (its own inverse).

    One big-integer XOR over the whole payload: C speed, no per-byte Python loop.
    """
    n = len(data)
    if n == 0:
        return b""
    k = (key * ((n + 3) // 4))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False,
                 mask_key: Optional[bytes] = None) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if masked:
        key = mask_key if mask_key is not None else os.urandom(4)
        return head + key + mask(key, payload)
    return head + payload


_VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


def _close_code_ok(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


class WebSocket:
    """One WebSocket connection over a connected stream socket.

    `client=False` (the server side) requires masked frames from the peer and sends unmasked;
    `client=True` the reverse. `recv()` answers pings and close frames itself and returns data
    messages only. `reader`, when given, replaces `sock.recv` for reading (an http.server
    handler passes its buffered `rfile.read1` so no byte already buffered is lost).
    """

    def __init__(self, sock: socket.socket, *, client: bool = False, initial: bytes = b"",
                 reader: Optional[Callable[[int], bytes]] = None,
                 max_frame: int = limits.WS_MAX_FRAME, max_message: int = limits.WS_MAX_MESSAGE):
        self.sock = sock
        self.client = client
        self.max_frame = max_frame
        self.max_message = max_message
        self._read = reader or sock.recv
        self._buf = bytearray(initial)
        self._send_lock = threading.Lock()
        self.close_sent = False
        self.close_received: Optional[Tuple[int, str]] = None
        self.last_pong = time.monotonic()
        self.on_pong: Optional[Callable[[bytes], None]] = None

    # -- reading
    def _fill(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = self._read(max(65536, n - len(self._buf)))
            except OSError:
                chunk = b""
            if not chunk:
                raise ConnectionClosed(CLOSE_ABNORMAL, "connection lost")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _fail(self, code: int, msg: str) -> WebSocketError:
        try:
            self.close(code, msg[:120])
        except OSError:
            pass
        return WebSocketError(code, "websocket: " + msg)

    def _read_frame(self) -> Tuple[bool, int, bytes]:
        b0, b1 = self._fill(2)
        fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        if rsv:
            raise self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension negotiated)")
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise self._fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if masked == self.client:
            raise self._fail(CLOSE_PROTOCOL_ERROR,
                             "masked frame from the server" if self.client else "unmasked frame from the client")
        if opcode in _CONTROL_OPS and (not fin or n > 125):
            raise self._fail(CLOSE_PROTOCOL_ERROR, "fragmented or oversized control frame")
        if n == 126:
            (n,) = struct.unpack("!H", self._fill(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._fill(8))
            if n >> 63:
                raise self._fail(CLOSE_PROTOCOL_ERROR, "frame length has the top bit set")
        if n > self.max_frame:
            raise self._fail(CLOSE_TOO_BIG, f"frame of {n} bytes exceeds {self.max_frame}")
        key = self._fill(4) if masked else b""
        payload = self._fill(n) if n else b""
        if masked:
            payload = mask(key, payload)
        return fin, opcode, payload

    def recv(self) -> Tuple[int, bytes]:
        """The next data message: (OP_TEXT, utf-8 bytes) or (OP_BINARY, bytes).

        Raises `ConnectionClosed` once the peer closed (after answering its close frame) or the
        stream ended, `WebSocketError` on a protocol violation (after sending our close).
        """
        if self.close_received is not None:
            raise ConnectionClosed(*self.close_received)
        msg_op: Optional[int] = None
        parts: list = []
        size = 0
        utf8 = None
        while True:
            fin, op, payload = self._read_frame()
            if op == OP_PING:
                self._send(OP_PONG, payload)
                continue
            if op == OP_PONG:
                self.last_pong = time.monotonic()
                if self.on_pong is not None:
                    self.on_pong(payload)
                continue
            if op == OP_CLOSE:
                raise self._on_close(payload)
            if op == OP_CONT:
                if msg_op is None:
                    raise self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
            else:
                if msg_op is not None:
                    raise self._fail(CLOSE_PROTOCOL_ERROR, "new message before the last one finished")
                msg_op = op
                if op == OP_TEXT:
                    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
            size += len(payload)
            if size > self.max_message:
                raise self._fail(CLOSE_TOO_BIG, f"message exceeds {self.max_message} bytes")
            if utf8 is not None:
                try:
                    # fail fast on a bad fragment; a code point may straddle fragments
                    utf8.decode(payload, final=fin)
                except UnicodeDecodeError:
                    raise self._fail(CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None
            parts.append(payload)
            if fin:
                return msg_op, b"".join(parts)

    def _on_close(self, payload: bytes) -> Exception:
        if len(payload) == 1:
            return self._fail(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code, reason = CLOSE_NO_STATUS, ""
        if len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            if not _close_code_ok(code):
                return self._fail(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(CLOSE_INVALID_DATA, "close reason is not valid UTF-8")
        self.close_received = (code, reason)
        if not self.close_sent:
            try:
                # echo the status code, as RFC 6455 §5.5.1 suggests
                self.close(code if code != CLOSE_NO_STATUS else None)
            except OSError:
                pass
        return ConnectionClosed(code, reason)

    # -- writing
    def _send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        frame = encode_frame(opcode, payload, fin=fin, masked=self.client)
        with self._send_lock:
            if self.close_sent:
                raise ConnectionClosed(CLOSE_ABNORMAL, "close already sent")
            if opcode == OP_CLOSE:
                self.close_sent = True
            self.sock.sendall(frame)

    def send_text(self, text: str) -> None:
        self._send(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        self._send(OP_BINARY, bytes(data))

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """A raw frame (fragments, tests); a close must go through close()."""
        if opcode == OP_CLOSE:
            raise ValueError("use close()")
        self._send(opcode, payload, fin)

    def ping(self, data: bytes = b"") -> None:
        self._send(OP_PING, data[:125])

    def pong(self, data: bytes = b"") -> None:
        self._send(OP_PONG, data[:125])

    def close(self, code: Optional[int] = CLOSE_NORMAL, reason: str = "") -> None:
        """Send our close frame once (later calls do nothing); the socket stays open so the
        reader can still receive the peer's close. `shutdown()` ends the stream."""
        if self.close_sent:
            return
        payload = b""
        if code is not None:
            payload = struct.pack("!H", code) + reason.encode("utf-8")[:123]
        try:
            self._send(OP_CLOSE, payload)
        except ConnectionClosed:
            pass

    def wait_closed(self, timeout: float = limits.WS_CLOSE_TIMEOUT) -> None:
        """After close(): read (discarding data) until the peer's close arrives or `timeout`."""
        deadline = time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            while self.close_received is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.sock.settimeout(left)
                try:
                    self.recv()
                except (ConnectionClosed, WebSocketError, OSError):
                    return
        finally:
            try:
                self.sock.settimeout(old)
            except OSError:
                pass

    def shutdown(self) -> None:
        """End the stream both ways (wakes a thread blocked in recv) and close the socket."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
