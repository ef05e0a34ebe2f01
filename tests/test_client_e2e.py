"""The ssh-shaped clients end to end: `cli pty shell|exec|start` against a real `cli pty host`.

Everything is real: the host is a subprocess of skypty.py on a loopback port, the clients are
subprocesses of skypty.py (the library for the concurrency test), and the interactive shell
runs in a real pty driven by pexpect.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import threading
import time

import pytest

from conftest import SKYPTY, HostProc, free_port, run_skypty, stop_process, wait_port
from skypty.keys import generate_keypair
from skypty.terminal import EscapeFilter, interactive_env

HAVE_HOST = os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "skypty", "host.py"))
needs_host = pytest.mark.skipif(not HAVE_HOST, reason="skypty/host.py is not there yet")


# ---------------------------------------------------------------------------------- pure parts

def test_escape_filter():
    f = EscapeFilter()
    assert f.feed(b"~.") == (b"", True)                 # at the very start
    f = EscapeFilter()
    assert f.feed(b"ls\r") == (b"ls\r", False)
    assert f.feed(b"~") == (b"", False)                 # held: may be an escape
    assert f.feed(b"~") == (b"~", False)                # ~~ -> one ~
    assert f.feed(b"~.") == (b"~.", False)              # mid-line: literal
    assert f.feed(b"\n~x") == (b"\n~x", False)          # not an escape: both bytes go
    assert f.feed(b"\r~.rest") == (b"\r", True)
    f = EscapeFilter()
    assert f.feed(b"a~.") == (b"a~.", False)
    f = EscapeFilter()
    assert f.feed(b"no tilde\n") == (b"no tilde\n", False)   # the no-loop path keeps line state
    assert f.feed(b"~.") == (b"", True)
    f = EscapeFilter()
    assert f.feed(b"x") == (b"x", False)
    assert f.feed(b"~.") == (b"~.", False)


def test_escape_filter_any_chunking():
    """However input is split into reads, the filter sends the same bytes and stops at the
    same `~.` as when fed one byte at a time."""
    import random

    rnd = random.Random(7)
    for _ in range(300):
        data = bytes(rnd.choice(b"ab~.\r\n") for _ in range(rnd.randrange(0, 40)))
        one, stop1 = bytearray(), False
        f = EscapeFilter()
        for i in range(len(data)):
            out, stop1 = f.feed(data[i:i + 1])
            one += out
            if stop1:
                break
        chunked, stop2, pos = bytearray(), False, 0
        g = EscapeFilter()
        while pos < len(data) and not stop2:
            n = rnd.randrange(1, 8)
            out, stop2 = g.feed(data[pos:pos + n])
            chunked += out
            pos += n
        assert (bytes(chunked), stop2) == (bytes(one), stop1), data


def test_exec_stream_frames_any_chunking():
    from skypty.client import _read_frames, _Sink
    from skypty.errors import ProtocolError

    def fr(tag, payload):
        return bytes([tag]) + len(payload).to_bytes(4, "big") + payload

    body = fr(1, b"hello ") + fr(0, b"") + fr(2, b"err") + fr(1, b"") + fr(1, b"world")
    for size in range(1, len(body) + 1):
        sink = _Sink(keep=True)
        _read_frames(iter([body[i:i + size] for i in range(0, len(body), size)]), sink)
        assert (bytes(sink.bufs[1]), bytes(sink.bufs[2])) == (b"hello world", b"err")
    for bad in (body[:-1], body + b"\x01", fr(3, b""), b"\x01\x7f\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            _read_frames(iter([bad]), _Sink(keep=True))


def test_interactive_env():
    assert interactive_env({}) == ["TERM=xterm-256color"]
    env = interactive_env({"TERM": "vt100", "LANG": "C.UTF-8", "HOME": "/x", "LC_ALL": ""})
    assert env == ["TERM=vt100", "LANG=C.UTF-8"]
    assert interactive_env({"COLORTERM": "truecolor"}) == ["TERM=xterm-256color", "COLORTERM=truecolor"]


# ---------------------------------------------------------------------------------- fixtures

def shell(host, *args, timeout=60):
    return run_skypty("cli", "pty", "shell", host.dest, *host.sk_args, *args, timeout=timeout)


def one_line(b: bytes) -> str:
    lines = [ln for ln in b.decode().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------------- exec

@needs_host
def test_exec_stdout_stderr_exit_code(host):
    r = shell(host, "--", "sh", "-c", "printf 'out\\n'; printf 'e r r' >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"e r r")


@needs_host
def test_exec_forms(host):
    script = ["--", "sh", "-c", "echo $0 \"$@\"", "x", "a b", "-c"]
    r1 = run_skypty("cli", "pty", "exec", f"tcp://{host.dest}", *host.sk_args, *script)
    r2 = run_skypty("cli", "pty", "exec", host.pk.hex().upper(), "--via", f"tcp://{host.dest}", *host.sk_args,
                    *script)
    for r in (r1, r2):
        assert (r.returncode, r.stdout, r.stderr) == (0, b"x a b -c\n", b"")
    # the key may also come from the environment
    env = dict(os.environ, DMSGPTY_SK=host.client_sk.hex())
    r = run_skypty("cli", "pty", "shell", host.dest, "--", "true", env=env)
    assert (r.returncode, r.stderr) == (0, b"")


@needs_host
def test_exec_binary_output_is_exact(host):
    r = shell(host, "--", "head", "-c", "300000", "/dev/urandom")
    assert r.returncode == 0 and len(r.stdout) == 300000


@needs_host
@pytest.mark.parametrize("stream", [False, True])
def test_exec_into_a_reader_that_quits_early(host, stream):
    """`exec … | head -c 10`: the client ends at once, quietly, with no traceback (also not
    from flushing its output on the way out)."""
    cmd = SKYPTY + ["cli", "pty", "shell", host.dest, *host.sk_args] + (["--stream"] if stream else []) + \
        ["--", "sh", "-c", "head -c 3000000 /dev/zero; echo done >&2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert len(p.stdout.read(10)) == 10
        p.stdout.close()
        err = p.stderr.read()
        assert p.wait(30) == 0
    finally:
        stop_process(p)
    assert b"Traceback" not in err and b"Exception ignored" not in err, err


@needs_host
def test_a_profiled_exec_still_writes_its_profile(host, tmp_path):
    """One-shot verbs leave without the interpreter's teardown, except under a profiler or
    tracer, whose results are written at that teardown."""
    prof = tmp_path / "exec.prof"
    r = subprocess.run([SKYPTY[0], "-m", "cProfile", "-o", str(prof)] + SKYPTY[1:] +
                       ["cli", "pty", "shell", host.dest, *host.sk_args, "--", "echo", "hi"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr
    assert prof.stat().st_size > 0


@needs_host
def test_timeout_124(host):
    r = shell(host, "-t", "300ms", "--", "sleep", "20")
    assert r.returncode == 124
    assert b"[timed out after 300ms]" in r.stderr


@needs_host
def test_remote_minus_one_is_255(host):
    r = shell(host, "--", "/nonexistent/program")
    assert r.returncode == 255
    assert b"/nonexistent/program" in r.stderr


@needs_host
def test_env_passing(host):
    r = shell(host, "-e", "FOO=bar baz", "--env", "EMPTY=", "--", "sh", "-c", "echo \"$FOO|${EMPTY-unset}|$TERM_X\"")
    assert (r.returncode, r.stdout) == (0, b"bar baz||\n")
    r = shell(host, "-e", "NOEQUALS", "--", "true")
    assert r.returncode == 2 and "KEY=VALUE" in one_line(r.stderr)


@needs_host
def test_json_shape(host):
    r = shell(host, "--json", "--", "sh", "-c", "printf 'h\\303\\251'; printf '\\377\\376' >&2; exit 7")
    assert r.returncode == 7
    doc = json.loads(r.stdout)
    assert set(doc) == {"stdout", "stdout_encoding", "stderr", "stderr_encoding", "exit_code", "timed_out",
                        "stdout_truncated", "stderr_truncated", "duration_ms"}
    assert (doc["stdout"], doc["stdout_encoding"]) == ("hé", "utf-8")
    assert doc["stderr_encoding"] == "base64" and base64.b64decode(doc["stderr"]) == b"\xff\xfe"
    assert (doc["exit_code"], doc["timed_out"], doc["stdout_truncated"], doc["stderr_truncated"]) == \
        (7, False, False, False)
    assert isinstance(doc["duration_ms"], int) and doc["duration_ms"] >= 0
    r = run_skypty("cli", "pty", "exec", f"tcp://{host.dest}", *host.sk_args, "--json", "-t", "200ms",
                   "--", "sleep", "10")
    doc = json.loads(r.stdout)
    assert r.returncode == 124 and doc["timed_out"] is True and doc["exit_code"] == -1


@needs_host
def test_stream_output_arrives_before_the_command_ends(host):
    cmd = SKYPTY + ["cli", "pty", "shell", host.dest, *host.sk_args, "--stream", "-t", "2m", "--",
                    "sh", "-c", "echo first; echo err1 >&2; sleep 60; echo never"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 30)
        assert ready, "no streamed output"
        assert p.stdout.readline() == b"first\n"
        assert p.poll() is None      # the remote command is still sleeping
    finally:
        stop_process(p)
        p.stdout.close()
        p.stderr.close()


@needs_host
def test_stream_exit_code_and_stderr(host):
    r = shell(host, "--stream", "--", "sh", "-c", "echo a; echo b >&2; exit 4")
    assert (r.returncode, r.stdout, r.stderr) == (4, b"a\n", b"b\n")
    r = shell(host, "--stream", "--json", "--", "sh", "-c", "printf x; exit 0")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["stdout"] == "x" and doc["exit_code"] == 0
    r = shell(host, "--stream", "-t", "300ms", "--", "sleep", "20")
    assert r.returncode == 124 and b"[timed out after 300ms]" in r.stderr


@needs_host
def test_wrong_server_key(host):
    other_pk, _ = generate_keypair()
    r = run_skypty("cli", "pty", "shell", f"{other_pk.hex()}@127.0.0.1:{host.port}", *host.sk_args, "--", "true")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith("pty shell: ") and "wrong server key" in line and other_pk.hex() in line


@needs_host
def test_client_not_whitelisted(host):
    pk, sk = generate_keypair()
    r = run_skypty("cli", "pty", "shell", host.dest, "--sk", sk.hex(), "--", "true")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "probably not whitelisted" in line and pk.hex() in line
    # with no key at all we say that a random one is used (and then that it is not listed)
    r = run_skypty("cli", "pty", "shell", host.dest, "--no-visor-key", "--", "true",
                   env={k: v for k, v in os.environ.items() if k != "DMSGPTY_SK"})
    assert r.returncode == 1
    assert b"fresh random key" in r.stderr and b"probably not whitelisted" in r.stderr
    # the streamed paths do not take the hang-up for "no such subsystem" and fall back
    r = run_skypty("cli", "pty", "shell", host.dest, "--sk", sk.hex(), "--stream", "--", "true")
    assert r.returncode == 1 and "probably not whitelisted" in one_line(r.stderr)
    import pexpect

    child = pexpect.spawn(SKYPTY[0], SKYPTY[1:] + ["cli", "pty", "shell", host.dest, "--sk", sk.hex()], timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and b"probably not whitelisted" in child.before


def test_unreachable():
    pk, sk = generate_keypair()
    r = run_skypty("cli", "pty", "shell", f"{pk.hex()}@127.0.0.1:{free_port()}", "--sk", sk.hex(), "--", "true")
    assert r.returncode == 1
    assert "cannot reach 127.0.0.1:" in one_line(r.stderr)


@pytest.mark.parametrize("dest", ["nothex@127.0.0.1", "02ab@127.0.0.1:2022", "::1",
                                  "%s@::1:2022", "%s@127.0.0.1:70000", "%s@"])
def test_bad_destination_exit_2(dest):
    pk, sk = generate_keypair()
    dest = dest.replace("%s", pk.hex())
    r = run_skypty("cli", "pty", "shell", dest, "--sk", sk.hex(), "--", "true")
    assert r.returncode == 2
    assert one_line(r.stderr).startswith("pty shell: ")


def test_exec_without_node_rpc():
    pk, sk = generate_keypair()
    r = run_skypty("cli", "pty", "exec", pk.hex(), "--rpc", f"127.0.0.1:{free_port()}", "--sk", sk.hex(),
                   "--", "true")
    assert r.returncode == 1 and "no local node RPC at 127.0.0.1:" in one_line(r.stderr)
    r = run_skypty("cli", "pty", "exec", pk.hex(), "--standalone", "--dmsgdisc", f"http://127.0.0.1:{free_port()}",
                   "--sk", sk.hex(), "--", "true")
    assert r.returncode == 1 and one_line(r.stderr).startswith("pty exec: ")


def test_exec_through_node_rpc():
    """A bare <pk> goes to the node's `app-visor.DmsgPtyExec` (pty.md §11); here a stand-in
    node built from our own rpc server checks what arrives and answers."""
    import socket

    from skypty import gob
    from skypty.gobtypes import CommandExecReq, CommandExecResult, PubKey
    from skypty.rpc import Method, RPCServer

    args_t = gob.Struct("DmsgPtyExecArgs", [("RemotePK", PubKey), ("RemotePort", gob.UINT16),
                                            ("Req", CommandExecReq), ("Scheme", gob.STRING)])
    seen = []

    def dmsg_pty_exec(a):
        seen.append(a)
        return {"Stdout": b"via node\n", "Stderr": b"e", "ExitCode": 5, "DurationMS": 3}

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    port = ls.getsockname()[1]

    def serve():
        for _ in range(2):
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            srv = RPCServer(conn)
            srv.register("app-visor", [Method("DmsgPtyExec", args_t, CommandExecResult, dmsg_pty_exec)])
            threading.Thread(target=srv.serve, daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    pk, sk = generate_keypair()
    try:
        r = run_skypty("cli", "pty", "exec", f"dmsg://{pk.hex()}", "--rpc", f"127.0.0.1:{port}", "-e", "A=1",
                       "-t", "5s", "--", "ls", "-l")
        r2 = run_skypty("cli", "pty", "exec", pk.hex(), "-p", "23", "--rpc", f"127.0.0.1:{port}", "--", "true")
    finally:
        ls.close()
        t.join(5)
    assert (r.returncode, r.stdout, r.stderr) == (5, b"via node\n", b"e")
    assert r2.returncode == 5
    a, a2 = seen
    assert (a["RemotePK"], a["RemotePort"], a["Scheme"]) == (bytes(pk), 22, "dmsg")
    assert (a["Req"]["Name"], a["Req"]["Arg"], a["Req"]["Env"], a["Req"]["TimeoutMS"]) == ("ls", ["-l"], ["A=1"], 5000)
    assert (a2["RemotePort"], a2["Scheme"], a2["Req"]["Name"]) == (23, "", "true")


@needs_host
def test_fifty_concurrent_execs(host):
    from skypty.client import open_pty_tcp

    results, errors = {}, []

    def one(i: int) -> None:
        try:
            c = open_pty_tcp("127.0.0.1", host.port, host.pk, host.client_sk, timeout=60)
            try:
                results[i] = c.exec("sh", ["-c", f"echo {i}; exit {i % 7}"], timeout_ms=60000)
            finally:
                c.close()
        except Exception as e:  # collected: every thread must report
            errors.append(f"{i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(results) == 50
    for i, res in results.items():
        assert (res["Stdout"], res["ExitCode"], res["TimedOut"]) == (f"{i}\n".encode(), i % 7, False)


@needs_host
def test_concurrent_execs_on_one_connection(host):
    from skypty.client import open_pty_tcp

    c = open_pty_tcp("127.0.0.1", host.port, host.pk, host.client_sk)
    out = {}
    try:
        def one(i: int) -> None:
            out[i] = c.exec("echo", [str(i)])["Stdout"]
        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        c.close()
    assert out == {i: f"{i}\n".encode() for i in range(10)}


# ---------------------------------------------------------------------------------- interactive

pexpect = pytest.importorskip("pexpect")
PROMPT = "SKYPROMPT> "


def spawn_shell(tmp: str, args, rows=30, cols=100):
    """skypty in a real pty, wrapped so `stty -g` is recorded before and after it runs."""
    before, after = os.path.join(tmp, "before"), os.path.join(tmp, "after")
    inner = " ".join(shlex.quote(a) for a in SKYPTY + list(args))
    script = f"stty -g > {before}; {inner}; rc=$?; stty -g > {after}; exit $rc"
    env = dict(os.environ, TERM="xterm", PS1=PROMPT)
    child = pexpect.spawn("/bin/sh", ["-c", script], dimensions=(rows, cols), env=env, timeout=30)
    return child, before, after


def wait_prompt(child) -> None:
    child.expect(r"[$#>] ")                     # whatever the remote bash shows first
    child.sendline(f"PS1='{PROMPT[:3]}''{PROMPT[3:]}'")
    child.expect_exact(PROMPT)


def restored(before: str, after: str) -> bool:
    with open(before) as b, open(after) as a:
        return b.read() == a.read()


@contextlib.contextmanager
def interactive(tmp: str, args, rows=30, cols=100, exit_code=0):
    """skypty in a real pty, at the remote prompt; once the block ends without error, it must
    have exited `exit_code` with the terminal settings restored."""
    child, before, after = spawn_shell(tmp, args, rows, cols)
    try:
        wait_prompt(child)
        yield child
    finally:
        child.close(force=True)
    assert child.exitstatus == exit_code
    assert restored(before, after)


def check_window_size(tmp: str, args, rows: int, cols: int) -> None:
    """The remote pty starts at the local terminal's size; `exit` ends the session cleanly."""
    with interactive(tmp, args, rows, cols) as child:
        child.sendline("stty size; exit")
        child.expect_exact(f"{rows} {cols}")
        child.expect(pexpect.EOF)


