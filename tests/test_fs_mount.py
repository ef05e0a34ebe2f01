"""`cli pty fs mount/umount` end to end: a real `cli pty host` process, a real FUSE mount process.

Needs root, /dev/fuse, libfuse2 and fusermount (CI has them); skipped with the reason otherwise.
Every mount is unmounted in teardown (lazily as a last resort) and every process is stopped.
Operations that could block on a dead mount run in a child process with a deadline.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from ctypes.util import find_library

import pytest

from conftest import SKYPTY, free_port, run_skypty, stop_process, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _why_skip():
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not find_library("fuse"):
        return "libfuse2 is not installed"
    if not any(os.path.exists(os.path.join(d, "fusermount")) for d in os.environ.get("PATH", "").split(":")):
        return "fusermount is not installed"
    if not os.path.exists(os.path.join(ROOT, "skypty", "host.py")):
        return "skypty/host.py (cli pty host) is not available"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")


def _mounted(path: str) -> bool:
    from skypty.fs import find_mount

    return find_mount(path) is not None


class Host:
    def __init__(self, tmp, keys, root=None, readonly=False):
        self.pk, sk, self.cpk, self.csk = keys
        self.port = free_port()
        conf = os.path.join(tmp, f"host-{self.port}.json")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"sk": sk.hex(), "pk": self.pk.hex(), "wl": [self.cpk.hex()]}, f)
        cmd = SKYPTY + ["cli", "pty", "host", "-l", f"127.0.0.1:{self.port}", "-c", conf, "--allow", self.cpk.hex()]
        if root:
            cmd += ["--sftp-root", str(root)]
        if readonly:
            cmd.append("--sftp-readonly")
        # the host logs every connection: to a file, so a full pipe can never stall it
        self.log = open(os.path.join(tmp, f"host-{self.port}.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            wait_port(self.port)
        except Exception:
            stop_process(self.proc)
            self.log.close()
            with open(self.log.name, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
            raise AssertionError(f"cli pty host did not start (exit {self.proc.returncode}): {tail}") from None

    @property
    def dest(self) -> str:
        return f"{self.pk.hex()}@127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        stop_process(self.proc)
        self.log.close()


class Mount:
    def __init__(self, host: Host, mnt, *extra, sk=None):
        self.mnt = str(mnt)
        self.proc = subprocess.Popen(
            SKYPTY + ["cli", "pty", "fs", "mount", host.dest, self.mnt, "--sk", sk or host.csk.hex(), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not _mounted(self.mnt):
            if self.proc.poll() is not None:
                raise MountFailed(self.proc.returncode, self.proc.stderr.read().decode(errors="replace"))
            if time.monotonic() > deadline:
                self.cleanup()
                raise AssertionError("mount did not appear")
            time.sleep(0.05)

    def cleanup(self):
        if _mounted(self.mnt):
            run_skypty("cli", "pty", "fs", "umount", self.mnt, timeout=30)
        for cmd in (["fusermount", "-u", self.mnt], ["fusermount", "-u", "-z", self.mnt], ["umount", "-l", self.mnt]):
            if not _mounted(self.mnt):
                break
            subprocess.run(cmd, capture_output=True, timeout=30)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)


class MountFailed(Exception):
    def __init__(self, rc, stderr):
        super().__init__(f"mount exited {rc}: {stderr}")
        self.rc, self.stderr = rc, stderr


@pytest.fixture
def keys():
    from skypty.keys import generate_keypair

    pk, sk = generate_keypair()
    cpk, csk = generate_keypair()
    return pk, sk, cpk, csk


@pytest.fixture
def env(tmp_path, keys):
    """Factories for hosts and mounts; everything is torn down in reverse order."""
    made = []

    class Env:
        srv = tmp_path / "srv"
        base = tmp_path

        def host(self, **kw):
            h = Host(str(tmp_path), keys, **kw)
            made.append(h)
            return h

        def mount(self, host, name="mnt", *extra, sk=None):
            mnt = tmp_path / name
            mnt.mkdir(exist_ok=True)
            m = Mount(host, mnt, *extra, sk=sk)
            made.append(m)
            return m

    Env.srv.mkdir()
    yield Env()
    for obj in reversed(made):
        try:
            obj.cleanup() if isinstance(obj, Mount) else obj.stop()
        except Exception as e:  # keep tearing down the rest
            print(f"teardown: {e}", file=sys.stderr)


def _in_child(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run python code in a child (it may block on a dead mount): output is its stdout."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------- data path

def test_64mib_file_written_through_the_mount_matches_on_the_host(env):
    host = env.host(root=env.srv)
    m = env.mount(host)
    data = os.urandom(64 * 1024 * 1024)
    with open(os.path.join(m.mnt, "big.bin"), "wb", buffering=0) as f:
        for off in range(0, len(data), 1024 * 1024):
            f.write(data[off:off + 1024 * 1024])
    want = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256((env.srv / "big.bin").read_bytes()).hexdigest() == want
    assert os.stat(os.path.join(m.mnt, "big.bin")).st_size == len(data)
    h = hashlib.sha256()
    with open(os.path.join(m.mnt, "big.bin"), "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    assert h.hexdigest() == want
    # random access reads and overwrites in the middle
    with open(os.path.join(m.mnt, "big.bin"), "r+b") as f:
        f.seek(10_000_000)
        assert f.read(5000) == data[10_000_000:10_005_000]
        f.seek(33_333_333)
        f.write(b"X" * 70_000)
    with open(env.srv / "big.bin", "rb") as f:
        f.seek(33_333_333 - 1)
        assert f.read(70_002) == data[33_333_332:33_333_333] + b"X" * 70_000 + data[33_403_333:33_403_334]


def test_many_small_files_read_in_order_and_out_of_order(env):
    want = {}
    (env.srv / "many").mkdir()
    for i in range(300):
        want[f"f{i:03d}"] = os.urandom(1 + (i * 7919) % 9000)
        (env.srv / "many" / f"f{i:03d}").write_bytes(want[f"f{i:03d}"])
    host = env.host(root=env.srv)
    m = env.mount(host)
    d = os.path.join(m.mnt, "many")
    names = os.listdir(d)
    assert sorted(names) == sorted(want)
    for order in (sorted(names), names, sorted(names, reverse=True)):
        for n in order:
            with open(os.path.join(d, n), "rb") as f:
                assert f.read() == want[n], n
    # a file changed through the mount while the ones after it are opened ahead reads fresh
    for n in sorted(names)[:10]:
        with open(os.path.join(d, n), "rb") as f:
            f.read()
    with open(os.path.join(d, "f012"), "wb") as f:
        f.write(b"changed")
    for n in sorted(names)[10:20]:
        with open(os.path.join(d, n), "rb") as f:
            assert f.read() == (b"changed" if n == "f012" else want[n]), n


def test_namespace_operations(env):
    host = env.host(root=env.srv)
    m = env.mount(host)
    mnt = m.mnt
    j = os.path.join
    os.mkdir(j(mnt, "d"), 0o755)
    assert (env.srv / "d").is_dir()
    with pytest.raises(FileExistsError):
        os.mkdir(j(mnt, "d"))
    with open(j(mnt, "d", "f.txt"), "w") as f:
        f.write("hello world")
    assert (env.srv / "d" / "f.txt").read_text() == "hello world"
    with pytest.raises(FileExistsError):
        os.open(j(mnt, "d", "f.txt"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(OSError) as ei:
        os.rmdir(j(mnt, "d"))
    assert ei.value.errno == errno.ENOTEMPTY

    os.rename(j(mnt, "d", "f.txt"), j(mnt, "d", "g.txt"))
    assert sorted(os.listdir(env.srv / "d")) == ["g.txt"]
    (env.srv / "other.txt").write_text("other")
    os.rename(j(mnt, "other.txt"), j(mnt, "d", "g.txt"))   # POSIX rename replaces the target
    assert (env.srv / "d" / "g.txt").read_text() == "other"
    os.rename(j(mnt, "d"), j(mnt, "e"))
    assert sorted(os.listdir(mnt)) == ["e"]

    os.symlink("g.txt", j(mnt, "e", "link"))
    assert os.readlink(env.srv / "e" / "link") == "g.txt"
    assert os.readlink(j(mnt, "e", "link")) == "g.txt"
    with open(j(mnt, "e", "link")) as f:
        assert f.read() == "other"

    os.chmod(j(mnt, "e", "g.txt"), 0o640)
    assert os.stat(env.srv / "e" / "g.txt").st_mode & 0o7777 == 0o640
    assert os.stat(j(mnt, "e", "g.txt")).st_mode & 0o7777 == 0o640
    os.truncate(j(mnt, "e", "g.txt"), 2)
    assert (env.srv / "e" / "g.txt").read_bytes() == b"ot"
    assert os.stat(j(mnt, "e", "g.txt")).st_size == 2
    os.truncate(j(mnt, "e", "g.txt"), 6)
    assert (env.srv / "e" / "g.txt").read_bytes() == b"ot\0\0\0\0"
    os.utime(j(mnt, "e", "g.txt"), (1_000_000, 2_000_000))
    assert int(os.stat(env.srv / "e" / "g.txt").st_mtime) == 2_000_000
    with open(j(mnt, "e", "g.txt"), "ab") as f:
        f.write(b"+tail")
    assert (env.srv / "e" / "g.txt").read_bytes() == b"ot\0\0\0\0+tail"

    with pytest.raises(FileNotFoundError):
        os.stat(j(mnt, "nope"))
    with pytest.raises(FileNotFoundError):
        open(j(mnt, "nope", "x"), "w")
    os.unlink(j(mnt, "e", "link"))
    os.unlink(j(mnt, "e", "g.txt"))
    os.rmdir(j(mnt, "e"))
    assert os.listdir(env.srv) == [] and os.listdir(mnt) == []
    st = os.statvfs(mnt)
    assert st.f_bsize > 0 and st.f_blocks > 0
    assert open("/proc/self/mountinfo").read().count("fuse.skywire-ptyfs") >= 1


def test_ro_mount_gives_erofs(env):
    (env.srv / "f.txt").write_text("content")
    (env.srv / "d").mkdir()
    host = env.host(root=env.srv)
    m = env.mount(host, "mnt", "--ro")
    j = os.path.join
    with open(j(m.mnt, "f.txt")) as f:
        assert f.read() == "content"
    attempts = [
        lambda: open(j(m.mnt, "f.txt"), "w"),
        lambda: open(j(m.mnt, "new.txt"), "w"),
        lambda: os.mkdir(j(m.mnt, "x")),
        lambda: os.rmdir(j(m.mnt, "d")),
        lambda: os.unlink(j(m.mnt, "f.txt")),
        lambda: os.rename(j(m.mnt, "f.txt"), j(m.mnt, "g.txt")),
        lambda: os.chmod(j(m.mnt, "f.txt"), 0o777),
        lambda: os.truncate(j(m.mnt, "f.txt"), 0),
        lambda: os.symlink("f.txt", j(m.mnt, "l")),
    ]
    for i, attempt in enumerate(attempts):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS, i
    assert (env.srv / "f.txt").read_text() == "content" and sorted(os.listdir(env.srv)) == ["d", "f.txt"]


def test_sftp_readonly_host_refuses_writes(env):
    (env.srv / "f.txt").write_text("content")
    host = env.host(root=env.srv, readonly=True)
    m = env.mount(host)
    with open(os.path.join(m.mnt, "f.txt")) as f:
        assert f.read() == "content"
    with pytest.raises(PermissionError):
        open(os.path.join(m.mnt, "new.txt"), "w")
    with pytest.raises(PermissionError):
        os.mkdir(os.path.join(m.mnt, "x"))
    assert sorted(os.listdir(env.srv)) == ["f.txt"]


# ---------------------------------------------------------------------------------- confinement

@pytest.fixture
def jailed(env):
    (env.base / "secret").write_text("top secret")
    (env.base / "outdir").mkdir()
    (env.base / "outdir" / "x").write_text("outside")
    (env.srv / "inside.txt").write_text("inside")
    os.symlink(str(env.base / "outdir"), env.srv / "abs_dir_escape")
    os.symlink("../outdir", env.srv / "rel_dir_escape")
    os.symlink("../secret", env.srv / "file_escape")
    return env


def test_remote_root_cannot_leave_the_sftp_root(jailed):
    env = jailed
    host = env.host(root=env.srv)
    for bad in ("/abs_dir_escape", "rel_dir_escape", "/rel_dir_escape/"):
        with pytest.raises(MountFailed) as ei:
            env.mount(host, "mnt-bad", "--remote-root", bad)
        assert ei.value.rc == 1 and "remote-root" in ei.value.stderr
        assert not _mounted(str(env.base / "mnt-bad"))
    # `..` above the root is clamped to the root: the mount shows the root, nothing outside
    m = env.mount(host, "mnt", "--remote-root", "/../..")
    assert "inside.txt" in os.listdir(m.mnt) and "secret" not in os.listdir(m.mnt)


def test_sftp_root_escapes_refused_on_the_real_host(jailed):
    """A plain SFTP client on the host process: `..` and symlinks cannot reach outside the root."""
    import paramiko

    from skypty.client import dial_uri_tcp
    from skypty.services.sftp import StreamChannel

    env = jailed
    host = env.host(root=env.srv)
    conn = dial_uri_tcp("127.0.0.1", host.port, host.pk, host.csk, "dmsgpty/sftp")
    s = paramiko.SFTPClient(StreamChannel(conn))
    try:
        assert sorted(s.listdir("/")) == sorted(os.listdir(env.srv))
        assert s.open("/inside.txt").read() == b"inside"
        for p in ("../secret", "/../secret", "/file_escape", "/abs_dir_escape/x", "/rel_dir_escape/x"):
            with pytest.raises(PermissionError):
                s.open(p).read()
        for p in ("/abs_dir_escape", "/rel_dir_escape", ".."):
            with pytest.raises(PermissionError):
                s.listdir(p)
        for attempt in (lambda: s.open("/rel_dir_escape/new", "w"), lambda: s.mkdir("/abs_dir_escape/d"),
                        lambda: s.remove("/rel_dir_escape/x"), lambda: s.rename("/inside.txt", "../stolen"),
                        lambda: s.chmod("/file_escape", 0o777)):
            with pytest.raises(PermissionError):
                attempt()
    finally:
        s.close()
    assert sorted(os.listdir(env.base / "outdir")) == ["x"] and not (env.base / "stolen").exists()
    assert (env.base / "secret").read_text() == "top secret"


# ---------------------------------------------------------------------------------- lifecycle

def test_killed_host_gives_eio_and_umount_works(env):
    (env.srv / "f.txt").write_text("content")
    host = env.host(root=env.srv)
    m = env.mount(host, "mnt", "--attr-ttl", "0", "--entry-ttl", "0")
    # a writer with data in flight when the host dies must hear about it
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
f = os.open({os.path.join(m.mnt, 'w.bin')!r}, os.O_WRONLY | os.O_CREAT, 0o644)
os.write(f, b"x" * 65536)
print("ready", flush=True)
sys.stdin.readline()
try:
    for _ in range(64):
        os.write(f, b"y" * 131072)
    os.close(f)
    print("no-error")
except OSError as e:
    print("errno", e.errno)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        host.proc.kill()
        host.proc.wait(10)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        out, _ = writer.communicate(timeout=60)
        assert out.strip() == f"errno {errno.EIO}"
    finally:
        stop_process(writer)
    r = _in_child(f"""
