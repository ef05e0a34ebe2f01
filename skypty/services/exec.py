"""One-shot exec (rpc `pty.Exec`, pty.md §4.1): no tty, own session, argv without a shell.

`run_exec` turns a CommandExecReq dict into a CommandExecResult dict. The process helpers
(`spawn`, `pump`, `kill_session`) are shared with the pty service and exec-stream.

Every child runs in its own session (no controlling tty, stdin /dev/null unless stdin was
sent, no inherited fds but its three pipes). A command that is killed (deadline, connection
gone, host shutdown) loses its whole session, not only the process it started as.
"""
from __future__ import annotations

import errno
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional

from skypty import limits
from skypty.errors import SkyptyError

__all__ = ["ExecError", "SpawnError", "run_exec", "merge_env", "resolve_command", "spawn", "pump",
           "kill_session", "clamp_timeout_ms", "kill_all", "describe_peer"]

_CHUNK = 65536

# Children that are running now, so a host shutting down can kill every one of them.
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()
# Readable once the host shuts down: every pump kills its child (before reaping it, so the
# group id cannot have been reused by then).
_SHUTDOWN_R, _SHUTDOWN_W = os.pipe()
_KILL_LOCK = threading.Lock()
# Bumped by kill_all. A child whose spawn began before a kill_all but joined _LIVE after it
# looked (and re-armed the pipe) would miss it: its pump compares generations instead.
_KILL_GEN = [0]


class ExecError(SkyptyError):
    """A request the host refuses outright (the rpc answers with this text)."""


class SpawnError(Exception):
    """The command could not be started; str() is Go's error text for the same case."""


def merge_env(extra: Optional[Iterable[str]]) -> Dict[str, str]:
    """Host environment with `KEY=VAL` entries overriding by key (later entries win)."""
    env = dict(os.environ)
    for item in extra or ():
        if not isinstance(item, str) or "=" not in item:
            continue  # an entry without '=' cannot be represented in an execve env
        key, _, val = item.partition("=")
        if key:
            env[key] = val
    return env


def resolve_command(name: str) -> str:
    """Find `name` the way Go's exec.LookPath does: bare names through the host's $PATH."""
    if "/" in name:
        return name
    found = shutil.which(name, path=os.environ.get("PATH", ""))
    if not found:
        raise SpawnError(f'exec: "{name}": executable file not found in $PATH')
    return found


