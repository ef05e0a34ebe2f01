"""services/pty: the `pty` rpc service with real ptys, directly and over net/rpc on a socket."""
from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest

from skypty import gob, gobtypes, limits, mux, rpc
from skypty.services.pty import PtyError, PtyGateway, pty_factory

pytestmark = pytest.mark.timeout(120)

EIO = "read /dev/ptmx: input/output error"


from conftest import process_alive as _alive, wait_gone as _wait_gone  # noqa: E402


def _read_until(read, needle: bytes, limit: int = 1 << 20) -> bytes:
    out = b""
    while needle not in out and len(out) < limit:
        out += read()
    return out


def _read_to_end(read) -> (bytes, str):
    out = b""
    while True:
        try:
            out += read()
        except (PtyError, rpc.RPCError) as e:
            return out, str(e)


@pytest.fixture
def gw():
    g = PtyGateway()
    yield g
    g.close()


# ----------------------------------------------------------------------------- direct calls

def test_start_write_read_and_eio_at_exit(gw):
    gw.start({"Name": "/bin/sh", "Env": ["PS1=$ "]})
    assert gw.write(b"echo hel''lo; exit\n") == len(b"echo hel''lo; exit\n")
    out, err = _read_to_end(lambda: gw.read(32768))
    assert b"hello\r\n" in out
    assert err == EIO


def test_no_output_is_lost_before_eio(gw):
    gw.start({"Name": "seq", "Arg": ["1", "30000"]})
    out, err = _read_to_end(lambda: gw.read(4096))
    assert err == EIO
    expected = "".join(f"{i}\r\n" for i in range(1, 30001)).encode()
    assert out == expected


def test_size_and_env_applied_no_shell_wrapping(gw, monkeypatch):
    monkeypatch.setenv("SKYPTY_PTY_HOSTVAR", "fromhost")
    gw.start({"Name": "sh", "Arg": ["-c", 'stty size; echo "$SKYPTY_PTY_HOSTVAR $FOO $TERM"'],
              "Size": {"Rows": 33, "Cols": 111, "X": 0, "Y": 0}, "Env": ["FOO=bar", "TERM=vt100"]})
    out, err = _read_to_end(lambda: gw.read(1024))
    assert out == b"33 111\r\nfromhost bar vt100\r\n"
    assert err == EIO


def test_set_pty_size(gw):
    gw.start({"Name": "cat"})
    gw.set_pty_size({"Rows": 40, "Cols": 132, "X": 1, "Y": 2})
    import fcntl
    import struct
    import termios
    proc, fd = gw._use()
    try:
        ws = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    finally:
        proc.release()
    assert ws == (40, 132, 1, 2)


def test_errors(gw):
    with pytest.raises(PtyError) as ei:
        gw.stop()
    assert str(ei.value) == "no active pty session"
    with pytest.raises(PtyError) as ei:
        gw.read(10)
    assert str(ei.value) == "no active pty session"
    gw.start({"Name": "cat"})
    with pytest.raises(PtyError) as ei:
        gw.start({"Name": "cat"})
    assert str(ei.value) == "a pty session is already running"
    for n in (0, -5):
        for read in (gw.read, gw.read_now):   # the worker's Read and the serve thread's
            with pytest.raises(PtyError) as ei:
                read(n)
            assert str(ei.value) == f"invalid read size: {n}"
    gw.stop()


def test_spawn_failures(gw):
    with pytest.raises(PtyError) as ei:
        gw.start({"Name": "skypty-no-such-command"})
    assert str(ei.value) == 'exec: "skypty-no-such-command": executable file not found in $PATH'
    with pytest.raises(PtyError) as ei:
        gw.start({"Name": "/etc/passwd"})
    assert str(ei.value) == "fork/exec /etc/passwd: permission denied"
    gw.start({"Name": "cat"})   # a failed Start leaves no session behind
    gw.stop()


def test_read_is_capped(gw):
    gw.start({"Name": "head", "Arg": ["-c", "300000", "/dev/zero"]})
    time.sleep(0)  # the read blocks until output exists
    got = gw.read(10 ** 7)
    assert 0 < len(got) <= limits.PTY_READ_MAX