import os
for op in (lambda: open({os.path.join(m.mnt, 'f.txt')!r}).read(), lambda: os.listdir({m.mnt!r}),
           lambda: open({os.path.join(m.mnt, 'n.txt')!r}, 'w')):
    try:
        op()
        print('ok')
    except OSError as e:
        print(e.errno)
""")
    assert r.stdout.split() == [str(errno.EIO)] * 3
    r = run_skypty("cli", "pty", "fs", "umount", m.mnt)
    assert r.returncode == 0, r.stderr
    assert not _mounted(m.mnt)
    assert m.proc.wait(20) == 1
    assert b"lost" in m.proc.stderr.read()


def test_silent_host_gives_eio_without_hanging(env):
    """A host that stops answering (no FIN, no RST) is detected by the link watchdog."""
    (env.srv / "f.txt").write_text("content")
    host = env.host(root=env.srv)
    m = env.mount(host, "mnt", "--attr-ttl", "0", "--entry-ttl", "0")
    os.kill(host.proc.pid, signal.SIGSTOP)
    try:
        r = _in_child(f"""
import os
try:
    open({os.path.join(m.mnt, 'f.txt')!r}).read()
    print('ok')
except OSError as e:
    print(e.errno)
""", timeout=60)
        assert r.stdout.strip() == str(errno.EIO)
        r = run_skypty("cli", "pty", "fs", "umount", m.mnt)
        assert r.returncode == 0, r.stderr
    finally:
        os.kill(host.proc.pid, signal.SIGCONT)
    assert m.proc.wait(20) == 1


def test_silent_host_fails_a_big_write_without_hanging(env):
    """Writes to a host that stopped reading fill every buffer; the writer must get EIO, not hang."""
    host = env.host(root=env.srv)
    m = env.mount(host)
    os.kill(host.proc.pid, signal.SIGSTOP)
    try:
        r = _in_child(f"""
