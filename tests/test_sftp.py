"""The `dmsgpty/sftp` server (skypty.services.sftp) driven by paramiko's own SFTP client.

The server runs in a thread on one end of a socketpair (or a Noise XK connection over it),
exactly as the host's connection thread runs it after the mux accepted the URI.
"""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import struct
import threading
import time

import paramiko
import pytest

from skypty.services.sftp import StreamChannel, serve_sftp


class Session:
    def __init__(self, root=None, readonly=False, secure=False):
        a, b = socket.socketpair()
        self._socks = (a, b)
        self.server_conn = a
        self.client_conn = b
        self.thread = threading.Thread(target=self._serve, args=(root, readonly, secure), daemon=True)
        if secure:
            self._secure_setup()
        self.thread.start()
        if secure:
            self.client_conn = self._client_hs()
        else:
            self.client_conn = StreamChannel(b)
        self.sftp = paramiko.SFTPClient(self.client_conn)

    def _secure_setup(self):
        from skypty.keys import generate_keypair

        self.server_pk, self.server_sk = generate_keypair()
        self.client_pk, self.client_sk = generate_keypair()

    def _client_hs(self):
        from skypty import noise

        conn = noise.client_handshake(self._socks[1], self.client_sk, self.server_pk, timeout=10)
        return StreamChannel(conn)

    def _serve(self, root, readonly, secure):
        conn = self.server_conn
        if secure:
            from skypty import noise

            conn = noise.server_handshake(conn, self.server_sk, timeout=10)
        serve_sftp(conn, "", None, root=root, readonly=readonly)

    def close(self):
        try:
            self.sftp.close()
        finally:
            for s in self._socks:
                s.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "sftp session thread left behind"


@pytest.fixture
def session():
    opened = []

    def make(**kw):
        s = Session(**kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def _errno(excinfo) -> int:
    return excinfo.value.errno


def test_basic_ops_without_root(session, tmp_path):
    s = session().sftp
    d = str(tmp_path)
    with s.open(d + "/a.txt", "w") as f:
        f.write(b"hello world")
    assert (tmp_path / "a.txt").read_bytes() == b"hello world"
    with s.open(d + "/a.txt", "r") as f:
        assert f.read() == b"hello world"
    st = s.stat(d + "/a.txt")
    assert st.st_size == 11 and stat.S_ISREG(st.st_mode)
    s.mkdir(d + "/sub", 0o750)
    assert stat.S_IMODE(os.stat(tmp_path / "sub").st_mode) == 0o750 & ~_umask()
    assert sorted(s.listdir(d)) == ["a.txt", "sub"]
    attrs = {a.filename: a for a in s.listdir_attr(d)}
    assert stat.S_ISDIR(attrs["sub"].st_mode) and attrs["a.txt"].st_size == 11

    # rename and posix-rename both replace the target, like the Go host (os.Rename)
    (tmp_path / "b.txt").write_bytes(b"B")
    (tmp_path / "a2.txt").write_bytes(b"A2")
    s.rename(d + "/a2.txt", d + "/b.txt")
    assert (tmp_path / "b.txt").read_bytes() == b"A2"
    s.posix_rename(d + "/a.txt", d + "/b.txt")
    assert (tmp_path / "b.txt").read_bytes() == b"hello world" and not (tmp_path / "a.txt").exists()
    s.rename(d + "/b.txt", d + "/sub/c.txt")
    assert (tmp_path / "sub" / "c.txt").exists()

    s.symlink("sub/c.txt", d + "/lnk")
    assert os.readlink(tmp_path / "lnk") == "sub/c.txt"
    assert s.readlink(d + "/lnk") == "sub/c.txt"
    assert stat.S_ISLNK(s.lstat(d + "/lnk").st_mode) and stat.S_ISREG(s.stat(d + "/lnk").st_mode)

    s.chmod(d + "/sub/c.txt", 0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "sub" / "c.txt").st_mode) == 0o600
    s.utime(d + "/sub/c.txt", (1_000_000, 2_000_000))
    assert int(os.stat(tmp_path / "sub" / "c.txt").st_mtime) == 2_000_000
    s.truncate(d + "/sub/c.txt", 5)
    assert (tmp_path / "sub" / "c.txt").read_bytes() == b"hello"
    s.truncate(d + "/sub/c.txt", 8)   # extending keeps the data
    assert (tmp_path / "sub" / "c.txt").read_bytes() == b"hello\0\0\0"

    with pytest.raises(IOError) as ei:
        s.stat(d + "/nope")
    assert _errno(ei) == errno.ENOENT
    with pytest.raises(IOError):
        s.rmdir(d + "/sub")   # not empty
    with pytest.raises(IOError):
        s.open(d + "/sub/c.txt", "x")   # exclusive create of an existing file
    s.remove(d + "/lnk")
    s.remove(d + "/sub/c.txt")
    s.rmdir(d + "/sub")
    assert sorted(os.listdir(tmp_path)) == []


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_relative_paths_without_root_use_the_host_cwd(session):
    s = session().sftp
    assert s.normalize(".") == os.path.realpath(os.getcwd())


