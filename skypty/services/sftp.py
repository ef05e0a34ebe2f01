"""The `dmsgpty/sftp` subsystem (pty.md §6.1): raw SFTP v3 on the mux connection, no SSH framing.

paramiko's server machinery (`SFTPServer` + an `SFTPServerInterface`) does the protocol; this
module gives it a Channel-shaped adapter over our stream and the filesystem policy:

* no root (upstream behaviour): the host's filesystem with the host's privileges, relative
  paths against the host's working directory;
* `root`: every client path lives under that directory. `..` that would climb above it is
  refused, and every object is reached through a descriptor whose real location
  (/proc/self/fd) is checked to be inside the root, so symlinks (even swapped in by a
  racing second connection) cannot lead out. Operations that must not follow the final
  component (lstat, unlink, rename, symlink, readlink, mkdir, rmdir) work relative to a
  checked descriptor of the parent directory.
* `readonly`: every mutating request answers permission denied.

The session runs in the caller's thread (the host's connection thread) and starts none of
its own; it ends cleanly at EOF, closing the connection and every handle it opened.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat as statmod
from typing import Optional, Tuple

from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface
from paramiko.sftp import SFTP_FAILURE, SFTP_NO_SUCH_FILE, SFTP_OK, SFTP_PERMISSION_DENIED

from skypty import limits

__all__ = ["serve_sftp", "StreamChannel", "SFTP_URI"]

SFTP_URI = "dmsgpty/sftp"

log = logging.getLogger("skypty.sftp")

_O_PATH = getattr(os, "O_PATH", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class StreamChannel:
    """The part of a paramiko Channel that BaseSFTP uses, over any socket-like stream.

    `recv(n)` returns all n bytes unless the stream ends first: paramiko asks for exactly
    one length prefix or one packet body, and gathering here avoids its quadratic
    `bytes +=` on packets that span many Noise records. A request larger than
    `max_packet` is refused (the peer's length is never trusted).
    """

    def __init__(self, conn, name: str = "sftp", max_packet: int = limits.SFTP_MAX_PACKET,
                 first_timeout: Optional[float] = None) -> None:
        self._conn = conn
        self._name = name
        self._max = max_packet
        self._pending_timeout = first_timeout is not None
        if first_timeout is not None:
            conn.settimeout(first_timeout)
        self._reads = 0
        self.closed = False

    # paramiko asks the channel for its transport only for logging settings
    def get_transport(self) -> "StreamChannel":
        return self

    def get_log_channel(self) -> str:
        return "skypty"

    def get_hexdump(self) -> bool:
        return False

    def get_name(self) -> str:
        return self._name

    def send(self, data) -> int:
        self._conn.sendall(data)
        return len(data)

    def recv(self, n: int) -> bytes:
        if n > self._max:
            raise EOFError(f"sftp packet of {n} bytes exceeds the {self._max}-byte limit")
        first = self._conn.recv(n)
        if len(first) >= n or not first:
            data = first
        else:
            parts = [first]
            got = len(first)
            while got < n:
                b = self._conn.recv(n - got)
                if not b:
                    break
                parts.append(b)
                got += len(b)
            data = b"".join(parts)
        if self._pending_timeout:
            self._reads += 1
            if self._reads >= 2:   # length + body of the first packet (INIT): from now on, no deadline
                self._pending_timeout = False
                self._conn.settimeout(None)
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._conn.close()
            except OSError:
                pass


def _status(e: OSError) -> int:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return SFTP_NO_SUCH_FILE
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP):
        return SFTP_PERMISSION_DENIED
    return SFTP_FAILURE


def _guard(fn):
    """Turn OSError into the SFTP status code paramiko sends back."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except OSError as e:
            return _status(e)
    return wrapper


def _denied() -> PermissionError:
    return PermissionError(errno.EACCES, "outside the sftp root")


def _attrs(st: os.stat_result, name: Optional[str] = None) -> SFTPAttributes:
    a = SFTPAttributes.from_stat(st)
    if name is not None:
        try:
            name.encode("utf-8")
            a.filename = name
        except UnicodeEncodeError:   # a non-UTF-8 name goes out as its raw bytes
            a.filename = name.encode("utf-8", "surrogateescape")
    return a


def _has(attr: SFTPAttributes, flag: int) -> bool:
    return bool(attr._flags & flag)


class _Handle(SFTPHandle):
    """An open file: positional I/O on one descriptor."""

    def __init__(self, fd: int, flags: int, readonly: bool, owner: "_Interface") -> None:
        super().__init__(flags)
        self._fd = fd
        self._readonly = readonly
        self._owner = owner
        owner.open_files += 1

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._owner.open_files -= 1
            os.close(fd)

    @_guard
    def read(self, offset, length):
        length = max(0, min(int(length), limits.SFTP_MAX_READ))
        parts = []
        got = 0
        while got < length:   # a short read only at EOF: clients may take short data as the end
            b = os.pread(self._fd, length - got, offset + got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts) if len(parts) != 1 else parts[0]

    @_guard
    def write(self, offset, data):
        if self._readonly:
            return SFTP_PERMISSION_DENIED
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            done += os.pwrite(self._fd, mv[done:], offset + done)
        return SFTP_OK

    @_guard
    def stat(self):
        return _attrs(os.fstat(self._fd))

    @_guard
    def chattr(self, attr):
        if self._readonly:
            return SFTP_PERMISSION_DENIED
        fd = self._fd
        if _has(attr, attr.FLAG_SIZE):
            os.ftruncate(fd, attr.st_size)
        if _has(attr, attr.FLAG_PERMISSIONS):
            os.chmod(fd, attr.st_mode & 0o7777)
        if _has(attr, attr.FLAG_UIDGID):
            os.chown(fd, attr.st_uid, attr.st_gid)
        if _has(attr, attr.FLAG_AMTIME):
            os.utime(fd, (attr.st_atime, attr.st_mtime))
        return SFTP_OK


class _Policy:
    """Where a client path lives on the host, and how to reach it without leaving the root."""

    def __init__(self, root: Optional[str]) -> None:
        self.root = os.path.realpath(root) if root else None

    # --- path arithmetic ---
    def host_path(self, path: str) -> str:
        if "\0" in path:
            raise OSError(errno.EINVAL, "NUL in path")
        if self.root is None:
            return path if path.startswith("/") else os.path.join(os.getcwd(), path)
        parts = []
        for comp in path.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not parts:
                    raise _denied()   # would climb above the root
                parts.pop()
            else:
                parts.append(comp)
        return self.root + ("/" + "/".join(parts) if parts else "") if self.root != "/" else "/" + "/".join(parts)

    def client_path(self, path: str) -> str:
        """What REALPATH answers: lexical inside a root (real host paths stay private)."""
        if self.root is None:
            return os.path.realpath(self.host_path(path))
        host = self.host_path(path)
        rel = host[len(self.root):] if self.root != "/" else host
        return rel or "/"

    def inside(self, real: str) -> bool:
        r = self.root
        return r is None or r == "/" or real == r or real.startswith(r + "/")

    def check_fd(self, fd: int) -> None:
        """The descriptor's real location must be inside the root (closes it otherwise)."""
        if self.root is None or self.root == "/":
            return
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = None
        if real is None or not self.inside(real):
            os.close(fd)
            raise _denied()

    # --- reaching objects ---
    def open_follow(self, path: str, flags: int, mode: int = 0o666) -> int:
        """open(2) following symlinks; the result is checked to be inside the root."""
        fd = os.open(self.host_path(path), flags | _O_CLOEXEC, mode)
        self.check_fd(fd)
        return fd

    def parent(self, path: str) -> Tuple[int, str]:
        """A checked descriptor of the parent directory and the final name ("" for the root)."""
        host = self.host_path(path)
        if self.root is not None and host == self.root:
            fd = os.open(host, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
            return fd, ""
        head, _, name = host.rpartition("/")
        fd = os.open(head or "/", os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        self.check_fd(fd)
        return fd, name


def _check_openable(st: os.stat_result) -> None:
    if statmod.S_ISFIFO(st.st_mode) or statmod.S_ISSOCK(st.st_mode):
        raise PermissionError(errno.EACCES, "not a file")  # opening would block the session


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class _Interface(SFTPServerInterface):
    """paramiko's per-session filesystem interface, with the root and read-only policy."""

    def __init__(self, server, root: Optional[str] = None, readonly: bool = False) -> None:
        super().__init__(server)
        self._p = _Policy(root)
        self._ro = readonly
        self._confined = self._p.root not in (None, "/")
        self.open_files = 0

    # --- helpers ---
    def _mutating(self) -> None:
        if self._ro:
            raise PermissionError(errno.EACCES, "read-only sftp")

    def _at(self, path: str, fn):
        """fn(dir_fd, name) on the checked parent of path; name "" means the root itself."""
        dfd, name = self._p.parent(path)
        try:
            return fn(dfd, name)
        finally:
            os.close(dfd)

    def _followed(self, path: str, fn):
        """fn(fd) with an O_PATH descriptor of the object path names (symlinks followed, checked)."""
        fd = self._p.open_follow(path, _O_PATH)
        try:
            return fn(fd)
        finally:
            os.close(fd)

    # --- SFTPServerInterface ---
    @_guard
    def open(self, path, flags, attr):
        if flags & _WRITE_FLAGS:
            self._mutating()
        if self.open_files >= limits.SFTP_MAX_HANDLES:
            raise OSError(errno.EMFILE, "too many open files in this sftp session")
        mode = attr.st_mode & 0o7777 if _has(attr, attr.FLAG_PERMISSIONS) and attr.st_mode is not None else 0o666
        if not self._confined:
            host = self._p.host_path(path)
            try:
                _check_openable(os.stat(host))
            except FileNotFoundError:
                pass
            return _Handle(os.open(host, flags | _O_CLOEXEC, mode), flags, self._ro, self)
        try:
            pfd = self._p.open_follow(path, _O_PATH)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
            # Create through the checked parent; O_NOFOLLOW refuses a dangling symlink
            # (which would create its target wherever it points).
            def create(dfd, name):
                if not name:
                    raise IsADirectoryError(errno.EISDIR, "is the root")
                return os.open(name, flags | _O_NOFOLLOW | _O_CLOEXEC, mode, dir_fd=dfd)
            return self._file(self._at(path, create), flags)
        try:
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, "exists")
            _check_openable(os.fstat(pfd))
            # Reopen the very inode that was checked, not the path (which may have changed).
            fd = os.open(_proc(pfd), (flags & ~(os.O_CREAT | os.O_EXCL)) | _O_CLOEXEC)
        finally:
            os.close(pfd)
        return self._file(fd, flags)

    def _file(self, fd: int, flags: int) -> _Handle:
        return _Handle(fd, flags, self._ro, self)

    @_guard
    def list_folder(self, path):
        fd = self._p.open_follow(path, os.O_RDONLY | os.O_DIRECTORY)
        out = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue   # vanished while listing
                    out.append(_attrs(st, entry.name))
        finally:
            os.close(fd)
        return out

    @_guard
    def stat(self, path):
        if not self._confined:
            return _attrs(os.stat(self._p.host_path(path)))
        return self._followed(path, lambda fd: _attrs(os.stat(fd)))

    @_guard
    def lstat(self, path):
        if not self._confined:
            return _attrs(os.lstat(self._p.host_path(path)))
        return self._at(path, lambda d, n: _attrs(os.stat(n, dir_fd=d, follow_symlinks=False) if n else os.stat(d)))

    @_guard
    def remove(self, path):
        self._mutating()
        if not self._confined:
            os.unlink(self._p.host_path(path))
            return SFTP_OK

        def rm(d, n):
            if not n:
                raise _denied()
            os.unlink(n, dir_fd=d)
        self._at(path, rm)
        return SFTP_OK

    def _rename(self, oldpath: str, newpath: str) -> int:
        self._mutating()
        if not self._confined:
            os.rename(self._p.host_path(oldpath), self._p.host_path(newpath))
            return SFTP_OK
        sfd, sname = self._p.parent(oldpath)
        try:
            dfd, dname = self._p.parent(newpath)
            try:
                if not sname or not dname:
                    raise _denied()
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        return SFTP_OK

    @_guard
    def rename(self, oldpath, newpath):
        # rename(2) semantics, as the Go host's pkg/sftp server (os.Rename): clients written
        # against it (the upstream FUSE client) rely on replacing the target.
        return self._rename(oldpath, newpath)

    @_guard
    def posix_rename(self, oldpath, newpath):
        return self._rename(oldpath, newpath)

    @_guard
    def mkdir(self, path, attr):
        self._mutating()
        mode = attr.st_mode & 0o7777 if _has(attr, attr.FLAG_PERMISSIONS) and attr.st_mode is not None else 0o777
        if not self._confined:
            os.mkdir(self._p.host_path(path), mode)
            return SFTP_OK

        def mk(d, n):
            if not n:
                raise FileExistsError(errno.EEXIST, "exists")
            os.mkdir(n, mode, dir_fd=d)
        self._at(path, mk)
        return SFTP_OK

    @_guard
    def rmdir(self, path):
        self._mutating()
        if not self._confined:
            os.rmdir(self._p.host_path(path))
            return SFTP_OK

        def rm(d, n):
            if not n:
                raise _denied()
            os.rmdir(n, dir_fd=d)
        self._at(path, rm)
        return SFTP_OK

    @_guard
    def chattr(self, path, attr):
        self._mutating()
        if not self._confined:
            self._apply(self._p.host_path(path), attr)
            return SFTP_OK
        self._followed(path, lambda fd: self._apply(_proc(fd), attr))
        return SFTP_OK

    @staticmethod
    def _apply(where: str, attr: SFTPAttributes) -> None:
        if _has(attr, attr.FLAG_SIZE):
            os.truncate(where, attr.st_size)
        if _has(attr, attr.FLAG_PERMISSIONS):
            os.chmod(where, attr.st_mode & 0o7777)
        if _has(attr, attr.FLAG_UIDGID):
            os.chown(where, attr.st_uid, attr.st_gid)
        if _has(attr, attr.FLAG_AMTIME):
            os.utime(where, (attr.st_atime, attr.st_mtime))

    def canonicalize(self, path):
        try:
            return self._p.client_path(path)
        except OSError:
            return "/"

    @_guard
    def readlink(self, path):
        if not self._confined:
            return os.readlink(self._p.host_path(path))

        def rl(d, n):
            if not n:
                raise OSError(errno.EINVAL, "not a symlink")
            return os.readlink(n, dir_fd=d)
        return self._at(path, rl)

    @_guard
    def symlink(self, target_path, path):
        self._mutating()
        if "\0" in target_path:
            raise OSError(errno.EINVAL, "NUL in target")
        if not self._confined:
            os.symlink(target_path, self._p.host_path(path))
            return SFTP_OK

        def ln(d, n):
            if not n:
                raise FileExistsError(errno.EEXIST, "exists")
            os.symlink(target_path, n, dir_fd=d)
        self._at(path, ln)
        return SFTP_OK


def serve_sftp(conn, query: str = "", peer=None, root: Optional[str] = None, readonly: bool = False) -> None:
    """Serve one SFTP v3 session on `conn` (the mux already answered 0x00) until EOF.

    Runs in the calling thread; closes `conn` and every handle when the session ends.
    """
    who = getattr(getattr(peer, "pk", None), "hex", lambda: "?")()
    if root and not os.path.isdir(root):
        log.error("sftp: root %s is not a directory; refusing session from %s", root, who)
        try:
            conn.close()
        finally:
            return
    chan = StreamChannel(conn, first_timeout=limits.SFTP_INIT_TIMEOUT)
    server = SFTPServer(chan, "sftp", None, sftp_si=_Interface, root=root, readonly=readonly)
    log.debug("sftp session from %s (root=%s, readonly=%s)", who, root or "-", readonly)
    try:
        server.start_subsystem("sftp", chan, chan)
    except Exception as e:   # INIT timeout or garbage before the loop: the session just ends
        log.debug("sftp session from %s ended: %s", who, e)
    finally:
        try:
            server.finish_subsystem()
        except Exception:
            chan.close()