def test_blocked_read_does_not_block_write(gw):
    gw.start({"Name": "cat"})
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", _read_until(lambda: gw.read(100), b"abc")))
    t.start()
    gw.set_pty_size({"Rows": 10, "Cols": 10})   # also not blocked by the pending Read
    gw.ping()
    gw.write(b"abc\n")
    t.join(30)
    assert b"abc" in result["r"]


def test_stop_kills_process_group_and_background_jobs(gw):
    gw.start({"Name": "bash", "Arg": ["--norc", "--noprofile", "-i"], "Env": ["PS1=$ "]})
    # B""G: the echoed command line must not match, only the output does
    gw.write(b'sleep 600 & echo B""G=$!; echo S""H=$$\n')
    out = b""
    while not re.search(rb"SH=\d+\r\n", out):
        out += gw.read(4096)
    bg = int(re.search(rb"BG=(\d+)", out).group(1))
    sh = int(re.search(rb"SH=(\d+)", out).group(1))
    assert _alive(bg) and _alive(sh)
    gw.stop()
    assert _wait_gone([bg, sh]) == []
    # the shell (our child) was reaped: no zombie is left
    with pytest.raises(ChildProcessError):
        os.waitpid(sh, os.WNOHANG)
    with pytest.raises(PtyError) as ei:
        gw.read(10)
    assert str(ei.value) == "EOF"


def test_stop_wakes_blocked_read(gw):
    gw.start({"Name": "cat"})
    result = {}

    def reader():
        try:
            gw.read(100)
        except PtyError as e:
            result["err"] = str(e)
    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    gw.stop()
    t.join(30)
    assert result["err"] == "EOF"


def test_child_exit_is_reaped_without_stop(gw):
    gw.start({"Name": "true"})
    pid = gw._proc.pid
    _read_to_end(lambda: gw.read(10))
    gw.stop()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# ----------------------------------------------------------------------------- over net/rpc

class _Conn:
    """A mux table serving `dmsgpty/pty` on one end of a socketpair; the client on the other
    (`make_client(sock)`: an rpc.RPCClient, or e.g. a skypty.client.PtyClient)."""

    def __init__(self, make_client=rpc.RPCClient):
        self.table = mux.MuxTable()
        self.table.add_rpc("dmsgpty/pty", pty_factory)
        a, b = socket.socketpair()
        self.server = threading.Thread(target=self.table.serve, args=(b, mux.Peer(None, "test", "control")),
                                       daemon=True)
        self.server.start()
        mux.request(a, "dmsgpty/pty", timeout=10)
        self.sock = a
        self.c = make_client(a)

    def call(self, method, at, arg, rt, timeout=60):
        return self.c.call("pty." + method, at, arg, rt, timeout=timeout)

    def close(self):
        self.c.close()
        self.server.join(30)


@pytest.fixture
def conn():
    c = _Conn()
    yield c
    c.close()


def test_rpc_session(conn):
    assert conn.call("Start", gobtypes.CommandReq, {"Name": "/bin/sh", "Env": ["PS1=$ "],
                                                     "Size": {"Rows": 30, "Cols": 100}}, gob.EMPTY) == {}
    assert conn.call("Write", gob.BYTES, b"stty size; exit\n", gob.INT) == 16
    out, err = _read_to_end(lambda: conn.call("Read", gob.INT, 32768, gob.BYTES))
    assert b"30 100\r\n" in out
    assert err == EIO
    assert conn.call("Ping", gob.EMPTY, {}, gob.EMPTY) == {}
    assert conn.call("Stop", gob.EMPTY, {}, gob.EMPTY) == {}
    with pytest.raises(rpc.RPCError) as ei:
        conn.call("Stop", gob.EMPTY, {}, gob.EMPTY)
    assert str(ei.value) == "no active pty session"
    with pytest.raises(rpc.RPCError) as ei:
        conn.call("Read", gob.INT, 0, gob.BYTES)
    assert str(ei.value) == "invalid read size: 0"
    with pytest.raises(rpc.RPCError) as ei:
        conn.call("StartSession", gobtypes.CommandReq, {"Name": "sh"}, gob.STRING)
    assert str(ei.value) == "rpc: can't find method pty.StartSession"


