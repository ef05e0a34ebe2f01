"""`cli pty fs mount|umount` (pty.md §6.2): a remote host's filesystem over `dmsgpty/sftp`, via FUSE.

Shape: one secure stream (Noise XK over TCP for `<pk>@host[:port]`, or an ephemeral dmsg
client for `<pk> --standalone`) carries raw SFTP v3; `SFTPLink` (a paramiko `SFTPClient`
made concurrent) keeps many requests in flight on it, matched by request id by a single
reader thread; `RemoteFS` maps fusepy (libfuse2) operations onto it.

Why it is fast:
* reads are pipelined: a file read sequentially keeps up to FS_READAHEAD_CHUNKS READ
  requests of FS_READ_CHUNK bytes in flight (the window doubles on each sequential hit);
* writes are pipelined: a WRITE is sent and the call returns; acknowledgements are collected
  as they arrive, the first failure is reported at the next write, flush, fsync or close;
* attributes and directory listings are cached for --attr-ttl/--entry-ttl (the same TTLs go
  to the kernel), listings prime the attribute cache, a listed directory whose names are looked
  up again after expiry is re-listed in one pipelined pass instead of one LSTAT per name, and
  requests that need a fresh stat afterwards (create, mkdir, chmod, truncate…) send the LSTAT
  right behind them (one round trip);
* opening a file for reading sends its first READ at once, and files read one after another
  in directory order (`cat *`, `grep -r`, `cp -r`) are opened ahead, eight at a time, so
  their open and first read cost no round trip (used only within the attribute TTL, ≤ 1 s);
* requests nobody waits for (CLOSE) and bursts (opens ahead) share one write and one record;
* big_writes and 128 KiB max_read/max_write, the most libfuse2 allows;
* one FUSE thread: the concurrency that pays is on the link, and each libfuse worker thread
  would enter Python through a fresh thread state per call (measured slower on every phase).

Why it cannot hang: a watchdog fails the link when a request has waited FS_LINK_TIMEOUT
with no byte from the host; every waiter then gets EIO, and so does every later operation.
`fs umount` works on a dead link (the kernel detaches the mount, our loop returns).
"""
from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import socket
import stat as statmod
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Dict, List, Optional, Tuple

import paramiko
from paramiko import SFTPAttributes
from paramiko.message import Message
from paramiko.sftp import int64

from skypty import limits
from skypty.errors import SkyptyError, UsageError
from skypty.limits import DEFAULT_DMSG_PORT, DEFAULT_TCP_PORT
from skypty.services.sftp import SFTP_URI, StreamChannel

__all__ = ["cmd_mount", "cmd_umount", "SFTPLink", "RemoteFS", "FS_NAME", "find_mount", "load_fuse"]

FS_NAME = "skywire-ptyfs"

log = logging.getLogger("skypty.fs")

# SFTP v3 packet types and codes (draft-ietf-secsh-filexfer-02) used on the fast paths
_OPEN, _CLOSE, _READ, _WRITE = 3, 4, 5, 6
_READDIR = 12
_STATUS, _HANDLE, _DATA, _NAME, _ATTRS, _EXTENDED, _EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201
_FX_OK, _FX_EOF, _FX_NO_SUCH_FILE, _FX_PERMISSION_DENIED, _FX_FAILURE = 0, 1, 2, 3, 4
_FX_BAD_MESSAGE, _FX_NO_CONNECTION, _FX_CONNECTION_LOST, _FX_OP_UNSUPPORTED = 5, 6, 7, 8
_FXF_READ, _FXF_WRITE, _FXF_APPEND, _FXF_CREAT, _FXF_TRUNC, _FXF_EXCL = 1, 2, 4, 8, 16, 32

_CODE_ERRNO = {
    _FX_NO_SUCH_FILE: errno.ENOENT,
    _FX_PERMISSION_DENIED: errno.EACCES,
    _FX_BAD_MESSAGE: errno.EBADMSG,
    _FX_NO_CONNECTION: errno.ENOTCONN,
    _FX_CONNECTION_LOST: errno.ECONNABORTED,
    _FX_OP_UNSUPPORTED: errno.EOPNOTSUPP,
}
# SSH_FX_FAILURE carries only text; Go hosts send the Go error string, which names the errno.
_TEXT_ERRNO = (
    ("file exists", errno.EEXIST), ("directory not empty", errno.ENOTEMPTY),
    ("is a directory", errno.EISDIR), ("not a directory", errno.ENOTDIR),
    ("no space left", errno.ENOSPC), ("read-only file system", errno.EROFS),
    ("operation not permitted", errno.EPERM), ("invalid argument", errno.EINVAL),
    ("cross-device", errno.EXDEV), ("too many levels of symbolic links", errno.ELOOP),
    ("file name too long", errno.ENAMETOOLONG), ("quota", errno.EDQUOT),
)


def _eio(why: str) -> OSError:
    return OSError(errno.EIO, why)


def status_errno(code: int, text: str) -> int:
    """errno for a failed SFTP status; SSH_FX_FAILURE without a known text is EPERM (as sshfs)."""
    if code in _CODE_ERRNO:
        return _CODE_ERRNO[code]
    if code == _FX_FAILURE:
        low = text.lower()
        for needle, num in _TEXT_ERRNO:
            if needle in low:
                return num
        return errno.EPERM
    return errno.EIO


def _status_of(body: bytes) -> Tuple[int, str]:
    """(code, text) of a STATUS body (after the type byte): id, code, text, language."""
    if len(body) < 8:
        return _FX_BAD_MESSAGE, "short status"
    code = struct.unpack_from(">I", body, 4)[0]
    text = ""
    if len(body) >= 12:
        n = struct.unpack_from(">I", body, 8)[0]
        text = body[12:12 + n].decode("utf-8", "replace")
    return code, text


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


class _Req:
    """One request in flight: completion by event (a waiter) or by callback (pipelined writes)."""

    __slots__ = ("num", "sent", "t", "body", "err", "cb", "_ev")

    def __init__(self, num: int, cb=None) -> None:
        self.num = num
        self.sent = time.monotonic()
        self.t = 0
        self.body = b""
        self.err: Optional[str] = None
        self.cb = cb
        self._ev = None if cb else threading.Event()

    def done(self) -> bool:
        return self._ev is None or self._ev.is_set()

    def finish(self) -> None:
        if self.cb is not None:
            try:
                self.cb(self)
            except Exception:   # a callback must never kill the reader thread
                log.exception("fs: completion callback failed")
        else:
            self._ev.set()

    def wait(self, limit: float) -> Tuple[int, bytes]:
        # The watchdog fails a silent link long before `limit`; this is only a backstop.
        if not self._ev.wait(limit):
            raise _eio("no answer from the host")
        if self.err is not None:
            raise _eio(self.err)
        return self.t, self.body

    def error(self) -> Optional[OSError]:
        """For a STATUS-only answer (WRITE, CLOSE…): None when OK, else the mapped error."""
        if self.err is not None:
            return _eio(self.err)
        if self.t != _STATUS:
            return OSError(errno.EBADMSG, "unexpected answer")
        code, text = _status_of(self.body)
        if code == _FX_OK:
            return None
        return OSError(status_errno(code, text), text or os.strerror(status_errno(code, text)))


