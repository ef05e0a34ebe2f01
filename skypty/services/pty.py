"""The `pty` rpc service behind `dmsgpty/pty` (pty.md §2.3, §3.1): one pty per connection.

`PtyGateway` holds the state of one connection; `pty_service(peer)` wraps a fresh gateway as
net/rpc methods, and `pty_factory` is the `mux.add_rpc` factory (connection end = Stop).
Read blocks in poll() without any lock, so Write/SetPtySize/Ping/Exec run beside it.

The master is non-blocking. Write and Read run on the connection's own thread (`write_now`,
`read_now`): a Read with no output yet is parked as an rpc.Wait that the thread polls beside
the connection, so a keystroke and its echo cost no thread hand-off. A Write the pty cannot
take at once finishes on a worker, waiting in poll() beside the stop pipe, so Stop ends it.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import pty as _pty
import select
import signal
import struct
import termios
import threading
from typing import Callable, Dict, Optional, Tuple

from skypty import limits
from skypty.errors import SkyptyError
from skypty.rpc import AGAIN, Later, Wait
from skypty.services.exec import SpawnError, describe_peer, kill_session, merge_env, resolve_command, run_exec

__all__ = ["PTY_RPC_NAME", "PtyError", "PtyGateway", "pty_service", "pty_factory", "open_gateway", "stop_all"]

PTY_RPC_NAME = "pty"
log = logging.getLogger("skypty.pty")

ERR_RUNNING = "a pty session is already running"
ERR_NO_PTY = "no active pty session"
ERR_EIO = "read /dev/ptmx: input/output error"
ERR_EOF = "EOF"  # after an explicit Stop, like the persistent gateway (clients treat it as the end)

# forkpty's master is inheritable: fork under one lock and mark it close-on-exec before any
# other pty child of this process can be forked, so no shell holds another session's master.
_FORK_LOCK = threading.Lock()


class PtyError(SkyptyError):
    """An error whose text is the rpc `Error` string."""


def _winsize(ws: Optional[dict]) -> Optional[bytes]:
    if not ws:
        return None
    return struct.pack("HHHH", int(ws.get("Rows", 0)) & 0xFFFF, int(ws.get("Cols", 0)) & 0xFFFF,
                       int(ws.get("X", 0)) & 0xFFFF, int(ws.get("Y", 0)) & 0xFFFF)


class _PtyProc:
    """A child on a pty master. The fd is closed only when its last user leaves."""

    def __init__(self, pid: int, master: int):
        self.pid = pid
        self.master = master
        self.wake_r, self.wake_w = os.pipe()
        self.lock = threading.Lock()
        self.reap_lock = threading.Lock()
        self.users = 0
        self.closed = False
        self.reaped = False
        self.status: Optional[int] = None

    def acquire(self) -> Optional[int]:
        with self.lock:
            if self.closed:
                return None
            self.users += 1
            return self.master

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            last = self.closed and self.users == 0
        if last:
            self._close_fds()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            idle = self.users == 0
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass
        if idle:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.master, self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def try_reap(self, block: bool) -> None:
        with self.reap_lock:  # not self.lock: readers leaving must not wait for waitpid
            if self.reaped:
                return
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, -1
            if pid:
                self.reaped = True
                self.status = status


class PtyGateway:
    """State of one `dmsgpty/pty` connection (Go's LocalPtyGateway)."""

    def __init__(self, peer=None):
        self.peer = peer
        self._lock = threading.Lock()
        self._proc: Optional[_PtyProc] = None
        self._stopped = False
        # Exec calls of this connection watch one pipe; the connection's end makes it readable
        # so their commands die with it (nobody is left to receive the result).
        self._exec_lock = threading.Lock()
        self._exec_running = 0
        self._exec_pipe: Optional[Tuple[int, int]] = None
        self._closed = False

    # --- rpc methods ----------------------------------------------------------------
    def start(self, req: dict) -> dict:
        with self._lock:
            # a Start still running when the connection ended must not leave a child behind:
            # close() takes this lock, so either it sees the new pty or Start sees `_closed`
            if self._closed:
                raise PtyError(ERR_EOF)
            if self._proc is not None:
                raise PtyError(ERR_RUNNING)
            proc = self._proc = self._spawn(req)
            self._stopped = False
        log.info("pty started: %s (pid %d) for %s", req.get("Name"), proc.pid, describe_peer(self.peer))
        return {}

    def read(self, n: int) -> bytes:
        """Block until the pty has output (a worker's Read)."""
        return self.read_now(n).block()

    def read_now(self, n: int):
        """An rpc.Wait on the master (and the stop pipe) that the connection's thread polls:
        no thread sits in a blocked Read. Output already there makes the poll return at
        once, so the Read is not tried here first (usually it would be one EAGAIN more)."""
        n = int(n)
        if n <= 0:
            raise PtyError(f"invalid read size: {n}")
        n = min(n, limits.PTY_READ_MAX)
        proc, fd = self._use()

        def ready():
            try:
                got = self._try_read(proc, fd, n)
            except BaseException:
                proc.release()
                raise
            if got is None:
                return AGAIN
            proc.release()
            return got

        return Wait((fd, proc.wake_r), ready, proc.release)

    def open_master(self):
        """For a caller that polls the master itself (pty-stream over TCP): (fd, stop_fd, read,
        write, done). read(n) -> output or None (none yet), raising PtyError once the program
        ended; write(data) -> how many bytes the pty took (never blocks); stop_fd turns readable
        on Stop; done() once the caller is finished with the fd."""
        proc, fd = self._use()
        # partials, not closures: no frame of ours around the two calls an echo makes
        read = functools.partial(self._try_read, proc, fd)
        write = functools.partial(_write_some, fd)
        return fd, proc.wake_r, read, write, proc.release

    @staticmethod
    def _try_read(proc: "_PtyProc", fd: int, n: int) -> Optional[bytes]:
        """Up to n bytes of output, None if there is none yet; raises once the pty ended."""
        if proc.closed:
            raise PtyError(ERR_EOF)
        parts = []
        got = 0
        # a pty hands out <= 4 KiB a read: while it comes in bulk take all that is there
        # (fewer round trips, no waiting)
        while got < n:
            try:
                chunk = os.read(fd, n - got)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if parts:
                    break   # deliver what we have; the next Read reports the error
                if e.errno == errno.EIO:
                    # not reaped here: the unreaped leader keeps its pid (= the session and
                    # group id Stop kills) from being reused by another process
                    raise PtyError(ERR_EIO) from None
                raise PtyError(f"read /dev/ptmx: {_strerror(e)}") from None
            if not chunk:
                if parts:
                    break
                raise PtyError(ERR_EOF)
            if len(chunk) < 1024:   # a trickle (a keystroke's echo): it was all there, skip the EAGAIN read
                if not parts:
                    return chunk
                parts.append(chunk)
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts) if parts else None

    def write(self, data: bytes) -> int:
        return self._write(bytes(data or b""), wait=True)

    def write_now(self, data: bytes):
        """Write what the pty takes at once; the rest (if any) as an rpc.Later."""
        data = bytes(data or b"")
        done = self._write(data, wait=False)
        if done == len(data):
            return done
        rest = data[done:]
        return Later(lambda: done + self._write(rest, wait=True))

    def _write(self, data: bytes, wait: bool) -> int:
        proc, fd = self._use()
        try:
            view = memoryview(data)
            total = 0
            poller = None
            while total < len(view):
                took = _write_some(fd, view[total:])
                if took:
                    total += took
                    continue
                if not wait:
                    return total
                if poller is None:   # the child is not reading its input: wait for room or Stop
                    poller = select.poll()
                    poller.register(fd, select.POLLOUT)
                    poller.register(proc.wake_r, select.POLLIN)
                if any(f == proc.wake_r for f, _ in poller.poll()):
                    raise PtyError(ERR_EOF)
            return total
        finally:
            proc.release()

    def set_pty_size(self, ws: dict) -> dict:
        proc, fd = self._use()
        try:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, _winsize(ws) or _winsize({}))
        except OSError as e:
            raise PtyError(f"ioctl /dev/ptmx: {_strerror(e)}") from None
        finally:
            proc.release()
        return {}

    def stop(self, _arg=None) -> dict:
        with self._lock:
            proc = self._proc
            if proc is None:
                raise PtyError(ERR_NO_PTY)
            self._proc = None
            self._stopped = True
        self._terminate(proc)
        log.info("pty stopped (pid %d) for %s", proc.pid, describe_peer(self.peer))
        return {}

    def ping(self, _arg=None) -> dict:
        return {}

    def exec(self, req: dict) -> dict:
        with self._exec_lock:
            if self._closed:
                raise PtyError(ERR_EOF)
            if self._exec_pipe is None:
                self._exec_pipe = os.pipe()
            self._exec_running += 1
            cancel_r = self._exec_pipe[0]
        try:
            res = run_exec(req, cancel_fd=cancel_r)
            log.info("exec %s for %s: exit %d%s in %d ms", req.get("Name"), describe_peer(self.peer), res["ExitCode"],
                     " (timed out)" if res["TimedOut"] else "", res["DurationMS"])
            return res
        finally:
            with self._exec_lock:
                self._exec_running -= 1
                self._maybe_close_pipe()

    def close(self) -> None:
        """Connection end: Stop, and kill the commands of Exec calls still running."""
        with self._lock:
            self._closed = True
        try:
            self.stop()
        except PtyError:
            pass
        with self._exec_lock:
            if self._exec_pipe is not None:
                try:
                    os.write(self._exec_pipe[1], b"x")
                except OSError:
                    pass
            self._maybe_close_pipe()

    def _maybe_close_pipe(self) -> None:
        # caller holds _exec_lock
        if self._closed and self._exec_running == 0 and self._exec_pipe is not None:
            for fd in self._exec_pipe:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._exec_pipe = None

    # --- internals ------------------------------------------------------------------
    def _use(self) -> Tuple[_PtyProc, int]:
        with self._lock:
            proc = self._proc
            stopped = self._stopped
        if proc is None:
            raise PtyError(ERR_EOF if stopped else ERR_NO_PTY)
        fd = proc.acquire()
        if fd is None:
            raise PtyError(ERR_EOF)
        return proc, fd

    @staticmethod
    def _terminate(proc: _PtyProc) -> None:
        proc.close()  # wakes blocked readers; the fd closes when the last one leaves
        kill_session(proc.pid)
        proc.try_reap(block=True)

    @staticmethod
    def _spawn(req: dict) -> _PtyProc:
        name = req.get("Name") or ""
        try:
            path = resolve_command(name) if name else None
        except SpawnError as e:
            raise PtyError(str(e)) from None
        if path is None:
            raise PtyError("exec: no command")
        argv = [name] + [str(a) for a in (req.get("Arg") or [])]
        env = merge_env(req.get("Env") or [])
        ws = _winsize(req.get("Size"))
        try:
            bpath = os.fsencode(path)
            bargv = [os.fsencode(a) for a in argv]
            benv = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        except (UnicodeError, ValueError) as e:
            raise PtyError(f"fork/exec {path}: {e}") from None
        if any(b"\0" in a for a in [bpath] + bargv + list(benv) + list(benv.values())):
            raise PtyError(f"fork/exec {path}: invalid argument")
        err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec worked
        try:
            with _FORK_LOCK:
                pid, master = _pty.fork()
                if pid == 0:  # child: as little Python as possible before exec
                    code = 127
                    try:
                        _close_inherited(keep=err_w)
                        if ws is not None:
                            fcntl.ioctl(0, termios.TIOCSWINSZ, ws)
                        try:  # Python ignores SIGPIPE/SIGXFSZ; an ignored signal survives exec
                            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                                signal.signal(sig, signal.SIG_DFL)
                        except (ValueError, OSError):
                            pass
                        os.execve(bpath, bargv, benv)
                    except OSError as e:
                        try:
                            os.write(err_w, str(e.errno).encode())
                        except OSError:
                            pass
                    finally:
                        os._exit(code)
                os.set_inheritable(master, False)
            os.set_blocking(master, False)
            os.close(err_w)
            err_w = -1
            failed = _read_all(err_r)
        finally:
            os.close(err_r)
            if err_w >= 0:
                os.close(err_w)
        if failed:
            os.close(master)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            try:
                num = int(failed)
            except ValueError:
                num = errno.EINVAL
            raise PtyError(f"fork/exec {path}: {_strerror(OSError(num, os.strerror(num)))}")
        return _PtyProc(pid, master)


