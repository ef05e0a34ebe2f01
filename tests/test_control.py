"""The local control socket: listener/dialer rules, the whitelist service (Go transcript),
and every `app pty exec` verb against a real host process."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SKYPTY, free_port, load_vector, run_skypty, stop_process, wait_port
from skypty.errors import SkyptyError, UsageError
from skypty.keys import PubKey
from skypty.transport.unixsock import dial_control, listen_control

KEYS = load_vector("keys.json")["cases"]
HOST_SK, HOST_PK = KEYS[0]["sk"], KEYS[0]["pk"]
CLIENT_SK, CLIENT_PK = KEYS[5]["sk"], KEYS[5]["pk"]
GOB = load_vector("gob_rpc.json")
WL_SCENARIO = next(s for s in GOB["scenarios"] if s["scenario"] == "whitelist")
HAVE_HOST = os.path.exists(os.path.join(ROOT, "skypty", "host.py"))


@pytest.fixture
def sockdir(tmp_path_factory):
    # A short directory: AF_UNIX paths are limited to 107 bytes and pytest's tmp paths are long.
    import tempfile
    d = tempfile.mkdtemp(prefix="skyctl", dir="/tmp")
    yield d
    for name in os.listdir(d):
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass
    os.rmdir(d)


# ================================================================== listener / dialer rules

def test_unix_socket_is_0600_even_with_umask_0(sockdir):
    path = os.path.join(sockdir, "pty.sock")
    old = os.umask(0)
    try:
        s = listen_control("unix", path)
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(sockdir) == ["pty.sock"]            # the private temp dir is gone
        c = dial_control("unix", path)
        a, _ = s.accept()
        c.sendall(b"ping")
        assert a.recv(4) == b"ping"
        a.close()
        c.close()
    finally:
        s.close()
    assert not os.path.exists(path)                          # removed on close


def test_stale_socket_is_replaced(sockdir):
    path = os.path.join(sockdir, "pty.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()                                             # file left behind, nobody listening
    s = listen_control("unix", path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        dial_control("unix", path).close()
    finally:
        s.close()


def test_live_socket_and_non_socket_are_refused(sockdir):
    path = os.path.join(sockdir, "pty.sock")
    s = listen_control("unix", path)
    try:
        with pytest.raises(UsageError, match="already listening"):
            listen_control("unix", path)
        dial_control("unix", path).close()                   # the first one still works
    finally:
        s.close()
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(UsageError, match="not a socket"):
        listen_control("unix", path)
    assert open(path).read() == "precious"
    os.unlink(path)
    os.symlink("/etc/passwd", path)
    with pytest.raises(UsageError, match="not a socket"):
        listen_control("unix", path)
    os.unlink(path)


def test_tcp_control_must_be_loopback():
    for addr in ("0.0.0.0:0", ":0", "192.0.2.1:0", "[::]:0"):
        with pytest.raises(UsageError, match="not loopback"):
            listen_control("tcp", addr)
    s = listen_control("tcp", "127.0.0.1:0")
    port = s.getsockname()[1]
    try:
        c = dial_control("tcp", f"127.0.0.1:{port}")
        c.close()
    finally:
        s.close()
    s = listen_control("tcp", "0.0.0.0:0", unsafe=True)
    s.close()
    with pytest.raises(UsageError, match="abstract"):
        listen_control("unix", "@skypty-test")


def test_dial_errors_are_one_line(sockdir):
    with pytest.raises(SkyptyError, match="no host listens"):
        dial_control("unix", os.path.join(sockdir, "none.sock"))
    with pytest.raises(SkyptyError, match="no host listens"):
        dial_control("tcp", f"127.0.0.1:{free_port()}")
    with pytest.raises(UsageError, match="unknown network"):
        dial_control("udp", "x")


# ================================================================== whitelist service, in process

def _serve_mux(listener, table, peer_path="control"):
    from skypty import mux

    def loop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=table.serve, args=(conn, mux.Peer(None, "local", peer_path)),
                             daemon=True).start()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


@pytest.fixture
def wl_server(sockdir, tmp_path):
    """A control socket serving only dmsgpty/whitelist, backed by a real config file."""
    from skypty import mux
    from skypty.services.whitelist import whitelist_factory
    from skypty.whitelist import ConfigWhitelist

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"sk": HOST_SK, "pk": HOST_PK, "wl": None, "dmsgport": 22}))
    os.chmod(cfg, 0o600)
    store = ConfigWhitelist(PubKey.from_hex(HOST_PK), str(cfg))
    table = mux.MuxTable()
    table.add_rpc("dmsgpty/whitelist", whitelist_factory(store))
    path = os.path.join(sockdir, "pty.sock")
    lst = listen_control("unix", path)
    _serve_mux(lst, table)
    yield path, str(cfg), store
    lst.close()


def _replay_whitelist_transcript(path: str) -> None:
    """Send the Go dmsgpty-cli's bytes; decode our reply stream and compare values with Go's."""
    from skypty import gob, gobtypes
    from skypty.gob import BufferedReader

    c2s = bytes.fromhex(WL_SCENARIO["c2s_stream_hex"])
    sock = dial_control("unix", path)
    sock.settimeout(20)
    try:
        # One call at a time, as the Go client did (its replies are what we compare with).
        pre = bytes.fromhex(WL_SCENARIO["preamble"]["c2s_hex"])
        assert c2s.startswith(pre)
        sock.sendall(pre)
        reader = BufferedReader(sock)
        assert reader.read_exact(1) == bytes.fromhex(WL_SCENARIO["preamble"]["s2c_hex"])
        dec = gob.Decoder(reader.read_exact)
        for call in WL_SCENARIO["calls"]:
            sock.sendall(bytes.fromhex(call["c2s_hex"]))
            hdr = dec.decode(gobtypes.RPC_RESPONSE)
            assert hdr["ServiceMethod"] == call["method"] and hdr["Seq"] == call["seq"]
            assert hdr["Error"] == (call["error"] or "")
            if call["method"] == "whitelist.Whitelist":
                got = [bytes(pk).hex() for pk in dec.decode(gobtypes.PubKeyList)]
                assert sorted(got) == sorted(call["reply"]["value"])
            else:
                assert dec.decode(gob.EMPTY) == {}
    finally:
        sock.close()


def test_go_whitelist_transcript_in_process(wl_server):
    path, cfg, store = wl_server
    _replay_whitelist_transcript(path)
    added = WL_SCENARIO["calls"][1]["args"]["value"]
    removed = WL_SCENARIO["calls"][2]["args"]["value"]
    left = [pk for pk in added if pk not in removed]
    assert json.load(open(cfg))["wl"] == left                 # persisted in the config file
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    assert json.load(open(cfg))["sk"] == HOST_SK               # other keys kept


def test_whitelist_errors_are_rpc_strings(wl_server):
    from skypty import gob, gobtypes, mux, rpc

    path, cfg, store = wl_server
    pk = PubKey.from_hex(CLIENT_PK)
    sock = dial_control("unix", path)
    try:
        mux.request(sock, "dmsgpty/whitelist", timeout=10)
        cl = rpc.RPCClient(sock)
        cl.call("whitelist.WhitelistAdd", gobtypes.PubKeyList, [bytes(pk)], gob.EMPTY, timeout=10)
        before = os.stat(cfg)
        with pytest.raises(rpc.RPCError, match="Already exists"):
            cl.call("whitelist.WhitelistAdd", gobtypes.PubKeyList, [bytes(pk)], gob.EMPTY, timeout=10)
        with pytest.raises(rpc.RPCError, match="Not in whitelist"):
            cl.call("whitelist.WhitelistRemove", gobtypes.PubKeyList, [bytes(PubKey.from_hex(HOST_PK))],
                    gob.EMPTY, timeout=10)
        after = os.stat(cfg)
        assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)   # no rewrite
        # the connection survives errors
        assert cl.call("whitelist.Whitelist", gob.EMPTY, {}, gobtypes.PubKeyList, timeout=10) == [bytes(pk)]
        cl.close()
    finally:
        sock.close()


def test_whitelist_client_verbs_in_process(wl_server):
    path, cfg, store = wl_server
    cli = lambda *a: run_skypty("app", "pty", "exec", a[0], "-r", path, *a[1:])   # noqa: E731
    r = cli("whitelist-add", f"{CLIENT_PK},{KEYS[6]['pk']}")
    assert r.returncode == 0, r.stderr
    assert cli("whitelist").stdout.decode().split() == [CLIENT_PK, KEYS[6]["pk"]]
    r = cli("whitelist-remove", CLIENT_PK, CLIENT_PK)
    assert r.returncode == 0, r.stderr
    assert store.list() == [PubKey.from_hex(KEYS[6]["pk"])]
    r = cli("whitelist-remove", CLIENT_PK)
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and "Not in whitelist" in r.stderr.decode()
    # the socket flags before the sub-verb, as the host's startup hint prints them, reach the
    # same socket (argparse once let the sub-verb's absent flag reset them to the default)
    r = run_skypty("app", "pty", "exec", "--cliaddr", path, "whitelist-add", CLIENT_PK)
    assert r.returncode == 0, r.stderr
    r = run_skypty("dmsg", "pty", "cli", "-n", "unix", "-r", path, "whitelist")
    assert r.returncode == 0 and r.stdout.decode().split() == [KEYS[6]["pk"], CLIENT_PK], r.stderr


# ================================================================== against a real host process

needs_host = pytest.mark.skipif(not HAVE_HOST, reason="skypty/host.py has not landed yet")


def _write_host_config(tmp_path, wl=()) -> str:
    p = tmp_path / "host.json"
    p.write_text(json.dumps({"sk": HOST_SK, "pk": HOST_PK, "wl": list(wl) or None}, indent=2))
    os.chmod(p, 0o600)
    return str(p)


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"host exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        if os.path.exists(path):
            try:
                dial_control("unix", path, timeout=1).close()
                return
            except SkyptyError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"no control socket at {path}")


class Host:
    def __init__(self, tmp_path, sockdir, wl=()):
        self.cfg = _write_host_config(tmp_path, wl)
        self.sock = os.path.join(sockdir, "pty.sock")
        self.port = free_port()
        self.proc = subprocess.Popen(
            SKYPTY + ["app", "pty", "tcp", "-c", self.cfg, "--addr", f"127.0.0.1:{self.port}",
                      "--cliaddr", self.sock, "--log-level", "debug"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_socket(self.sock, self.proc)
            wait_port(self.port)
        except BaseException:
            self.stop()
            raise

    def cli(self, *args, **kw):
        return run_skypty("app", "pty", "exec", *args[:1], "--cliaddr", self.sock, *args[1:], **kw)

    def stop(self):
        stop_process(self.proc)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def host(tmp_path, sockdir):
    h = Host(tmp_path, sockdir)
    yield h
    h.stop()


@needs_host
def test_host_control_socket_mode_and_second_host_refused(host, tmp_path, sockdir):
    st = os.lstat(host.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    r = run_skypty("app", "pty", "tcp", "-c", host.cfg, "--addr", f"127.0.0.1:{free_port()}",
                   "--cliaddr", host.sock, timeout=60)
    assert r.returncode != 0 and b"already listening" in r.stderr
    assert host.cli("whitelist").returncode == 0            # the first host is untouched


@needs_host
def test_host_replaces_stale_socket(tmp_path, sockdir):
    path = os.path.join(sockdir, "pty.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    h = Host(tmp_path, sockdir)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert h.cli("whitelist").returncode == 0
    finally:
        h.stop()


@needs_host
def test_host_refuses_non_loopback_tcp_control(tmp_path):
    cfg = _write_host_config(tmp_path)
    r = run_skypty("app", "pty", "tcp", "-c", cfg, "--addr", f"127.0.0.1:{free_port()}",
                   "--clinet", "tcp", "--cliaddr", f"0.0.0.0:{free_port()}", timeout=60)
    assert r.returncode == 2 and b"not loopback" in r.stderr


@needs_host
def test_host_tcp_loopback_control(tmp_path):
    cfg = _write_host_config(tmp_path)
    cport, port = free_port(), free_port()
    p = subprocess.Popen(SKYPTY + ["app", "pty", "tcp", "-c", cfg, "--addr", f"127.0.0.1:{port}",
                                   "--clinet", "tcp", "--cliaddr", f"127.0.0.1:{cport}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(cport)
        r = run_skypty("app", "pty", "exec", "exec", "--clinet", "tcp", "--cliaddr", f"127.0.0.1:{cport}",
                       "--", "echo", "over-tcp")
        assert r.returncode == 0 and r.stdout == b"over-tcp\n", r.stderr
    finally:
        stop_process(p)


@needs_host
def test_whitelist_verbs_against_host(host):
    assert host.cli("whitelist").stdout == b""
    r = host.cli("whitelist-add", CLIENT_PK, KEYS[6]["pk"])
    assert r.returncode == 0, r.stderr
    assert host.cli("whitelist").stdout.decode().split() == [CLIENT_PK, KEYS[6]["pk"]]
    assert json.load(open(host.cfg))["wl"] == [CLIENT_PK, KEYS[6]["pk"]]
    assert stat.S_IMODE(os.stat(host.cfg).st_mode) == 0o600
    r = host.cli("whitelist-add", CLIENT_PK)
    assert r.returncode == 1 and b"Already exists" in r.stderr and r.stderr.count(b"\n") == 1
    r = host.cli("whitelist-remove", KEYS[6]["pk"])
    assert r.returncode == 0, r.stderr
    r = host.cli("whitelist-remove", KEYS[6]["pk"])
    assert r.returncode == 1 and b"Not in whitelist" in r.stderr
    assert host.cli("whitelist").stdout.decode().split() == [CLIENT_PK]
    r = host.cli("whitelist-add", "02abc")
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1


@needs_host
def test_whitelist_add_lets_a_tcp_client_in(host):
    r = run_skypty("cli", "pty", "exec", f"tcp://{HOST_PK}@127.0.0.1:{host.port}", "--sk", CLIENT_SK,
                   "--", "echo", "hi")
    assert r.returncode != 0                                  # not whitelisted yet
    assert host.cli("whitelist-add", CLIENT_PK).returncode == 0
    r = run_skypty("cli", "pty", "exec", f"tcp://{HOST_PK}@127.0.0.1:{host.port}", "--sk", CLIENT_SK,
                   "--", "echo", "hi")
    assert r.returncode == 0 and r.stdout == b"hi\n", r.stderr


@needs_host
def test_go_whitelist_transcript_against_host(host):
    _replay_whitelist_transcript(host.sock)
    added = WL_SCENARIO["calls"][1]["args"]["value"]
    removed = WL_SCENARIO["calls"][2]["args"]["value"]
    assert json.load(open(host.cfg))["wl"] == [pk for pk in added if pk not in removed]


@needs_host
def test_exec_verb_mirrors_exit_code(host):
    r = host.cli("exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7 and r.stdout == b"out\n" and r.stderr == b"err\n"
    r = host.cli("exec", "-e", "SKYTEST=yes", "--", "sh", "-c", "echo $SKYTEST")
    assert r.returncode == 0 and r.stdout == b"yes\n", r.stderr
    r = host.cli("exec", "-t", "1s", "--", "sleep", "30")
    assert r.returncode == 124 and b"timed out" in r.stderr
    r = host.cli("exec")
    assert r.returncode == 2


@needs_host
def test_cliaddr_from_confpath(host, tmp_path):
    cfg = tmp_path / "client.yaml"
    cfg.write_text(f"cliaddr: {host.sock}\nclinet: unix\n")
    r = run_skypty("app", "pty", "exec", "exec", "-p", str(cfg), "--", "echo", "via-conf")
    assert r.returncode == 0 and r.stdout == b"via-conf\n", r.stderr
    r = run_skypty("app", "pty", "exec", "exec", "--", "true",
                   env=dict(os.environ, DMSGPTY_CLIADDR=host.sock))
    assert r.returncode == 0, r.stderr
    # hidden legacy alias
    r = run_skypty("dmsg", "pty", "cli", "exec", "--cliaddr", host.sock, "--", "echo", "legacy")
    assert r.returncode == 0 and r.stdout == b"legacy\n", r.stderr
    # the flags before the sub-verb: given to `exec`'s parent, still used by `exec`
    r = run_skypty("app", "pty", "exec", "-p", str(cfg), "exec", "--", "echo", "parent-conf")
    assert r.returncode == 0 and r.stdout == b"parent-conf\n", r.stderr
    r = run_skypty("dmsg", "pty", "cli", "--cliaddr", host.sock, "exec", "-t", "5s", "--", "echo", "parent-addr")
    assert r.returncode == 0 and r.stdout == b"parent-addr\n", r.stderr


@needs_host
def test_no_host_is_one_line_exit_1(sockdir):
    r = run_skypty("app", "pty", "exec", "whitelist", "--cliaddr", os.path.join(sockdir, "none.sock"))
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"no host listens" in r.stderr


@needs_host
def test_local_shell_via_pexpect(host):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "skypty.py"), "app", "pty", "exec", "--cliaddr",
                                           host.sock, "-c", "/bin/sh"], timeout=30,
                          env=dict(os.environ, TERM="xterm", PS1="$ "))
    try:
        child.setwinsize(30, 100)
        child.sendline("echo $((6*7)); stty size")
        child.expect("42")
        child.expect("30 100")
        child.sendline("exit 0")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


@needs_host
def test_listen_fd_serves_one_accepted_connection(tmp_path):
    """systemd Accept=yes: a child host gets an already-accepted socket as fd N."""
    cfg = _write_host_config(tmp_path, wl=[CLIENT_PK])
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    port = lst.getsockname()[1]
    result = {}

    def client():
        result["r"] = run_skypty("cli", "pty", "exec", f"tcp://{HOST_PK}@127.0.0.1:{port}", "--sk", CLIENT_SK,
                                 "--", "sh", "-c", "echo via-fd; exit 3")
    t = threading.Thread(target=client)
    t.start()
    conn, _ = lst.accept()
    lst.close()
    fd = conn.fileno()
    child = subprocess.Popen(SKYPTY + ["app", "pty", "dmsg", "-c", cfg, "--no-dmsg", "--listen-fd", str(fd),
                                       "--cliaddr", str(tmp_path / "unused.sock")],
                             pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    conn.close()                                              # the child owns it now
    try:
        t.join(60)
        r = result["r"]
        assert r.returncode == 3 and r.stdout == b"via-fd\n", r.stderr
        assert child.wait(30) == 0                            # one connection, then exit
        assert not os.path.exists(tmp_path / "unused.sock")    # and no control socket of its own
    finally:
        stop_process(child)
        child.stderr.close()


def test_proxy_uri():
    from skypty.control import proxy_uri
    assert proxy_uri(CLIENT_PK) == f"dmsgpty/proxy?pk={CLIENT_PK}&port=22"
    assert proxy_uri(CLIENT_PK.upper() + ":2222") == f"dmsgpty/proxy?pk={CLIENT_PK}&port=2222"
    for bad in (CLIENT_PK + ":x", CLIENT_PK + ":70000", "02abc", "0" * 66):
        with pytest.raises(UsageError):
            proxy_uri(bad)


@needs_host
def test_proxy_addr_unreachable_is_one_line(tmp_path, sockdir):
    # `app pty tcp` has no dmsg: the host cannot dial the proxy target and closes without a byte.
    h = Host(tmp_path, sockdir)
    try:
        r = h.cli("exec", "--addr", f"{CLIENT_PK}:22", "--", "true")
        assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr
        assert h.cli("whitelist").returncode == 0             # the host survives it
    finally:
        h.stop()


# ================================================================== stale-socket abuse

def test_stale_socket_of_another_user_is_not_removed_even_by_root(sockdir):
    path = os.path.join(sockdir, "pty.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    other = os.geteuid() + 4242
    try:
        os.chown(path, other, -1)
    except PermissionError:
        pytest.skip("needs root to give the socket to another uid")
    with pytest.raises(UsageError, match=f"belongs to uid {other}"):
        listen_control("unix", path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and os.lstat(path).st_uid == other


def test_stale_socket_in_a_directory_others_can_write_is_not_removed(sockdir):
    # without the sticky bit anyone could swap the entry between our checks and the unlink
    path = os.path.join(sockdir, "pty.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    ino = os.lstat(path).st_ino
    os.chmod(sockdir, 0o777)
    try:
        with pytest.raises(UsageError, match="writable by others"):
            listen_control("unix", path)
        assert os.lstat(path).st_ino == ino
        os.chmod(sockdir, 0o1777)                   # sticky, like /tmp: only we may remove our entry
        s = listen_control("unix", path)
        s.close()
    finally:
        os.chmod(sockdir, 0o700)
