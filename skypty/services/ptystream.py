"""The pty-stream subsystem: an interactive pty as two byte streams, a skypty extension.

Go's `dmsgpty/pty` is net/rpc: every keystroke is a Write call and its reply, and output only
flows while the client keeps a Read call outstanding, so one echo costs four messages and a
gob round on each. Between two skypty peers an interactive session takes this route instead:
keystrokes and output flow as frames, one message each way per echo, as in an ssh channel.
A client tries it first and falls back to `dmsgpty/pty` on a host that answers the mux request
with 0x01 (a Go host, an older skypty). Upstream has nothing like it: the URI is ours.

After the mux accepted, both directions carry frames `[u8 tag][u32 BE length][payload]`
(services/frames.py, as exec-stream), payload at most PTY_READ_MAX bytes:

  client -> host   'S' Start, first and once: JSON {"Name", "Arg", "Env", "Size": {"Rows",
                       "Cols", "X", "Y"}} with pty.Start's meaning (the CommandReq fields)
                   'D' input for the pty        'W' window size, 4 x u16 BE rows cols x y
                   'P' keepalive (ignored)
  host -> client   'A' started                  'E' Start failed: the reason, then close
                   'D' output of the pty        'X' the program ended: what a Read would
                                                    have said ("EOF", "read /dev/ptmx: …"), then close

The host serves a session on the connection's own thread, one poll() over the socket and the
pty master for both directions (so it needs a TCP connection: over a dmsg stream, which cannot
be polled, Start fails and the client should use `dmsgpty/pty`). The pty and its lifetime are
PtyGateway's, exactly as for `dmsgpty/pty` (connection end = Stop). After 'X' the host
half-closes and drops what the client still sends.
"""
from __future__ import annotations

import _socket   # not socket: see netutil
import json
import select
import struct
import time
from typing import Any, Optional, Tuple

from skypty import limits
from skypty.errors import ProtocolError
from skypty.logs import get_logger
from skypty.netutil import close_after_drain, close_conn
from skypty.services.frames import FRAME_HEAD, encode_frame as frame, json_field, loads_strict

__all__ = ["PTY_STREAM_URI", "MAX_PAYLOAD", "FrameReader", "frame", "start_payload", "parse_start",
           "winsize_payload", "serve_pty_stream",
           "T_START", "T_DATA", "T_SIZE", "T_PING", "T_STARTED", "T_FAILED", "T_ENDED"]

PTY_STREAM_URI = "skypty/pty-stream"

T_START, T_DATA, T_SIZE, T_PING = b"S"[0], b"D"[0], b"W"[0], b"P"[0]
T_STARTED, T_FAILED, T_ENDED = b"A"[0], b"E"[0], b"X"[0]
MAX_PAYLOAD = limits.PTY_READ_MAX

_WINSIZE = struct.Struct(">HHHH")
# While input is held back no frame is read, so the client's FIN would go unseen (a program
# that never reads its input would then outlive the session): poll for it (Linux's POLLRDHUP;
# POLLHUP and POLLERR come unasked). Ending there is what a read of EOF does otherwise.
_HUNG_UP = getattr(select, "POLLRDHUP", 0)

log = get_logger("skypty.ptystream")   # the client imports this module: no `logging` until a record


def winsize_payload(rows: int, cols: int, x: int = 0, y: int = 0) -> bytes:
    clamp = lambda v: max(0, min(int(v), 0xFFFF))  # noqa: E731
    return _WINSIZE.pack(clamp(rows), clamp(cols), clamp(x), clamp(y))