class SFTPLink(paramiko.SFTPClient):
    """paramiko's SFTPClient, made safe for many threads with many requests in flight.

    paramiko matches answers inside the calling thread, which loses answers as soon
    as two threads share a client. Here one reader thread owns the socket and hands
    each answer to its request; `_async_request`/`_read_response` are overridden so
    every SFTPClient method (stat, mkdir, readlink…) works concurrently on top.
    """

    def __init__(self, conn, timeout: float = limits.FS_LINK_TIMEOUT, name: str = "fs") -> None:
        self._conn = conn
        self._timeout = timeout
        self._pending: Dict[int, _Req] = {}
        self._sync: Dict[int, _Req] = {}
        self._plock = threading.Lock()
        self._slock = threading.Lock()
        self._deferred: List[bytes] = []
        self.dead: Optional[str] = None
        self._closing = False
        self._last_rx = time.monotonic()
        chan = StreamChannel(conn, name=name)
        try:
            conn.settimeout(timeout)   # the INIT/VERSION exchange is bounded too
        except OSError:
            pass
        super().__init__(chan)
        self.logger = logging.getLogger("skypty.fs.sftp")
        conn.settimeout(None)
        self._statvfs_ok = True
        self._reader = threading.Thread(target=self._read_loop, name="sftp-reader", daemon=True)
        self._watch = threading.Thread(target=self._watchdog, name="sftp-watchdog", daemon=True)
        self._reader.start()
        self._watch.start()

    # --- sending ---
    def _register(self, cb=None) -> _Req:
        with self._plock:
            if self.dead is not None:
                raise _eio(self.dead)
            num = self.request_number
            self.request_number = (num + 1) & 0xFFFFFFFF
            req = _Req(num, cb)
            self._pending[num] = req
        return req

    def _send(self, t: int, num: int, body: bytes, defer: bool = False) -> None:
        pkt = struct.pack(">IBI", len(body) + 5, t, num) + body
        with self._slock:
            if self.dead is not None:
                return   # the request was failed together with the link
            self._deferred.append(pkt)   # behind any deferred ones: the order on the wire is kept
            if not defer:
                self._write_deferred()

    def flush(self) -> None:
        """Send what was deferred (one write for all of it)."""
        if self._deferred:
            with self._slock:
                if self._deferred and self.dead is None:
                    self._write_deferred()

    def _write_deferred(self) -> None:
        """One sendall of every deferred packet; the caller holds _slock."""
        pkt = b"".join(self._deferred)
        self._deferred = []
        try:
            self._conn.sendall(pkt)
        except (OSError, EOFError) as e:
            self._fail(f"send failed: {getattr(e, 'strerror', None) or e}")

    def submit(self, t: int, *args, cb=None, defer: bool = False) -> _Req:
        """Send one request; its answer arrives through `cb(req)` or `req.wait()`.

        defer=True holds it back until the next request that is not deferred, `flush()`, or
        the watchdog's next tick (≤ 0.25 s): for requests nobody waits on (CLOSE) and for
        bursts sent together, so that several cost one write and one Noise record."""
        m = Message()
        for item in args:
            if isinstance(item, int64):
                m.add_int64(item)
            elif isinstance(item, int):
                m.add_int(item)
            elif isinstance(item, paramiko.SFTPAttributes):
                item._pack(m)
            else:
                m.add_string(item)
        req = self._register(cb)
        self._send(t, req.num, m.asbytes(), defer)
        return req

    def submit_read(self, handle: bytes, offset: int, length: int, cb=None, defer: bool = False) -> _Req:
        req = self._register(cb)
        self._send(_READ, req.num, _ssh_string(handle) + struct.pack(">QI", offset, length), defer)
        return req

    def submit_write(self, handle: bytes, offset: int, data: bytes, cb=None) -> _Req:
        req = self._register(cb)
        self._send(_WRITE, req.num, _ssh_string(handle) + struct.pack(">QI", offset, len(data)) + data)
        return req

    def wait(self, req: _Req) -> Tuple[int, "Message"]:
        """Wait for a request; STATUS errors raise OSError (EIO when the link failed)."""
        t, body = req.wait(self._timeout * 3 + 5)
        if t == _STATUS:
            code, text = _status_of(body)
            if code == _FX_EOF:
                raise EOFError(text)
            if code != _FX_OK:
                num = status_errno(code, text)
                raise OSError(num, text or os.strerror(num))
        return t, Message(body[4:])

    # --- paramiko's hooks: every SFTPClient method goes through these two ---
    def _async_request(self, fileobj, t, *args):
        req = self.submit(t, *args)
        with self._plock:
            self._sync[req.num] = req
        return req.num

    def _read_response(self, waitfor=None):
        if waitfor is None:
            return None, None   # only SFTPFile's own pipelining uses this; we never do
        with self._plock:
            req = self._sync.pop(waitfor)
        return self.wait(req)

    # --- receiving ---
    def _read_loop(self) -> None:
        chan = self.sock
        try:
            while True:
                hdr = chan.recv(4)
                if len(hdr) < 4:
                    raise EOFError("connection closed by the host")
                size = struct.unpack(">I", hdr)[0]
                if size < 5 or size > limits.SFTP_MAX_PACKET:
                    raise EOFError(f"bad sftp packet length {size}")
                pkt = chan.recv(size)
                if len(pkt) < size:
                    raise EOFError("connection closed by the host")
                self._last_rx = time.monotonic()
                num = struct.unpack_from(">I", pkt, 1)[0]
                with self._plock:
                    req = self._pending.pop(num, None)
                if req is None:
                    continue   # answer to a request nobody waits for any more
                req.t = pkt[0]
                req.body = pkt[1:]
                req.finish()
        except Exception as e:
            self._fail(str(e) or type(e).__name__)

    def _watchdog(self) -> None:
        while self.dead is None:
            time.sleep(0.25)
            self.flush()
            now = time.monotonic()
            with self._plock:
                oldest = min((r.sent for r in self._pending.values()), default=None)
            if oldest is None:
                continue
            if now - oldest > self._timeout and now - self._last_rx > self._timeout:
                self._fail(f"no answer from the host for {self._timeout:g}s")

    def _fail(self, reason: str) -> None:
        with self._plock:
            if self.dead is not None:
                return
            self.dead = "closed" if self._closing else f"link to the host lost: {reason}"
            pending = list(self._pending.values())
            self._pending.clear()
        if not self._closing:
            log.warning("fs: %s", self.dead)
        for req in pending:
            req.err = self.dead
            req.finish()
        # shutdown() wakes a reader blocked in recv and any blocked sender; close() alone does
        # not on Linux (SecureConn.close does both, a plain socket needs it spelled out).
        try:
            self._conn.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass
        try:
            self._conn.close()
        except OSError:
            pass

    def close(self) -> None:
        self._closing = True
        self._fail("closed")
        for th in (self._reader, self._watch):
            if th is not threading.current_thread():
                th.join(5)

    # --- a few requests paramiko lacks ---
    def statvfs(self, path: str) -> Optional[dict]:
        if not self._statvfs_ok:
            return None
        try:
            t, msg = self.wait(self.submit(_EXTENDED, "statvfs@openssh.com", path))
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.EBADMSG):
                self._statvfs_ok = False
                return None
            raise
        if t != _EXTENDED_REPLY:
            self._statvfs_ok = False
            return None
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                "f_favail", "f_fsid", "f_flag", "f_namemax")
        return {k: msg.get_int64() for k in keys}



