"""The interactive loop of `cli pty shell` / `cli pty start`: our terminal <-> a remote pty.

Threads: the main thread reads stdin (raw mode when it is a tty) and sends `Write`s; the rpc
client's reader thread keeps exactly one `Read` outstanding (more would reorder output) and
writes to stdout; one pinger sends `Ping` every 30 s (keeps a dmsg stream's idle deadline
away). Signal handlers only poke a self-pipe, so no RPC is ever issued from inside a handler.

Unlike upstream we send the window size with `Start`, so the remote pty has the right size
before the user's first resize. `~.` after a newline (or at the start) disconnects; `~~` sends
one `~`.
"""
from __future__ import annotations

import errno
import gc
import os
import select
import signal
import threading
from typing import List, Optional, Sequence, Tuple

from . import limits
from .errors import SkyptyError

__all__ = ["run_interactive", "interactive_env", "terminal_size", "EscapeFilter", "DISCONNECT"]

FORWARDED_ENV = ("TERM", "COLORTERM", "LANG", "LC_ALL")
DEFAULT_TERM = "xterm-256color"
DISCONNECT = object()


def interactive_env(environ=None) -> List[str]:
    """The variables an interactive session forwards (pty.md §3.3), TERM defaulted."""
    environ = os.environ if environ is None else environ
    env = [f"{k}={environ[k]}" for k in FORWARDED_ENV if environ.get(k)]
    if not environ.get("TERM"):
        env.insert(0, f"TERM={DEFAULT_TERM}")
    return env


def terminal_size(fds: Sequence[int] = (0, 1)) -> Optional[Tuple[int, int]]:
    """(rows, cols) of the first fd that is a terminal with a known size, else None."""
    for fd in fds:
        try:
            cols, rows = os.get_terminal_size(fd)
        except OSError:
            continue
        if rows > 0 and cols > 0:
            return rows, cols
    return None