def _close_inherited(keep: int) -> None:
    """In the forked child: close every fd above 2 but `keep` (close-on-exec itself).

    Python's own fds are close-on-exec already; this also drops inheritable ones the host
    process was given (by its launcher, a library), as subprocess's close_fds does.
    """
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            return out
        out += chunk


def _write_some(fd: int, data) -> int:
    """What the pty master takes of data now: 0 when it is full (the fd does not block);
    PtyError for any other failure."""
    try:
        return os.write(fd, data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as e:
        raise PtyError(f"write /dev/ptmx: {_strerror(e)}") from None


def _strerror(e: OSError) -> str:
    s = e.strerror or str(e)
    return s[:1].lower() + s[1:]


def pty_methods(gw: PtyGateway) -> list:
    """The gateway's methods as rpc.Method objects (wire names `pty.<Method>`)."""
    from skypty import gob, gobtypes, rpc

    M = rpc.Method
    return [
        M("Start", gobtypes.CommandReq, gob.EMPTY, gw.start),
        M("Read", gob.INT, gob.BYTES, gw.read, ordered=True, now=gw.read_now),
        # pipelined keystrokes keep their order
        M("Write", gob.BYTES, gob.INT, gw.write, ordered=True, now=gw.write_now),
        M("SetPtySize", gobtypes.WinSize, gob.EMPTY, gw.set_pty_size),
        M("Stop", gob.EMPTY, gob.EMPTY, gw.stop),
        M("Ping", gob.EMPTY, gob.EMPTY, gw.ping),
        M("Exec", gobtypes.CommandExecReq, gobtypes.CommandExecResult, gw.exec),
    ]


def pty_service(peer=None, gateway: Optional[PtyGateway] = None):
    """`(service_name, [Method…])` for one connection, backed by a fresh gateway."""
    gw = gateway if gateway is not None else PtyGateway(peer)
    return PTY_RPC_NAME, pty_methods(gw)


# The open gateways, so a host can stop every child on shutdown.
_LIVE: Dict[int, PtyGateway] = {}
_LIVE_LOCK = threading.Lock()


def open_gateway(peer=None) -> Tuple[PtyGateway, Callable[[], None]]:
    """A gateway for one connection, known to stop_all, and the function that ends it
    (connection end = Stop) and forgets it."""
    gw = PtyGateway(peer)
    with _LIVE_LOCK:
        _LIVE[id(gw)] = gw

    def ended() -> None:
        with _LIVE_LOCK:
            _LIVE.pop(id(gw), None)
        gw.close()

    return gw, ended


def pty_factory(conn, query, peer):
    """`mux.add_rpc` factory: one gateway per connection, stopped when the connection ends."""
    gw, ended = open_gateway(peer)
    name, methods = pty_service(peer, gw)
    return [(name, methods, ended)]


def stop_all() -> None:
    """Stop every live pty of this process (host shutdown)."""
    with _LIVE_LOCK:
        gws = list(_LIVE.values())
        _LIVE.clear()
    for gw in gws:
        gw.close()
