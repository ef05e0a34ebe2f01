"""The dmsg client (crypto-dmsg.md §5.3, §5.7): sessions to dmsg servers found in discovery,
its client entry, dial/listen of KK-secured streams, and the helpers the host and the
`--standalone` clients use (`serve_dmsg`, `dial_standalone`).

Threads: one maintainer (keeps `sessions` sessions alive with exponential back-off and the
discovery entry current), one acceptor per session (yamux streams the server opens for
incoming dials), and one short-lived thread per incoming stream handshake (20 s deadline).
"""
from __future__ import annotations

import collections
import logging
import random
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional

from skypty import limits, noise
from skypty.errors import HandshakeError, ProtocolError, SkyptyError
from skypty.keys import PubKey, SecKey, generate_keypair
from skypty.transport.dmsg import disc as dmsgdisc
from skypty.transport.dmsg.session import DmsgSession, client_session_handshake, read_object, write_object
from skypty.transport.dmsg.stream import (Addr, DmsgError, DmsgStream, check_request, check_response,
                                          make_request, make_response, req_hash)

__all__ = ["DmsgClient", "Listener", "serve_dmsg", "start_host_dmsg", "dial_standalone", "split_hostport"]

log = logging.getLogger("skypty.dmsg.client")


def split_hostport(addr: str) -> tuple:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ProtocolError(f"invalid dmsg server address {addr!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


class Listener:
    """Streams accepted on one dmsg port; at most DMSG_LISTENER_BACKLOG waiting."""

    def __init__(self, client: "DmsgClient", port: int, backlog: int = limits.DMSG_LISTENER_BACKLOG) -> None:
        self.client = client
        self.port = port
        self._backlog = backlog
        self._q: Deque[DmsgStream] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    @property
    def addr(self) -> Addr:
        return Addr(self.client.pk, self.port)

    def full(self) -> bool:
        with self._cond:
            return len(self._q) >= self._backlog

    def _offer(self, s: DmsgStream) -> bool:
        with self._cond:
            if self.closed or len(self._q) >= self._backlog:
                return False
            self._q.append(s)
            self._cond.notify()
            return True

    def accept(self, timeout: Optional[float] = None) -> DmsgStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._q:
                if self.closed:
                    raise DmsgError(200, f"listener on port {self.port} closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise socket.timeout("accept timed out")
                self._cond.wait(1.0 if left is None else min(left, 1.0))
            return self._q.popleft()

    def close(self) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            pending = list(self._q)
            self._q.clear()
            self._cond.notify_all()
        for s in pending:
            s.close()
        self.client._drop_listener(self)


class DmsgClient:
    """A dmsg client identity. `sessions` = sessions to keep (0 = all servers; with
    `maintain=False` none are kept and dials connect on demand, without a client entry)."""

    def __init__(self, sk: SecKey, disc_url: str, sessions: int = limits.DMSG_DEFAULT_SESSIONS,
                 client_type: str = "", maintain: bool = True) -> None:
        self.sk = sk
        self.pk = sk.pubkey()
        self.disc = dmsgdisc.DiscClient(disc_url)
        self.want = sessions
        self.client_type = client_type
        self.maintain = maintain
        self._lock = threading.Lock()
        self._sessions: Dict[PubKey, DmsgSession] = {}
        self._connecting: Dict[PubKey, threading.Lock] = {}
        self._listeners: Dict[int, Listener] = {}
        self._ports_in_use: set = set()
        self._next_port = limits.DMSG_FIRST_EPHEMERAL_PORT - 1
        self._entry: Optional[Dict[str, Any]] = None
        self._posted: Optional[List[str]] = None
        self._posted_at = 0.0
        self._wake = threading.Event()
        self._ready = threading.Event()
        self.closed = False
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "DmsgClient":
        if self.maintain and self._thread is None:
            self._thread = threading.Thread(target=self._maintain, name="dmsg-maintain", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once a session is up and the client entry that names it is posted."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            sessions = list(self._sessions.values())
            listeners = list(self._listeners.values())
            entry = self._entry if self._posted is not None else None
        self._wake.set()
        for lis in listeners:
            lis.close()
        for s in sessions:
            s.close("client closed")
        if entry is not None:
            try:
                self.disc.timeout = 2.0
                self.disc.delete_entry(entry)
            except SkyptyError:
                pass

    def sessions(self) -> List[DmsgSession]:
        with self._lock:
            return [s for s in self._sessions.values() if not s.closed]

    # ---------------------------------------------------------------- sessions
    def _server_lock(self, pk: PubKey) -> threading.Lock:
        with self._lock:
            return self._connecting.setdefault(pk, threading.Lock())

    def connect_server(self, entry: Dict[str, Any]) -> DmsgSession:
        """A session with the server of this discovery entry (reused if one is up)."""
        spk = PubKey.from_hex(entry["static"])
        if not entry.get("server") or not entry["server"].get("address"):
            raise DmsgError(101, spk.hex())
        with self._server_lock(spk):
            with self._lock:
                cur = self._sessions.get(spk)
            if cur is not None and not cur.closed:
                return cur
            if self.closed:
                raise DmsgError(200)
            host, port = split_hostport(entry["server"]["address"])
            try:
                sock = socket.create_connection((host, port), timeout=limits.TCP_DIAL_TIMEOUT)
            except OSError as e:
                raise DmsgError(202, f"{host}:{port}: {e.strerror or e}") from None
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                cipher = client_session_handshake(sock, self.sk, spk)
                sess = DmsgSession(sock, cipher, self.pk, spk, client=True, addr=f"{host}:{port}")
            except (HandshakeError, OSError) as e:
                sock.close()
                raise DmsgError(202, f"{host}:{port}: {e}") from None
            with self._lock:
                if self.closed:
                    sess.close("client closed")
                    raise DmsgError(200)
                self._sessions[spk] = sess
            sess.mux.on_close(lambda _m, s=sess: self._session_closed(s))
            threading.Thread(target=sess.serve_streams, args=(self._incoming, "dmsg-incoming", lambda: self.closed),
                             name="dmsg-accept", daemon=True).start()
            log.info("dmsg session up with server %s at %s:%d", spk.hex(), host, port)
            return sess

    def _session_closed(self, sess: DmsgSession) -> None:
        with self._lock:
            if self._sessions.get(sess.remote_pk) is sess:
                del self._sessions[sess.remote_pk]
        if not self.closed:
            log.warning("dmsg session with server %s lost: %s", sess.remote_pk.hex(), sess.mux.error or "closed")
        self._wake.set()

    def _maintain(self) -> None:
        backoff = limits.DMSG_RECONNECT_MIN
        while not self.closed:
            ok = False
            try:
                ok = self._ensure_sessions()
                self._update_entry()
            except SkyptyError as e:
                log.warning("dmsg: %s", e)
                ok = False
            if self.closed:
                return
            have = len(self.sessions())
            if have and self._posted:
                self._ready.set()
            if ok and have and (not self.want or have >= self.want):
                backoff = limits.DMSG_RECONNECT_MIN
                wait = 30.0
            else:
                # short of sessions (or of servers to reach): retry with exponential back-off
                wait = backoff
                backoff = min(backoff * 2, limits.DMSG_RECONNECT_MAX)
            self._wake.wait(wait * random.uniform(0.9, 1.1))
            self._wake.clear()

    def _ensure_sessions(self) -> bool:
        have = {s.remote_pk for s in self.sessions()}
        if self.want and len(have) >= self.want:
            return True
        servers = self.disc.available_servers()
        random.shuffle(servers)
        for e in servers:
            if self.closed or (self.want and len(have) >= self.want):
                break
            pk = PubKey.from_hex(e["static"])
            if pk in have:
                continue
            try:
                self.connect_server(e)
                have.add(pk)
            except SkyptyError as err:
                log.warning("dmsg: server %s: %s", pk.hex(), err)
        if not servers:
            log.warning("dmsg: discovery %s lists no dmsg servers", self.disc.base_url)
        return bool(have) and (not self.want or len(have) >= min(self.want, len(servers) or 1))

    def _update_entry(self) -> None:
        delegated = sorted(s.remote_pk.hex() for s in self.sessions())
        if not delegated and self._posted is None:
            return   # like Go: the first entry names at least one server
        due = time.monotonic() - self._posted_at > limits.DMSG_CLIENT_UPDATE_INTERVAL
        if self._posted == delegated and not due:
            return
        if self._entry is None:
            cur = self.disc.current_entry(self.pk)
            if cur is None or cur["client"] is None:
                e = dmsgdisc.new_client_entry(self.pk, [PubKey.from_hex(h) for h in delegated], self.client_type)
                self._entry = self.disc.post_after(e, cur, self.sk)
                self._mark_posted(delegated)
                return
            self._entry = cur
        self._entry["client"] = {"delegated_servers": delegated}
        self._entry["client_type"] = self.client_type
        self._entry["server"] = None
        self.disc.put_entry(self._entry, self.sk)
        self._mark_posted(delegated)

    def _mark_posted(self, delegated: List[str]) -> None:
        self._posted = delegated
        self._posted_at = time.monotonic()
        log.info("dmsg client entry posted (delegated servers: %s)", ", ".join(d[:12] for d in delegated) or "none")

    # ---------------------------------------------------------------- ports and listeners
    def _alloc_port(self) -> int:
        with self._lock:
            for _ in range(65536):
                self._next_port += 1
                if self._next_port > 65535:
                    self._next_port = limits.DMSG_FIRST_EPHEMERAL_PORT
                p = self._next_port
                if p not in self._ports_in_use and p not in self._listeners:
                    self._ports_in_use.add(p)
                    return p
        raise DmsgError(400, "no free ephemeral port")

    def _free_port(self, p: int) -> None:
        with self._lock:
            self._ports_in_use.discard(p)

    def listen(self, port: int) -> Listener:
        if not 0 < port < 65536:
            raise DmsgError(305, f"port {port}")
        with self._lock:
            if self.closed:
                raise DmsgError(200)
            if port in self._listeners or port in self._ports_in_use:
                raise DmsgError(400, f"port {port}")
            lis = Listener(self, port)
            self._listeners[port] = lis
            return lis

    def _drop_listener(self, lis: Listener) -> None:
        with self._lock:
            if self._listeners.get(lis.port) is lis:
                del self._listeners[lis.port]

    # ---------------------------------------------------------------- dialing
    def _session_for(self, dst: PubKey) -> DmsgSession:
        try:
            entry = self.disc.entry(dst)
        except dmsgdisc.EntryNotFoundError:
            raise DmsgError(100, dst.hex()) from None
        if entry["client"] is None:
            raise DmsgError(102, dst.hex())
        delegated = [PubKey.from_hex(h) for h in (entry["client"]["delegated_servers"] or [])]
        if not delegated:
            raise DmsgError(103, dst.hex())
        with self._lock:
            for spk in delegated:
                s = self._sessions.get(spk)
                if s is not None and not s.closed:
                    return s
        last: Optional[SkyptyError] = None
        for spk in random.sample(delegated, len(delegated)):
            try:
                return self.connect_server(self.disc.entry(spk))
            except SkyptyError as e:
                last = e
        raise DmsgError(202, str(last) if last else "")

    def dial(self, dst_pk: PubKey, port: int, timeout: float = limits.DMSG_STREAM_HANDSHAKE_TIMEOUT) -> DmsgStream:
        """A KK-secured stream to dst_pk:port through one of its dmsg servers."""
        if self.closed:
            raise DmsgError(200)
        if not 0 < port < 65536:
            raise DmsgError(305, f"port {port}")
        sess = self._session_for(dst_pk)
        lport = self._alloc_port()
        src, dst = Addr(self.pk, lport), Addr(dst_pk, port)
        ys = None
        try:
            ys = sess.open_stream()
            deadline = time.monotonic() + timeout
            ys.settimeout(timeout)
            hs = noise.Handshake("KK", True, self.sk, dst_pk, pq=False)
            req = make_request(self.sk, src, dst, hs.write_message())
            write_object(ys, sess.cipher, req)
            try:
                resp_obj = read_object(ys, sess.cipher, deadline)
            except EOFError:
                raise DmsgError(352, f"{dst}: no listener on that port, or the server could not reach the host")
            except ConnectionResetError:
                raise DmsgError(352, f"{dst}: stream reset")
            resp = check_response(resp_obj, req, dst_pk)
            try:
                hs.read_message(resp["NoiseMsg"])
            except (ProtocolError, HandshakeError, ValueError) as e:
                raise HandshakeError(f"dmsg stream handshake with {dst_pk.hex()} failed: {e}") from None
            ys.settimeout(None)
            send, recv = hs.split()
            ds = DmsgStream(ys, send, recv, src, dst, on_close=lambda: self._free_port(lport))
            ys = None
            log.debug("dmsg stream %s -> %s via %s", src, dst, sess.remote_pk.hex()[:12])
            return ds
        except socket.timeout:
            raise DmsgError(352, f"{dst}: no answer within {timeout:g}s") from None
        except (ConnectionError, EOFError) as e:
            raise DmsgError(201, str(e)) from None
        finally:
            if ys is not None:
                ys.close()
                self._free_port(lport)

    def lookup_ip(self, server_pk: Optional[PubKey] = None, timeout: float = 10.0) -> str:
        """Our public IP as a dmsg server sees it (IP lookup, port 1)."""
        sessions = self.sessions()
        sess = next((s for s in sessions if server_pk is None or s.remote_pk == server_pk), None)
        if sess is None:
            raise DmsgError(201, "no session with that server")
        lport = self._alloc_port()
        ys = sess.open_stream()
        try:
            ys.settimeout(timeout)
            req = make_request(self.sk, Addr(self.pk, lport), Addr(sess.remote_pk, limits.DMSG_IP_PORT), ip_info=True)
            write_object(ys, sess.cipher, req)
            resp = check_response(read_object(ys, sess.cipher, time.monotonic() + timeout), req, sess.remote_pk)
            import ipaddress
            ip = ipaddress.ip_address(resp["IP"])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            return str(ip)
        except (EOFError, socket.timeout, ValueError) as e:
            raise DmsgError(352, f"IP lookup: {e}") from None
        finally:
            ys.close()
            self._free_port(lport)

    # ---------------------------------------------------------------- incoming
    def _incoming(self, sess: DmsgSession, ys) -> None:
        try:
            obj, _ = sess.read_request(ys)
            v, src, dst = check_request(obj, local_pk=self.pk)
            with self._lock:
                lis = self._listeners.get(dst.port)
            if lis is None or lis.closed:
                raise DmsgError(306, f"port {dst.port}")
            if lis.full():
                raise DmsgError(401, f"port {dst.port}")
            hs = noise.Handshake("KK", False, self.sk, src.pk, pq=False)
            hs.read_message(bytes(v.get("NoiseMsg") or b""))
            msg2 = hs.write_message()
            write_object(ys, sess.cipher, make_response(self.sk, req_hash(obj), True, msg2))
            ys.settimeout(None)
            send, recv = hs.split()
            ds = DmsgStream(ys, send, recv, dst, src)
            if not lis._offer(ds):
                ds.close()
                raise DmsgError(401, f"port {dst.port}")
            ys = None
            log.debug("dmsg stream accepted %s <- %s", dst, src)
        except (SkyptyError, EOFError, OSError, ValueError) as e:
            # Go answers failures by closing the stream, never with a negative response
            log.info("dmsg: incoming stream refused: %s", e)
        finally:
            if ys is not None:
                ys.close()


# ---------------------------------------------------------------- host and CLI glue

def serve_dmsg(host, client: DmsgClient, port: int) -> Listener:
    """Mode 2: accept streams on `port` and hand each to host.serve_dmsg_stream."""
    lis = client.listen(port)

    def serve_one(conn: DmsgStream) -> None:
        try:
            host.serve_dmsg_stream(conn, conn.remote_pk, str(conn.remote_addr))
        except Exception as e:  # a bad peer must not take the listener down
            log.info("dmsg: stream from %s ended: %s", conn.remote_addr, e)
        finally:
            conn.close()

    def loop() -> None:
        while True:
            try:
                conn = lis.accept()
            except SkyptyError:
                return
            threading.Thread(target=serve_one, args=(conn,), name="dmsg-serve", daemon=True).start()

    threading.Thread(target=loop, name=f"dmsg-listen-{port}", daemon=True).start()
    log.info("dmsg: serving %s:%d", client.pk.hex(), port)
    return lis


def start_host_dmsg(host, sk: SecKey, disc_url: str, sessions: int = limits.DMSG_DEFAULT_SESSIONS,
                    port: int = limits.DEFAULT_DMSG_PORT) -> DmsgClient:
    """Everything mode 2 needs from dmsg: a client keeping `sessions` sessions, streams on
    `port` served by the host, and the control socket's `dmsgpty/proxy` dialer."""
    client = DmsgClient(sk, disc_url, sessions=sessions)
    serve_dmsg(host, client, port)
    host.set_proxy_dialer(lambda pk, p: client.dial(pk, p))
    return client.start()


def dial_standalone(pk: PubKey, port: int, sk: Optional[SecKey], disc_url: str, uri: str,
                    timeout: float = limits.DMSG_STREAM_HANDSHAKE_TIMEOUT) -> DmsgStream:
    """An ephemeral dmsg client (no entry, no kept sessions) dials pk:port and requests `uri`
    on the host's mux; the returned stream owns the client (closing it closes everything)."""
    from skypty import mux

    if sk is None:
        _, sk = generate_keypair()
    client = DmsgClient(sk, disc_url, sessions=0, maintain=False)
    try:
        conn = client.dial(pk, port, timeout)
    except BaseException:
        client.close()
        raise
    prev: Optional[Callable[[], None]] = conn._on_close

    def done() -> None:
        if prev is not None:
            prev()
        client.close()

    conn._on_close = done
    try:
        conn.settimeout(timeout)
        mux.request(conn, uri)
        conn.settimeout(None)
    except BaseException:
        conn.close()
        raise
    return conn