def test_read_write_pipelined_big_file(session, tmp_path):
    s = session().sftp
    data = os.urandom(3 * 1024 * 1024 + 123)
    with s.open(str(tmp_path / "big"), "w") as f:
        f.set_pipelined(True)
        f.write(data)
    assert hashlib.sha256((tmp_path / "big").read_bytes()).digest() == hashlib.sha256(data).digest()
    with s.open(str(tmp_path / "big"), "r") as f:
        f.prefetch()
        assert f.read() == data


def test_over_noise_xk(session, tmp_path):
    s = session(secure=True, root=str(tmp_path)).sftp
    data = os.urandom(1024 * 1024 + 7)
    with s.open("/f.bin", "w") as f:
        f.set_pipelined(True)
        f.write(data)
    assert (tmp_path / "f.bin").read_bytes() == data
    with s.open("f.bin", "r") as f:
        f.prefetch()
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


@pytest.fixture
def jail(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_bytes(b"top secret")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "x").write_bytes(b"outside")
    (root / "inside.txt").write_bytes(b"inside")
    (root / "dir").mkdir()
    os.symlink(str(tmp_path / "secret"), root / "abs_escape")
    os.symlink("../secret", root / "rel_escape")
    os.symlink("../outdir", root / "dir_escape")
    os.symlink(str(tmp_path / "outdir" / "newfile"), root / "dangling_escape")
    os.symlink("inside.txt", root / "ok_link")
    os.symlink("../inside.txt", root / "dir" / "ok_up")
    return tmp_path, root


def test_root_confines_paths(session, jail):
    base, root = jail
    secret_mode = stat.S_IMODE(os.stat(base / "secret").st_mode)
    s = session(root=str(root)).sftp
    assert s.normalize(".") == "/"
    assert s.normalize("/dir/../dir") == "/dir"
    assert sorted(s.listdir("/")) == sorted(os.listdir(root))
    assert sorted(s.listdir(".")) == sorted(os.listdir(root))
    with s.open("/inside.txt") as f:
        assert f.read() == b"inside"
    # symlinks that stay inside work, in both directions
    with s.open("/ok_link") as f:
        assert f.read() == b"inside"
    with s.open("/dir/ok_up") as f:
        assert f.read() == b"inside"

    # `..` above the root is refused
    for p in ("../secret", "/../secret", "/dir/../../secret", "../root/inside.txt"):
        with pytest.raises(IOError) as ei:
            s.open(p)
        assert _errno(ei) == errno.EACCES, p
        with pytest.raises(IOError):
            s.stat(p)
    with pytest.raises(IOError):
        s.listdir("..")
    with pytest.raises(IOError):
        s.open("../evil", "w")
    assert not (base / "evil").exists()

    # symlinks that lead out are refused for every following operation
    for p in ("/abs_escape", "/rel_escape", "rel_escape"):
        with pytest.raises(IOError) as ei:
            s.open(p)
        assert _errno(ei) == errno.EACCES
        with pytest.raises(IOError):
            s.stat(p)
        with pytest.raises(IOError):
            s.chmod(p, 0o777)
        with pytest.raises(IOError):
            s.truncate(p, 0)
    assert (base / "secret").read_bytes() == b"top secret"
    assert stat.S_IMODE(os.stat(base / "secret").st_mode) == secret_mode
    with pytest.raises(IOError):
        s.listdir("/dir_escape")
    with pytest.raises(IOError):
        s.open("/dir_escape/x")
    with pytest.raises(IOError):
        s.open("/dir_escape/new", "w")
    with pytest.raises(IOError):
        s.mkdir("/dir_escape/newdir")
    with pytest.raises(IOError):
        s.remove("/dir_escape/x")
    with pytest.raises(IOError):
        s.symlink("/etc/passwd", "/dir_escape/ln")
    with pytest.raises(IOError):
        s.rename("/inside.txt", "/dir_escape/stolen")
    with pytest.raises(IOError):
        s.rename("/dir_escape/x", "/got")
    # creating through a dangling symlink that points out is refused
    with pytest.raises(IOError):
        s.open("/dangling_escape", "w")
    assert sorted(os.listdir(base / "outdir")) == ["x"]
    assert (base / "outdir" / "x").read_bytes() == b"outside"

    # the links themselves are visible (lstat/readlink) and removable
    assert stat.S_ISLNK(s.lstat("/abs_escape").st_mode)
    assert s.readlink("/rel_escape") == "../secret"
    s.remove("/abs_escape")
    assert (base / "secret").exists()
    # the root itself cannot be removed or renamed away
    with pytest.raises(IOError):
        s.rmdir("/")
    with pytest.raises(IOError):
        s.rename("/", "/x")