class EscapeFilter:
    """ssh-style escapes on the input stream: `~.` disconnects, `~~` is one `~`.

    Recognised only at the start of a line (start of session, or after CR/LF was sent).
    `feed(data)` returns (bytes to send, disconnect?).
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self.pending = False   # saw '~' at a line start, waiting for the next byte

    def feed(self, data: bytes) -> Tuple[bytes, bool]:
        # the usual case (and a paste): no byte loop. find(), not `in`: `in` on bytes first
        # tries the operand as an int and formats the TypeError it then swallows
        if not self.pending and data.find(b"~") < 0:
            if data:
                self.at_line_start = data[-1] in (0x0D, 0x0A)
            return bytes(data), False
        out = bytearray()
        for b in data:
            if self.pending:
                self.pending = False
                if b == 0x2E:          # '.'
                    return bytes(out), True
                if b == 0x7E:          # '~~' -> one '~'
                    out.append(0x7E)
                    self.at_line_start = False
                    continue
                out.append(0x7E)       # not an escape: the '~' was meant literally
            if self.at_line_start and b == 0x7E:
                self.pending = True
                continue
            out.append(b)
            self.at_line_start = b in (0x0D, 0x0A)
        return bytes(out), False


def _write_fd(fd: int, data: bytes) -> None:
    try:
        n = os.write(fd, data)
    except (InterruptedError, BlockingIOError):
        n = 0
    if n == len(data):
        return   # the usual case (an echo, a line): no view, no loop
    view = memoryview(data)[n:]
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class _SignalExit(Exception):
    pass


class _Writer:
    """Our input to the remote pty with at most one Write in flight; what is typed meanwhile
    goes out as the next Write. Writes never overtake each other (a Go host runs calls
    concurrently) and what we have in flight stays bounded (see run_interactive)."""

    def __init__(self, client, on_error, on_room) -> None:
        self._client = client
        self._on_error = on_error
        self._on_room = on_room
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._busy = False
        self._want_room = False
        self.error: Optional[BaseException] = None

    def has_room(self) -> bool:
        """False while a full batch waits: stop reading input until on_room() is called."""
        if not self._buf:   # the usual case, without the lock: at worst on_room() is called once for nothing
            return True
        with self._lock:
            self._want_room = len(self._buf) >= limits.CLIENT_READ_SIZE
            return not self._want_room

    def send(self, data: bytes) -> bool:
        """Queue data; False once a Write failed (on_error was called)."""
        self._lock.acquire()   # per keystroke: not `with` (see noise._LOCKING)
        try:
            if self.error is not None:
                return False
            if self._busy or self._buf or len(data) > limits.CLIENT_READ_SIZE:
                self._buf += data
                if self._busy:
                    return True
                chunk = self._take()
            else:   # a keystroke with nothing waiting: straight out, no buffer copies
                self._busy = True
                chunk = data
        finally:
            self._lock.release()
        self._go(chunk)
        return self.error is None

    def _take(self) -> bytes:   # holds _lock
        chunk = bytes(self._buf[:limits.CLIENT_READ_SIZE])
        del self._buf[:len(chunk)]
        self._busy = True
        return chunk

    def _go(self, chunk: bytes) -> None:
        try:
            self._client.write_then(chunk, self._done)
        except Exception as e:
            self._fail(e)

    def _done(self, err: Optional[BaseException]) -> None:   # on the rpc reader thread
        if err is not None:
            self._fail(err)
            return
        self._lock.acquire()
        try:
            chunk = self._take() if self._buf else None   # leaves < one batch waiting
            self._busy = chunk is not None
            room, self._want_room = self._want_room, False
        finally:
            self._lock.release()
        if chunk is not None:
            self._go(chunk)
        if room:
            self._on_room()

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            first = self.error is None
            if first:
                self.error = err
            self._busy = False
        if first:
            self._on_error(err)


def run_interactive(client, name: str, args: Sequence[str] = (), env: Optional[Sequence[str]] = None,
                    stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Run `name args` in a remote pty wired to our terminal. 0 when the remote program ended
    (or `~.`); raises SkyptyError (exit 1) when the connection broke.

    The echo of a keystroke is the latency that matters, so nothing on its path changes
    thread. A pty-stream client (`output_fd`) is served by one poll() loop on the main
    thread, input and output alike, as ssh does. Over rpc the main thread sends the Write, and
    the Read reply is handled on the rpc reader thread itself, which writes the output to
    stdout and then issues the next Read. (A Write typed while that Read is being sent goes out
    right behind it, on the reader thread: see RPCClient.go.) That thread sends, so it must
    never wait on a peer that waits on us: it cannot, because we never have more in flight than
    one Write (<= CLIENT_READ_SIZE), one Read, one Ping and one SetPtySize, which the socket
    buffers always hold."""
    from .netutil import steady_allocator

    steady_allocator()   # output may come in bulk (`cat` of a big file): see netutil
    is_tty = os.isatty(stdin_fd)
    size = terminal_size((stdin_fd, stdout_fd))
    client.start(name, list(args), size=size, env=list(env) if env is not None else interactive_env())
    # All that is loaded by now lives until we exit: out of the collector's sight, a full
    # collection stops being a ~5 ms pause of whichever keystroke meets it (bench/). And the
    # collector runs when the session is idle (see _pump_stdin), not in the middle of a
    # keystroke's echo (with it off altogether, 87 -> 69 of 3000 echoes took over 1 ms).
    gc.freeze()
    # a client with output_fd (pty-stream) has its output read by _pump_stdin's loop, no reader thread
    out_fd = client.output_fd() if hasattr(client, "output_fd") else -1
    inline = out_fd >= 0
    gc_was_enabled = gc.isenabled()
    if inline:   # the loop sees all the traffic, so it can pick the moment (over rpc it cannot)
        gc.disable()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    done = threading.Event()
    reader_done = threading.Event()
    outcome = {"code": None, "error": None}

    def poke(tag: bytes) -> None:
        try:
            os.write(wake_w, tag)
        except OSError:
            pass   # pipe full: a wake-up is already pending

    def on_read(data: bytes, err: Optional[BaseException]) -> None:   # rpc reader thread
        if err is None:
            try:
                if data:   # before the next Read: sending it wakes the host, which costs us the CPU
                    _write_fd(stdout_fd, data)
                client.read_then(on_read)
                return
            except Exception as e:
                err = e
        if isinstance(err, EOFError):
            if outcome["code"] is None and not done.is_set():   # not the echo of our own Stop
                outcome["code"] = 0
        elif not done.is_set():   # the link broke (or stdout went away)
            outcome["error"] = _describe(err)
        reader_done.set()
        poke(b"E")

    def on_write_error(err: BaseException) -> None:
        outcome["write_error"] = _describe(err)
        poke(b"X")

    writer = _Writer(client, on_write_error, lambda: poke(b"R"))

    def pinger() -> None:
        while not done.wait(limits.PING_INTERVAL):
            try:
                client.ping(timeout=limits.PING_INTERVAL)
            except Exception:
                return   # the reader notices the broken link

    old_handlers = {}
    saved_attrs = None

    def on_winch(signum, frame) -> None:
        poke(b"W")

    def on_exit_signal(signum, frame) -> None:
        raise _SignalExit(signum)

    pt = threading.Thread(target=pinger, name="pty-ping", daemon=True)
    try:
        if threading.current_thread() is threading.main_thread():
            old_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, on_winch)
            for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                old_handlers[s] = signal.signal(s, on_exit_signal)
        if is_tty:
            import termios
            import tty

            saved_attrs = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd, termios.TCSANOW)
        try:
            client.read_then(on_read)
        except Exception as e:
            on_read(b"", e)
        pt.start()
        if not _pump_stdin(client, writer, stdin_fd, wake_r, out_fd, size, outcome):
            # The input side gave up (a Write failed): the reader knows whether the remote
            # program ended (exit 0) or the link broke, so let it have the last word.
            if inline:
                _drain_output(client, 5.0)
            else:
                reader_done.wait(5.0)
    except _SignalExit:
        outcome["code"] = outcome["code"] if outcome["code"] is not None else 1
    finally:
        if gc_was_enabled:
            gc.enable()
        done.set()
        for s in old_handlers:   # a second signal must not cut the terminal restore short
            if s != signal.SIGWINCH:
                signal.signal(s, _ignore)
        if saved_attrs is not None:
            import termios

            termios.tcsetattr(stdin_fd, termios.TCSAFLUSH, saved_attrs)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        client.close()   # fails the outstanding Read
        if not inline:
            reader_done.wait(2.0)
        os.close(wake_r)
        os.close(wake_w)
    if outcome["code"] is None:
        why = outcome["error"] or outcome.get("write_error")
        if why:
            raise SkyptyError(f"connection lost: {why}")
    return outcome["code"] or 0


