"""`skypty dmsg server`: a small dmsg server for tests and private fleets (crypto-dmsg.md §5.3, §7.2).

Per TCP connection: XK responder handshake, then a yamux *server* session on the plain
connection. Per stream a client opens: read the request object, verify it (signature by
SrcAddr.PK, SrcAddr.PK = the session's client, ports, timestamp), then either answer an IP
lookup or relay: open a stream on the destination's session, forward the same SignedObject
bytes re-encrypted with that session's keys, verify the response (ReqHash, signature by
DstAddr.PK, Accepted), forward it unchanged, then copy bytes both ways. Failures close the
stream (Go never sends a negative response). The server registers itself in discovery and
refreshes its entry every minute.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Dict, Optional

from skypty import limits
from skypty.errors import HandshakeError, SkyptyError, UsageError
from skypty.keys import PubKey, SecKey, generate_keypair
from skypty.transport.dmsg import disc as dmsgdisc
from skypty.transport.dmsg.session import DmsgSession, read_object, server_session_handshake, write_object
from skypty.transport.dmsg.stream import DmsgError, check_request, check_response, make_response, req_hash

__all__ = ["DmsgServer", "cmd_server", "relay"]

log = logging.getLogger("skypty.dmsg.server")

_RELAY_CHUNK = 64 * 1024


def _pump(src, dst, done: threading.Event) -> None:
    try:
        while True:
            b = src.recv(_RELAY_CHUNK)
            if not b:
                break
            dst.sendall(b)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    except (OSError, SkyptyError):
        # a broken leg must not look like a clean end on the other one: reset both
        for s in (src, dst):
            try:
                s.reset()
            except (OSError, SkyptyError):
                pass
    finally:
        done.set()


def relay(a, b) -> None:
    """Copy both ways until both directions ended; FIN is forwarded, errors reset both."""
    d1, d2 = threading.Event(), threading.Event()
    t = threading.Thread(target=_pump, args=(b, a, d2), name="dmsg-relay", daemon=True)
    t.start()
    _pump(a, b, d1)
    d2.wait()
    a.close()
    b.close()


class DmsgServer:
    def __init__(self, sk: SecKey, listen: tuple, public_address: str, disc_url: Optional[str],
                 max_sessions: int = limits.DMSG_SERVER_MAX_SESSIONS,
                 update_interval: float = limits.DMSG_SERVER_UPDATE_INTERVAL) -> None:
        self.sk = sk
        self.pk = sk.pubkey()
        self.max_sessions = max_sessions
        self.update_interval = update_interval
        self.public_address = public_address
        self.disc = dmsgdisc.DiscClient(disc_url) if disc_url else None
        self._lock = threading.Lock()
        self._sessions: Dict[PubKey, DmsgSession] = {}
        self._pending = 0
        self._entry: Optional[Dict[str, Any]] = None
        self._stop = threading.Event()
        self.sock = socket.create_server(listen, backlog=128, reuse_port=False)
        self.address = self.sock.getsockname()[:2]

    # ---------------------------------------------------------------- discovery
    def _available(self) -> int:
        with self._lock:
            return max(self.max_sessions - len(self._sessions), 0)

    def register(self) -> None:
        if self.disc is None:
            return
        if self._entry is None:
            cur = self.disc.current_entry(self.pk)
            e = dmsgdisc.new_server_entry(self.pk, self.public_address, self._available())
            self._entry = self.disc.post_after(e, cur, self.sk)
        else:
            self._entry["server"] = {"address": self.public_address, "availableSessions": self._available(),
                                     "serverType": ""}
            self.disc.put_entry(self._entry, self.sk)

    def _register_loop(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                self.register()
                delay = self.update_interval
            except SkyptyError as e:
                log.warning("dmsg server: discovery registration failed: %s", e)
                self._entry = None
                delay = min(max(delay * 2, 1.0), self.update_interval)

    # ---------------------------------------------------------------- sessions
    def serve_forever(self) -> None:
        threading.Thread(target=self._register_loop, name="dmsg-register", daemon=True).start()
        log.info("dmsg server %s listening on %s:%d (public %s)", self.pk.hex(), self.address[0], self.address[1],
                 self.public_address)
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            with self._lock:
                busy = self._pending >= limits.MAX_UNAUTH_CONNS or len(self._sessions) >= self.max_sessions
                if not busy:
                    self._pending += 1
            if busy:
                conn.close()
                continue
            threading.Thread(target=self._serve_conn, args=(conn, addr), name="dmsg-session", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.close("server closed")

    def _serve_conn(self, conn: socket.socket, addr) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cipher, cpk = server_session_handshake(conn, self.sk)
        except (HandshakeError, OSError) as e:
            log.info("dmsg server: handshake with %s:%d failed: %s", addr[0], addr[1], e)
            conn.close()
            return
        finally:
            with self._lock:
                self._pending -= 1
        sess = DmsgSession(conn, cipher, self.pk, cpk, client=False, addr=f"{addr[0]}:{addr[1]}")
        with self._lock:
            self._sessions[cpk] = sess   # a reconnecting client replaces its old session
        log.info("dmsg server: session with %s from %s:%d", cpk.hex(), addr[0], addr[1])

        def gone(_m, s=sess) -> None:
            with self._lock:
                if self._sessions.get(s.remote_pk) is s:
                    del self._sessions[s.remote_pk]
            log.info("dmsg server: session with %s ended (%s)", s.remote_pk.hex(), s.mux.error or "closed")

        sess.mux.on_close(gone)
        sess.serve_streams(self._serve_stream, "dmsg-stream")

    def _serve_stream(self, sess: DmsgSession, ys) -> None:
        out = None
        try:
            obj, deadline = sess.read_request(ys)
            v, src, dst = check_request(obj, session_pk=sess.remote_pk)
            if v.get("IPinfo"):
                return self._answer_ip(sess, ys, obj)
            with self._lock:
                nxt = self._sessions.get(dst.pk)
            if nxt is None or nxt.closed:
                raise DmsgError(307, dst.pk.hex())
            out = nxt.open_stream()
            out.settimeout(max(deadline - time.monotonic(), 0.1))
            write_object(out, nxt.cipher, obj)
            resp = read_object(out, nxt.cipher, deadline)
            check_response(resp, obj, dst.pk)
            write_object(ys, sess.cipher, resp)
            ys.settimeout(None)
            out.settimeout(None)
            log.debug("dmsg server: relaying %s -> %s", src, dst)
            a, b, out, ys = ys, out, None, None
            relay(a, b)
        except (SkyptyError, EOFError, OSError, ValueError) as e:
            log.info("dmsg server: stream from %s refused: %s", sess.remote_pk.hex()[:12], e)
        finally:
            for s in (ys, out):
                if s is not None:
                    s.close()

    def _answer_ip(self, sess: DmsgSession, ys, obj: bytes) -> None:
        try:
            ip = ipaddress.ip_address(sess.remote_ip.split("%")[0])
        except ValueError:
            raise DmsgError(370, "no client IP") from None
        if isinstance(ip, ipaddress.IPv4Address):
            ip = ipaddress.IPv6Address("::ffff:" + str(ip))   # Go's 16-byte net.IP form
        write_object(ys, sess.cipher, make_response(self.sk, req_hash(obj), True, ip=ip.packed))


# ---------------------------------------------------------------- CLI

def _listen_addr(text: str) -> tuple:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid listen address {text!r} (want host:port or :port)")
    return host.strip("[]"), int(port)


def _load_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return cfg


def cmd_server(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config) if args.config else {}
    sk_hex = args.sk or cfg.get("secret_key")
    sk = SecKey.from_hex(sk_hex) if sk_hex else generate_keypair()[1]
    listen = args.listen if args.listen != ":8081" or "local_address" not in cfg else cfg["local_address"]
    host, port = _listen_addr(listen)
    disc_url = args.dmsgdisc
    if cfg.get("discovery") and args.dmsgdisc == "http://127.0.0.1:9090":
        disc_url = cfg["discovery"]
    max_sessions = args.max_sessions if args.max_sessions != limits.DMSG_SERVER_MAX_SESSIONS \
        else int(cfg.get("max_sessions") or args.max_sessions)
    interval = float(cfg.get("update_interval") or 0) / 1e9 or limits.DMSG_SERVER_UPDATE_INTERVAL  # Go: ns
    try:
        srv = DmsgServer(sk, (host, port), "", disc_url, max_sessions, update_interval=interval)
    except OSError as e:
        raise SkyptyError(f"cannot listen on {listen}: {os.strerror(e.errno) if e.errno else e}") from None
    public = args.public_address or cfg.get("public_address") or ""
    if not public:
        h = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        public = f"{h}:{srv.address[1]}"
    srv.public_address = public
    try:
        srv.serve_forever()
    finally:
        srv.close()
    return 0
