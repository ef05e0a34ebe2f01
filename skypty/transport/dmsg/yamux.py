"""hashicorp/yamux v0.1.2 wire protocol on a plain byte stream (crypto-dmsg.md §5.2).

One `Session` per TCP connection: a reader thread parses frames into per-stream buffers; a
control thread sends what the reader must answer (ping ACKs, resets) plus keepalive pings, so
the reader never blocks on a write. Application threads write data frames themselves under
the one write lock. Flow control is yamux's: a stream may have at most YAMUX_WINDOW bytes in
flight; the receiver credits the window back once half of it was consumed, and a peer that
overruns the window is a session error (GoAway protocol error, connection closed).

`Stream` is socket-like (sendall/recv/close/shutdown/settimeout) so noise.SecureConn can
wrap it.
"""
from __future__ import annotations

import collections
import logging
import socket
import struct
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from skypty import limits
from skypty.errors import ProtocolError

__all__ = [
    "Session", "Stream", "YamuxError", "SessionClosedError", "StreamResetError",
    "encode_header", "decode_header", "HEADER_LEN",
    "TYPE_DATA", "TYPE_WINDOW_UPDATE", "TYPE_PING", "TYPE_GOAWAY",
    "FLAG_SYN", "FLAG_ACK", "FLAG_FIN", "FLAG_RST",
    "GOAWAY_NORMAL", "GOAWAY_PROTOCOL", "GOAWAY_INTERNAL",
]

log = logging.getLogger("skypty.yamux")

HEADER_LEN = 12
_HDR = struct.Struct(">BBHII")
VERSION = 0
TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GOAWAY = 0, 1, 2, 3
FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST = 1, 2, 4, 8
GOAWAY_NORMAL, GOAWAY_PROTOCOL, GOAWAY_INTERNAL = 0, 1, 2
_MAX_WINDOW_CREDIT = 1 << 31           # a peer may not grow our send window past this


class YamuxError(ProtocolError):
    """The yamux session broke (peer protocol error, dead peer, closed session)."""


class SessionClosedError(YamuxError, ConnectionError):
    pass


class StreamResetError(ConnectionResetError):
    pass


def encode_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return _HDR.pack(VERSION, ftype, flags, stream_id, length)


def decode_header(b: bytes) -> Tuple[int, int, int, int, int]:
    """(version, type, flags, stream_id, length)."""
    return _HDR.unpack(b)


class _Reader:
    """Exact reads from a socket through a buffer (few syscalls for many small frames)."""

    def __init__(self, sock: socket.socket, closed: Callable[[], bool]) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._closed = closed

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buf)))
            except socket.timeout:
                # the socket timeout exists for writes; an idle peer is keepalive's business
                if self._closed():
                    raise EOFError("session closed")
                continue
            if not chunk:
                raise EOFError("connection closed by peer")
            self._buf += chunk
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return out