@needs_host
def test_interactive_shell(host, tmp_path):
    with interactive(str(tmp_path), ["cli", "pty", "shell", host.dest, *host.sk_args]) as child:
        child.sendline("stty size")
        child.expect_exact("30 100")                 # the size we sent with Start
        child.expect_exact(PROMPT)
        child.setwinsize(41, 121)                    # SIGWINCH -> SetPtySize
        child.sendline("stty size")
        child.expect_exact("41 121")
        child.expect_exact(PROMPT)
        child.sendline("echo \"term=$TERM\"")
        child.expect_exact("term=xterm")
        child.expect_exact(PROMPT)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    assert _last_accept(host) == "skypty/pty-stream"   # skypty to skypty


@needs_host
def test_interactive_tilde_escapes(host, tmp_path):
    with interactive(str(tmp_path), ["cli", "pty", "shell", host.dest, *host.sk_args]) as child:
        child.send("~~Q")                            # at a line start ~~ sends one ~
        child.expect_exact("~Q")
        child.send("\x15")                           # kill the line
        child.send("\r")
        child.expect_exact(PROMPT)
        child.send("~.")                             # after CR: disconnect
        child.expect_exact("[disconnected]")
        child.expect(pexpect.EOF)


def _last_accept(host) -> str:
    return re.findall(r"mux: accept " + host.client_pk.hex() + r"@\S+ \(tcp\) (\S+)\n", host.log_text())[-1]


