"""Socket endings and TCP options shared by the host, the TCP transport and the services.

Three ways a connection ends, each for a reason the peer can tell apart:
- `close_conn`: shutdown(RDWR) then close. close() alone does not wake a thread of ours that
  is blocked in recv() on the same socket (Linux), shutdown() does.
- `close_after_drain`: FIN first, then read and discard (bounded in bytes and time) what the
  peer already sent. Closing with unread input makes the kernel answer RST, which can destroy
  the last bytes we wrote (an HTTP error) or turn a deliberate EOF into "connection reset".
- `reset_close`: close with SO_LINGER 0, so the peer gets RST whatever it sent. The TCP host
  sheds over-cap connections this way; our client retries only a reset handshake, and reports
  an EOF (what a wrong pinned key produces) at once.

Modules on the client's path (this one, client, noise, mux, rpc) take their socket names from
`_socket`, the C module that `socket` wraps, and dial with `connect_tcp`: importing `socket`
(its enum conversions and `selectors`) was 8 % of a one-shot `cli pty exec` (bench/). The
host's own modules keep `socket`; both kinds of object have what these modules call.
"""
from __future__ import annotations

import _socket
import struct
import time

from skypty import limits

__all__ = ["connect_tcp", "close_conn", "close_after_drain", "reset_close", "reset_on_close", "set_keepalive",
           "steady_allocator"]


def close_conn(conn) -> None:
    """End `conn` (a socket or a SecureConn), waking any thread blocked on it; never raises."""
    if conn is None:
        return
    if hasattr(conn, "shutdown"):
        try:
            conn.shutdown(_socket.SHUT_RDWR)
        except (OSError, TypeError):   # TypeError: a stream whose shutdown() takes no argument
            pass
    try:
        conn.close()
    except Exception:  # noqa: B902 - closing is best effort by definition
        pass


def close_after_drain(conn, limit: int, wait: float) -> None:
    """Half-close, discard up to `limit` bytes for at most `wait` s, and leave the close to the caller."""
    try:
        if hasattr(conn, "shutdown_write"):
            conn.shutdown_write()
        else:
            conn.shutdown(_socket.SHUT_WR)
    except (OSError, AttributeError):
        return
    deadline = time.monotonic() + wait
    got = 0
    try:
        while got < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            data = conn.recv(65536)
            if not data:
                return
            got += len(data)
    except Exception:  # noqa: B902 - timeout or reset: we are closing anyway
        return


def connect_tcp(host, port: int, timeout: float):
    """Every outgoing TCP connection: socket.create_connection's job (each address getaddrinfo
    gives, in order, until one connects; the last error otherwise), then TCP_NODELAY (our
    traffic is keystrokes and rpc turns) and set_keepalive. The socket keeps `timeout`. A
    _socket.socket: recv, recv_into, sendall, setsockopt, settimeout, shutdown, close, fileno
    as socket's."""
    err: OSError = OSError(f"no address for {host!r}")
    for family, kind, proto, _, addr in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        except OSError as e:
            sock.close()
            err = e
            continue
        set_keepalive(sock)
        return sock
    raise err


def reset_on_close(sock) -> None:
    """Make the coming close() send RST (SO_LINGER on, timeout 0), dropping unsent data."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass


def reset_close(sock) -> None:
    """Close with RST."""
    reset_on_close(sock)
    try:
        sock.close()
    except OSError:
        pass


def set_keepalive(sock) -> None:
    """TCP keepalive with short probes (IDLE + INTERVAL * COUNT s to declare a peer dead).

    After the handshake nothing on the TCP path has a timeout (rpc and the pty wait forever
    on purpose), so a peer whose network vanished would keep its threads and its pty alive
    for ever. A peer that vanished with our data unacknowledged is ended by the kernel's
    retransmission limit instead (tcp_retries2, ~15 min). TCP_USER_TIMEOUT would shorten that
    but also cuts a live peer that merely stops reading (zero window), so it is not set.
    Options the platform lacks are skipped.
    """
    idle, interval, count = limits.TCP_KEEPALIVE_IDLE, limits.TCP_KEEPALIVE_INTERVAL, limits.TCP_KEEPALIVE_COUNT
    opts = [(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(_socket, name):
            opts.append((_socket.IPPROTO_TCP, getattr(_socket, name), int(value)))
    if not hasattr(_socket, "TCP_KEEPIDLE") and hasattr(_socket, "TCP_KEEPALIVE"):   # macOS spelling
        opts.append((_socket.IPPROTO_TCP, _socket.TCP_KEEPALIVE, int(idle)))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_steady = False


def steady_allocator() -> None:
    """Fixed malloc thresholds for a process that moves bulk data (a host, a download, a mount).

    A bulk transfer makes and frees buffers of 64-256 KiB at a high rate. glibc maps blocks
    over a threshold it moves at run time and trims its heap as it goes, so whether those
    buffers reuse heap memory or are freshly mapped and faulted in, page by page, every time
    depends on the order of the first frees. Measured on a 256 MiB `exec --stream`: 3,900
    page faults and ~350 MiB/s, or 168,000 and ~200 MiB/s, run to run; fs seq-write
    185-210 -> ~295 MiB/s. A fixed 1 MiB map threshold and 4 MiB trim threshold make it the
    first case every time, for at most 4 MiB of freed heap kept. glibc only (elsewhere, e.g.
    musl, nothing is done); once per process. Not for the one-shot exec path: ctypes is ~3 ms
    of a cold start."""
    global _steady
    if _steady:
        return
    _steady = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version   # noqa: B018 - AttributeError off glibc
        mallopt = libc.mallopt
    except (ImportError, OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    mallopt(_M_TRIM_THRESHOLD, 4 << 20)
