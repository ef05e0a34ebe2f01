"""Noise-XK over plain TCP (mode 3, pty.md §1): the listener and the dialer.

`TCPServer` accepts with one thread per connection and hands each socket to
`host.serve_tcp_conn(sock, addr, on_auth=…)`, which does the handshake and the whitelist.
Until the whitelist accepts it (`on_auth`) a connection counts against two caps (like
sshd's MaxStartups): all unauthenticated connections, and those from one source address.
A connection over a cap is reset at once, before any handshake work; the reset (not an EOF)
tells our client to retry. Each slot is taken under one lock and given back exactly once,
whatever way the connection ends.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Dict, Optional, Set, Tuple

from skypty import limits
from skypty.errors import HandshakeError, SkyptyError, UsageError
from skypty.netutil import close_conn, connect_tcp, reset_close, set_keepalive

__all__ = ["TCPServer", "dial_tcp", "parse_listen_addr", "display_addr"]

log = logging.getLogger("skypty.tcp")


def parse_listen_addr(addr: str) -> Tuple[str, int]:
    """":2022" (every interface), "127.0.0.1:2022", "[::1]:2022", "host:2022" -> (host, port)."""
    text = (addr or "").strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise UsageError(f"bad listen address {addr!r} (use [::1]:2022)")
        host, port_s = text[1:end], text[end + 2:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise UsageError(f"bad listen address {addr!r} (use :2022 or 127.0.0.1:2022)")
        if ":" in host:
            raise UsageError(f"bad listen address {addr!r}: put IPv6 addresses in brackets, [::1]:2022")
    if not port_s.isdigit() or int(port_s) > 65535:
        raise UsageError(f"bad port in listen address {addr!r}")
    return host, int(port_s)


def display_addr(host: str, port: int) -> str:
    """How a client writes this address: IPv6 in brackets; a wildcard becomes loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    if host == "":
        # every interface: one dual-stack IPv6 socket when the system has IPv6, else IPv4
        candidates = [(socket.AF_INET6, ("::", port), True), (socket.AF_INET, ("0.0.0.0", port), False)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise UsageError(f"cannot resolve listen host {host!r}: {e.strerror}") from None
        candidates = [(fam, sa, False) for fam, _, _, _, sa in infos]
    last: Optional[OSError] = None
    for fam, sa, dual in candidates:
        try:
            s = socket.socket(fam, socket.SOCK_STREAM)
        except OSError as e:
            last = e
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if dual:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(sa)
            s.listen(128)
            return s
        except OSError as e:
            s.close()
            last = e
    what = display_addr(host, port) if host else f":{port}"
    raise SkyptyError(f"cannot listen on {what}: {last.strerror if last and last.strerror else last}")


class TCPServer:
    """Thread-per-connection listener in front of a Host."""

    def __init__(self, addr: str, host, *, max_unauth: int = limits.MAX_UNAUTH_CONNS,
                 per_source: int = limits.MAX_UNAUTH_PER_SOURCE):
        self.host = host
        self.max_unauth = max_unauth
        self.per_source = per_source
        bind_host, port = parse_listen_addr(addr)
        self._sock = _bind(bind_host, port)
        self.bind_host = bind_host
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._unauth = 0
        self._by_source: Dict[str, int] = {}
        self._conns: Set[socket.socket] = set()
        self._threads: Set[threading.Thread] = set()
        self._closed = False
        self._acceptor: Optional[threading.Thread] = None

    @property
    def address(self) -> str:
        """The address a client dials (wildcards shown as loopback)."""
        return display_addr(self.bind_host, self.port)

    def start(self) -> "TCPServer":
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"tcp-accept-{self.port}", daemon=True)
        self._acceptor.start()
        log.info("tcp: listening on %s", self._sock.getsockname()[:2])
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._sock.accept()
            except OSError as e:
                if self._closed:
                    return
                # EMFILE, ECONNABORTED…: keep serving, without spinning while fds are short
                log.warning("tcp: accept failed: %s", e.strerror or e)
                time.sleep(0.05)
                continue
            src = addr[0]
            where = display_addr(addr[0], addr[1])
            with self._lock:
                if self._closed:
                    reason = "shutting down"
                elif self._unauth >= self.max_unauth:
                    reason = f"{self._unauth} unauthenticated connections (max {self.max_unauth})"
                elif self._by_source.get(src, 0) >= self.per_source:
                    reason = f"{self._by_source[src]} unauthenticated connections from {src} (max {self.per_source})"
                else:
                    reason = ""
                    self._unauth += 1
                    self._by_source[src] = self._by_source.get(src, 0) + 1
                    self._conns.add(sock)
            if reason:
                log.warning("tcp: reject -@%s (tcp): %s", where, reason)
                reset_close(sock)
                continue
            log.info("tcp: accept -@%s (tcp): handshake", where)
            t = threading.Thread(target=self._serve, args=(sock, src, where), name=f"tcp-conn-{where}", daemon=True)
            with self._lock:
                self._threads.add(t)
            try:
                t.start()
            except RuntimeError as e:  # out of threads
                log.warning("tcp: reject -@%s (tcp): %s", where, e)
                with self._lock:
                    self._threads.discard(t)
                self._release(src, [False])
                self._forget(sock)
                reset_close(sock)

    def _release(self, src: str, once: list) -> None:
        with self._lock:
            if once[0]:
                return
            once[0] = True
            self._unauth -= 1
            n = self._by_source.get(src, 1) - 1
            if n > 0:
                self._by_source[src] = n
            else:
                self._by_source.pop(src, None)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)

    def _serve(self, sock: socket.socket, src: str, where: str) -> None:
        once = [False]
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            set_keepalive(sock)
            self.host.serve_tcp_conn(sock, where, on_auth=lambda: self._release(src, once))
        except Exception:  # one connection must never take the listener down
            log.exception("tcp: connection %s failed", where)
        finally:
            self._release(src, once)
            self._forget(sock)
            close_conn(sock)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def close(self, grace: float = limits.HOST_SHUTDOWN_GRACE) -> None:
        """Stop accepting, end every connection, and wait (bounded) for their threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
            threads = list(self._threads)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self._sock.close()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._acceptor is not None:
            self._acceptor.join(grace)
        deadline = time.monotonic() + grace
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        log.info("tcp: listener %s closed", self.address)


def dial_tcp(host: str, port: int, sk, remote_pk, timeout: float = limits.TCP_DIAL_TIMEOUT, *,
             pq: bool = True, require_pq: bool = False):
    """Connect to host:port and run the XK initiator pinned to `remote_pk` -> SecureConn."""
    from skypty import noise

    where = display_addr(host, port)
    try:
        sock = connect_tcp(host, port, timeout)
    except socket.timeout:
        raise SkyptyError(f"dial tcp {where}: timed out after {timeout:g}s") from None
    except OSError as e:
        raise SkyptyError(f"dial tcp {where}: {(e.strerror or str(e)).lower()}") from None
    try:
        return noise.client_handshake(sock, sk, remote_pk, timeout=limits.HANDSHAKE_TIMEOUT, pq=pq,
                                      require_pq=require_pq)
    except BaseException as e:
        close_conn(sock)
        if isinstance(e, HandshakeError):
            raise HandshakeError(f"{where}: {e}") from None
        raise