# ---------------------------------------------------------------------------------- FUSE ops

class _Pre:
    """A file opened ahead: its OPEN request, then its handle and first chunk."""

    __slots__ = ("open_req", "handle", "chunk", "size", "t0")

    def __init__(self, open_req, size: int, t0: float) -> None:
        self.open_req = open_req
        self.handle: Optional[bytes] = None
        self.chunk = None
        self.size = size
        self.t0 = t0


class _Chunk:
    """One read-ahead chunk: its READ requests (offset, length, request) and, once read, its bytes."""

    __slots__ = ("pieces", "data")

    def __init__(self, pieces) -> None:
        self.pieces = pieces
        self.data: Optional[bytes] = None


class _OpenFile:
    # Two locks: `rlock` guards the read-ahead state and may be held while a READ is sent;
    # `cond` guards write accounting and is taken by the link's reader thread, so it is
    # never held while sending (a full socket would otherwise deadlock the reader).
    __slots__ = ("handle", "path", "size_hint", "rlock", "cond", "chunks", "window", "last_end",
                 "inflight", "inflight_bytes", "error", "writable")

    def __init__(self, handle: bytes, path: str, size_hint: Optional[int], writable: bool) -> None:
        self.handle = handle
        self.path = path
        self.size_hint = size_hint
        self.rlock = threading.Lock()
        self.cond = threading.Condition()
        self.chunks: Dict[int, _Chunk] = {}
        self.window = 0
        self.last_end = -1
        self.inflight = 0
        self.inflight_bytes = 0
        self.error: Optional[OSError] = None
        self.writable = writable


def _pflags(flags: int) -> int:
    acc = flags & os.O_ACCMODE
    p = _FXF_READ if acc == os.O_RDONLY else _FXF_WRITE if acc == os.O_WRONLY else _FXF_READ | _FXF_WRITE
    if flags & os.O_APPEND:
        p |= _FXF_APPEND
    if flags & os.O_CREAT:
        p |= _FXF_CREAT
    if flags & os.O_TRUNC:
        p |= _FXF_TRUNC
    if flags & os.O_EXCL:
        p |= _FXF_EXCL
    return p


# libfuse2 hands utimensat's special nanosecond values through (tv_sec = 0); with
# use_ns, fusepy turns them into these plain numbers.
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2


def _ns(t) -> int:
    return int(t or 0) * 1_000_000_000


