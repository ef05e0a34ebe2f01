"""services/exec.run_exec with real processes (pty.md §4.1)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from skypty import limits
from skypty.services.exec import ExecError, clamp_timeout_ms, run_exec

pytestmark = pytest.mark.timeout(120)


from conftest import process_alive as _alive, wait_gone as _wait_gone  # noqa: E402


def test_stdout_stderr_exit_code_exact():
    r = run_exec({"Name": "sh", "Arg": ["-c", "printf 'out\\n'; printf 'e r r' >&2; exit 3"]})
    assert r["Stdout"] == b"out\n"
    assert r["Stderr"] == b"e r r"
    assert r["ExitCode"] == 3
    assert r["TimedOut"] is False
    assert r["StdoutTruncated"] is False and r["StderrTruncated"] is False
    assert isinstance(r["DurationMS"], int) and r["DurationMS"] >= 0


def test_argv_is_not_shell_parsed():
    r = run_exec({"Name": "printf", "Arg": ["%s|", "a b", "$HOME", "*", ";"]})
    assert (r["ExitCode"], r["Stdout"]) == (0, b"a b|$HOME|*|;|")


def test_signal_death_is_minus_one():
    r = run_exec({"Name": "sh", "Arg": ["-c", "kill -9 $$"]})
    assert r["ExitCode"] == -1 and r["TimedOut"] is False


def test_timeout_kills_the_whole_group():
    # the shell prints the pids of two background children, then waits forever
    r = run_exec({"Name": "sh", "Arg": ["-c", "sleep 600 & echo $!; sleep 600 & echo $!; echo $$; wait"],
                  "TimeoutMS": 500})
    assert r["ExitCode"] == -1
    assert r["TimedOut"] is True
    pids = [int(x) for x in r["Stdout"].split()]
    assert len(pids) == 3
    assert _wait_gone(pids) == []


def test_stdin_one_mib_round_trip():
    data = os.urandom(limits.EXEC_STDIN_MAX)
    r = run_exec({"Name": "cat", "Stdin": data})
    assert r["ExitCode"] == 0
    assert r["Stdout"] == data


def test_stdin_ignored_by_child_does_not_hang():
    r = run_exec({"Name": "true", "Stdin": b"x" * limits.EXEC_STDIN_MAX})
    assert r["ExitCode"] == 0


def test_no_stdin_is_dev_null():
    r = run_exec({"Name": "cat"})
    assert (r["ExitCode"], r["Stdout"]) == (0, b"")


def test_stdin_too_large():
    with pytest.raises(ExecError) as ei:
        run_exec({"Name": "cat", "Stdin": b"x" * (limits.EXEC_STDIN_MAX + 1)})
    assert str(ei.value) == f"dmsgpty: Exec: stdin {limits.EXEC_STDIN_MAX + 1} > max 1048576"


def test_empty_name():
    with pytest.raises(ExecError) as ei:
        run_exec({"Name": "", "Arg": ["x"]})
    assert str(ei.value) == "dmsgpty: Exec: empty command name"


def test_env_merged_over_host_env(monkeypatch):
    monkeypatch.setenv("SKYPTY_TEST_HOSTVAR", "host")
    monkeypatch.setenv("SKYPTY_TEST_OVERRIDE", "old")
    r = run_exec({"Name": "sh", "Arg": ["-c", 'echo "$SKYPTY_TEST_HOSTVAR $SKYPTY_TEST_OVERRIDE $NEWVAR"'],
                  "Env": ["SKYPTY_TEST_OVERRIDE=new", "NEWVAR=a=b", "NEWVAR=c"]})
    assert r["Stdout"] == b"host new c\n"


def test_output_cap_sets_truncated_flags():
    n = 17 * 1024 * 1024
    r = run_exec({"Name": "sh", "Arg": ["-c", f"head -c {n} /dev/zero; head -c {n} /dev/zero >&2; echo done >&2"]})
    assert r["ExitCode"] == 0   # the child was never blocked on a full pipe
    assert len(r["Stdout"]) == limits.EXEC_OUTPUT_CAP and r["StdoutTruncated"] is True
    assert len(r["Stderr"]) == limits.EXEC_OUTPUT_CAP and r["StderrTruncated"] is True


def test_spawn_failure_not_found():
    r = run_exec({"Name": "skypty-no-such-command"})
    assert r["ExitCode"] == -1 and r["TimedOut"] is False
    assert r["Stdout"] == b""
    assert r["Stderr"] == (b'dmsgpty: exec skypty-no-such-command: exec: "skypty-no-such-command": '
                           b"executable file not found in $PATH\n")


def test_spawn_failure_not_executable(tmp_path):
    p = tmp_path / "script"
    p.write_text("echo hi\n")
    os.chmod(p, 0o644)
    r = run_exec({"Name": str(p)})
    assert r["ExitCode"] == -1
    assert r["Stderr"] == f"dmsgpty: exec {p}: fork/exec {p}: permission denied\n".encode()


def test_timeout_clamping():
    assert clamp_timeout_ms(0, 30000, 300000) == 30000
    assert clamp_timeout_ms(-5, 30000, 300000) == 30000
    assert clamp_timeout_ms(None, 30000, 300000) == 30000
    assert clamp_timeout_ms(10**12, 30000, 300000) == 300000
    assert clamp_timeout_ms(1234, 30000, 300000) == 1234


def test_concurrent_execs(tmp_path):
    """A reader blocks on a fifo until a second exec writes it: only works if both run at once."""
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    results = {}

    def go(key, req):
        results[key] = run_exec(req)

    t1 = threading.Thread(target=go, args=("reader", {"Name": "cat", "Arg": [fifo], "TimeoutMS": 60000}))
    t1.start()
    t2 = threading.Thread(target=go, args=("writer", {"Name": "sh", "Arg": ["-c", f"echo ping > {fifo}"],
                                                      "TimeoutMS": 60000}))
    t2.start()
    t1.join(90)
    t2.join(90)
    assert results["writer"]["ExitCode"] == 0
    assert results["reader"]["Stdout"] == b"ping\n"
    assert results["reader"]["TimedOut"] is False


def test_kill_all_kills_running_and_rearms(tmp_path):
    from skypty.services.exec import kill_all
    pidfile = tmp_path / "pid"
    res = {}
    t = threading.Thread(target=lambda: res.setdefault("r", run_exec(
        {"Name": "sh", "Arg": ["-c", f"echo $$ > {pidfile}; exec sleep 600"], "TimeoutMS": 300000})))
    t.start()
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    kill_all()
    t.join(30)
    assert res["r"]["ExitCode"] == -1
    assert _wait_gone([pid]) == []
    # later execs are not affected
    assert run_exec({"Name": "echo", "Arg": ["after"]})["Stdout"] == b"after\n"


def _pids_with(marker: str) -> list:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _alive(int(name)):
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(name))
            except OSError:
                pass
    return out


def test_timeout_kills_a_job_that_left_the_process_group():
    # a child that moved to a process group of its own (as a shell's job control does) is still
    # in the command's session: a timeout must not leave it running as an orphan
    import sys
    marker = f"skypty-pgid-{os.getpid()}-{time.monotonic_ns()}"
    code = "import os, time; os.setpgid(0, 0); print(os.getpid(), flush=True); time.sleep(600)"
    r = run_exec({"Name": "sh", "Arg": ["-c", f'{sys.executable} -c "{code}" {marker} & wait'], "TimeoutMS": 2000})
    assert r["TimedOut"] is True and r["ExitCode"] == -1
    assert r["Stdout"].strip().isdigit()       # it did start (and moved group) before the deadline
    assert _wait_gone(_pids_with(marker)) == []
    assert _pids_with(marker) == []


def test_deadline_kills_while_an_output_callback_blocks():
    # exec-stream's callback blocks while a client does not read: the deadline must still kill
    from skypty.services.exec import pump, spawn
    proc = spawn("sh", ["-c", "echo x; exec sleep 600"], [], stdin=False)
    seen = []

    def stuck(_data: bytes) -> None:
        deadline = time.monotonic() + 30
        while _alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(_alive(proc.pid))          # killed (a zombie: pump cannot reap while we block)

    assert pump(proc, b"", time.monotonic() + 0.5, stuck, lambda _d: None) is True
    assert seen == [False]
    assert proc.returncode is not None


def test_a_child_spawned_before_kill_all_but_pumped_after_it_is_killed():
    """kill_all may look before a just-spawned child joins the live set (or give up waiting)
    and re-arm; that child's pump must still kill it, not run it to its deadline."""
    from skypty.services.exec import kill_all, pump, spawn

    proc = spawn("sleep", ["600"], [], stdin=False)
    kill_all(wait=0.1)   # nothing pumps the child yet: kill_all stops waiting and re-arms
    out = []
    t0 = time.monotonic()
    assert pump(proc, b"", t0 + 30, out.append, out.append) is True
    assert time.monotonic() - t0 < 15 and proc.returncode is not None
    assert run_exec({"Name": "echo", "Arg": ["after"]})["Stdout"] == b"after\n"