class FrameReader:
    """Frames off a stream with recv(n), every size checked before it is trusted.

    next() -> (tag, payload), blocking until a whole frame is in; None at a clean EOF. For a
    select() loop: more() reads once unless a whole frame is buffered (False at EOF), pop()
    gives a whole buffered frame or None, waiting() says whether anything can be had without a
    read. ProtocolError for a frame over MAX_PAYLOAD or a stream cut inside a frame."""

    __slots__ = ("_conn", "_buf")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._buf = b""

    def pop(self) -> Optional[Tuple[int, bytes]]:
        buf = self._buf
        if len(buf) < 5:
            return None
        tag, n = FRAME_HEAD.unpack_from(buf)
        if n > MAX_PAYLOAD:
            raise ProtocolError(f"pty-stream: frame of {n} bytes (max {MAX_PAYLOAD})")
        end = 5 + n
        if len(buf) < end:
            return None
        self._buf = buf[end:]
        return tag, buf[5:end]

    def ready(self) -> bool:
        buf = self._buf
        return len(buf) >= 5 and len(buf) >= 5 + FRAME_HEAD.unpack_from(buf)[1]

    def waiting(self) -> bool:
        """Something to take without a socket read: a whole frame here, or bytes the stream
        itself already holds (SecureConn.pending()). select()/poll() cannot see either."""
        return bool(self._buf) and self.ready() or self._conn.pending() > 0

    def more(self) -> bool:
        return bool(self._buf) and self.ready() or self.fill()

    def fill(self) -> bool:
        """One read (False at EOF)."""
        chunk = self._conn.recv(MAX_PAYLOAD + 5)
        if not chunk:
            if self._buf:
                self._buf = b""
                raise ProtocolError("pty-stream: connection ended inside a frame")
            return False
        # a keystroke's frame comes whole: no copy then; a big one is put together once
        self._buf = self._buf + chunk if self._buf else chunk
        return True

    def next(self, deadline: Optional[float] = None) -> Optional[Tuple[int, bytes]]:
        """deadline (time.monotonic()): the whole frame must be in by then, or TimeoutError."""
        while True:
            got = self.pop()
            if got is not None:
                return got
            if deadline is not None:   # a total bound, not one per read: no trickling
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("pty-stream: timed out waiting for a frame")
                self._conn.settimeout(left)
                try:
                    more = self.fill()
                except _socket.timeout:   # not a TimeoutError before Python 3.10
                    raise TimeoutError("pty-stream: timed out waiting for a frame") from None
            else:
                more = self.fill()
            if not more:
                return None