def test_root_allows_normal_writes(session, jail):
    base, root = jail
    s = session(root=str(root)).sftp
    s.mkdir("/new")
    with s.open("/new/f", "w") as f:
        f.write(b"abc")
    assert (root / "new" / "f").read_bytes() == b"abc"
    with s.open("new/f", "a") as f:
        f.write(b"def")
    assert (root / "new" / "f").read_bytes() == b"abcdef"
    s.posix_rename("/new/f", "/g")
    s.chmod("/g", 0o640)
    assert stat.S_IMODE(os.stat(root / "g").st_mode) == 0o640
    s.truncate("/g", 2)
    assert (root / "g").read_bytes() == b"ab"
    s.symlink("g", "/g_link")
    with s.open("/g_link") as f:
        assert f.read() == b"ab"
    s.remove("/g_link")
    s.remove("/g")
    s.rmdir("/new")
    with pytest.raises(IOError):
        s.open("/inside.txt", "x")


def test_readonly_refuses_every_mutation(session, jail):
    base, root = jail
    for r in (str(root), None):
        s = session(root=r, readonly=True).sftp
        prefix = "" if r else str(root)
        with s.open(prefix + "/inside.txt") as f:
            assert f.read() == b"inside"
        assert "inside.txt" in s.listdir(prefix + "/")
        attempts = [
            lambda: s.open(prefix + "/inside.txt", "w"),
            lambda: s.open(prefix + "/inside.txt", "a"),
            lambda: s.open(prefix + "/inside.txt", "r+"),
            lambda: s.open(prefix + "/new.txt", "w"),
            lambda: s.remove(prefix + "/inside.txt"),
            lambda: s.rename(prefix + "/inside.txt", prefix + "/moved"),
            lambda: s.posix_rename(prefix + "/inside.txt", prefix + "/moved"),
            lambda: s.mkdir(prefix + "/d2"),
            lambda: s.rmdir(prefix + "/dir"),
            lambda: s.chmod(prefix + "/inside.txt", 0o777),
            lambda: s.utime(prefix + "/inside.txt", (1, 1)),
            lambda: s.truncate(prefix + "/inside.txt", 0),
            lambda: s.symlink("inside.txt", prefix + "/l2"),
        ]
        for i, attempt in enumerate(attempts):
            with pytest.raises(IOError) as ei:
                attempt()
            assert _errno(ei) == errno.EACCES, i
        assert (root / "inside.txt").read_bytes() == b"inside"
        assert not (root / "new.txt").exists() and not (root / "moved").exists() and (root / "dir").is_dir()