def test_rpc_exec_and_concurrent_execs(conn, tmp_path):
    r = conn.call("Exec", gobtypes.CommandExecReq, {"Name": "echo", "Arg": ["hi"], "TimeoutMS": 30000},
                  gobtypes.CommandExecResult)
    assert (r["Stdout"], r["ExitCode"], r["TimedOut"]) == (b"hi\n", 0, False)
    with pytest.raises(rpc.RPCError) as ei:
        conn.call("Exec", gobtypes.CommandExecReq, {"Name": ""}, gobtypes.CommandExecResult)
    assert str(ei.value) == "dmsgpty: Exec: empty command name"
    # two Execs on one connection at once: the reader only finishes if the writer runs beside it
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    res = {}
    t = threading.Thread(target=lambda: res.setdefault("r", conn.call(
        "Exec", gobtypes.CommandExecReq, {"Name": "cat", "Arg": [fifo]}, gobtypes.CommandExecResult)))
    t.start()
    w = conn.call("Exec", gobtypes.CommandExecReq, {"Name": "sh", "Arg": ["-c", f"echo ping > {fifo}"]},
                  gobtypes.CommandExecResult)
    t.join(60)
    assert w["ExitCode"] == 0
    assert res["r"]["Stdout"] == b"ping\n"


def test_rpc_pipelined_writes_keep_order(conn):
    conn.call("Start", gobtypes.CommandReq, {"Name": "sh", "Arg": ["-c", "stty -echo; cat"]}, gob.EMPTY)
    # wait for `stty -echo` to take effect before writing
    conn.call("Write", gob.BYTES, b"ready\n", gob.INT)
    _read_until(lambda: conn.call("Read", gob.INT, 32768, gob.BYTES), b"ready")
    threads = []
    parts = [b"%04d," % i for i in range(200)]
    results = []
    for p in parts:   # no waiting between calls, as the web UI does
        t = threading.Thread(target=lambda p=p: results.append(conn.call("Write", gob.BYTES, p, gob.INT)))
        t.start()
        threads.append(t)
        time.sleep(0.001)
    for t in threads:
        t.join(30)
    conn.call("Write", gob.BYTES, b"\n", gob.INT)
    out = _read_until(lambda: conn.call("Read", gob.INT, 32768, gob.BYTES), b"0199,")
    assert b"".join(parts) in out


def test_connection_end_stops_the_pty():
    c = _Conn()
    try:
        c.call("Start", gobtypes.CommandReq, {"Name": "sh", "Arg": ["-c", "echo PID=$$; sleep 600 & wait"]},
               gob.EMPTY)
        out = _read_until(lambda: c.call("Read", gob.INT, 32768, gob.BYTES), b"\n")
        pid = int(out.split(b"PID=")[1].split()[0])
        assert _alive(pid)
    finally:
        c.close()
    assert _wait_gone([pid]) == []


