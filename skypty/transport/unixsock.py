"""The local control socket: listener (0600, stale-socket handling) and dialer (pty.md §7.1).

The control socket has no authentication beyond who can connect to it, so:
- a unix socket is created 0600 with no moment where it is reachable with a wider mode;
- an existing path is replaced only if it is a socket our euid owns (root included: another
  user's socket is theirs to remove), nobody answers on it, and it is still the same inode
  just before the unlink; in a directory others may write without the sticky bit the entry
  could be swapped in between, so there we refuse. A live host there, or anything that is
  not a socket, makes us refuse to start;
- an abstract unix address (`@name`) has no permissions at all and a tcp address is reachable
  by every local user: the first is refused and the second must be loopback, unless `unsafe`.

How the mode is made right (why not the alternatives): bind() creates the socket file with
0777 & ~umask. Changing the umask is process-wide and races with other threads; chmod after
bind leaves a window where the file is wider; fchmod on the socket before bind is not portable.
So we bind inside a fresh private directory (mkdtemp: 0700, in the target's directory, hence
on the same filesystem), chmod the socket to 0600 while nobody else can reach it, then move
it into place with link() (atomic, and fails instead of replacing a socket another host
created meanwhile) or rename() where link() is not supported, and remove the directory.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import tempfile
from typing import Optional, Tuple

from skypty.errors import SkyptyError, UsageError
from skypty.limits import CONTROL_DIAL_TIMEOUT, CONTROL_PROBE_TIMEOUT

__all__ = ["listen_control", "dial_control", "ControlListener", "split_hostport", "UNIX_PATH_MAX"]

log = logging.getLogger(__name__)

UNIX_PATH_MAX = 107   # sun_path is 108 bytes on Linux, one for the NUL
_TCP_NETS = ("tcp", "tcp4", "tcp6")


class ControlListener(socket.socket):
    """A listening unix socket that removes its file on close (only if it is still ours)."""

    _unlink_path: Optional[str] = None
    _unlink_ident: Optional[Tuple[int, int]] = None

    def close(self) -> None:
        path, ident = self._unlink_path, self._unlink_ident
        self._unlink_path = None
        if path is not None:
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == ident:
                    os.unlink(path)
            except OSError:
                pass
        super().close()

    @property
    def path(self) -> Optional[str]:
        return self._unlink_path


def split_hostport(addr: str) -> Tuple[str, int]:
    """"host:port", "[v6]:port" or ":port" -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise UsageError(f"control address {addr!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port)
    except ValueError:
        raise UsageError(f"control address {addr!r}: bad port {port!r}") from None
    if not 0 <= p <= 65535:
        raise UsageError(f"control address {addr!r}: port out of range")
    return host, p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(path: str) -> bool:
    """True when something accepts connections on the unix socket `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONTROL_PROBE_TIMEOUT)
    try:
        s.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except socket.timeout:
        return True   # a full backlog is still a live listener
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        return True
    finally:
        s.close()


def _clear_stale(path: str) -> None:
    """Remove `path` if it is a dead socket of ours; refuse for anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"control socket {path} exists and is not a socket; refusing to replace it")
    if st.st_uid != os.geteuid():
        raise UsageError(f"control socket {path} belongs to uid {st.st_uid}; refusing to replace it")
    if _probe(path):
        raise UsageError(f"another host is already listening on {path} (use --cliaddr for a second one)")
    parent = os.path.dirname(os.path.abspath(path))
    pst = os.stat(parent)
    if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
        raise UsageError(f"stale control socket {path}: {parent} is writable by others; remove it by hand")
    try:
        again = os.lstat(path)
    except FileNotFoundError:
        return
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        raise UsageError(f"control socket {path} changed while we checked it; refusing to replace it")
    log.info("removing stale control socket %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listen_unix(path: str) -> ControlListener:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(f"control socket path is too long ({len(os.fsencode(path))} > {UNIX_PATH_MAX} bytes): {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"control socket {path}: directory {parent} does not exist")
    _clear_stale(path)
    tmpdir = tempfile.mkdtemp(prefix=".pty", dir=parent)   # 0700: nobody else can reach inside
    tmp = os.path.join(tmpdir, "s")
    sock = ControlListener(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(tmp)) > UNIX_PATH_MAX:
            raise UsageError(f"control socket path is too long to create safely: {path}")
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        for attempt in (1, 2):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                if attempt == 2:
                    raise UsageError(f"another host is already listening on {path}") from None
                _clear_stale(path)   # a host started (or died) between our check and now
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOTSUP):
                    raise
                _clear_stale(path)
                os.rename(tmp, path)   # no hard links here: rename is still atomic
                break
        st = os.lstat(path)
        sock._unlink_path = path
        sock._unlink_ident = (st.st_dev, st.st_ino)
    except BaseException:
        sock.close()
        raise
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        try:
            os.rmdir(tmpdir)
        except OSError:
            pass
    if stat.S_IMODE(st.st_mode) != 0o600:   # pragma: no cover - defensive
        sock.close()
        raise SkyptyError(f"control socket {path} has mode {stat.S_IMODE(st.st_mode):o}, want 600")
    return sock


