"""Client of the pty-stream subsystem (services/ptystream.py): an interactive session to a
skypty host with one message per keystroke and one per output chunk.

`PtyStreamClient` offers what terminal.run_interactive uses of a PtyClient (start, read_then,
set_size, ping, close) with the same meanings, so the terminal loop is one for both protocols,
and one difference it asks for by name: output is read by the terminal loop itself
(`output_fd`, `output_waiting`, `deliver`), no reader thread. deliver() hands each output
frame to the read_then callback, which re-arms by calling read_then again (as it issues the
next Read over rpc); a callback that does not stops the delivery. Input is acknowledged once
it is sent (nothing comes back for it, unlike pty.Write); a write that could block goes out on
a sender thread, so the loop never stops reading output while the host cannot take input.
"""
from __future__ import annotations

import select
import threading
import time
from typing import Any, Callable, Optional, Sequence, Tuple

from .errors import ProtocolError, SkyptyError
from .netutil import close_conn, reset_on_close
from .services.ptystream import (MAX_PAYLOAD, T_DATA, T_ENDED, T_FAILED, T_PING, T_SIZE, T_START, T_STARTED,
                                 FrameReader, frame, start_payload, winsize_payload)

__all__ = ["PtyStreamClient"]


def _no_reader(data: bytes, err: Optional[BaseException]) -> None:
    raise RuntimeError("PtyStreamClient.deliver() before read_then()")


_INLINE_WRITE = 1024   # bytes: a keystroke, a short burst; bigger input goes out on the sender thread
START_TIMEOUT = 30.0   # fork+exec of the remote shell on a slow box; the host answers at once otherwise


class PtyStreamClient:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        small = getattr(conn, "prefer_small_reads", None)
        if small is not None:
            small()
        self._rd = FrameReader(conn)
        # output_waiting() -> bool: output already read off the socket, which poll() cannot
        # see: call deliver() now. Asked after every deliver(): the reader's own method
        self.output_waiting: Callable[[], bool] = self._rd.waiting
        self._fn: Callable[[bytes, Optional[BaseException]], Any] = _no_reader
        self._armed = False
        self._closed = False
        self._sender: Optional[threading.Thread] = None
        self._jobs: Any = None

    def start(self, name: str, args: Sequence[str] = (), size: Optional[Tuple[int, int]] = None,
              env: Optional[Sequence[str]] = None) -> None:
        self.conn.sendall(frame(T_START, start_payload(name, args, env, size)))
        try:
            got = self._rd.next(time.monotonic() + START_TIMEOUT)
        except OSError as e:
            raise SkyptyError(f"pty-stream: no answer to Start: {e.strerror or e}") from None
        self.conn.settimeout(None)   # then the session may idle for hours
        if got is None:
            raise SkyptyError("pty-stream: the host closed the connection before the session started")
        tag, payload = got
        if tag == T_FAILED:
            raise SkyptyError(payload.decode("utf-8", "replace") or "pty-stream: Start failed")
        if tag != T_STARTED:
            raise ProtocolError(f"pty-stream: unexpected frame {tag:#04x} in answer to Start")

    def read_then(self, fn: Callable[[bytes, Optional[BaseException]], Any], n: int = 0) -> None:
        """fn(output, None) for the next output, fn(b"", EOFError(text)) once the remote program
        ended, fn(b"", err) if the link broke; it runs inside deliver(). n is ignored (the host
        sends what it has)."""
        self._fn = fn
        self._armed = True

    # Output is read on the caller's thread, from its poll() loop, not on a reader thread of
    # our own: a keystroke's echo then costs no GIL hand-off between two threads of ours.
    def output_fd(self) -> int:
        """The fd to poll for readability beside the terminal."""
        return self.conn.fileno()

    def deliver(self) -> bool:
        """One read (poll() said there is something), then every whole frame to the read_then
        callback. False once the output ended (the callback was told why) or the callback did
        not re-arm; a frame cut by the read waits for the next call."""
        rd = self._rd
        try:
            if not rd.more():
                self._fn(b"", ConnectionError("the host closed the connection"))
                return False
            while True:
                got = rd.pop()
                if got is None:
                    return True
                tag, payload = got
                if tag == T_DATA:
                    if payload:
                        self._armed = False
                        self._fn(payload, None)
                        if not self._armed:
                            return False   # the caller stopped reading (stdout gone, or done)
                elif tag == T_ENDED:
                    self._fn(b"", EOFError(payload.decode("utf-8", "replace") or "EOF"))
                    return False
                else:
                    raise ProtocolError(f"pty-stream: unexpected frame {tag:#04x}")
        except Exception as e:   # the caller must hear of every end
            self._fn(b"", e)
            return False

    def write(self, data: bytes) -> int:
        """Send input to the remote pty (in frames of at most MAX_PAYLOAD); blocks while the
        connection's buffers are full."""
        if len(data) <= MAX_PAYLOAD:
            self.conn.sendall(frame(T_DATA, data))
        else:
            view = memoryview(data)
            for off in range(0, len(view), MAX_PAYLOAD):
                self.conn.sendall(frame(T_DATA, bytes(view[off:off + MAX_PAYLOAD])))
        return len(data)

    def write_then(self, data: bytes, fn: Callable[[Optional[BaseException]], Any]) -> None:
        """write(), then fn(None) or fn(err), as PtyClient.write_then (terminal._Writer keeps
        one in flight). A keystroke is sent right here; a bigger write (a paste) goes out on a
        sender thread, since the socket may then block until the host takes it, and meanwhile
        the caller's loop must go on reading our output: a remote program that does not read
        its input but writes output would otherwise stop both sides."""
        # after a paste the socket may still be full: then even a keystroke could block here
        if len(data) <= _INLINE_WRITE and (self._sender is None or self._writable()):
            self.write(data)
            fn(None)
            return
        if self._sender is None:
            import queue   # a session that never pastes does without

            self._jobs = queue.SimpleQueue()
            self._sender = threading.Thread(target=self._send_loop, daemon=True, name="pty-stream-send")
            self._sender.start()
        self._jobs.put((data, fn))

    def _writable(self) -> bool:
        return bool(select.select([], [self.conn.fileno()], [], 0)[1])

    def _send_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            data, fn = job
            try:
                self.write(data)
            except Exception as e:   # the writer reports it; the reader sees the link end
                fn(e)
            else:
                fn(None)

    def set_size(self, rows: int, cols: int, x: int = 0, y: int = 0) -> None:
        self.conn.sendall(frame(T_SIZE, winsize_payload(rows, cols, x, y)))

    def ping(self, timeout: Optional[float] = None) -> None:
        self.conn.sendall(frame(T_PING))

    def close(self) -> None:
        """Hang up: the host stops the pty when the connection ends. With a reset, not a FIN: a
        FIN waits behind input still queued for a host that holds input back (a paste to a
        program that does not read it), and the host would not see the hang-up until the
        kernel gave up on that input, a minute or more later."""
        if not self._closed:
            self._closed = True
            reset_on_close(getattr(self.conn, "stream", self.conn))
            close_conn(self.conn)   # a sender blocked in sendall fails now
            if self._sender is not None:
                self._jobs.put(None)
                if self._sender is not threading.current_thread():
                    self._sender.join(2.0)   # its callback must not outlive the caller's session

    def __enter__(self) -> "PtyStreamClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