import os
try:
    with open({os.path.join(m.mnt, 'big.bin')!r}, 'wb', buffering=0) as f:
        for _ in range(64):
            f.write(b"z" * (1 << 20))
    print('ok')
except OSError as e:
    print(e.errno)
""", timeout=90)
        assert r.stdout.strip() == str(errno.EIO)
        assert run_skypty("cli", "pty", "fs", "umount", m.mnt).returncode == 0
    finally:
        os.kill(host.proc.pid, signal.SIGCONT)
    assert m.proc.wait(20) == 1


def test_sigterm_sigint_and_external_unmount_end_cleanly(env):
    host = env.host(root=env.srv)
    m = env.mount(host)
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(20) == 0
    assert not _mounted(m.mnt)
    m2 = env.mount(host, "mnt2")
    m2.proc.send_signal(signal.SIGINT)
    assert m2.proc.wait(20) == 0
    assert not _mounted(m2.mnt)
    m3 = env.mount(host, "mnt3")
    subprocess.run(["fusermount", "-u", m3.mnt], check=True, timeout=30)
    assert m3.proc.wait(20) == 0


def test_umount_of_something_not_mounted_is_a_clear_error(tmp_path):
    r = run_skypty("cli", "pty", "fs", "umount", str(tmp_path))
    assert r.returncode == 1
    assert b"is not mounted" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unlisted_client_key_is_refused(env):
    from skypty.keys import generate_keypair

    host = env.host(root=env.srv)
    _, other = generate_keypair()
    with pytest.raises(MountFailed) as ei:
        env.mount(host, "mnt", sk=other.hex())
    assert ei.value.rc == 1 and "whitelist" in ei.value.stderr
    assert not _mounted(str(env.base / "mnt"))


def test_mountpoint_must_be_a_directory(keys, tmp_path):
    r = run_skypty("cli", "pty", "fs", "mount", f"{keys[0].hex()}@127.0.0.1:{free_port()}",
                   str(tmp_path / "missing"))
    assert r.returncode == 2 and b"not a directory" in r.stderr


def test_bare_pk_destination_is_a_clear_usage_error(keys, tmp_path):
    r = run_skypty("cli", "pty", "fs", "mount", keys[0].hex(), str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_busy_mount_needs_lazy_umount(env):
    host = env.host(root=env.srv)
    m = env.mount(host)
    busy = subprocess.Popen(["sleep", "60"], cwd=m.mnt)
    try:
        r = run_skypty("cli", "pty", "fs", "umount", m.mnt)
        assert r.returncode == 1 and b"--lazy" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert _mounted(m.mnt)
        r = run_skypty("cli", "pty", "fs", "umount", "--lazy", m.mnt)
        assert r.returncode == 0, r.stderr
        assert not _mounted(m.mnt)
    finally:
        stop_process(busy)
    assert m.proc.wait(20) == 0


# ---------------------------------------------------------------------------------- over dmsg

def _popen_logged(*args):
    """A helper process at --log-level warn (its stderr is read only when it fails)."""
    return subprocess.Popen(SKYPTY + list(args) + ["--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_mount_over_dmsg_with_an_ephemeral_client(env, keys):
    """`fs mount <pk> --standalone`: disc + dmsg server + a mode-2 host, all real processes."""
    from skypty.keys import generate_keypair
    from skypty.transport.dmsg import disc as dmsgdisc

    hpk, hsk, cpk, csk = keys
    procs = []
    try:
        dport, sport = free_port(), free_port()
        url = f"http://127.0.0.1:{dport}"
        procs.append(_popen_logged("dmsg", "disc", "--addr", f"127.0.0.1:{dport}"))
        wait_port(dport)
        _, ssk = generate_keypair()
        procs.append(_popen_logged("dmsg", "server", "--sk", ssk.hex(), "--listen", f"127.0.0.1:{sport}",
                                   "--dmsgdisc", url))
        wait_port(sport)
        dc = dmsgdisc.DiscClient(url)
        _wait_for(lambda: any(e["static"] == ssk.pubkey().hex() for e in dc.available_servers()), "dmsg server")
        cfg = env.base / "dmsghost.json"
        cfg.write_text(json.dumps({"sk": hsk.hex(), "pk": hpk.hex(), "dmsgdisc": url, "dmsgsessions": 1,
                                   "dmsgport": 22, "clinet": "unix", "cliaddr": str(env.base / "h.sock"),
                                   "wl": [cpk.hex()]}))
        os.chmod(cfg, 0o600)
        host = _popen_logged("app", "pty", "dmsg", "-c", str(cfg), "--dmsgdisc", url,
                             "--cliaddr", str(env.base / "h.sock"), "--sftp-root", str(env.srv))
        procs.append(host)

        def host_up():
            assert host.poll() is None, host.stderr.read().decode(errors="replace")
            try:
                return bool(dc.entry(hpk)["client"]["delegated_servers"])
            except dmsgdisc.DiscoveryError:
                return False
        _wait_for(host_up, "the host's dmsg entry")

        mnt = env.base / "mnt-dmsg"
        mnt.mkdir()
        m = subprocess.Popen(SKYPTY + ["cli", "pty", "fs", "mount", hpk.hex(), str(mnt), "--standalone",
                                       "--dmsgdisc", url, "--sk", csk.hex()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(m)
        _wait_for(lambda: _mounted(str(mnt)) or m.poll() is not None, "the dmsg mount")
        assert _mounted(str(mnt)), m.stderr.read().decode(errors="replace")
        try:
            data = os.urandom(3 * 1024 * 1024 + 17)
            with open(mnt / "over-dmsg.bin", "wb") as f:
                f.write(data)
            assert (env.srv / "over-dmsg.bin").read_bytes() == data
            with open(mnt / "over-dmsg.bin", "rb") as f:
                assert f.read() == data
            assert os.listdir(mnt) == ["over-dmsg.bin"]
        finally:
            r = run_skypty("cli", "pty", "fs", "umount", str(mnt))
            if _mounted(str(mnt)):
                subprocess.run(["fusermount", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert m.wait(20) == 0
    finally:
        for p in reversed(procs):
            stop_process(p)


def test_sftp_is_not_served_on_the_control_socket(env, keys):
    """The local control socket (no noise, file permissions) never carries dmsgpty/sftp."""
    from skypty import mux
    from skypty.errors import ProtocolError, RejectedError
    from skypty.transport.unixsock import dial_control

    hpk, hsk, cpk, _ = keys
    sock = str(env.base / "ctl.sock")
    cfg = env.base / "tcphost.json"
    cfg.write_text(json.dumps({"sk": hsk.hex(), "pk": hpk.hex(), "clinet": "unix", "cliaddr": sock,
                               "wl": [cpk.hex()]}))
    os.chmod(cfg, 0o600)
    port = free_port()
    p = subprocess.Popen(SKYPTY + ["app", "pty", "tcp", "-c", str(cfg), "--addr", f"127.0.0.1:{port}",
                                   "--cliaddr", sock, "--sftp-root", str(env.srv), "--log-level", "warn"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and p.poll() is None, "no control socket"
            time.sleep(0.05)
        conn = dial_control("unix", sock)
        try:
            with pytest.raises((RejectedError, ProtocolError)):
                mux.request(conn, "dmsgpty/sftp", timeout=10)
        finally:
            conn.close()
    finally:
        stop_process(p)