@needs_host
def test_interactive_no_pty_stream_speaks_the_go_protocol(host, tmp_path):
    check_window_size(str(tmp_path), ["cli", "pty", "shell", host.dest, *host.sk_args, "--no-pty-stream"],
                      rows=23, cols=81)
    assert _last_accept(host) == "dmsgpty/pty"


@needs_host
def test_a_paste_the_remote_does_not_read_never_stops_its_output(host, tmp_path):
    """64 MiB pasted (more than the sockets hold) while the remote writes 85 MiB and reads
    nothing: our sends block, as the host can put no more into the pty, and our output must
    keep flowing all the same, or neither side ever moves again. Then `wc` takes the paste."""
    with interactive(str(tmp_path), ["cli", "pty", "shell", host.dest, *host.sk_args]) as child:
        child.maxread = 65536
        child.sendline("stty -echo; head -c 67108864 /dev/zero | base64 -w 1000; echo DO''NE; wc -l")
        paste = (b"p" * 99 + b"\n") * (64 * 1024 * 1024 // 100)
        sender = threading.Thread(target=child.send, args=(paste,), daemon=True)
        sender.start()
        child.expect_exact("DONE", timeout=60, searchwindowsize=64)
        sender.join(60)
        assert not sender.is_alive()
        child.send("\x04")                                 # wc's EOF
        child.expect_exact(str(len(paste) // 100), timeout=60)
        child.sendline("stty echo; exit")
        child.expect(pexpect.EOF)


def _drain_until(child, marker: bytes, bound: float) -> bool:
    """Read the session's output as fast as it comes (pexpect's own search is slower than a
    flood) until marker shows up; False after bound seconds."""
    tail, deadline = b"", time.monotonic() + bound
    while time.monotonic() < deadline:
        if select.select([child.child_fd], [], [], 0.5)[0]:
            tail = (tail + os.read(child.child_fd, 1 << 20))[-4096:]
            if marker in tail:
                return True
    return False


@needs_host
def test_ctrl_c_gets_through_a_flood_of_output(host, tmp_path):
    """^C typed while output pours in at full speed gets through and stops it."""
    with interactive(str(tmp_path), ["cli", "pty", "shell", host.dest, *host.sk_args]) as child:
        child.sendline("base64 /dev/zero")
        assert _drain_until(child, b"A" * 64, 30)   # 76-column lines of A
        child.send("\x03")
        child.sendline("echo AF''TER")
        assert _drain_until(child, b"AFTER", 30)
        child.sendline("exit")
        child.expect(pexpect.EOF)


@needs_host
def test_interactive_start_via(host, tmp_path):
    check_window_size(str(tmp_path), ["cli", "pty", "start", "--via", f"tcp://{host.dest}", *host.sk_args],
                      rows=25, cols=90)
    assert _last_accept(host) == "skypty/pty-stream"


@needs_host
def test_connection_lost_exit_1(tmp_path):
    h = HostProc(str(tmp_path))
    try:
        with interactive(str(tmp_path), ["cli", "pty", "shell", h.dest, *h.sk_args], exit_code=1) as child:
            h.proc.send_signal(signal.SIGKILL)
            child.expect(pexpect.EOF)
            out = child.before.decode(errors="replace")
    finally:
        h.stop()
    assert "connection lost" in out


@needs_host
def test_start_through_control_socket(tmp_path):
    """`cli pty start` with no target: the local host's control socket; with a <pk>: its
    dmsgpty/proxy, which a --no-dmsg host refuses (one clear line, exit 1)."""
    conf, sock = str(tmp_path / "config.json"), str(tmp_path / "pty.sock")
    r = run_skypty("app", "pty", "dmsg", "confgen", conf)
    assert r.returncode == 0, r.stderr
    port = free_port()
    log = open(tmp_path / "host.log", "wb")
    hp = subprocess.Popen(SKYPTY + ["app", "pty", "tcp", "-c", conf, "--addr", f"127.0.0.1:{port}",
                                    "--cliaddr", sock], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=20)
        check_window_size(str(tmp_path), ["cli", "pty", "start", "--cliaddr", sock], rows=22, cols=77)
        pk, _ = generate_keypair()
        r = run_skypty("cli", "pty", "start", pk.hex(), "--cliaddr", sock)
        assert r.returncode == 1 and "could not reach the remote pty" in one_line(r.stderr)
    finally:
        stop_process(hp)
        log.close()
    r = run_skypty("cli", "pty", "start", "--cliaddr", sock)
    assert r.returncode == 1 and one_line(r.stderr).startswith("pty start: ")


@needs_host
def test_ctrl_c_is_130(host):
    cmd = SKYPTY + ["cli", "pty", "shell", host.dest, *host.sk_args, "--stream", "-t", "2m", "--",
                    "sh", "-c", "echo started; sleep 60"]
    # faulthandler: if the client ever ignores the ^C (seen once in CI, never reproduced), its
    # stack goes into the failure instead of a bare timeout
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    try:
        assert p.stdout.readline() == b"started\n"
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            _, err = p.communicate(timeout=10)
            pytest.fail("still running 30 s after SIGINT; its stacks:\n" + err.decode("utf-8", "replace"))
    finally:
        stop_process(p)
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == 130
    assert one_line(err) == "pty shell: interrupted"


@needs_host
def test_output_truncation_note(host):
    r = shell(host, "--", "sh", "-c", "head -c 17000000 /dev/zero; echo tail >&2")
    assert r.returncode == 0
    assert len(r.stdout) == 16 * 1024 * 1024 and r.stdout.count(b"\0") == len(r.stdout)
    assert r.stderr == b"tail\n[stdout truncated at 16MiB]\n"


def _children(pid: int):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@needs_host
def test_interactive_sigterm_restores_terminal(host, tmp_path):
    with interactive(str(tmp_path), ["cli", "pty", "shell", host.dest, *host.sk_args], exit_code=1) as child:
        (client_pid,) = _children(child.pid)
        os.kill(client_pid, signal.SIGTERM)
        child.expect(pexpect.EOF)


@needs_host
def test_shell_with_piped_stdin_runs_the_script(host):
    """No terminal on stdin: like `ssh host < script`, the shell reads the script and exits."""
    r = run_skypty("cli", "pty", "shell", host.dest, *host.sk_args,
                   input=b"echo \"hi-$((1+2))\"\necho oops >&2\nexit 5\n")
    assert (r.returncode, r.stdout, r.stderr) == (5, b"hi-3\n", b"oops\n")
    r = run_skypty("cli", "pty", "shell", host.dest, *host.sk_args, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (0, b"")


@needs_host
def test_standalone_dmsg_exec_and_start(tmp_path):
    """`--standalone`: an ephemeral dmsg client through a private dmsg network (discovery +
    server + `app pty dmsg` host, all subprocesses on loopback)."""
    import time
    import urllib.request

    conf = str(tmp_path / "host.json")
    assert run_skypty("app", "pty", "dmsg", "confgen", conf).returncode == 0
    with open(conf) as f:
        hpk = json.load(f)["pk"]
    cpk, csk = generate_keypair()
    dport, sport = free_port(), free_port()
    disc = f"http://127.0.0.1:{dport}"
    log = open(tmp_path / "net.log", "wb")
    procs = []

    def start(*args):
        procs.append(subprocess.Popen(SKYPTY + list(args), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))

    try:
        start("dmsg", "disc", "-a", f"127.0.0.1:{dport}")
        wait_port(dport, timeout=20)
        start("dmsg", "server", "-l", f"127.0.0.1:{sport}", "--dmsgdisc", disc)
        wait_port(sport, timeout=20)
        start("app", "pty", "dmsg", "-c", conf, "--dmsgdisc", disc, "--wl", cpk.hex(),
              "--cliaddr", str(tmp_path / "pty.sock"))
        # ready once the host's entry names its dmsg server (a readiness poll, not a timing check)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{disc}/dmsg-discovery/entry/{hpk}", timeout=2) as resp:
                    if json.load(resp).get("client", {}).get("delegated_servers"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "host never registered with the dmsg discovery"
            time.sleep(0.1)
        r = run_skypty("cli", "pty", "exec", hpk, "--standalone", "--dmsgdisc", disc, "--sk", csk.hex(),
                       "--", "sh", "-c", "echo via-dmsg; echo e >&2; exit 6")
        assert (r.returncode, r.stdout, r.stderr) == (6, b"via-dmsg\n", b"e\n")
        _, other = generate_keypair()
        r = run_skypty("cli", "pty", "exec", f"dmsg://{hpk}", "--standalone", "--dmsgdisc", disc,
                       "--sk", other.hex(), "--", "true")
        assert r.returncode == 1 and "probably not whitelisted" in one_line(r.stderr)
        check_window_size(str(tmp_path), ["cli", "pty", "start", hpk, "--standalone", "--dmsgdisc", disc,
                                          "--sk", csk.hex()], rows=23, cols=81)
    finally:
        for p in reversed(procs):
            stop_process(p)
        log.close()


@needs_host
def test_identity_resolution_order(host, tmp_path):
    """--sk > $DMSGPTY_SK > the node's key (./skywire-config.json, or --visor-config) > random."""
    node_conf = tmp_path / "skywire-config.json"
    node_conf.write_text(json.dumps({"sk": host.client_sk.hex()}))
    _, stranger = generate_keypair()
    env = {k: v for k, v in os.environ.items() if k != "DMSGPTY_SK"}
    base = ["cli", "pty", "shell", host.dest]
    # the default path ./skywire-config.json (shell borrows the node key by default)
    r = run_skypty(*base, "--", "true", cwd=str(tmp_path), env=env)
    assert (r.returncode, r.stderr) == (0, b"")
    r = run_skypty(*base, "--no-visor-key", "--", "true", cwd=str(tmp_path), env=env)
    assert r.returncode == 1 and b"fresh random key" in r.stderr
    # an explicit --visor-config, from anywhere
    r = run_skypty(*base, "--visor-config", str(node_conf), "--", "true", env=env)
    assert r.returncode == 0
    r = run_skypty(*base, "--visor-config", str(tmp_path / "missing.json"), "--", "true", env=env)
    assert r.returncode != 0 and one_line(r.stderr).startswith("pty shell: ")
    # $DMSGPTY_SK beats the node key; --sk beats both
    r = run_skypty(*base, "--", "true", cwd=str(tmp_path), env=dict(env, DMSGPTY_SK=stranger.hex()))
    assert r.returncode == 1 and stranger.pubkey().hex() in one_line(r.stderr)
    r = run_skypty(*base, "--sk", host.client_sk.hex(), "--", "true", env=dict(env, DMSGPTY_SK=stranger.hex()))
    assert r.returncode == 0
    r = run_skypty(*base, "--sk", "zz", "--", "true", env=env)
    assert r.returncode == 2 and "--sk" in one_line(r.stderr)


@contextlib.contextmanager
def older_host():
    """A host with `dmsgpty/pty` alone, as a Go host or an older skypty: it answers the
    exec-stream and pty-stream URIs with 0x01. Built from the real pieces (XK responder, mux
    table, pty service). Yields (destination, client sk hex)."""
    import socket

    from skypty import mux, noise
    from skypty.services.pty import pty_factory

    hpk, hsk = generate_keypair()
    cpk, csk = generate_keypair()
    table = mux.MuxTable()
    table.add_rpc("dmsgpty/pty", pty_factory)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    seen = []

    def serve_one(s):
        try:
            conn = noise.server_handshake(s, hsk)
        except Exception:
            return
        if conn.remote_pk != cpk:
            conn.close()
            return
        seen.append(conn)
        table.serve(conn, mux.Peer(conn.remote_pk, "test", "tcp"))

    def accept_loop():
        while True:
            try:
                s, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(s,), daemon=True).start()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    try:
        yield f"{hpk.hex()}@127.0.0.1:{port}", csk.hex()
    finally:
        ls.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept()
        ls.close()
        t.join(5)
        for conn in seen:
            conn.close()


def test_stream_falls_back_on_an_older_host():
    """--stream on a host without exec-stream: buffered Exec, said on stderr."""
    with older_host() as (dest, sk):
        r = run_skypty("cli", "pty", "shell", dest, "--sk", sk, "--stream", "--", "sh", "-c", "echo buffered; exit 2")
    assert (r.returncode, r.stdout) == (2, b"buffered\n")
    assert "no exec-stream subsystem" in one_line(r.stderr)


def test_interactive_shell_falls_back_to_rpc_on_an_older_host(tmp_path):
    """A host without pty-stream (a Go host): the same session over `dmsgpty/pty`'s calls."""
    with older_host() as (dest, sk):
        with interactive(str(tmp_path), ["cli", "pty", "shell", dest, "--sk", sk], rows=26, cols=88) as child:
            child.sendline("stty size")
            child.expect_exact("26 88")
            child.expect_exact(PROMPT)
            child.setwinsize(30, 99)
            child.sendline("stty size")
            child.expect_exact("30 99")
            child.expect_exact(PROMPT)
            child.send("~.")
            child.expect_exact("[disconnected]")
            child.expect(pexpect.EOF)