def _ignore(signum, frame) -> None:
    pass


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


_IDLE_GC_AFTER_MS = 1000  # without input or output: the session is idle, collect then
_GC_YOUNG_MAX = 20000     # tracked objects allocated since the last collection, at most


def _pump_stdin(client, writer: _Writer, stdin_fd: int, wake_fd: int, out_fd: int, size, outcome: dict) -> bool:
    """Forward input until the reader finished or `~.` (True), or a call failed (False).
    A client that reads its output here (out_fd >= 0, its output_fd: pty-stream) is served by
    this loop too.
    One poll() object for the session, its fds changed only when what we wait for changes
    (select() builds three fd sets and three lists per call: a keystroke's echo pays it twice)."""
    esc = EscapeFilter()
    collected = out_fd < 0   # over rpc the collector keeps its own schedule
    p = select.poll()
    p.register(wake_fd, select.POLLIN)
    if out_fd >= 0:
        p.register(out_fd, select.POLLIN)
    output_waiting = client.output_waiting if out_fd >= 0 else None
    stdin_open = True
    reading = False   # stdin_fd registered
    turn = 0
    # Output already off the socket, which poll() cannot see: then poll() only looks at the
    # rest, without waiting (input must not starve behind a flood of output: a ^C must get
    # through). Only deliver() reads the socket, so this is asked after each deliver().
    waiting = False
    while True:
        if (stdin_open and writer.has_room()) != reading:
            reading = not reading
            if reading:
                p.register(stdin_fd, select.POLLIN)
            else:
                p.unregister(stdin_fd)
        try:
            events = p.poll(0 if waiting else None if collected else _IDLE_GC_AFTER_MS)
        except InterruptedError:
            continue
        if not events and not waiting:
            gc.collect()   # idle for a while: now it delays nobody
            collected = True
            continue
        got_out, got_wake, got_in = waiting, False, False
        for fd, _ in events:
            if fd == out_fd:
                got_out = True
            elif fd == wake_fd:
                got_wake = True
            else:
                got_in = True
        if out_fd >= 0:
            collected = False
            turn += 1
            # a flood never lets us idle: bound what waits (looked at every 64th turn: a call
            # that builds a tuple is a visible part of a keystroke's cost)
            if not turn & 63 and gc.get_count()[0] > _GC_YOUNG_MAX:
                gc.collect()
            if got_out:
                if client.deliver():
                    waiting = output_waiting()
                else:   # the end (or the broken link) was reported: the wake pipe says so next
                    p.unregister(out_fd)
                    out_fd = -1
                    waiting = False
        if got_wake:
            tags = os.read(wake_fd, 64)
            if b"E" in tags:
                return True
            if b"X" in tags:
                return False
            if b"W" in tags:
                new = terminal_size((stdin_fd, 1))
                if new and new != size:
                    size = new
                    if not _guard(client.set_size, new[0], new[1], outcome=outcome):
                        return False
            continue   # the input side may have room again: ask has_room() afresh
        if got_in:
            try:
                data = os.read(stdin_fd, limits.CLIENT_READ_SIZE)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                data = b""
            if not data:
                # Not a terminal and our input ended: send ^D, the remote line discipline's EOF.
                stdin_open = False
                if not writer.send(b"\x04"):
                    return False
                continue
            send, disconnect = esc.feed(data)
            if send and not writer.send(send):
                return False
            if disconnect:
                _write_fd(1, b"\r\n[disconnected]\r\n")
                outcome["code"] = 0
                return True


def _drain_output(client, timeout: float) -> None:
    """What an inline-reading client still has, until it ends, for at most timeout seconds."""
    import time

    fd = client.output_fd()
    deadline = time.monotonic() + timeout
    while True:
        if not client.output_waiting():
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return
        if not client.deliver():
            return


def _guard(fn, *args, outcome: dict) -> bool:
    """Call an RPC from the input side; on failure remember why and tell the loop to stop."""
    try:
        fn(*args)
        return True
    except Exception as e:
        outcome["write_error"] = _describe(e)
        return False