class Stream:
    """One yamux stream. Socket-like; thread-safe for one reader plus concurrent writers."""

    def __init__(self, session: "Session", stream_id: int) -> None:
        self._s = session
        self.stream_id = stream_id
        self._cond = threading.Condition()
        self._chunks: Deque[bytes] = collections.deque()
        self._buffered = 0
        self._recv_window = limits.YAMUX_WINDOW   # what the peer may still send us
        self._consumed = 0                         # read by the app, not yet credited back
        self._send_window = limits.YAMUX_WINDOW
        self._remote_fin = False
        self._local_fin = False
        self._discard = False                      # app closed its read side
        self._reset = False
        self._acked = False
        self._timeout: Optional[float] = None
        self._send_lock = threading.Lock()
        self.opened_at = time.monotonic()
        self.fin_at: Optional[float] = None

    # ---- socket-like API
    def settimeout(self, t: Optional[float]) -> None:
        self._timeout = t

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def fileno(self) -> int:   # pragma: no cover - select() is not supported on streams
        raise OSError("yamux streams have no file descriptor")

    def _deadline(self) -> Optional[float]:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _wait(self, deadline: Optional[float]) -> None:
        if deadline is None:
            self._cond.wait(1.0)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self._cond.wait(min(left, 1.0))

    def recv(self, n: int) -> bytes:
        if n <= 0:
            return b""
        deadline = self._deadline()
        credit = 0
        with self._cond:
            while not self._chunks:
                if self._reset:
                    raise StreamResetError("stream reset by peer")
                if self._remote_fin or self._discard:
                    return b""
                if self._s.closed:
                    if self._s.error:
                        raise SessionClosedError(f"dmsg session closed: {self._s.error}")
                    return b""
                self._wait(deadline)
            first = self._chunks.popleft()
            if len(first) > n:
                self._chunks.appendleft(first[n:])
                first = first[:n]
            self._buffered -= len(first)
            self._consumed += len(first)
            if self._consumed >= limits.YAMUX_WINDOW // 2 and not self._remote_fin:
                credit = self._consumed
                self._consumed = 0
                self._recv_window += credit
        if credit:
            self._s._send_frame(TYPE_WINDOW_UPDATE, 0, self.stream_id, credit, None, best_effort=True)
        return first

    def recv_exact(self, n: int) -> bytes:
        parts: List[bytes] = []
        got = 0
        while got < n:
            b = self.recv(n - got)
            if not b:
                raise EOFError("stream closed")
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def sendall(self, data: bytes) -> None:
        view = memoryview(bytes(data) if not isinstance(data, (bytes, bytearray)) else data)
        deadline = self._deadline()
        with self._send_lock:
            while len(view):
                with self._cond:
                    while True:
                        if self._reset:
                            raise StreamResetError("stream reset by peer")
                        if self._local_fin:
                            raise BrokenPipeError("stream closed for writing")
                        if self._s.closed:
                            raise SessionClosedError(f"dmsg session closed: {self._s.error or 'closed'}")
                        if self._send_window > 0:
                            break
                        self._wait(deadline)
                    n = min(len(view), self._send_window, limits.YAMUX_MAX_FRAME)
                    self._send_window -= n
                self._s._send_frame(TYPE_DATA, 0, self.stream_id, n, view[:n])
                view = view[n:]

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            with self._cond:
                self._discard = True
                self._chunks.clear()
                self._buffered = 0
                self._cond.notify_all()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._send_fin()

    def shutdown_write(self) -> None:
        self._send_fin()

    def _send_fin(self) -> None:
        with self._cond:
            if self._local_fin or self._reset:
                return
            self._local_fin = True
            done = self._remote_fin
        self._s._send_frame(TYPE_WINDOW_UPDATE, FLAG_FIN, self.stream_id, 0, None, best_effort=True)
        if done:
            self._s._forget(self.stream_id)

    def close(self) -> None:
        """FIN our side and stop reading; data the peer still sends is refused with RST."""
        self.shutdown(socket.SHUT_RDWR)
        with self._cond:
            self.fin_at = self.fin_at or time.monotonic()

    def reset(self) -> None:
        with self._cond:
            if self._reset:
                return
            self._reset = True
            self._cond.notify_all()
        self._s._send_frame(TYPE_WINDOW_UPDATE, FLAG_RST, self.stream_id, 0, None, best_effort=True)
        self._s._forget(self.stream_id)

    @property
    def session(self) -> "Session":
        return self._s

    # ---- called by the session reader (never blocks on the network)
    def _on_data(self, payload: bytes) -> bool:
        """Queue payload; False if the stream was closed by the app (caller sends RST)."""
        with self._cond:
            if self._discard or self._reset:
                return False
            self._recv_window -= len(payload)
            if payload:
                self._chunks.append(payload)
                self._buffered += len(payload)
            self._cond.notify_all()
            return True

    def _on_flags(self, flags: int) -> bool:
        """Apply ACK/FIN/RST; True when the stream is finished both ways."""
        with self._cond:
            if flags & FLAG_ACK:
                self._acked = True
            if flags & FLAG_FIN:
                self._remote_fin = True
                self.fin_at = self.fin_at or time.monotonic()
            if flags & FLAG_RST:
                self._reset = True
            self._cond.notify_all()
            return self._reset or (self._remote_fin and self._local_fin)

    def _on_window(self, delta: int) -> None:
        with self._cond:
            self._send_window = min(self._send_window + delta, _MAX_WINDOW_CREDIT)
            self._cond.notify_all()

    def _on_session_closed(self) -> None:
        with self._cond:
            self._cond.notify_all()