def _oserror_text(path: str, e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror[:1].lower() + e.strerror[1:]
    else:
        msg = str(e)
    return f"fork/exec {path}: {msg}"


def spawn(name: str, args: List[str], env: Optional[Iterable[str]], stdin: bool) -> subprocess.Popen:
    """Start `name args…` in a new session with pipes; raise SpawnError with Go's text."""
    path = resolve_command(name)
    gen = _KILL_GEN[0]
    try:
        proc = subprocess.Popen(
            [name] + [str(a) for a in (args or [])], executable=path, env=merge_env(env),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True)
    except (OSError, ValueError) as e:
        raise SpawnError(_oserror_text(path, e)) from None
    proc.skypty_kill_gen = gen
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def kill_all(wait: float = 5.0) -> None:
    """Make every running pump SIGKILL its process group, and wait (bounded) until they did."""
    with _KILL_LOCK:
        with _LIVE_LOCK:
            _KILL_GEN[0] += 1
        try:
            os.write(_SHUTDOWN_W, b"x")
        except OSError:
            return
        try:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                with _LIVE_LOCK:
                    if not _LIVE:
                        break
                time.sleep(0.02)
        finally:
            os.set_blocking(_SHUTDOWN_R, False)
            try:
                os.read(_SHUTDOWN_R, 64)  # re-arm: execs started later run normally
            except OSError:
                pass


def _session_members(sid: int) -> List[int]:
    """Live pids whose session id is `sid` (Linux /proc; empty elsewhere)."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()   # state ppid pgrp session ...
        if len(rest) > 3 and rest[0] != b"Z" and int(rest[3]) == sid:
            found.append(int(name))
    return found


def kill_session(sid: int) -> None:
    """SIGKILL the process group `sid` and every process still in session `sid`.

    Call it before reaping the leader: while the leader is unreaped its pid, which is the
    group and session id, cannot be reused. A shell or script puts jobs in process groups
    of their own; killing only the leader's group would leave those running as orphans.
    """
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(10):   # bounded: a member forking as fast as we kill is not chased for ever
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def describe_peer(peer) -> str:
    """`pk@addr (path)` of a mux.Peer for the logs; "-" when there is none (a direct call)."""
    return peer.describe() if hasattr(peer, "describe") else "-"


def clamp_timeout_ms(ms: Optional[int], default: int, maximum: int) -> int:
    ms = int(ms or 0)
    if ms <= 0:
        return default
    return min(ms, maximum)


def pump(proc: subprocess.Popen, stdin_data: bytes, deadline: float,
         on_stdout: Callable[[bytes], None], on_stderr: Callable[[bytes], None],
         cancel_fd: Optional[int] = None, tick: Optional[Callable[[], None]] = None,
         tick_interval: Optional[float] = None) -> bool:
    """Feed stdin and drain stdout/stderr until both close and the process exits.

    Returns True when the deadline fired (or `cancel_fd` became readable): the whole
    session is then SIGKILLed. The process is always reaped before returning.
    Output is read to the end even when the caller discards it, so the child never blocks.
    An output callback may block (exec-stream writing to a client that does not read): a
    timer still kills the command at the deadline. Every reap happens under `guard`, and the
    timer kills only under `guard` while nothing was reaped, so it never hits a reused pid.
    """
    sel = selectors.DefaultSelector()
    outs = {}
    if proc.stdout is not None:
        outs[proc.stdout.fileno()] = on_stdout
    if proc.stderr is not None:
        outs[proc.stderr.fileno()] = on_stderr
    for fd in outs:
        sel.register(fd, selectors.EVENT_READ)
    in_fd = None
    view = memoryview(stdin_data or b"")
    if proc.stdin is not None:
        in_fd = proc.stdin.fileno()
        if view:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
            in_fd = None
    cancel_fds = [fd for fd in (cancel_fd, _SHUTDOWN_R) if fd is not None]
    for fd in cancel_fds:
        sel.register(fd, selectors.EVENT_READ)
    next_tick = time.monotonic() + tick_interval if tick and tick_interval else None
    # spawned while a kill_all ran that could not see it yet (see _KILL_GEN)
    killed = getattr(proc, "skypty_kill_gen", _KILL_GEN[0]) != _KILL_GEN[0]
    guard = threading.Lock()
    state = {"done": False, "fired": False}

    def expire() -> None:
        with guard:
            if not state["done"] and proc.returncode is None:
                state["fired"] = True
                kill_session(proc.pid)

    def running() -> bool:
        with guard:
            return proc.poll() is None

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    timer.daemon = True
    timer.start()
    try:
        while not killed and (outs or running()):
            now = time.monotonic()
            if now >= deadline:
                killed = True
                break
            wait = deadline - now
            if next_tick is not None:
                if now >= next_tick:
                    tick()  # type: ignore[misc]
                    next_tick = now + tick_interval  # type: ignore[operator]
                wait = min(wait, max(0.0, next_tick - now))
            if not outs and in_fd is None:
                # pipes are closed but the process lives on: wait for it in bounded slices
                with guard:
                    try:
                        proc.wait(timeout=min(wait, 0.05))
                    except subprocess.TimeoutExpired:
                        pass
                if proc.returncode is None and _readable(cancel_fds):
                    killed = True
                    break
                continue
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd in cancel_fds:
                    killed = True
                    break
                if fd == in_fd:
                    try:
                        n = os.write(fd, view[:_CHUNK])
                        view = view[n:]
                    except BlockingIOError:
                        n = 0
                    except OSError:
                        view = view[:0]  # child closed its stdin: the rest is not wanted
                    if not view:
                        sel.unregister(fd)
                        proc.stdin.close()  # type: ignore[union-attr]
                        in_fd = None
                    continue
                try:
                    data = os.read(fd, _CHUNK)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    data = b""
                if data:
                    outs[fd](data)
                else:
                    sel.unregister(fd)
                    del outs[fd]
            if killed:
                break
    finally:
        timer.cancel()
        if killed:
            kill_session(proc.pid)
        if in_fd is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if killed:
            # whatever is already buffered is kept; a straggler outside the group cannot hold us
            for fd, cb in list(outs.items()):
                _drain_nonblocking(fd, cb)
        sel.close()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        with guard:
            state["done"] = True   # the reap below may free the pid: the timer must not kill now
            killed = killed or state["fired"]
        proc.wait()
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    return killed


def _readable(fds: List[int]) -> bool:
    import select

    p = select.poll()   # not select(): a busy host's fds pass 1024
    for fd in fds:
        p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _drain_nonblocking(fd: int, cb: Callable[[bytes], None]) -> None:
    os.set_blocking(fd, False)
    for _ in range(64):
        try:
            data = os.read(fd, _CHUNK)
        except OSError:
            return
        if not data:
            return
        cb(data)


class _Capped:
    """Collects up to `cap` bytes and remembers whether anything was dropped."""

    def __init__(self, cap: int):
        self.buf = bytearray()
        self.cap = cap
        self.truncated = False

    def __call__(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if len(data) > room:
            self.truncated = True
            data = data[:max(room, 0)]
        if data:
            self.buf += data


def run_exec(req: dict, cancel_fd: Optional[int] = None) -> dict:
    """Run one CommandExecReq; errors the caller made raise ExecError, spawn failures do not.
    `cancel_fd` readable = kill the command now (its connection ended)."""
    name = req.get("Name") or ""
    if not name:
        raise ExecError("dmsgpty: Exec: empty command name")
    stdin = bytes(req.get("Stdin") or b"")
    if len(stdin) > limits.EXEC_STDIN_MAX:
        raise ExecError(f"dmsgpty: Exec: stdin {len(stdin)} > max {limits.EXEC_STDIN_MAX}")
    timeout_ms = clamp_timeout_ms(req.get("TimeoutMS"), limits.EXEC_DEFAULT_TIMEOUT_MS,
                                  limits.EXEC_MAX_TIMEOUT_MS)
    out, err = _Capped(limits.EXEC_OUTPUT_CAP), _Capped(limits.EXEC_OUTPUT_CAP)
    start = time.monotonic()
    try:
        proc = spawn(name, list(req.get("Arg") or []), req.get("Env") or [], stdin=bool(stdin))
    except SpawnError as e:
        err(f"dmsgpty: exec {name}: {e}\n".encode("utf-8", "replace"))
        return _result(out, err, -1, False, start)
    timed_out = pump(proc, stdin, start + timeout_ms / 1000.0, out, err, cancel_fd=cancel_fd)
    code = proc.returncode
    if timed_out or code is None or code < 0:
        code = -1  # Go reports -1 for a signal death, a timeout and a spawn failure alike
    return _result(out, err, code, timed_out, start)


def _result(out: _Capped, err: _Capped, code: int, timed_out: bool, start: float) -> dict:
    return {
        "Stdout": bytes(out.buf), "Stderr": bytes(err.buf),
        "StdoutTruncated": out.truncated, "StderrTruncated": err.truncated,
        "ExitCode": code, "TimedOut": timed_out,
        "DurationMS": int((time.monotonic() - start) * 1000),
    }