def _listen_tcp(net: str, addr: str, unsafe: bool) -> socket.socket:
    host, port = split_hostport(addr)
    if not _is_loopback(host) and not unsafe:
        raise UsageError(f"control address {addr} is not loopback: anyone who can reach it gets a shell"
                         " (use 127.0.0.1:PORT, a unix socket, or --unsafe)")
    family = socket.AF_INET6 if (net == "tcp6" or ":" in host) else socket.AF_INET
    if not host:
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    elif host == "localhost":
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"control address {addr} is already in use (another host?)") from None
        raise SkyptyError(f"cannot listen on control address {addr}: {e.strerror or e}") from None
    return s


def listen_control(net: str, addr: str, unsafe: bool = False) -> socket.socket:
    """Listen on the control address; `net` is unix or tcp(4|6)."""
    net = (net or "unix").strip()
    if net == "unix":
        if not addr:
            raise UsageError("control socket: empty address")
        if addr.startswith("@"):
            if not unsafe:
                raise UsageError(f"control socket {addr}: abstract unix sockets have no permissions"
                                 " (any local user could connect); use a path or --unsafe")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind("\0" + addr[1:])
                s.listen(64)
            except OSError as e:
                s.close()
                raise UsageError(f"control socket {addr}: {e.strerror or e}") from None
            return s
        return _listen_unix(addr)
    if net in _TCP_NETS:
        return _listen_tcp(net, addr, unsafe)
    raise UsageError(f"control socket: unknown network {net!r} (use unix or tcp)")


def dial_control(net: str, addr: str, timeout: float = CONTROL_DIAL_TIMEOUT) -> socket.socket:
    """Connect to a host's control socket; the returned socket is blocking with no timeout."""
    net = (net or "unix").strip()
    hint = "is the host running? (skypty app pty dmsg, or --cliaddr)"
    if net == "unix":
        target = "\0" + addr[1:] if addr.startswith("@") else addr
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(target)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            raise SkyptyError(f"no host listens on the control socket {addr}; {hint}") from None
        except PermissionError:
            s.close()
            raise SkyptyError(f"control socket {addr}: permission denied (it is 0600: run as the host's user)") from None
        except socket.timeout:
            s.close()
            raise SkyptyError(f"control socket {addr}: connect timed out") from None
        except OSError as e:
            s.close()
            raise SkyptyError(f"control socket {addr}: {e.strerror or e}") from None
    elif net in _TCP_NETS:
        host, port = split_hostport(addr)
        try:
            s = socket.create_connection((host or "127.0.0.1", port), timeout=timeout)
        except ConnectionRefusedError:
            raise SkyptyError(f"no host listens on the control address {addr}; {hint}") from None
        except socket.timeout:
            raise SkyptyError(f"control address {addr}: connect timed out") from None
        except OSError as e:
            raise SkyptyError(f"control address {addr}: {e.strerror or e}") from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        raise UsageError(f"control socket: unknown network {net!r} (use unix or tcp)")
    s.settimeout(None)
    return s
