"""The interactive loop of `cli pty shell` / `cli pty start`: our terminal <-> a remote pty.

Threads: the main thread reads stdin (raw mode when it is a tty) and sends `Write`s; one reader
thread keeps exactly one `Read` outstanding (more would reorder output) and writes to stdout;
one pinger sends `Ping` every 30 s (keeps a dmsg stream's idle deadline away). Signal handlers
only poke a self-pipe, so no RPC is ever issued from inside a handler.

Unlike upstream we send the window size with `Start`, so the remote pty has the right size
before the user's first resize. `~.` after a newline (or at the start) disconnects; `~~` sends
one `~`.
"""
from __future__ import annotations

import errno
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
    view = memoryview(data)
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


def run_interactive(client, name: str, args: Sequence[str] = (), env: Optional[Sequence[str]] = None,
                    stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Run `name args` in a remote pty wired to our terminal. 0 when the remote program ended
    (or `~.`); raises SkyptyError (exit 1) when the connection broke."""
    is_tty = os.isatty(stdin_fd)
    size = terminal_size((stdin_fd, stdout_fd))
    client.start(name, list(args), size=size, env=list(env) if env is not None else interactive_env())

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    done = threading.Event()
    outcome = {"code": None, "error": None}

    def poke(tag: bytes) -> None:
        try:
            os.write(wake_w, tag)
        except OSError:
            pass   # pipe full: a wake-up is already pending

    def reader() -> None:
        try:
            while not done.is_set():
                data = client.read(limits.CLIENT_READ_SIZE)
                if data:
                    _write_fd(stdout_fd, data)
        except EOFError:
            if outcome["code"] is None and not done.is_set():   # not the echo of our own Stop
                outcome["code"] = 0
        except Exception as e:  # the link broke (or stdout went away)
            if not done.is_set():
                outcome["error"] = _describe(e)
        poke(b"E")

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

    rt = threading.Thread(target=reader, name="pty-read", daemon=True)
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
        rt.start()
        pt.start()
        if not _pump_stdin(client, stdin_fd, wake_r, size, outcome):
            # The input side gave up (a Write failed): the reader knows whether the remote
            # program ended (exit 0) or the link broke, so let it have the last word.
            rt.join(5.0)
    except _SignalExit:
        outcome["code"] = outcome["code"] if outcome["code"] is not None else 1
    finally:
        done.set()
        for s in old_handlers:   # a second signal must not cut the terminal restore short
            if s != signal.SIGWINCH:
                signal.signal(s, _ignore)
        if saved_attrs is not None:
            import termios

            termios.tcsetattr(stdin_fd, termios.TCSAFLUSH, saved_attrs)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        client.close()   # unblocks the outstanding Read
        rt.join(2.0)
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


def _pump_stdin(client, stdin_fd: int, wake_fd: int, size, outcome: dict) -> bool:
    """Forward input until the reader finished or `~.` (True), or a call failed (False)."""
    esc = EscapeFilter()
    stdin_open = True
    while True:
        fds = [wake_fd, stdin_fd] if stdin_open else [wake_fd]
        try:
            ready, _, _ = select.select(fds, [], [])
        except InterruptedError:
            continue
        if wake_fd in ready:
            tags = os.read(wake_fd, 64)
            if b"E" in tags:
                return True
            if b"W" in tags:
                new = terminal_size((stdin_fd, 1))
                if new and new != size:
                    size = new
                    if not _guard(client.set_size, new[0], new[1], outcome=outcome):
                        return False
        if stdin_open and stdin_fd in ready:
            try:
                data = os.read(stdin_fd, limits.CLIENT_READ_SIZE)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                data = b""
            if not data:
                # Not a terminal and our input ended: send ^D, the remote line discipline's EOF.
                stdin_open = False
                if not _guard(client.write, b"\x04", outcome=outcome):
                    return False
                continue
            send, disconnect = esc.feed(data)
            if send and not _guard(client.write, send, outcome=outcome):
                return False
            if disconnect:
                _write_fd(1, b"\r\n[disconnected]\r\n")
                outcome["code"] = 0
                return True


def _guard(fn, *args, outcome: dict) -> bool:
    """Call an RPC from the input side; on failure remember why and tell the loop to stop."""
    try:
        fn(*args)
        return True
    except Exception as e:
        outcome["write_error"] = _describe(e)
        return False
