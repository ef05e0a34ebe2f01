"""The host: one whitelist, two mux tables, and the listeners that feed them (pty.md §1, §2, §7).

remote mux (TCP, dmsg): dmsgpty/pty, dmsgpty/sftp, the exec-stream URI
local mux (control socket): dmsgpty/pty, dmsgpty/whitelist, dmsgpty/proxy?pk=…&port=…

Verbs: `cli pty host` (cmd_cli_host), `app pty tcp` (cmd_app_tcp), `app pty dmsg` and
`dmsg pty host` (cmd_standalone_host).
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Set

from skypty import limits
from skypty.errors import HandshakeError, ProtocolError, SkyptyError, UsageError
from skypty.netutil import close_after_drain, close_conn, set_keepalive
from skypty.services.whitelist import WHITELIST_URI, whitelist_factory

__all__ = ["Host", "PTY_URI", "SFTP_URI", "WHITELIST_URI", "PROXY_URI", "cmd_cli_host", "cmd_app_tcp",
           "cmd_standalone_host"]

log = logging.getLogger("skypty.host")

PTY_URI = "dmsgpty/pty"
SFTP_URI = "dmsgpty/sftp"
PROXY_URI = "dmsgpty/proxy"


class Host:
    """Composes the whitelist, the mux tables and the per-connection pipelines."""

    def __init__(self, sk, whitelist, *, sftp_root: Optional[str] = None, sftp_readonly: bool = False,
                 require_pq: bool = False):
        from skypty import mux
        from skypty.services.execstream import EXEC_STREAM_URI, serve_exec_stream
        from skypty.services.pty import pty_factory
        from skypty.services.ptystream import PTY_STREAM_URI, serve_pty_stream

        self.sk = sk
        self.pk = sk.pubkey()
        self.whitelist = whitelist
        self.sftp_root = sftp_root
        self.sftp_readonly = sftp_readonly
        self.require_pq = require_pq
        self._proxy_dialer: Optional[Callable[[Any, int], Any]] = None
        self._lock = threading.Lock()
        self._conns: Set[Any] = set()
        self._closed = False

        self.remote_mux = mux.MuxTable()
        self.remote_mux.add_rpc(PTY_URI, pty_factory)
        if importlib.util.find_spec("skypty.services.sftp") is not None:
            self.remote_mux.add_raw(SFTP_URI, self._serve_sftp)
        # else: no route, so the mux answers 0x01 as an older Go host does
        self.remote_mux.add_raw(EXEC_STREAM_URI, serve_exec_stream)
        self.remote_mux.add_raw(PTY_STREAM_URI, serve_pty_stream)

        self.local_mux = mux.MuxTable()
        self.local_mux.add_rpc(PTY_URI, pty_factory)
        self.local_mux.add_rpc(WHITELIST_URI, whitelist_factory(whitelist))
        self.local_mux.add_rpc(PROXY_URI, self._proxy_factory)

    # ------------------------------------------------------------------ policy
    def allowed(self, pk) -> bool:
        """The one whitelist decision of every path; `pk` is what the transport authenticated."""
        if pk is not None and pk == self.pk:
            return True
        try:
            return bool(self.whitelist.allowed(pk))
        except Exception as e:  # a broken store denies, it never lets anyone in
            log.warning("whitelist check failed, denying %s: %s", _hex(pk), e)
            return False

    def set_proxy_dialer(self, fn: Callable[[Any, int], Any]) -> None:
        self._proxy_dialer = fn

    # ------------------------------------------------------------------ pipelines
    def serve_tcp_conn(self, sock, addr, on_auth: Optional[Callable[[], None]] = None) -> None:
        """XK responder + whitelist + remote mux on one accepted TCP socket; always closes it.

        Everything before the whitelist decision is pre-auth and bounded: the handshake by
        its deadline and frame cap, a refused client by the drain below. `on_auth` runs only
        once the whitelist accepted the key the handshake authenticated: until then the
        listener counts this connection against its pre-auth caps.
        """
        from skypty import mux, noise

        where = _addr_text(addr)
        if not self._track(sock):
            close_conn(sock)
            return
        conn = None
        try:
            try:
                conn = noise.server_handshake(sock, self.sk, timeout=limits.HANDSHAKE_TIMEOUT,
                                              require_pq=self.require_pq)
            except (HandshakeError, ProtocolError, OSError, ValueError) as e:
                log.info("tcp: reject %s: %s", mux.Peer(None, where, "tcp").describe(), e)
                return
            peer = mux.Peer(conn.remote_pk, where, "tcp")
            if not self.allowed(conn.remote_pk):
                # as upstream: close after msg 3 without writing a byte; the drain makes that
                # an EOF for the client rather than a reset
                log.warning("tcp: reject %s: not whitelisted", peer.describe())
                close_after_drain(sock, limits.REJECT_DRAIN_MAX, limits.CLOSE_DRAIN_TIMEOUT)
                return
            if on_auth is not None:
                on_auth()
            self._swap(sock, conn)
            log.info("tcp: accept %s", peer.describe())
            self.remote_mux.serve(conn, peer)
            log.info("tcp: session ended %s", peer.describe())
        finally:
            self._untrack(sock)
            self._untrack(conn)
            close_conn(conn if conn is not None else sock)

    def serve_dmsg_stream(self, conn, remote_pk, addr) -> None:
        """Whitelist (0x01 and close if unlisted, before reading the request) + remote mux."""
        from skypty import mux

        peer = mux.Peer(remote_pk, _addr_text(addr), "dmsg")
        if not self.allowed(remote_pk):
            log.warning("dmsg: reject %s: not whitelisted", peer.describe())
            try:
                conn.sendall(mux.REJECT)
            except OSError:
                pass
            close_conn(conn)
            return
        if not self._track(conn):
            close_conn(conn)
            return
        try:
            log.info("dmsg: accept %s", peer.describe())
            self.remote_mux.serve(conn, peer)
            log.info("dmsg: session ended %s", peer.describe())
        finally:
            self._untrack(conn)
            close_conn(conn)

    def serve_control_conn(self, sock) -> None:
        """Local mux, no authentication: the socket's file mode decides who gets here."""
        from skypty import mux

        if not self._track(sock):
            close_conn(sock)
            return
        peer = mux.Peer(None, "local", "control")
        try:
            log.info("control: accept %s", peer.describe())
            self.local_mux.serve(sock, peer)
        finally:
            self._untrack(sock)
            close_conn(sock)

    # ------------------------------------------------------------------ handlers
    def _serve_sftp(self, conn, query, peer) -> None:
        from skypty.services.sftp import serve_sftp

        serve_sftp(conn, query, peer, root=self.sftp_root, readonly=self.sftp_readonly)

    def _proxy_factory(self, conn, query, peer):
        """`dmsgpty/proxy?pk=<hex>&port=<n>`: a pty service forwarded to another host."""
        from skypty import gob, gobtypes, mux, rpc
        from skypty.keys import PubKey

        if self._proxy_dialer is None:
            raise SkyptyError("proxy: this host has no dmsg (started with --no-dmsg)")
        try:
            pk = PubKey.from_hex(query.get("pk", ""))
            port = int(query.get("port", str(limits.DEFAULT_DMSG_PORT)) or limits.DEFAULT_DMSG_PORT)
        except (ValueError, SkyptyError) as e:
            raise SkyptyError(f"proxy: bad query: {e}") from None
        if pk.is_null() or not 0 < port < 65536:
            raise SkyptyError("proxy: bad pk or port")
        remote = self._proxy_dialer(pk, port)
        try:
            if not self._track(remote):
                raise SkyptyError("proxy: host is shutting down")
            mux.request(remote, PTY_URI, timeout=limits.MUX_REQUEST_TIMEOUT)
            client = rpc.RPCClient(remote)
        except BaseException:
            self._untrack(remote)
            close_conn(remote)
            raise
        log.info("proxy: %s -> %s:%d", peer.describe(), pk.hex(), port)

        def fwd(name: str, at, rt):
            return lambda arg: client.call("pty." + name, at, arg, rt)

        methods = [
            rpc.Method("Start", gobtypes.CommandReq, gob.EMPTY, fwd("Start", gobtypes.CommandReq, gob.EMPTY)),
            rpc.Method("Read", gob.INT, gob.BYTES, fwd("Read", gob.INT, gob.BYTES), ordered=True),
            rpc.Method("Write", gob.BYTES, gob.INT, fwd("Write", gob.BYTES, gob.INT), ordered=True),
            rpc.Method("SetPtySize", gobtypes.WinSize, gob.EMPTY, fwd("SetPtySize", gobtypes.WinSize, gob.EMPTY)),
            rpc.Method("Stop", gob.EMPTY, gob.EMPTY, fwd("Stop", gob.EMPTY, gob.EMPTY)),
            rpc.Method("Ping", gob.EMPTY, gob.EMPTY, fwd("Ping", gob.EMPTY, gob.EMPTY)),
            rpc.Method("Exec", gobtypes.CommandExecReq, gobtypes.CommandExecResult,
                       fwd("Exec", gobtypes.CommandExecReq, gobtypes.CommandExecResult)),
        ]

        def ended() -> None:
            self._untrack(remote)
            client.close()  # the remote host stops its pty when this connection ends

        return [("pty", methods, ended)]

    # ------------------------------------------------------------------ lifecycle
    def _track(self, c) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._conns.add(c)
            return True

    def _swap(self, old, new) -> None:
        with self._lock:
            self._conns.discard(old)
            if not self._closed:
                self._conns.add(new)
        if self._closed:
            close_conn(new)

    def _untrack(self, c) -> None:
        if c is None:
            return
        with self._lock:
            self._conns.discard(c)

    def close(self) -> None:
        """End every connection and kill every child this host started."""
        from skypty.services import exec as exec_service
        from skypty.services import pty as pty_service

        with self._lock:
            self._closed = True
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            close_conn(c)
        pty_service.stop_all()
        exec_service.kill_all()