def parse_start(payload: bytes) -> dict:
    """A Start payload as the CommandReq dict PtyGateway.start takes; ProtocolError if malformed."""
    try:
        obj = loads_strict(payload)
    except ValueError as e:
        raise ProtocolError(f"pty-stream: Start: bad json: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("pty-stream: Start: not a JSON object")
    try:
        name = json_field(obj, "Name", str, "a string", "")
        args = json_field(obj, "Arg", list, "a list of strings", [], items=str)
        env = json_field(obj, "Env", list, "a list of strings", [], items=str)
        size = json_field(obj, "Size", dict, "an object", None)
        if size is not None:
            size = {k: json_field(size, k, int, "an integer", 0) for k in ("Rows", "Cols", "X", "Y")}
    except ValueError as e:
        raise ProtocolError(f"pty-stream: Start: {e}") from None
    if size is not None and not all(0 <= v <= 0xFFFF for v in size.values()):
        raise ProtocolError("pty-stream: Start: Size out of range")
    return {"Name": name, "Arg": args, "Env": env, "Size": size}


def start_payload(name: str, args, env, size: Optional[Tuple[int, int]]) -> bytes:
    req = {"Name": name, "Arg": list(args or ()), "Env": list(env or ())}
    if size:
        req["Size"] = {"Rows": int(size[0]), "Cols": int(size[1]), "X": 0, "Y": 0}
    return json.dumps(req).encode("utf-8")


# ---------------------------------------------------------------------------------- host

def serve_pty_stream(conn: Any, query=None, peer=None) -> None:
    """mux raw handler: one pty for the connection, stopped when the connection ends."""
    from skypty.services.exec import describe_peer
    from skypty.services.pty import PtyError, open_gateway

    gw, ended = open_gateway(peer)
    small = getattr(conn, "prefer_small_reads", None)
    if small is not None:
        small()   # keystrokes: a cheap read each (see SecureConn._recv_chunk)
    try:
        rd = FrameReader(conn)
        try:   # Start comes right after the request
            first = rd.next(time.monotonic() + limits.MUX_REQUEST_TIMEOUT)
        except OSError as e:
            log.info("pty-stream: %s: no Start: %s", describe_peer(peer), e)
            return
        if first is None or first[0] != T_START:
            log.info("pty-stream: %s: the first frame is not a Start", describe_peer(peer))
            return
        conn.settimeout(None)   # a session idles for hours
        cfd = _fileno(conn)
        try:
            if cfd < 0:
                raise PtyError("pty-stream needs a TCP connection: use dmsgpty/pty")
            gw.start(parse_start(first[1]))
        except (PtyError, ProtocolError) as e:
            log.info("pty-stream: %s: Start failed: %s", describe_peer(peer), e)
            conn.sendall(frame(T_FAILED, str(e).encode("utf-8", "replace")))
            return
        conn.sendall(frame(T_STARTED))
        _serve(gw, conn, cfd, rd)
    except (ProtocolError, OSError) as e:
        log.info("pty-stream: %s: %s", describe_peer(peer), e)
    finally:
        ended()   # Stop, if the program still runs
        # what the client typed after the end is read and dropped: closing on unread
        # input would reset the connection, and the client could lose the 'X' frame
        close_after_drain(conn, limits.REJECT_DRAIN_MAX, limits.CLOSE_DRAIN_TIMEOUT)
        close_conn(conn)


def _fileno(conn) -> int:
    try:
        return conn.fileno()
    except (AttributeError, OSError, ValueError):   # a yamux stream (dmsg) cannot be polled
        return -1


def _serve(gw, conn, cfd: int, rd: FrameReader) -> None:
    """Both directions on the connection's own thread, as ssh serves a channel: a keystroke
    and its echo then never wait for a thread of ours to let go of the GIL. Input the pty
    cannot take yet waits in `pending`, and no frame is read meanwhile (the client's sends
    then block: back-pressure); output is read whenever there is some."""
    from skypty.services.pty import ERR_EOF, PtyError

    mfd, stop_fd, read, write, done = gw.open_master()
    pending = b""
    p = select.poll()
    p.register(stop_fd, select.POLLIN)
    p.register(cfd, select.POLLIN)
    p.register(mfd, select.POLLIN)
    poll, more, pop, waiting = p.poll, rd.more, rd.pop, rd.waiting
    # input already off the socket (poll() cannot see it) is looked for after each read:
    # only a read puts it there (the Start may have brought more)
    again = True
    try:
        while True:
            if again and not pending and waiting():
                events = [(cfd, select.POLLIN)]
            else:
                events = poll()
            again = False
            for fd, ev in events:
                if fd == cfd:
                    if pending:   # only _HUNG_UP is asked for now: the client is gone
                        return
                    if not more():
                        return   # the client hung up
                    while True:
                        got = pop()
                        if got is None:
                            break
                        if got[0] == T_DATA:
                            pending = got[1][write(got[1]):]
                            if pending:   # the pty is full: wait until it takes more
                                p.register(cfd, _HUNG_UP)   # register again: modifies
                                p.register(mfd, select.POLLIN | select.POLLOUT)
                                break
                        else:
                            _control(gw, *got)
                    again = True
                elif fd == mfd:
                    if ev & select.POLLOUT:
                        pending = pending[write(pending):]
                        if not pending:
                            p.register(cfd, select.POLLIN)
                            p.register(mfd, select.POLLIN)
                            again = True   # frames held back may be buffered
                    if ev & ~select.POLLOUT:
                        data = read(MAX_PAYLOAD)
                        if data:
                            conn.sendall(frame(T_DATA, data))
                else:
                    raise PtyError(ERR_EOF)   # Stop
    except PtyError as e:   # the program ended, or Stop: what a Read would have said
        conn.sendall(frame(T_ENDED, str(e).encode("utf-8", "replace")))
        conn.shutdown_write()
    finally:
        done()


def _control(gw, tag: int, payload: bytes) -> None:
    """A frame other than input: window size, keepalive; anything else ends the session."""
    if tag == T_SIZE:
        if len(payload) != _WINSIZE.size:
            raise ProtocolError(f"pty-stream: window size of {len(payload)} bytes")
        rows, cols, x, y = _WINSIZE.unpack(payload)
        gw.set_pty_size({"Rows": rows, "Cols": cols, "X": x, "Y": y})
    elif tag != T_PING:
        raise ProtocolError(f"pty-stream: unexpected frame {tag:#04x}")