def test_session_end_closes_handles(session, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    before = len(os.listdir("/proc/self/fd"))
    sess = session()
    files = [sess.sftp.open(str(tmp_path / "f")) for _ in range(5)]
    assert files
    sess.close()   # EOF with five handles still open: the server closes them
    assert len(os.listdir("/proc/self/fd")) <= before


def test_garbage_and_oversize_packets_end_the_session(tmp_path):
    for payload in (b"\x00\x00\x00\x05\x63junk", b"\x7f\xff\xff\xff", b"\x00\xff\xff\xff\x01"):
        a, b = socket.socketpair()
        t = threading.Thread(target=serve_sftp, args=(a, "", None), daemon=True)
        t.start()
        try:
            b.sendall(payload)
            t.join(10)
            assert not t.is_alive()
            b.settimeout(5)
            try:
                assert b.recv(100) == b""   # closed without answering
            except ConnectionResetError:
                pass   # closed with our unread bytes still queued
        finally:
            a.close()
            b.close()


def test_silent_client_times_out(monkeypatch):
    from skypty import limits

    monkeypatch.setattr(limits, "SFTP_INIT_TIMEOUT", 0.3)
    a, b = socket.socketpair()
    t = threading.Thread(target=serve_sftp, args=(a, "", None), daemon=True)
    t.start()
    try:
        t.join(10)
        assert not t.is_alive()
    finally:
        a.close()
        b.close()


def test_read_length_is_clamped(session, tmp_path):
    """A READ asking for 4 GiB gets at most SFTP_MAX_READ bytes (short reads are legal)."""
    from skypty import limits

    (tmp_path / "big").write_bytes(b"z" * (limits.SFTP_MAX_READ + 5000))
    s = session().sftp
    f = s.open(str(tmp_path / "big"))
    t, msg = s._request(paramiko.sftp.CMD_READ, f.handle, paramiko.sftp.int64(0), 0xFFFFFFFF)
    assert t == paramiko.sftp.CMD_DATA and len(msg.get_string()) == limits.SFTP_MAX_READ
    f.close()


# ---------------------------------------------------------------------------------- the fs client
# skypty.fs's link and operations, driven directly (no kernel, no root) against serve_sftp.

class _Fi:
    def __init__(self, flags=os.O_RDONLY):
        self.flags = flags
        self.fh = 0


class FsSession:
    def __init__(self, root, readonly=False, **kw):
        from skypty.fs import RemoteFS, SFTPLink

        a, b = socket.socketpair()
        self.socks = (a, b)
        self.thread = threading.Thread(target=serve_sftp, args=(a, "", None),
                                       kwargs={"root": root, "readonly": readonly}, daemon=True)
        self.thread.start()
        self.link = SFTPLink(b, timeout=kw.pop("timeout", 8.0))
        self.fs = RemoteFS(self.link, "/", **kw)

    def close(self):
        self.link.close()
        for s in self.socks:
            s.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def fs_session():
    made = []

    def make(*a, **kw):
        s = FsSession(*a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _fs_read_all(fs, path, step=131072):
    fi = _Fi()
    fs.open(path, fi)
    out, off = [], 0
    while True:
        b = fs.read(path, step, off, fi)
        if not b:
            break
        out.append(b)
        off += len(b)
    fs.flush(path, fi)
    fs.release(path, fi)
    return b"".join(out)


def test_fs_ops_pipelined_read_write(fs_session, tmp_path):
    s = fs_session(str(tmp_path), chunk=65536, readahead=8)
    fs = s.fs
    data = os.urandom(5 * 1024 * 1024 + 333)
    fi = _Fi(os.O_WRONLY | os.O_TRUNC)
    fs.create("/f.bin", 0o644, fi)
    for off in range(0, len(data), 131072):
        assert fs.write("/f.bin", data[off:off + 131072], off, fi) == len(data[off:off + 131072])
    assert fs.getattr("/f.bin")["st_size"] == len(data)   # the cache follows our own writes
    fs.flush("/f.bin", fi)
    fs.release("/f.bin", fi)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert _fs_read_all(fs, "/f.bin") == data
    # unaligned, odd-sized reads across chunk boundaries
    fi = _Fi()
    fs.open("/f.bin", fi)
    for off, size in ((65530, 20), (1, 200_000), (len(data) - 10, 4096), (len(data) + 5, 100)):
        assert fs.read("/f.bin", size, off, fi) == data[off:off + size]
    fs.release("/f.bin", fi)
    assert fs.readdir("/", 0) == [".", "..", "f.bin"]
    fs.mkdir("/d", 0o755)
    with pytest.raises(FileExistsError):
        fs.mkdir("/d", 0o755)
    fs.rename("/f.bin", "/d/g.bin")
    with pytest.raises(OSError) as ei:
        fs.rmdir("/d")
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        fs.getattr("/f.bin")
    fs.symlink("/l", "d/g.bin")
    assert fs.readlink("/l") == "d/g.bin"
    fs.chmod("/d/g.bin", 0o600)
    assert fs.getattr("/d/g.bin")["st_mode"] & 0o777 == 0o600
    fs.truncate("/d/g.bin", 10)
    assert fs.getattr("/d/g.bin")["st_size"] == 10 and (tmp_path / "d" / "g.bin").read_bytes() == data[:10]
    fs.utimens("/d/g.bin", (5 * 10**9, 7 * 10**9))
    assert os.stat(tmp_path / "d" / "g.bin").st_mtime == 7
    fs.unlink("/l")
    fs.unlink("/d/g.bin")
    fs.rmdir("/d")
    assert os.listdir(tmp_path) == []
    assert fs.statfs("/")["f_bsize"] > 0


def test_fs_write_failure_is_reported_at_flush(fs_session, tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    s = fs_session(str(tmp_path), readonly=True)   # the host refuses, the mount does not know
    fi = _Fi(os.O_RDONLY)
    fs = s.fs
    fs.open("/f", fi)
    fs.write("/f", b"zzzz", 0, fi)   # returns at once: the WRITE is only sent
    with pytest.raises(OSError):
        fs.flush("/f", fi)   # the refusal surfaces here, nothing is silently dropped
    with pytest.raises(OSError):
        fs.write("/f", b"zzzz", 0, fi)
    fs.release("/f", fi)
    assert (tmp_path / "f").read_bytes() == b"data"


def test_fs_concurrent_requests_from_many_threads(fs_session, tmp_path):
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(str(i).encode() * (i + 1))
    s = fs_session(str(tmp_path), attr_ttl=0, entry_ttl=0)
    errors = []

    def worker(k):
        try:
            for i in range(k, 50, 5):
                assert s.fs.getattr(f"/f{i}")["st_size"] == len(str(i)) * (i + 1)
                assert _fs_read_all(s.fs, f"/f{i}") == str(i).encode() * (i + 1)
        except Exception as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_fs_link_loss_fails_in_flight_and_new_operations_with_eio(fs_session, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 1000)
    s = fs_session(str(tmp_path), attr_ttl=0, entry_ttl=0, timeout=1.0)
    fi = _Fi(os.O_WRONLY)
    s.fs.open("/f", fi)
    s.fs.write("/f", b"y" * 1000, 0, fi)
    s.fs.flush("/f", fi)
    s.socks[0].shutdown(socket.SHUT_RDWR)   # the host side vanishes
    try:
        s.fs.write("/f", b"z" * 100, 0, fi)
    except OSError as e:   # the link already knew
        assert e.errno == errno.EIO
    else:   # the write went out unacknowledged: the flush must say so
        with pytest.raises(OSError) as ei:
            s.fs.flush("/f", fi)
        assert ei.value.errno == errno.EIO
    for op in (lambda: s.fs.getattr("/f"), lambda: s.fs.readdir("/", 0), lambda: s.fs.open("/f", _Fi())):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == errno.EIO
    s.fs.release("/f", fi)


def test_fs_silent_link_is_failed_by_the_watchdog(tmp_path):
    """A peer that accepts bytes but never answers: the waiting request gets EIO."""
    from skypty.fs import RemoteFS, SFTPLink

    a, b = socket.socketpair()
    try:
        # answer INIT by hand with VERSION 3, then go silent
        def fake_host():
            a.recv(9)
            a.sendall(struct.pack(">IBI", 5, 2, 3))
        th = threading.Thread(target=fake_host)
        th.start()
        link = SFTPLink(b, timeout=0.5)
        th.join(5)
        fs = RemoteFS(link, "/", attr_ttl=0, entry_ttl=0)
        with pytest.raises(OSError) as ei:
            fs.getattr("/anything")
        assert ei.value.errno == errno.EIO
        link.close()
        assert not link._reader.is_alive() and not link._watch.is_alive()
    finally:
        a.close()
        b.close()


def test_open_handles_are_capped_per_session(session, tmp_path, monkeypatch):
    from skypty import limits

    monkeypatch.setattr(limits, "SFTP_MAX_HANDLES", 4)
    (tmp_path / "f").write_bytes(b"x")
    s = session().sftp
    files = [s.open(str(tmp_path / "f")) for _ in range(4)]
    with pytest.raises(IOError):
        s.open(str(tmp_path / "f"))
    files.pop().close()
    s.open(str(tmp_path / "f")).close()   # a closed handle frees its slot


def test_fs_walking_a_listed_directory_again_relists_instead_of_stat_per_name(fs_session, tmp_path):
    for i in range(60):
        (tmp_path / f"f{i:02d}").write_bytes(b"x" * i)
    s = fs_session(str(tmp_path), attr_ttl=0.2, entry_ttl=0.2)
    assert len(s.fs.readdir("/", 0)) == 62
    time.sleep(0.3)   # every cached attribute expired
    before = s.link.request_number
    for i in range(60):
        assert s.fs.getattr(f"/f{i:02d}")["st_size"] == i
    with pytest.raises(FileNotFoundError):
        s.fs.getattr("/missing")
    sent = s.link.request_number - before
    assert sent < 30, sent   # a few LSTATs, then one pipelined listing, not 61 round trips


def test_fs_reads_correctly_from_a_host_that_caps_read_answers(fs_session, tmp_path, monkeypatch):
    """Go's pkg/sftp answers at most 32 KiB per READ: short answers are not the end of the file."""
    from skypty import limits

    monkeypatch.setattr(limits, "SFTP_MAX_READ", 32768)
    data = os.urandom(1024 * 1024 + 4321)
    (tmp_path / "f").write_bytes(data)
    s = fs_session(str(tmp_path), chunk=131072)
    assert _fs_read_all(s.fs, "/f") == data               # size unknown at open
    s.fs.getattr("/f")
    assert _fs_read_all(s.fs, "/f", step=100_000) == data  # size known, unaligned reads
    assert s.fs._sub == 32768                              # the cap was learned


def test_fs_opens_ahead_when_a_directory_is_read_file_after_file(fs_session, tmp_path):
    want = {}
    for i in range(40):
        want[f"f{i:02d}"] = os.urandom(100 + i * 997)
        (tmp_path / f"f{i:02d}").write_bytes(want[f"f{i:02d}"])
    s = fs_session(str(tmp_path), attr_ttl=30, entry_ttl=30)
    fs = s.fs
    hits = []
    take = fs._take_pre
    fs._take_pre = lambda p: _count(hits, take(p))
    names = [n for n in fs.readdir("/", 0) if n not in (".", "..")]
    for n in sorted(names)[:20]:
        fs.getattr("/" + n)
        assert _fs_read_all(fs, "/" + n) == want[n]
    # a file opened ahead, then changed through the mount, is read fresh
    fi = _Fi(os.O_WRONLY)
    fs.open("/f21", fi)
    fs.write("/f21", b"NEW", 0, fi)
    fs.flush("/f21", fi)
    fs.release("/f21", fi)
    fs.truncate("/f21", 3)
    for n in sorted(names)[20:]:
        expect = b"NEW" if n == "f21" else want[n]
        assert _fs_read_all(fs, "/" + n) == expect, n
    assert len([h for h in hits if h is not None]) >= 25   # most opens cost no round trip
    fs.release("/none", _Fi())   # unknown handles are ignored


def _count(hits, pre):
    hits.append(pre)
    return pre