# ---------------------------------------------------------------------- helpers

def _hex(pk) -> str:
    try:
        return pk.hex()
    except AttributeError:
        return str(pk)


def _addr_text(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        from skypty.transport.tcp import display_addr

        return display_addr(str(addr[0]), int(addr[1]))
    return str(addr)


class _Stopper:
    """SIGTERM/SIGINT/SIGHUP set an event the main thread waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: Optional[int] = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._old[sig] = signal.signal(sig, self._on)
            except (ValueError, OSError):  # not the main thread: rely on the caller
                pass

    def _on(self, signum, frame) -> None:
        self.signum = signum
        self.event.set()

    def wait(self, until: Optional[Callable[[], bool]] = None) -> None:
        # The host is up: what it has loaded lives as long as the process. Out of the
        # collector's sight, a full collection stops being a ~5 ms pause of every session.
        gc.freeze()
        if until is None:
            # no timeout: the signal handler sets the event and the wait returns (a wait on
            # a lock is interrupted by signals), and an idle host does not wake twice a second
            self.event.wait()
            return
        while not self.event.wait(0.5):
            if until():
                return

    def restore(self) -> None:
        for sig, h in self._old.items():
            try:
                signal.signal(sig, h)
            except (ValueError, OSError):
                pass


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _prog() -> str:
    """How to run this same program again, for the hints a new operator copies."""
    if getattr(sys, "frozen", False) or not sys.argv[0].endswith(".py"):
        return os.path.basename(sys.argv[0]) if sys.argv[0] else "skypty"
    return f"{sys.executable} {os.path.abspath(sys.argv[0])}"


def _client_hint(pk, server, conf: Optional[str] = None) -> str:
    """The exact command that reaches this host; with the config's own key (always allowed) when given."""
    hint = f"{_prog()} cli pty shell {pk.hex()}@{server.address}"
    if conf:
        hint += f" --visor-config {os.path.abspath(conf)}"
    return hint


class _ControlServer:
    """Accept loop of the local control socket; one thread per connection."""

    def __init__(self, host: Host, listener) -> None:
        self.host = host
        self.listener = listener
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="control-accept", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            threading.Thread(target=self.host.serve_control_conn, args=(sock,), name="control-conn",
                             daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self.listener.close()  # a ControlListener also removes its socket file
        self._thread.join(limits.HOST_SHUTDOWN_GRACE)


def _pk_list(values: List[str], what: str) -> list:
    from skypty.keys import PubKey

    out = []
    for v in values or []:
        for item in str(v).split(","):
            item = item.strip()
            if item:
                try:
                    pk = PubKey.from_hex(item)
                except SkyptyError as e:
                    raise UsageError(f"{what}: {e}") from None
                if pk.is_null():
                    raise UsageError(f"{what}: the null key cannot be whitelisted")
                out.append(pk)
    return out


def _limits_from(args) -> dict:
    return {"max_unauth": getattr(args, "max_unauth", None) or limits.MAX_UNAUTH_CONNS,
            "per_source": getattr(args, "max_unauth_per_source", None) or limits.MAX_UNAUTH_PER_SOURCE}


# ---------------------------------------------------------------------- verbs

def cmd_cli_host(args) -> int:
    """`cli pty host`: TCP only, in-memory whitelist (--allow ∪ --conf's wl), like sshd."""
    from skypty.keys import generate_keypair
    from skypty.netutil import steady_allocator
    from skypty.transport.tcp import TCPServer, parse_listen_addr
    from skypty.whitelist import MemoryWhitelist

    steady_allocator()   # bulk transfers (downloads, fs writes): see netutil

    parse_listen_addr(args.listen)   # a bad address is a usage error before anything else
    sk = None
    wl = _pk_list(getattr(args, "allow", []), "--allow")
    if getattr(args, "conf", None) or getattr(args, "sk_from_visor", None) is not None:
        from skypty.config import load_host_config

        cfg = load_host_config(args)  # reads --conf, --allow and --sk-from-visor
        sk = cfg.sk
        for pk in cfg.wl:
            if pk not in wl:
                wl.append(pk)
    if not wl:
        raise UsageError("refusing to start with an empty whitelist: pass --allow <client-pk> (or --conf with a wl)")
    if sk is None:
        _, sk = generate_keypair()
        log.warning("no --conf or --sk-from-visor: using a fresh key for this run only")
    host = Host(sk, MemoryWhitelist(sk.pubkey(), wl), sftp_root=getattr(args, "sftp_root", None),
                sftp_readonly=getattr(args, "sftp_readonly", False), require_pq=getattr(args, "require_pq", False))
    stopper = _Stopper()
    try:
        server = TCPServer(args.listen, host, **_limits_from(args)).start()
    except BaseException:
        stopper.restore()
        host.close()
        raise
    try:
        log.info("pty host: pk %s, listening on %s, %d whitelisted key(s)", host.pk.hex(), args.listen, len(wl))
        sys.stdout.write(host.pk.hex() + "\n")
        sys.stdout.flush()
        _say("pty host: connect with: " + _client_hint(host.pk, server))
        stopper.wait()
        log.info("pty host: shutting down (signal %s)", stopper.signum)
    finally:
        server.close()
        host.close()
        stopper.restore()
    return 0


def cmd_app_tcp(args) -> int:
    """`app pty tcp --addr ADDR`: the standalone host with TCP on ADDR and no dmsg."""
    args.no_dmsg = True
    if not getattr(args, "tcplisten", None):
        args.tcplisten = args.addr
    return cmd_standalone_host(args)


def cmd_standalone_host(args) -> int:
    """`app pty dmsg` / `dmsg pty host`: config, control socket, dmsg and/or TCP, or --listen-fd."""
    from skypty.config import load_host_config
    from skypty.netutil import steady_allocator
    from skypty.whitelist import open_whitelist

    from skypty.transport.tcp import parse_listen_addr

    steady_allocator()   # bulk transfers (downloads, fs writes): see netutil
    cfg = load_host_config(args)
    if cfg.sk is None:
        raise UsageError("no secret key: create a config with `skypty app pty dmsg confgen` and pass -c PATH")
    if cfg.ssh_listen:
        parse_listen_addr(cfg.ssh_listen)   # a usage error before the control socket exists
    wl = open_whitelist(cfg, cfg.sk.pubkey())
    host = Host(cfg.sk, wl, sftp_root=getattr(args, "sftp_root", None),
                sftp_readonly=getattr(args, "sftp_readonly", False), require_pq=getattr(args, "require_pq", False))

    fd = getattr(args, "listen_fd", -1)
    if fd is not None and fd >= 0:
        return _serve_listen_fd(host, fd)

    dmsg_client = None
    if not getattr(args, "no_dmsg", False):
        if importlib.util.find_spec("skypty.transport.dmsg.client") is None:
            raise UsageError("dmsg is not available in this build; run with --no-dmsg (TCP and control socket only)")

    from skypty.transport.unixsock import listen_control

    stopper = _Stopper()
    closers: List[Callable[[], None]] = []
    try:
        ctl = _ControlServer(host, listen_control(cfg.clinet, cfg.cliaddr, unsafe=getattr(args, "unsafe", False)))
        closers.append(ctl.close)
        log.info("pty host: control socket %s %s", cfg.clinet, cfg.cliaddr)
        server = None
        if cfg.ssh_listen:
            from skypty.transport.tcp import TCPServer

            server = TCPServer(cfg.ssh_listen, host, **_limits_from(args)).start()
            closers.append(server.close)
        if not getattr(args, "no_dmsg", False):
            from skypty.transport.dmsg.client import start_host_dmsg

            dmsg_client = start_host_dmsg(host, cfg.sk, cfg.dmsgdisc, cfg.dmsgsessions, cfg.dmsgport)
            closers.append(dmsg_client.close)
        log.info("pty host: pk %s, %d whitelisted key(s)%s%s", host.pk.hex(), len(wl.list()),
                 f", tcp {server.address}" if server else "",
                 f", dmsg port {cfg.dmsgport}" if dmsg_client else "")
        if server is not None:
            _say("pty host: connect with: " + _client_hint(host.pk, server, cfg.path))
            _say(f"pty host: (that uses the host's own key; let other clients in with: "
                 f"{_prog()} app pty exec --cliaddr {cfg.cliaddr} whitelist-add <client-pk>)")
        if dmsg_client is not None:
            port_flag = f" -p {cfg.dmsgport}" if cfg.dmsgport != limits.DEFAULT_DMSG_PORT else ""
            _say(f"pty host: over dmsg: skypty cli pty exec --standalone --dmsgdisc {cfg.dmsgdisc}"
                 f"{port_flag} {host.pk.hex()} -- <cmd>")
        _say(f"pty host: locally: {_prog()} app pty exec --clinet {cfg.clinet} --cliaddr {cfg.cliaddr}")
        stopper.wait()
        log.info("pty host: shutting down (signal %s)", stopper.signum)
    finally:
        for fn in reversed(closers):
            try:
                fn()
            except Exception as e:  # shut the rest down anyway
                log.warning("pty host: shutdown step failed: %s", e)
        host.close()
        stopper.restore()
    return 0


def _serve_listen_fd(host: Host, fd: int) -> int:
    """Socket activation (systemd Accept=yes): one already-accepted connection, then exit."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise UsageError(f"--listen-fd {fd}: not a socket ({e.strerror or e})") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if listening:
        sock.detach()
        raise UsageError(f"--listen-fd {fd} is a listening socket: it must be one accepted connection"
                         " (systemd Accept=yes)")
    try:
        peer = sock.getpeername()
    except OSError:
        peer = f"fd {fd}"
    sock.set_inheritable(False)
    set_keepalive(sock)
    try:
        host.serve_tcp_conn(sock, peer)
    finally:
        host.close()
    return 0