class RemoteFS:
    """fusepy operations (raw_fi=True) over an SFTPLink. Mixed into fuse.Operations at mount."""

    use_ns = True

    def __init__(self, link, remote_root: str = "/", attr_ttl: float = 1.0, entry_ttl: float = 1.0,
                 readonly: bool = False, chunk: int = limits.FS_READ_CHUNK,
                 readahead: int = limits.FS_READAHEAD_CHUNKS) -> None:
        self.sftp = link
        self._root = "" if remote_root in ("", "/") else remote_root.rstrip("/")
        self._attr_ttl = max(0.0, attr_ttl)
        self._entry_ttl = max(0.0, entry_ttl)
        self._ro = readonly
        self._chunk = chunk
        self._sub = chunk   # READ size the host answers in full (learned down if it caps)
        self._maxwin = max(0, readahead)
        self._lock = threading.Lock()
        self._attrs: Dict[str, Tuple[float, Optional[dict]]] = {}
        self._dirs: Dict[str, Tuple[float, frozenset]] = {}
        self._listed: Dict[str, List[int]] = {}   # dir -> [entries at its last listing, lookups missed since]
        self._files: Dict[int, _OpenFile] = {}
        self._next_fh = 1
        self._pre: Dict[str, _Pre] = {}            # path -> opened ahead
        self._orphans: List[_Pre] = []             # dropped before the host answered their OPEN
        self._last_open: Dict[str, str] = {}       # dir -> name last opened for reading
        self._order: Dict[str, tuple] = {}         # dir -> ((names, index), (sorted, index))

    # --- plumbing ---
    def __call__(self, op, *args):
        fn = getattr(self, op, None)
        if fn is None:
            raise OSError(errno.ENOSYS, op)
        try:
            return fn(*args)
        except OSError:
            raise
        except EOFError as e:
            raise OSError(errno.EIO, str(e) or "end of file") from None
        except Exception as e:
            log.debug("fs: %s failed", op, exc_info=True)
            raise OSError(errno.EIO, str(e) or type(e).__name__) from None

    def _remote(self, path: str) -> str:
        return self._root + path if path != "/" else (self._root or "/")

    def _check_writable(self) -> None:
        if self._ro:
            raise OSError(errno.EROFS, "read-only mount")

    def _of(self, fi) -> _OpenFile:
        of = self._files.get(getattr(fi, "fh", fi))
        if of is None:
            raise OSError(errno.EBADF, "stale file handle")
        return of

    # --- attribute cache ---
    def _st(self, a) -> dict:
        mode = a.st_mode if a.st_mode is not None else statmod.S_IFREG | 0o644
        size = a.st_size or 0
        return {
            "st_mode": mode, "st_size": size, "st_nlink": 1,
            "st_uid": a.st_uid or 0, "st_gid": a.st_gid or 0,
            "st_atime": _ns(a.st_atime), "st_mtime": _ns(a.st_mtime), "st_ctime": _ns(a.st_mtime),
            "st_blocks": (size + 511) // 512, "st_blksize": self._chunk,
        }

    def _put(self, path: str, st: Optional[dict]) -> None:
        with self._lock:
            self._trim()
            self._attrs[path] = (time.monotonic() + self._attr_ttl, st)

    def _trim(self) -> None:
        """Keep the caches bounded (a `find` over a huge tree must not grow them forever)."""
        for cache in (self._attrs, self._dirs):
            if len(cache) >= limits.FS_CACHE_MAX:
                now = time.monotonic()
                for k in [k for k, v in cache.items() if v[0] <= now]:
                    del cache[k]
                if len(cache) >= limits.FS_CACHE_MAX:
                    cache.clear()
        if len(self._listed) >= limits.FS_CACHE_MAX:
            self._listed.clear()
        if len(self._order) >= 256 or len(self._last_open) >= limits.FS_CACHE_MAX:
            self._order.clear()   # each may hold a big directory's names
            self._last_open.clear()

    def _forget(self, *paths: str, tree: bool = False) -> None:
        for p in paths:
            self._drop_pre(p, tree)
        with self._lock:
            for p in paths:
                self._attrs.pop(p, None)
                self._dirs.pop(p, None)
                self._dirs.pop(posixpath.dirname(p), None)
                # a directory being changed is not re-listed on misses (creating many files in
                # a big directory must not list it again and again); the next readdir re-arms it
                self._listed.pop(posixpath.dirname(p), None)
                self._listed.pop(p, None)
                if tree:
                    pre = p.rstrip("/") + "/"
                    for k in [k for k in self._attrs if k.startswith(pre)]:
                        del self._attrs[k]
                    for k in [k for k in self._dirs if k.startswith(pre)]:
                        del self._dirs[k]

    def _lstat_req(self, path: str) -> _Req:
        return self.sftp.submit(7, self._remote(path))   # SSH_FXP_LSTAT

    def _take_stat(self, path: str, req: _Req) -> Optional[dict]:
        """Cache the answer of a pipelined LSTAT (None if it failed)."""
        try:
            t, msg = self.sftp.wait(req)
        except (OSError, EOFError):
            self._forget(path)
            return None
        if t != _ATTRS:
            return None
        st = self._st(SFTPAttributes._from_msg(msg))
        self._put(path, st)
        return st

    # --- metadata ---
    def getattr(self, path, fh=None):
        now = time.monotonic()
        with self._lock:
            ent = self._attrs.get(path)
            if ent is not None and ent[0] > now:
                if ent[1] is None:
                    raise OSError(errno.ENOENT, path)
                return ent[1]
            parent, name = posixpath.split(path)
            d = self._dirs.get(parent)
            if name and d is not None and d[0] > now and name not in d[1]:
                raise OSError(errno.ENOENT, path)   # a fresh listing says it is not there
            # A directory listed before whose entries are being looked up again (its cache
            # expired under a `cat *`, `cp -r`, `make`…): one pipelined listing refreshes them
            # all for a TTL, instead of one LSTAT round trip per name.
            info = self._listed.get(parent) if name else None
            relist = False
            if info is not None and info[0] <= limits.FS_RELIST_MAX and self._attr_ttl > 0:
                info[1] += 1
                relist = info[1] >= 3
        if relist:
            try:
                self.readdir(parent, 0)
            except OSError:
                pass
            else:
                with self._lock:
                    ent = self._attrs.get(path)
                    if ent is not None and ent[1] is not None:
                        return ent[1]
                    d = self._dirs.get(parent)
                    if d is not None and name not in d[1]:
                        raise OSError(errno.ENOENT, path)
        return self._take_stat_or_raise(path)

    def _take_stat_or_raise(self, path: str) -> dict:
        t, msg = self.sftp.wait(self._lstat_req(path))
        if t != _ATTRS:
            raise OSError(errno.EBADMSG, "unexpected answer to LSTAT")
        st = self._st(SFTPAttributes._from_msg(msg))
        self._put(path, st)
        return st

    def readdir(self, path, fh):
        link = self.sftp
        t, msg = link.wait(link.submit(11, self._remote(path)))   # SSH_FXP_OPENDIR
        if t != _HANDLE:
            raise OSError(errno.EBADMSG, "unexpected answer to OPENDIR")
        handle = msg.get_binary()
        names: List[str] = []
        stats: List[Tuple[str, dict]] = []
        inflight = deque(link.submit(_READDIR, handle) for _ in range(limits.FS_READDIR_PIPELINE))
        eof = False
        err: Optional[BaseException] = None
        try:
            while inflight:
                req = inflight.popleft()
                try:
                    t, msg = link.wait(req)
                except EOFError:
                    eof = True
                    continue
                except OSError as e:
                    if err is None:
                        err = e
                    eof = True
                    continue
                if t != _NAME:
                    eof = True
                    continue
                count = msg.get_int()
                if count > (len(msg.asbytes()) // 12) or len(names) + count > limits.FS_MAX_DIR_ENTRIES:
                    # an entry takes at least 12 bytes; a bigger count is a broken or hostile host
                    raise OSError(errno.EBADMSG, f"implausible directory listing from the host ({count} entries)")
                for _ in range(count):
                    raw = msg.get_string()
                    msg.get_string()   # longname
                    a = SFTPAttributes._from_msg(msg)
                    try:
                        name = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        continue   # fusepy speaks UTF-8 paths only: such a name cannot be shown
                    if name in (".", "..") or "/" in name or not name:
                        continue
                    names.append(name)
                    stats.append((name, self._st(a)))
                if not eof:
                    inflight.append(link.submit(_READDIR, handle))
        finally:
            try:
                link.submit(_CLOSE, handle, cb=lambda r: None, defer=True)
            except OSError:
                pass
        if err is not None:
            raise err
        base = path.rstrip("/")
        now = time.monotonic()
        with self._lock:
            self._trim()
            exp = now + self._attr_ttl
            for name, st in stats:
                self._attrs[base + "/" + name] = (exp, st)
            self._dirs[path] = (now + self._entry_ttl, frozenset(names))
            self._listed[path] = [len(names), 0]
            if len(names) <= limits.FS_RELIST_MAX:
                srt = sorted(names)
                self._order[path] = ((names, {n: i for i, n in enumerate(names)}),
                                     (srt, {n: i for i, n in enumerate(srt)}))
        return [".", ".."] + names

    def readlink(self, path):
        r = self.sftp.readlink(self._remote(path))
        if r is None:
            raise OSError(errno.EINVAL, "not a symlink")
        return r if isinstance(r, str) else r.decode("utf-8", "surrogateescape")

    def statfs(self, path):
        try:
            v = self.sftp.statvfs(self._remote(path))
        except (OSError, EOFError):
            v = None
        if v:
            return v
        # The host cannot tell (paramiko servers lack statvfs@openssh.com): plenty of room.
        blocks = 1 << 32
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": blocks, "f_bavail": blocks,
                "f_files": 1 << 24, "f_ffree": 1 << 24, "f_favail": 1 << 24, "f_namemax": 255}

    # --- changes to metadata (each answered with a fresh stat, pipelined) ---
    def _setstat(self, path: str, attr) -> None:
        self._check_writable()
        set_req = self.sftp.submit(9, self._remote(path), attr)   # SSH_FXP_SETSTAT
        st_req = self._lstat_req(path)
        try:
            self.sftp.wait(set_req)
        finally:
            self._take_stat(path, st_req)

    def chmod(self, path, mode):
        a = SFTPAttributes()
        a.st_mode = mode & 0o7777
        self._setstat(path, a)

    def chown(self, path, uid, gid):
        if uid == -1 or gid == -1:
            cur = self.getattr(path)
            uid = cur["st_uid"] if uid == -1 else uid
            gid = cur["st_gid"] if gid == -1 else gid
        a = SFTPAttributes()
        a.st_uid, a.st_gid = uid, gid
        self._setstat(path, a)

    def utimens(self, path, times=None):
        now_ns = time.time_ns()
        at, mt = (now_ns, now_ns) if times is None else times
        if _UTIME_OMIT in (at, mt):
            cur = self.getattr(path)
            at = cur["st_atime"] if at == _UTIME_OMIT else at
            mt = cur["st_mtime"] if mt == _UTIME_OMIT else mt
        at = now_ns if at == _UTIME_NOW else at
        mt = now_ns if mt == _UTIME_NOW else mt
        at, mt = at / 1e9, mt / 1e9
        a = SFTPAttributes()
        a.st_atime, a.st_mtime = int(at), int(mt)
        self._setstat(path, a)

    def truncate(self, path, length, fh=None):
        self._check_writable()
        a = SFTPAttributes()
        a.st_size = length
        self._invalidate_reads(path)
        of = self._files.get(getattr(fh, "fh", -1)) if fh is not None else None
        if of is not None:
            self._drain(of)
            set_req = self.sftp.submit(10, of.handle, a)   # SSH_FXP_FSETSTAT
            st_req = self._lstat_req(path)
            try:
                self.sftp.wait(set_req)
            finally:
                self._take_stat(path, st_req)
        else:
            self._setstat(path, a)
        for o in self._opened(path):
            o.size_hint = length

    # --- namespace ---
    def _create(self, path, req) -> None:
        """Wait for a request that creates `path`, with an lstat pipelined behind it.

        SFTP v3 has no "exists" status: a create over an existing name fails with a generic
        failure/permission code, so the lstat tells EEXIST apart (and refreshes the cache)."""
        st_req = self._lstat_req(path)
        try:
            self.sftp.wait(req)
        except OSError as e:
            st = self._take_stat(path, st_req)
            if e.errno == errno.EPERM and st is not None:
                raise OSError(errno.EEXIST, path) from None
            raise
        self._take_stat(path, st_req)

    def mkdir(self, path, mode):
        self._check_writable()
        a = SFTPAttributes()
        a.st_mode = mode & 0o7777
        self._forget(path)
        self._create(path, self.sftp.submit(14, self._remote(path), a))   # SSH_FXP_MKDIR

    def rmdir(self, path):
        self._check_writable()
        try:
            self.sftp.rmdir(self._remote(path))
        except OSError as e:
            if e.errno == errno.EPERM and self._nonempty(path):
                raise OSError(errno.ENOTEMPTY, path) from None
            raise
        finally:
            self._forget(path, tree=True)
        self._put(path, None)

    def _nonempty(self, path: str) -> bool:
        try:
            self._forget(path)
            return len(self.readdir(path, 0)) > 2
        except OSError:
            return False

    def unlink(self, path):
        self._check_writable()
        try:
            self.sftp.remove(self._remote(path))
        finally:
            self._forget(path)
        self._put(path, None)

    def rename(self, old, new):
        self._check_writable()
        link = self.sftp
        self._forget(old, new, tree=True)
        try:
            try:
                link.wait(link.submit(_EXTENDED, "posix-rename@openssh.com", self._remote(old), self._remote(new)))
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                link.rename(self._remote(old), self._remote(new))
        except OSError as e:
            if e.errno == errno.EPERM:
                try:
                    st = self._take_stat_or_raise(new)
                except OSError:
                    st = None
                if st is not None and statmod.S_ISDIR(st["st_mode"]) and self._nonempty(new):
                    raise OSError(errno.ENOTEMPTY, new) from None
            raise
        finally:
            self._forget(old, new, tree=True)
        with self._lock:
            for of in self._files.values():
                if of.path == old:
                    of.path = new
                elif of.path.startswith(old.rstrip("/") + "/"):
                    of.path = new.rstrip("/") + of.path[len(old.rstrip("/")):]
        self._put(old, None)

    def symlink(self, target, source):
        # fusepy: `target` is the new link's path, `source` what it points to (ln -s source target)
        self._check_writable()
        self._forget(target)
        self._create(target, self.sftp.submit(20, source, self._remote(target)))   # SSH_FXP_SYMLINK, OpenSSH order

    def link(self, target, source):
        raise OSError(errno.EPERM, "hard links are not supported over sftp")

    def mknod(self, path, mode, dev):
        raise OSError(errno.EPERM, "only regular files, directories and symlinks")

    # --- files ---
    def _register(self, of: _OpenFile) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = of
        return fh

    def _opened(self, path: str) -> List[_OpenFile]:
        with self._lock:
            return [of for of in self._files.values() if of.path == path]

    def _cached_size(self, path: str) -> Optional[int]:
        with self._lock:
            ent = self._attrs.get(path)
        if ent is not None and ent[1] is not None:
            return ent[1]["st_size"]
        return None

    def _open(self, path: str, flags: int, mode: Optional[int]):
        plain_read = (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & (os.O_TRUNC | os.O_CREAT)
        if not plain_read:
            self._check_writable()
        else:
            pre = self._take_pre(path)
            if pre is not None:
                of = _OpenFile(pre.handle, path, self._cached_size(path), False)
                if pre.chunk is not None:
                    of.chunks[0] = pre.chunk
                elif of.size_hint:
                    of.chunks[0] = self._submit_chunk(of.handle, 0)
                fh = self._register(of)
                self._prefetch_after(path)
                return fh
        a = SFTPAttributes()
        if mode is not None:
            a.st_mode = mode & 0o7777
        link = self.sftp
        op = link.submit(_OPEN, self._remote(path), _pflags(flags), a)
        st_req = self._lstat_req(path) if flags & (os.O_CREAT | os.O_TRUNC) else None
        try:
            t, msg = link.wait(op)
        except OSError as e:
            st = self._take_stat(path, st_req) if st_req is not None else None
            if e.errno == errno.EPERM and flags & os.O_EXCL and st is not None:
                raise OSError(errno.EEXIST, path) from None
            raise
        if t != _HANDLE:
            raise OSError(errno.EBADMSG, "unexpected answer to OPEN")
        handle = msg.get_binary()
        if st_req is not None:
            self._forget(path)
            self._take_stat(path, st_req)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        of = _OpenFile(handle, path, self._cached_size(path), writable)
        if not writable and of.size_hint:
            # start the first READ now: it overlaps the kernel's way back to us
            of.chunks[0] = self._submit_chunk(of.handle, 0)
        fh = self._register(of)
        if plain_read:
            self._prefetch_after(path)
        return fh

    # --- opening ahead: files read one after another in directory order ---
    # `cat *`, `grep -r`, `cp -r`, `tar`: when a file is opened for reading right after its
    # predecessor in the directory's listing order (or sorted order), the next few regular
    # files are opened on the host and their first chunk requested, so that their own open
    # and first read cost no round trip. What was fetched ahead is used only while it is
    # younger than the attribute TTL (at most 1 s) and the file's cached size still matches;
    # anything this mount changes under that path drops it first.
    def _pre_ttl(self) -> float:
        return min(self._attr_ttl, 1.0)

    def _take_pre(self, path: str) -> Optional["_Pre"]:
        with self._lock:
            pre = self._pre.pop(path, None)
        if pre is None:
            return None
        try:
            handle = pre.handle or self._pre_handle(pre, block=True)
        except (OSError, EOFError):
            return None   # the ordinary open will report what is wrong
        if handle is None:
            return None
        if time.monotonic() - pre.t0 > self._pre_ttl() or self._cached_size(path) != pre.size:
            self._close_handle(handle)
            return None
        return pre

    def _pre_handle(self, pre: "_Pre", block: bool) -> Optional[bytes]:
        if pre.handle is None:
            if not block and not pre.open_req.done():
                return None
            t, msg = self.sftp.wait(pre.open_req)
            if t != _HANDLE:
                raise OSError(errno.EBADMSG, "unexpected answer to OPEN")
            pre.handle = msg.get_binary()
        return pre.handle

    def _close_handle(self, handle: bytes) -> None:
        try:   # nobody waits for the CLOSE answer: ordering on the link keeps it correct
            self.sftp.submit(_CLOSE, handle, cb=lambda r: None, defer=True)
        except OSError:
            pass

    def _drop_pre(self, path: str, tree: bool = False) -> None:
        with self._lock:
            gone = [self._pre.pop(path)] if path in self._pre else []
            if tree:
                pre = path.rstrip("/") + "/"
                gone += [self._pre.pop(k) for k in [k for k in self._pre if k.startswith(pre)]]
        for p in gone:
            self._discard_pre(p)

    def _discard_pre(self, pre: "_Pre") -> None:
        try:
            handle = self._pre_handle(pre, block=False)
        except (OSError, EOFError):
            return
        if handle is not None:
            self._close_handle(handle)
        else:   # not answered yet: closed at a later sweep (or by the host at the session's end)
            with self._lock:
                self._orphans.append(pre)

    def _sweep_orphans(self) -> None:
        with self._lock:
            ready = [p for p in self._orphans if p.open_req.done()]
            self._orphans = [p for p in self._orphans if not p.open_req.done()]
        for p in ready:
            self._discard_pre(p)

    def _prefetch_after(self, path: str) -> None:
        ttl = self._pre_ttl()
        if ttl <= 0 or limits.FS_OPEN_AHEAD <= 0:
            return
        parent, name = posixpath.split(path)
        now = time.monotonic()
        with self._lock:
            last = self._last_open.get(parent)
            self._last_open[parent] = name
            order = self._order.get(parent)
            stale = [k for k, p in self._pre.items() if now - p.t0 > ttl]
            gone = [self._pre.pop(k) for k in stale]
        for p in gone:
            self._discard_pre(p)
        if self._orphans:
            self._sweep_orphans()
        if order is None or last is None:
            return
        seq = None
        for names, index in order:
            i, j = index.get(name), index.get(last)
            if i is not None and j is not None and i == j + 1:
                seq = names[i + 1:i + 1 + limits.FS_OPEN_AHEAD]
                break
        if not seq:
            return
        base = parent.rstrip("/")
        with self._lock:
            writing = {of.path for of in self._files.values() if of.writable}
        try:
            for nm in seq:
                p = base + "/" + nm
                with self._lock:
                    pre = self._pre.get(p)
                    ent = self._attrs.get(p)
                if pre is not None:
                    if pre.chunk is None and pre.size:
                        try:
                            h = self._pre_handle(pre, block=False)
                        except (OSError, EOFError):
                            with self._lock:
                                self._pre.pop(p, None)
                            continue
                        if h is not None:
                            pre.chunk = self._submit_chunk(h, 0, defer=True)
                    continue
                if ent is None or ent[0] <= now or ent[1] is None or not statmod.S_ISREG(ent[1]["st_mode"]):
                    continue
                if p in writing:
                    continue
                req = self.sftp.submit(_OPEN, self._remote(p), _FXF_READ, SFTPAttributes(), defer=True)
                with self._lock:
                    self._pre[p] = _Pre(req, ent[1]["st_size"], now)
        finally:
            self.sftp.flush()   # the whole burst (and any deferred CLOSE) in one write

    def open(self, path, fi):
        fi.fh = self._open(path, fi.flags, None)
        return 0

    def create(self, path, mode, fi):
        fi.fh = self._open(path, fi.flags | os.O_CREAT, mode)
        return 0

    def _submit_chunk(self, handle: bytes, i: int, defer: bool = False) -> "_Chunk":
        C, sub = self._chunk, self._sub
        base = i * C
        pieces = []
        for off in range(base, base + C, sub):
            n = min(sub, base + C - off)
            pieces.append((off, n, self.sftp.submit_read(handle, off, n, defer=defer)))
        return _Chunk(pieces)

    def read(self, path, size, offset, fi):
        of = self._of(fi)
        if size <= 0:
            return b""
        C = self._chunk
        first, last = offset // C, (offset + size - 1) // C
        with of.rlock:
            if first in of.chunks or offset == of.last_end:
                of.window = min(max(2, of.window * 2), self._maxwin)
            else:
                of.window = 0
            hi = last + of.window
            if of.window and of.size_hint is not None:
                hi = min(hi, max(last, (of.size_hint - 1) // C))
            for i in range(first, hi + 1):
                if i not in of.chunks:
                    of.chunks[i] = self._submit_chunk(of.handle, i)
            chunks = [of.chunks[i] for i in range(first, last + 1)]
            for i in [i for i in of.chunks if i < first - 4 or i > hi + self._maxwin]:
                del of.chunks[i]
        out = []
        pos, end = offset, offset + size
        for i, ch in zip(range(first, last + 1), chunks):
            try:
                data = self._chunk_bytes(of, i, ch)
            except OSError:
                with of.rlock:
                    if of.chunks.get(i) is ch:
                        del of.chunks[i]
                raise
            base = i * C
            piece = data[pos - base:end - base]
            if piece:
                out.append(piece)
                pos += len(piece)
            if len(data) < C or pos >= end:
                break
        res = out[0] if len(out) == 1 else b"".join(out)
        with of.rlock:
            of.last_end = offset + len(res)
            done = of.last_end // C
            for i in [i for i in of.chunks if i < done]:
                del of.chunks[i]
        return res

    def _chunk_bytes(self, of: _OpenFile, i: int, ch: "_Chunk") -> bytes:
        """A chunk's bytes: shorter than the chunk only at the end of the file.

        A server may answer a READ with fewer bytes than asked without being at EOF (Go's
        pkg/sftp caps answers at 32 KiB): the rest is read on, and the cap is learned so that
        later chunks are asked for in pieces the server answers in full.
        """
        if ch.data is not None:
            return ch.data
        base = i * self._chunk
        end = base + self._chunk
        out: List[bytes] = []
        pos = base
        for off, n, req in ch.pieces:
            if pos < off:   # an earlier piece came back short
                if not self._fill(of, out, pos, off):
                    ch.data = b"".join(out)
                    return ch.data
                pos = off
            data = self._piece(req)
            if not data:
                break
            out.append(data)
            pos = off + len(data)
            if len(data) < n and self._at_eof(of, pos):
                break
        else:
            if pos < end and not self._at_eof(of, pos):
                self._fill(of, out, pos, end)
        ch.data = out[0] if len(out) == 1 else b"".join(out)
        return ch.data

    @staticmethod
    def _at_eof(of: _OpenFile, pos: int) -> bool:
        return of.size_hint is not None and pos >= of.size_hint

    def _fill(self, of: _OpenFile, out: List[bytes], pos: int, end: int) -> bool:
        """Read [pos, end) one request at a time; False if the file ended first."""
        while pos < end:
            want = min(self._sub, end - pos)
            data = self._piece(self.sftp.submit_read(of.handle, pos, want))
            if not data:
                return False
            if out and len(out[-1]) < self._sub and len(out[-1]) >= 4096:
                self._sub = len(out[-1])   # the server answered short but had more: its cap
            out.append(data)
            pos += len(data)
        return True

    def _piece(self, req: _Req) -> bytes:
        t, body = req.wait(self.sftp._timeout * 3 + 5)
        if t == _DATA:
            n = struct.unpack_from(">I", body, 4)[0]
            return body[8:8 + n]
        if t == _STATUS:
            code, text = _status_of(body)
            if code == _FX_EOF:
                return b""
            num = status_errno(code, text)
            raise OSError(num, text or os.strerror(num))
        raise OSError(errno.EBADMSG, "unexpected answer to READ")

    def _invalidate_reads(self, path: str, keep: Optional[_OpenFile] = None) -> None:
        if self._pre:
            self._drop_pre(path)
        for of in self._opened(path):
            if of is not keep and of.chunks:
                with of.rlock:
                    of.chunks.clear()

    def write(self, path, data, offset, fi):
        self._check_writable()
        of = self._of(fi)
        n = len(data)
        link = self.sftp
        with of.cond:
            if of.error is not None:
                raise of.error
            while of.inflight and of.inflight_bytes + n > limits.FS_WRITE_INFLIGHT:
                if link.dead is not None:
                    raise _eio(link.dead)
                of.cond.wait(0.5)
            if of.error is not None:
                raise of.error
            of.inflight += 1
            of.inflight_bytes += n
        with of.rlock:
            of.chunks.clear()

        def acked(req: _Req, of=of, n=n) -> None:
            err = req.error()
            with of.cond:
                of.inflight -= 1
                of.inflight_bytes -= n
                if err is not None and of.error is None:
                    of.error = err
                of.cond.notify_all()

        try:
            link.submit_write(of.handle, offset, data, cb=acked)
        except OSError:
            with of.cond:
                of.inflight -= 1
                of.inflight_bytes -= n
            raise
        self._invalidate_reads(of.path, keep=of)
        end = offset + n
        if of.size_hint is None or end > of.size_hint:
            of.size_hint = end
        with self._lock:
            ent = self._attrs.get(of.path)
            if ent is not None and ent[1] is not None:
                st = dict(ent[1])
                if end > st["st_size"]:
                    st["st_size"] = end
                    st["st_blocks"] = (end + 511) // 512
                st["st_mtime"] = st["st_ctime"] = time.time_ns()
                self._attrs[of.path] = (ent[0], st)
        return n

    def _drain(self, of: _OpenFile) -> None:
        """Wait for every WRITE of this file to be acknowledged; raise the first failure."""
        with of.cond:
            give_up = None
            while of.inflight:
                if self.sftp.dead is not None:
                    # a failed link completes every request at once; this is only a backstop
                    give_up = give_up or time.monotonic() + 2.0
                    if time.monotonic() > give_up:
                        of.error = of.error or _eio(self.sftp.dead)
                        break
                of.cond.wait(0.5)
            if of.error is not None:
                raise of.error

    def flush(self, path, fi):
        self._drain(self._of(fi))
        return 0

    def fsync(self, path, datasync, fi):
        self._drain(self._of(fi))
        return 0

    def release(self, path, fi):
        fh = getattr(fi, "fh", fi)
        with self._lock:
            of = self._files.pop(fh, None)
        if of is None:
            return 0
        try:
            if of.writable:
                self._drain(of)
        except OSError as e:
            log.warning("fs: %s: a write failed: %s", of.path, e.strerror or e)
        finally:
            with of.rlock:
                of.chunks.clear()
            self._close_handle(of.handle)
            if of.writable:
                self._forget(of.path)
        return 0

    def destroy(self, path):
        return None


# ---------------------------------------------------------------------------------- mounting

def load_fuse():
    """fusepy over libfuse2, or a one-line SkyptyError saying what is missing."""
    try:
        import fuse
    except (ImportError, OSError, EnvironmentError) as e:
        if "libfuse" in str(e).lower() or isinstance(e, OSError):
            raise SkyptyError("libfuse2 not found: install it (Debian/Ubuntu: apt install libfuse2)") from None
        raise SkyptyError(f"fusepy is not installed ({e}): pip install fusepy") from None
    return fuse


def _unescape(field: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(mountpoint: str) -> Optional[Tuple[str, str]]:
    """(fstype, source) of what is mounted exactly at `mountpoint`, or None."""
    target = os.path.normpath(os.path.abspath(mountpoint))
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) < 5 or _unescape(parts[4]) != target:
                    continue
                r = right.split()
                found = (r[0] if r else "", _unescape(r[1]) if len(r) > 1 else "")   # the last one wins
    except OSError:
        return None
    return found


def _dial(args, dest):
    """The secure stream with `dmsgpty/sftp` accepted: noise-XK over TCP, or an ephemeral dmsg client."""
    from skypty import client

    if dest.is_tcp:
        sk = client.resolve_identity(args, "pty fs mount")
        return client.dial_uri_tcp(dest.host, dest.port, dest.pk, sk, SFTP_URI)
    from skypty.config import DEFAULT_DMSGDISC
    from skypty.errors import ProtocolError, RejectedError
    from skypty.transport.dmsg.client import dial_standalone

    args.visor_key = False   # an ephemeral dmsg client never borrows the node's key (pty.md §6.2)
    sk = client.resolve_identity(args, "pty fs mount")
    try:
        return dial_standalone(dest.pk, dest.port, sk, getattr(args, "dmsgdisc", None) or DEFAULT_DMSGDISC, SFTP_URI)
    except RejectedError:
        raise RejectedError(f"{dest.pk.hex()}:{dest.port} refused dmsgpty/sftp: this client key is probably not"
                            f" whitelisted (pk {sk.pubkey().hex()}), or the host has no sftp") from None
    except (ProtocolError, OSError, EOFError) as e:
        raise SkyptyError(f"dmsg stream to {dest.pk.hex()}:{dest.port} failed: {e}") from None


def _fuse_options(args, pk_hex: str) -> dict:
    opts = {
        "foreground": True,
        # One FUSE thread. Concurrency lives on the link (pipelined reads, unacknowledged
        # writes); libfuse's worker threads would each enter Python through a fresh thread
        # state per call, which measured 25-40% slower on every bench phase.
        "nothreads": True,
        "fsname": pk_hex,
        "subtype": FS_NAME,
        "big_writes": True,
        "max_write": 131072,
        "max_read": 131072,
        "max_readahead": 1 << 20,
        "attr_timeout": f"{max(0.0, args.attr_ttl):g}",
        "entry_timeout": f"{max(0.0, args.entry_ttl):g}",
    }
    if args.ro:
        opts["ro"] = True
    if args.debug:
        opts["debug"] = True
    return opts


def cmd_mount(args) -> int:
    from skypty.dest import parse_dest
    from skypty.netutil import steady_allocator

    steady_allocator()   # see netutil

    dest = parse_dest(args.dest, default_port=args.port)
    standalone = getattr(args, "standalone", False)
    if dest.is_tcp:
        if standalone or args.transport == "dmsg":
            raise UsageError("--standalone/--transport dmsg take a bare <pk>[:port], not <pk>@host")
    elif not standalone:
        raise UsageError("a bare <pk> needs --standalone (ephemeral dmsg client); the node bridge is not"
                         " available in this build, or use <pk>@host[:port] over TCP")
    else:
        # dmsg: <pk>[:port], default port 22 unless -p was changed
        port = args.port if args.port != DEFAULT_TCP_PORT else DEFAULT_DMSG_PORT
        dest = parse_dest(args.dest, default_port=port)
        if dest.scheme not in ("", "dmsg"):
            raise UsageError(f"--standalone speaks dmsg only, not {dest.scheme}://")
    mnt = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mnt):
        raise UsageError(f"mountpoint {mnt} is not a directory")
    if find_mount(mnt) is not None:
        raise SkyptyError(f"{mnt} is already a mount point (unmount it first: skypty cli pty fs umount {mnt})")
    if not os.path.exists("/dev/fuse"):
        raise SkyptyError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available")
    fuse = load_fuse()
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    if not args.debug:
        logging.getLogger("fuse").setLevel(logging.CRITICAL)   # fusepy logs every errno it returns

    conn = _dial(args, dest)
    try:
        link = SFTPLink(conn)
    except Exception as e:
        conn.close()
        where = dest.hostport() if dest.is_tcp else f"{dest.pk.hex()}:{dest.port}"
        raise SkyptyError(f"sftp with {where} failed: {e or type(e).__name__}") from None
    try:
        try:
            root = link.normalize(args.remote_root or "/")
            st = link.stat(root)
        except (OSError, EOFError) as e:
            raise SkyptyError(f"--remote-root {args.remote_root}: {getattr(e, 'strerror', None) or e}") from None
        if not statmod.S_ISDIR(st.st_mode or 0):
            raise SkyptyError(f"--remote-root {args.remote_root} is not a directory on the host")
        ops_cls = type("SkyptyFS", (RemoteFS, fuse.Operations), {})
        ops = ops_cls(link, root, attr_ttl=args.attr_ttl, entry_ttl=args.entry_ttl, readonly=args.ro)
        log.debug("mounting %s:%s on %s", dest.pk.hex(), root, mnt)
        try:
            fuse.FUSE(ops, mnt, raw_fi=True, **_fuse_options(args, dest.pk.hex()))
        except RuntimeError:
            raise SkyptyError(f"cannot mount on {mnt} (see the fuse message above)") from None
        lost = link.dead
    finally:
        link.close()
    if lost is not None:
        sys.stderr.write(f"pty fs mount: {lost}\n")
        return 1
    return 0


def cmd_umount(args) -> int:
    mnt = os.path.normpath(os.path.abspath(args.mountpoint))
    found = find_mount(mnt)
    if found is None:
        raise SkyptyError(f"{mnt} is not mounted")
    if not found[0].startswith("fuse"):
        raise SkyptyError(f"{mnt} is a {found[0] or 'non-FUSE'} mount, not a skypty one")
    lazy = getattr(args, "lazy", False)
    cmds = [["fusermount", "-u"] + (["-z"] if lazy else []) + [mnt],
            ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mnt]]
    if os.geteuid() == 0:
        cmds.append(["umount"] + (["-l"] if lazy else []) + [mnt])
    errors = []
    for cmd in cmds:
        if shutil.which(cmd[0]) is None:
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{cmd[0]}: {e}")
            continue
        if r.returncode == 0 and find_mount(mnt) is None:
            return 0
        lines = (r.stderr or r.stdout).strip().splitlines()
        errors.append(lines[-1] if lines else f"{cmd[0]} exited {r.returncode}")
    if find_mount(mnt) is None:
        return 0
    if not errors:
        raise SkyptyError("no fusermount, fusermount3 or umount found")
    hint = "" if lazy else " (busy? try --lazy)"
    raise SkyptyError(f"cannot unmount {mnt}: {errors[0]}{hint}")