def test_connection_end_kills_running_exec(tmp_path):
    pidfile = tmp_path / "pid"
    c = _Conn()
    t = threading.Thread(target=lambda: _ignore(lambda: c.call(
        "Exec", gobtypes.CommandExecReq,
        {"Name": "sh", "Arg": ["-c", f"echo $$ > {pidfile}; exec sleep 600"], "TimeoutMS": 300000},
        gobtypes.CommandExecResult)), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    c.close()
    assert _wait_gone([pid]) == []
    t.join(30)


def _ignore(fn):
    try:
        fn()
    except Exception:
        pass


def test_start_after_connection_end_spawns_nothing():
    # rpc runs a connection's on_close while calls may still be running: a Start that
    # arrives after the gateway closed must not leave a pty child nobody will ever stop
    g = PtyGateway()
    g.close()
    marker = f"{os.getpid()}{time.monotonic_ns() % 100000:05d}"
    with pytest.raises(PtyError) as ei:
        g.start({"Name": "sleep", "Arg": [marker]})
    assert str(ei.value) == "EOF"
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                assert f.read() != b"sleep\0" + marker.encode() + b"\0"
        except OSError:
            pass


def test_child_has_a_controlling_tty_and_no_inherited_fds(gw):
    # an inheritable fd of the host (as a launcher may pass one) must not reach the shell
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        gw.start({"Name": "sh", "Arg": ["-c", "tty; echo FDS; ls /proc/$$/fd; echo END; ps -o sid= -p $$ > /dev/null"
                                            " && echo SID $(ps -o sid= -p $$) $$"]})
        out, _ = _read_to_end(lambda: gw.read(4096))
    finally:
        os.close(r)
        os.close(w)
    text = out.decode().replace("\r", "")
    assert re.search(r"^/dev/pts/\d+$", text, re.M), text
    fds = re.search(r"FDS\n(.*?)END", text, re.S).group(1).split()
    assert str(r) not in fds and set(fds) <= {"0", "1", "2", "10", "255"}, fds
    sid, pid = re.search(r"SID\s+(\d+) (\d+)", text).groups()
    assert sid == pid                                   # its own session: setsid + the pty as ctty


# ----------------------------------------------------- non-blocking master: read_now, write_now

def _lines(total: int) -> bytes:
    """Input a canonical-mode pty cannot drop (it discards overlong lines, not whole ones)."""
    return (b"x" * 63 + b"\n") * (total // 64)


def _resolve(w, timeout: float = 10.0):
    """Drive an rpc.Wait as the server would (poll its fds, call ready) to its final value."""
    import select as _select

    if not isinstance(w, rpc.Wait):
        return w
    deadline = time.monotonic() + timeout
    p = _select.poll()
    for fd in w.fds:
        p.register(fd, _select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the Wait never became ready"
        if p.poll(left * 1000):
            got = w.ready()
            if got is not rpc.AGAIN:
                return got


def test_write_now_small_is_an_int_large_blocked_is_a_later(gw):
    gw.start({"Name": "/bin/sh", "Arg": ["-c", "sleep 30"], "Env": [], "Size": None})
    assert gw.write_now(b"abc") == 3
    later = gw.write_now(_lines(1 << 20))
    assert isinstance(later, rpc.Later)


def test_stop_ends_a_write_the_child_never_reads(gw):
    gw.start({"Name": "sleep", "Arg": ["30"], "Env": [], "Size": None})
    pid = gw._proc.pid
    data = _lines(1 << 20)
    later = gw.write_now(data)
    assert isinstance(later, rpc.Later)
    res = {}

    def finish():
        try:
            res["n"] = later.finish()
        except PtyError as e:
            res["err"] = str(e)
    t = threading.Thread(target=finish)
    t.start()
    t.join(0.3)
    assert t.is_alive()                      # blocked: the child takes no input
    stopper = threading.Thread(target=gw.stop)
    t0 = time.monotonic()
    stopper.start()
    t.join(5)
    stopper.join(5)
    assert not t.is_alive() and not stopper.is_alive()
    assert time.monotonic() - t0 < 2.5
    assert res == {"err": "EOF"}
    assert _wait_gone([pid]) == []


def test_write_blocked_on_a_worker_is_ended_by_stop_call():
    """Over rpc: the blocked rest of a Write finishes on a worker; the Stop call ends it with EOF."""
    c = _Conn()
    try:
        c.call("Start", gobtypes.CommandReq, {"Name": "sleep", "Arg": ["30"], "Env": [], "Size": None}, gob.EMPTY)
        res = {}

        def write():
            try:
                res["n"] = c.call("Write", gob.BYTES, _lines(1 << 20), gob.INT, timeout=20)
            except rpc.RPCError as e:
                res["err"] = str(e)
        t = threading.Thread(target=write)
        t.start()
        t.join(0.3)
        assert t.is_alive()
        assert c.call("Ping", gob.EMPTY, {}, gob.EMPTY, timeout=5) == {}   # the connection still serves
        assert c.call("Stop", gob.EMPTY, {}, gob.EMPTY, timeout=5) == {}
        t.join(5)
        assert not t.is_alive() and res == {"err": "EOF"}
    finally:
        c.close()


def test_read_now_waits_on_the_master_until_output(gw):
    gw.start({"Name": "sh", "Arg": ["-c", "sleep 0.3; echo late"], "Env": [], "Size": None})
    w = gw.read_now(4096)
    assert isinstance(w, rpc.Wait)
    assert gw._proc.master in w.fds and gw._proc.wake_r in w.fds
    assert _resolve(w) == b"late\r\n"
    # the child's exit comes through the same path
    out, err = _read_to_end(lambda: _resolve(gw.read_now(4096)))
    assert err == EIO and out == b""


def test_read_now_output_already_there_is_had_at_once(gw):
    """Output already waiting: read_now's Wait has fds readable at once, and ready() gives it."""
    import select as _select

    gw.start({"Name": "echo", "Arg": ["ready"], "Env": [], "Size": None})
    proc = gw._proc
    p = _select.poll()
    p.register(proc.master, _select.POLLIN)
    assert p.poll(10000)                       # the output exists now
    w = gw.read_now(4096)
    assert isinstance(w, rpc.Wait)
    p = _select.poll()
    for fd in w.fds:
        p.register(fd, _select.POLLIN)
    assert p.poll(0)                           # no waiting for it
    assert w.ready() == b"ready\r\n"


def test_stop_wakes_a_parked_read(gw):
    gw.start({"Name": "cat", "Env": [], "Size": None})
    w = gw.read_now(100)
    assert isinstance(w, rpc.Wait)
    gw.stop()
    with pytest.raises(PtyError) as ei:
        _resolve(w, timeout=5)
    assert str(ei.value) == "EOF"


def test_rpc_cat_echoes_a_write(conn):
    conn.call("Start", gobtypes.CommandReq, {"Name": "cat", "Arg": [], "Env": [], "Size": None}, gob.EMPTY)
    assert conn.call("Write", gob.BYTES, b"hello\n", gob.INT) == 6
    out = _read_until(lambda: conn.call("Read", gob.INT, 32768, gob.BYTES, timeout=10), b"hello\r\nhello")
    assert b"hello" in out


def test_rpc_read_before_output_is_answered_once_output_arrives(conn):
    conn.call("Start", gobtypes.CommandReq, {"Name": "cat", "Arg": [], "Env": [], "Size": None}, gob.EMPTY)
    got = []
    first = threading.Event()
    failed = threading.Event()

    def on_read(call):   # on the client's reader thread: keep one Read outstanding, as the shell does
        got.append((call.reply, call.error))
        first.set()
        if call.error is not None:
            failed.set()
        else:
            conn.c.go("pty.Read", gob.INT, 32768, gob.BYTES, callback=on_read)
    conn.c.go("pty.Read", gob.INT, 32768, gob.BYTES, callback=on_read)
    for i in range(5):   # the pending Read holds nothing up
        assert conn.call("Ping", gob.EMPTY, {}, gob.EMPTY, timeout=5) == {}
        assert conn.call("SetPtySize", gobtypes.WinSize, {"Rows": 20 + i, "Cols": 80}, gob.EMPTY, timeout=5) == {}
    assert not first.wait(0.2) and got == []
    assert conn.call("Write", gob.BYTES, b"ping\n", gob.INT, timeout=5) == 5
    assert first.wait(5)
    want = b"ping\r\nping\r\n"   # the echo, then cat's copy
    deadline = time.monotonic() + 5
    while b"".join(d for d, _ in list(got)) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"".join(d for d, _ in list(got)) == want and all(e is None for _, e in got)
    # the Read now left waiting is ended by Stop, with EOF
    assert conn.call("Stop", gob.EMPTY, {}, gob.EMPTY, timeout=5) == {}
    assert failed.wait(5)
    assert isinstance(got[-1][1], rpc.RPCError) and str(got[-1][1]) == "EOF"