class Session:
    """A yamux session over `sock` (already connected; client=True opens odd stream ids)."""

    def __init__(self, sock: socket.socket, client: bool, *, name: str = "",
                 keepalive: Optional[float] = limits.YAMUX_KEEPALIVE,
                 write_timeout: float = limits.YAMUX_WRITE_TIMEOUT,
                 open_timeout: float = limits.YAMUX_OPEN_TIMEOUT,
                 accept_backlog: int = limits.YAMUX_ACCEPT_BACKLOG,
                 max_streams: int = limits.YAMUX_MAX_STREAMS) -> None:
        self._sock = sock
        self.client = client
        self.name = name or ("client" if client else "server")
        self._keepalive = keepalive
        self._write_timeout = write_timeout
        self._open_timeout = open_timeout
        self._backlog = accept_backlog
        self._max_streams = max_streams
        self._next_id = 1 if client else 2
        self._streams: Dict[int, Stream] = {}
        self._lock = threading.Lock()              # stream table, accept queue, ping table
        self._write_lock = threading.Lock()
        self._accept: Deque[Stream] = collections.deque()
        self._accept_cond = threading.Condition(self._lock)
        self._ctl: Deque[bytes] = collections.deque()
        self._ctl_cond = threading.Condition()
        self._pings: Dict[int, threading.Event] = {}
        self._ping_id = 0
        self.closed = False
        self.error: Optional[str] = None
        self.remote_goaway = False
        self._closed_event = threading.Event()
        self._on_close: List[Callable[["Session"], None]] = []
        sock.settimeout(write_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._reader = _Reader(sock, lambda: self.closed)
        self._t_read = threading.Thread(target=self._read_loop, name=f"yamux-read-{self.name}", daemon=True)
        self._t_ctl = threading.Thread(target=self._ctl_loop, name=f"yamux-ctl-{self.name}", daemon=True)
        self._t_read.start()
        self._t_ctl.start()

    # ---- public API
    def open_stream(self) -> Stream:
        with self._lock:
            if self.closed:
                raise SessionClosedError(f"dmsg session closed: {self.error or 'closed'}")
            if self.remote_goaway:
                raise SessionClosedError("remote end is not accepting streams (GoAway)")
            if len(self._streams) >= self._max_streams:
                raise YamuxError(f"too many streams on the session ({self._max_streams})")
            sid = self._next_id
            if sid > 0xFFFFFFFF - 2:
                raise YamuxError("stream ids exhausted")
            self._next_id += 2
            st = Stream(self, sid)
            self._streams[sid] = st
        self._send_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0, None)
        return st

    def accept_stream(self, timeout: Optional[float] = None) -> Stream:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._accept_cond:
            while not self._accept:
                if self.closed:
                    raise SessionClosedError(f"dmsg session closed: {self.error or 'closed'}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise socket.timeout("accept timed out")
                self._accept_cond.wait(min(left, 1.0) if left is not None else 1.0)
            st = self._accept.popleft()
        self._send_frame(TYPE_WINDOW_UPDATE, FLAG_ACK, st.stream_id, 0, None, best_effort=True)
        return st

    def ping(self, timeout: float = limits.YAMUX_WRITE_TIMEOUT) -> float:
        """Round-trip time of one yamux Ping, in seconds."""
        ev = threading.Event()
        with self._lock:
            self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
            pid = self._ping_id
            self._pings[pid] = ev
        t0 = time.monotonic()
        try:
            self._send_frame(TYPE_PING, FLAG_SYN, 0, pid, None)
            if not ev.wait(timeout) or self.closed:
                raise YamuxError("ping timed out" if not self.closed else "session closed")
            return time.monotonic() - t0
        finally:
            with self._lock:
                self._pings.pop(pid, None)

    def go_away(self, code: int = GOAWAY_NORMAL) -> None:
        self._send_frame(TYPE_GOAWAY, 0, 0, code, None, best_effort=True)

    def num_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def on_close(self, fn: Callable[["Session"], None]) -> None:
        run = False
        with self._lock:
            if self.closed:
                run = True
            else:
                self._on_close.append(fn)
        if run:
            fn(self)

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        return self._closed_event.wait(timeout)

    def close(self, error: Optional[str] = None) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.error = error
            streams = list(self._streams.values())
            callbacks = list(self._on_close)
            self._on_close.clear()
            self._accept_cond.notify_all()
            for ev in self._pings.values():
                ev.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        for st in streams:
            st._on_session_closed()
        with self._ctl_cond:
            self._ctl_cond.notify_all()
        self._closed_event.set()
        if error:
            log.debug("yamux %s closed: %s", self.name, error)
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # pragma: no cover - callbacks must not kill the closer
                log.exception("yamux on_close callback failed")

    # ---- internals
    def _send_frame(self, ftype: int, flags: int, sid: int, length: int, payload, best_effort: bool = False) -> None:
        hdr = encode_header(ftype, flags, sid, length)
        data = hdr if payload is None else b"".join((hdr, payload))
        with self._write_lock:
            if self.closed:
                if best_effort:
                    return
                raise SessionClosedError(f"dmsg session closed: {self.error or 'closed'}")
            try:
                self._sock.sendall(data)
            except (OSError, ValueError) as e:
                err = "write timed out" if isinstance(e, socket.timeout) else f"write failed: {e}"
                threading.Thread(target=self.close, args=(err,), daemon=True).start()
                if best_effort:
                    return
                raise SessionClosedError(f"dmsg session closed: {err}") from None

    def _queue_ctl(self, frame: bytes) -> None:
        with self._ctl_cond:
            if len(self._ctl) < 4096:     # a peer flooding pings gets its answers dropped
                self._ctl.append(frame)
            self._ctl_cond.notify()

    def _forget(self, sid: int) -> None:
        with self._lock:
            self._streams.pop(sid, None)

    def _ctl_loop(self) -> None:
        next_ping = time.monotonic() + self._keepalive if self._keepalive else None
        outstanding: Optional[Tuple[int, float]] = None
        while not self.closed:
            frames: List[bytes] = []
            with self._ctl_cond:
                if not self._ctl:
                    self._ctl_cond.wait(1.0)
                while self._ctl:
                    frames.append(self._ctl.popleft())
            if self.closed:
                return
            if frames:
                with self._write_lock:
                    if self.closed:
                        return
                    try:
                        self._sock.sendall(b"".join(frames))
                    except OSError as e:
                        threading.Thread(target=self.close, args=(f"write failed: {e}",), daemon=True).start()
                        return
            now = time.monotonic()
            if outstanding is not None:
                pid, sent = outstanding
                with self._lock:
                    ev = self._pings.get(pid)
                if ev is None or ev.is_set():
                    outstanding = None
                    with self._lock:
                        self._pings.pop(pid, None)
                elif now - sent > self._write_timeout:
                    self.close("keepalive failed: peer did not answer a ping")
                    return
            if next_ping is not None and now >= next_ping and outstanding is None:
                next_ping = now + self._keepalive
                ev = threading.Event()
                with self._lock:
                    self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
                    pid = self._ping_id
                    self._pings[pid] = ev
                outstanding = (pid, now)
                self._send_frame(TYPE_PING, FLAG_SYN, 0, pid, None, best_effort=True)
            self._reap(now)

    def _reap(self, now: float) -> None:
        """Enforce the open timeout (session error, as Go) and reap long half-closed streams."""
        expired_open = False
        stale: List[Stream] = []
        with self._lock:
            for st in self._streams.values():
                mine = (st.stream_id % 2 == 1) == self.client
                if mine and not st._acked and not st._reset and now - st.opened_at > self._open_timeout:
                    expired_open = True
                if st.fin_at is not None and now - st.fin_at > limits.YAMUX_CLOSE_TIMEOUT:
                    stale.append(st)
        if expired_open:
            self.close("stream open timed out (peer never acknowledged)")
            return
        for st in stale:
            st.reset()

    def _protocol_error(self, why: str) -> None:
        log.warning("yamux %s: protocol error: %s", self.name, why)
        try:
            with self._write_lock:
                self._sock.sendall(encode_header(TYPE_GOAWAY, 0, 0, GOAWAY_PROTOCOL))
        except OSError:
            pass
        self.close(f"protocol error: {why}")

    def _read_loop(self) -> None:
        try:
            while not self.closed:
                ver, ftype, flags, sid, length = decode_header(self._reader.read_exact(HEADER_LEN))
                if ver != VERSION:
                    return self._protocol_error(f"invalid version {ver}")
                if ftype == TYPE_DATA or ftype == TYPE_WINDOW_UPDATE:
                    if not self._handle_stream_frame(ftype, flags, sid, length):
                        return
                elif ftype == TYPE_PING:
                    if flags & FLAG_SYN:
                        self._queue_ctl(encode_header(TYPE_PING, FLAG_ACK, 0, length))
                    elif flags & FLAG_ACK:
                        with self._lock:
                            ev = self._pings.get(length)
                        if ev is not None:
                            ev.set()
                elif ftype == TYPE_GOAWAY:
                    self.remote_goaway = True
                    if length != GOAWAY_NORMAL:
                        # as yamux: an error GoAway ends the session
                        why = "protocol error" if length == GOAWAY_PROTOCOL else f"code {length}"
                        return self.close(f"peer sent GoAway ({why})")
                else:
                    return self._protocol_error(f"invalid frame type {ftype}")
        except EOFError as e:
            self.close(str(e))
        except OSError as e:
            self.close(f"read failed: {e}")
        except Exception as e:  # pragma: no cover - a bug must not leave the session half-alive
            log.exception("yamux %s reader crashed", self.name)
            self.close(f"internal error: {e}")

    def _handle_stream_frame(self, ftype: int, flags: int, sid: int, length: int) -> bool:
        st: Optional[Stream] = None
        if flags & FLAG_SYN:
            if sid == 0 or (sid % 2 == 1) == self.client:
                self._protocol_error(f"peer opened stream {sid} with our id parity")
                return False
            refuse = False
            with self._lock:
                if sid in self._streams:
                    dup = True
                else:
                    dup = False
                    if len(self._streams) >= self._max_streams or len(self._accept) >= self._backlog:
                        refuse = True
                    else:
                        st = Stream(self, sid)
                        self._streams[sid] = st
                        self._accept.append(st)
                        self._accept_cond.notify()
            if dup:
                self._protocol_error(f"duplicate stream id {sid}")
                return False
            if refuse:
                log.warning("yamux %s: backlog full, resetting stream %d", self.name, sid)
                self._queue_ctl(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
                if ftype == TYPE_DATA:
                    return self._discard(length)
                return True
        else:
            with self._lock:
                st = self._streams.get(sid)
        if st is None:
            # late frames for a stream we already forgot: drain (bounded by the window)
            return self._discard(length) if ftype == TYPE_DATA else True
        if ftype == TYPE_WINDOW_UPDATE:
            if length:
                st._on_window(length)
        else:
            if length > st._recv_window:
                self._protocol_error(f"stream {sid} exceeded its receive window ({length} > {st._recv_window})")
                return False
            payload = self._reader.read_exact(length) if length else b""
            if not st._on_data(payload):
                # the app closed this stream: tell the peer nobody reads it any more
                self._queue_ctl(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
                st._on_flags(FLAG_RST)
                self._forget(sid)
                return True
        if flags & (FLAG_ACK | FLAG_FIN | FLAG_RST):
            if st._on_flags(flags):
                self._forget(sid)
        return True

    def _discard(self, length: int) -> bool:
        if length > limits.YAMUX_WINDOW:
            self._protocol_error(f"data frame of {length} bytes exceeds any window")
            return False
        left = length
        while left:
            n = min(left, 65536)
            self._reader.read_exact(n)
            left -= n
        return True
