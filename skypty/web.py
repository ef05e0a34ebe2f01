"""The browser terminal: `app pty http` (the local bridge) and a handler reusable behind a PK gate.

One `http.server` handler serves, on any path it is mounted at (pty.md §8.2):
- GET without `Upgrade: websocket`: the terminal page; `?asset=<name>` its vendored files
  (stored gzip-compressed in skypty/static/, sent with Content-Encoding: gzip);
- GET with the upgrade: a WebSocket bridged to a `pty` service obtained from `dial()` (§8.3);
- anything else: 405 JSON.
`make_handler(dial, authorize=…)` builds it; `authorize(peer)` sees the connection's
`client_address` (a (host, port) tuple on TCP; a mounting server may hand a richer peer object,
such as the dmsg peer's PubKey) and a False answer is a 403.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import zlib
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlsplit

from skypty import limits
from skypty.errors import SkyptyError, UsageError
from skypty.websocket import (CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_NORMAL, OP_TEXT, ConnectionClosed,
                              HandshakeRefused, WebSocket, WebSocketError, response_101, validate_upgrade)

__all__ = ["WebOptions", "PtyWebHandler", "make_handler", "make_server", "cmd_http", "parse_listen",
           "is_loopback_host", "loopback_host_header",
           "DEFAULT_ROWS", "DEFAULT_COLS", "TERM_ENV"]

log = logging.getLogger("skypty.web")

DEFAULT_ROWS, DEFAULT_COLS = 30, 100           # Go's web UI starts every pty at 100x30
TERM_ENV = "TERM=xterm-256color"
PAGE_MAX = 10 * 1024 * 1024                    # Go caps the gunzipped page at 10 MiB
_PREFIX = b"[skypty-ui] "
_SESSION_CLOSED = "\r\n\x1b[33m[skywire: session closed \u2014 reload the page to reconnect]\x1b[0m\r\n"
_SID_RE = re.compile(r"^[0-9a-fA-F]{1,64}$")
_NO_METHOD = ("rpc: can't find method", "rpc: can't find service")
_BANNER = "\n".join((                            # "SKYPTY-UI", figlet-style small letters
    r" ___  _  ____   __ ___  _____ __   __      _   _  ___",
    r"/ __|| |/ /\ \ / /| _ \|_   _|\ \ / /     | | | ||_ _|",
    r"\__ \| ' <  \ V / |  _/  | |   \ V /  ___ | |_| | | |",
    r"|___/|_|\_\  |_|  |_|    |_|    |_|  |___| \___/ |___|",
    "",
))

# ?asset=<name> -> (file in skypty/static, content type, cacheable)
_ASSETS: Dict[str, Tuple[str, str]] = {
    "xterm.js": ("xterm.js.gz", "application/javascript; charset=utf-8"),
    "xterm.css": ("xterm.css.gz", "text/css; charset=utf-8"),
    "addon-fit.js": ("addon-fit.js.gz", "application/javascript; charset=utf-8"),
    "term.js": ("term.js", "application/javascript; charset=utf-8"),
}
_PAGE = ("index.html", "text/html; charset=utf-8")
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'")
_static_cache: Dict[str, bytes] = {}
_static_lock = threading.Lock()


def _static(name: str) -> bytes:
    with _static_lock:
        data = _static_cache.get(name)
        if data is None:
            # importlib.resources works from a zipapp too (the single-file build)
            from importlib import resources
            data = (resources.files("skypty") / "static" / name).read_bytes()
            _static_cache[name] = data
        return data


def _gunzip(data: bytes, cap: int = PAGE_MAX) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, cap)
    if d.unconsumed_tail:
        raise ValueError("static asset too large")
    return out


def _accepts_gzip(header: Optional[str]) -> bool:
    """Accept-Encoding lists gzip (or *) with a non-zero q."""
    for item in (header or "").split(","):
        token, *params = [p.strip() for p in item.split(";")]
        if token.lower() not in ("gzip", "*"):
            continue
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


# ------------------------------------------------------------------------------- options

class WebOptions:
    """What one mount of the handler serves; shared by all its connections."""

    def __init__(self, dial: Callable[[], object], *, authorize: Optional[Callable[[object], bool]] = None,
                 cmd: str = "/bin/bash", args: Sequence[str] = (), allow_url_commands: bool = False,
                 allowed_hosts: Optional[Callable[[str], bool]] = None, pty_desc: str = "",
                 reattach_grace: float = limits.WEB_REATTACH_GRACE) -> None:
        self.dial = dial
        self.reattach_grace = reattach_grace
        self.authorize = authorize or (lambda peer: True)
        self.cmd = cmd
        self.args = list(args)
        self.allow_url_commands = allow_url_commands
        self.allowed_hosts = allowed_hosts
        self.pty_desc = pty_desc
        self._lock = threading.Lock()
        self._counter = 0
        self._active: set = set()
        # persistent sessions whose tab went away: sid -> (client, timer)
        self._grace: Dict[str, Tuple[object, threading.Timer]] = {}

    def next_ui_sid(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def track(self, bridge: "_Bridge", on: bool) -> None:
        with self._lock:
            (self._active.add if on else self._active.discard)(bridge)

    def park(self, sid: str, client) -> None:
        """A persistent session lost its tab: stop it unless a tab re-attaches within the grace."""
        timer = threading.Timer(self.reattach_grace, self._expire, (sid,))
        timer.daemon = True
        with self._lock:
            old = self._grace.pop(sid, None)
            self._grace[sid] = (client, timer)
        if old is not None:
            old[1].cancel()
            _detach(old[0])
        timer.start()

    def unpark(self, sid: str) -> None:
        """A tab re-attached to `sid`: the parked connection just hangs up (detach, no Stop)."""
        with self._lock:
            old = self._grace.pop(sid, None)
        if old is not None:
            old[1].cancel()
            _detach(old[0])

    def _expire(self, sid: str) -> None:
        with self._lock:
            item = self._grace.pop(sid, None)
        if item is not None:
            log.info("web: session %s had no tab for %.1fs: stopping it", sid, self.reattach_grace)
            _stop_and_close(item[0])

    def shutdown(self) -> None:
        """Stop every remote shell this mount started (server exit)."""
        with self._lock:
            bridges, parked = list(self._active), list(self._grace.values())
            self._grace.clear()
        for client, timer in parked:
            timer.cancel()
            _stop_and_close(client)
        for b in bridges:
            b.abort("server shutting down")


def _stop_and_close(client) -> None:
    try:
        client.stop(timeout=2.0)
    except Exception:  # already ended or the link is gone: the host stops it at hang-up anyway
        pass
    try:
        client.close()
    except Exception:
        pass


def _detach(client) -> None:
    """Hang up without Stop: a persistent host keeps the session for the next Attach."""
    conn = getattr(client, "conn", None)
    try:
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass
            conn.close()
        client.close()
    except Exception:
        pass


def _is_rpc_error(err: Exception) -> bool:
    """An error the host answered (as opposed to a broken link)."""
    from skypty.rpc import RPCError
    return isinstance(err, RPCError)


def _no_method(err: Exception) -> bool:
    return any(s in str(err) for s in _NO_METHOD)


# ------------------------------------------------------------------------------- bridge

class _Bridge:
    """One browser tab <-> one `pty` service connection (pty.md §8.3).

    Threads: this one reads the WebSocket; `pty-read` keeps one Read outstanding and appends to
    `_out`; `ws-send` coalesces `_out` into binary frames (at most one per WEB_FLUSH_INTERVAL, at
    once after idle); `pty-write` turns queued input and resizes into Write/SetPtySize calls so
    the WebSocket reader never waits on the host; `keepalive` pings both sides.
    """

    def __init__(self, ws: WebSocket, opts: WebOptions, query: Dict[str, list], ui_url: str,
                 peer: object) -> None:
        self.ws = ws
        self.opts = opts
        self.query = query
        self.ui_url = ui_url
        self.peer = peer
        self.client = None
        self.sid: Optional[str] = None
        self.persistent = False
        self.done = threading.Event()
        self.browser_gone = False
        self._aborted = False
        self._cv = threading.Condition()
        self._out = bytearray()
        self._pty_ended: Optional[str] = None          # why the output side ended
        self._in_cv = threading.Condition()
        self._in: deque = deque()
        self._in_bytes = 0

    # -- lines the user sees (before the sender runs, or after it finished)
    def _raw(self, data: bytes) -> None:
        try:
            self.ws.send_binary(data)
        except (OSError, ConnectionClosed):
            pass

    def status(self, msg: str) -> None:
        self._raw(_PREFIX + b"Status: " + msg.encode("utf-8", "replace") + b"\r")

    def error(self, msg: str) -> None:
        self._raw(_PREFIX + b"Error: " + msg.encode("utf-8", "replace") + b"\n\r")

    def _banner(self, ui_sid: int) -> bytes:
        text = "\n" + _BANNER + f"PTY-HOST {self.opts.pty_desc}\nUI-URL (http) {self.ui_url}\nUI-SID {ui_sid}\n"
        return text.replace("\n", "\n\r").encode("utf-8")

    # -- setup
    def _open(self) -> None:
        """Attach to ?sid= when the host keeps sessions, else start fresh (StartSession, then Start)."""
        c = self.client
        sid = (self.query.get("sid") or [""])[0]
        if sid and _SID_RE.match(sid):
            try:
                c.attach(sid)
                c.set_size(DEFAULT_ROWS, DEFAULT_COLS, DEFAULT_COLS, DEFAULT_ROWS)
                self.sid, self.persistent = sid, True
                self.opts.unpark(sid)
                log.info("web: %s re-attached session %s", self.peer, sid)
                return
            except Exception as e:
                if not _is_rpc_error(e):     # the link broke: nothing to fall back to
                    raise
                log.info("web: attach %s failed (%s): starting a fresh shell", sid, e)
        self._raw(self._banner(self.opts.next_ui_sid()))
        size = (DEFAULT_ROWS, DEFAULT_COLS)
        try:
            self.sid = c.start_session(self.opts.cmd, self.opts.args, size=size, env=[TERM_ENV])
            self.persistent = True
            self.ws.send_text(json.dumps({"type": "session", "id": self.sid}))
        except Exception as e:
            if not (_is_rpc_error(e) and _no_method(e)):
                raise
            c.start(self.opts.cmd, self.opts.args, size=size, env=[TERM_ENV])
        log.info("web: %s started %s (%s)", self.peer, self.opts.cmd,
                 f"session {self.sid}" if self.persistent else "no persistent sessions on this host")
        commands = [x for v in self.query.get("commands", []) for x in v.split(",") if x.strip()]
        if commands:
            if self.opts.allow_url_commands:
                self._queue_input(" && ".join(commands).encode("utf-8") + b"\n")
            else:
                log.info("web: ignoring ?commands= (start with --allow-url-commands to honour it)")

    def run(self) -> None:
        self.opts.track(self, True)
        try:
            self.status("Dialing...")
            try:
                self.client = self.opts.dial()
                self.status("Opening pty...")
                self._open()
            except Exception as e:
                log.warning("web: %s: cannot open the pty: %s", self.peer, e)
                self.error(str(e) or type(e).__name__)
                self.ws.close(CLOSE_INTERNAL, "cannot open the pty")
                self.ws.wait_closed()
                if self.client is not None:
                    _stop_and_close(self.client)
                return
            threads = [threading.Thread(target=f, name=n, daemon=True) for f, n in
                       ((self._pty_reader, "web-pty-read"), (self._sender, "web-ws-send"),
                        (self._writer, "web-pty-write"), (self._keepalive, "web-keepalive"))]
            for t in threads:
                t.start()
            self._ws_reader()
            self.done.set()
            with self._cv:
                self._cv.notify_all()
            with self._in_cv:
                self._in_cv.notify_all()
            self._teardown()
        finally:
            self.opts.track(self, False)
            self.ws.shutdown()

    def _teardown(self) -> None:
        if self.browser_gone and self.persistent and self.sid and self._pty_ended is None and not self._aborted:
            # a reload comes back within the grace and re-attaches; a closed tab does not
            self.opts.park(self.sid, self.client)
        else:
            _stop_and_close(self.client)
        log.info("web: %s: session ended (%s)", self.peer,
                 "tab closed" if self.browser_gone else (self._pty_ended or "closed"))

    def abort(self, why: str) -> None:
        """Server exit: stop the remote shell now (the process may be gone before teardown)."""
        self._aborted = True
        if self.client is not None:
            _stop_and_close(self.client)
        try:
            self.ws.close(CLOSE_GOING_AWAY, why)
        except (OSError, ConnectionClosed):
            pass
        self.ws.shutdown()

    # -- browser -> pty
    def _ws_reader(self) -> None:
        try:
            while True:
                op, data = self.ws.recv()
                if op == OP_TEXT and data[:1] == b"{":
                    size = _parse_resize(data)
                    if size is not None:
                        self._queue(("resize", size))
                        continue
                self._queue_input(data)
        except ConnectionClosed as e:
            # our own close (session over) is answered by the browser; otherwise the tab went away
            self.browser_gone = not self.done.is_set()
            log.debug("web: websocket closed: %s", e)
        except WebSocketError as e:
            self.browser_gone = not self.done.is_set()
            log.info("web: %s: %s", self.peer, e)
        except OSError:
            self.browser_gone = not self.done.is_set()

    def _queue_input(self, data: bytes) -> None:
        if data:
            self._queue(data)

    def _queue(self, item) -> None:
        with self._in_cv:
            # a flood from the browser waits here (TCP pushes back) instead of growing memory
            while self._in_bytes > limits.WS_MAX_MESSAGE and not self.done.is_set():
                self._in_cv.wait(0.5)
            self._in.append(item)
            if isinstance(item, bytes):
                self._in_bytes += len(item)
            self._in_cv.notify_all()

    def _writer(self) -> None:
        try:
            while True:
                with self._in_cv:
                    while not self._in and not self.done.is_set():
                        self._in_cv.wait()
                    if self.done.is_set():
                        return
                    item = self._in.popleft()
                    if isinstance(item, bytes):
                        # everything typed while the last Write was in flight goes in one call
                        chunks = [item]
                        while self._in and isinstance(self._in[0], bytes):
                            chunks.append(self._in.popleft())
                        item = b"".join(chunks)
                        self._in_bytes -= len(item)
                    self._in_cv.notify_all()
                if isinstance(item, bytes):
                    view = memoryview(item)
                    while view:
                        n = self.client.write(bytes(view[:limits.PTY_READ_MAX]))
                        view = view[max(1, min(n, limits.PTY_READ_MAX)):]
                else:
                    rows, cols = item[1]
                    # Go's UI fills the pixel fields with cols/rows; keep the same bytes on the wire
                    self.client.set_size(rows, cols, cols, rows)
        except Exception as e:
            if not self.done.is_set():
                log.info("web: %s: pty write failed: %s", self.peer, e)
                self._end_output(f"error: pty write failed: {e}")

    # -- pty -> browser
    def _pty_reader(self) -> None:
        why = "ended"
        try:
            while not self.done.is_set():
                data = self.client.read(limits.CLIENT_READ_SIZE)
                with self._cv:
                    while len(self._out) >= limits.WEB_OUTPUT_BUFFER and not self.done.is_set():
                        self._cv.wait(0.5)
                    self._out += data
                    self._cv.notify_all()
        except EOFError:
            why = "ended"
        except Exception as e:
            why = f"error: {e}"
        self._end_output(why)

    def _end_output(self, why: str) -> None:
        with self._cv:
            if self._pty_ended is None:
                self._pty_ended = why
            self._cv.notify_all()

    def _sender(self) -> None:
        last = 0.0
        try:
            while True:
                with self._cv:
                    while not self._out and self._pty_ended is None and not self.done.is_set():
                        self._cv.wait()
                    if self.done.is_set():
                        return
                    # idle for a while: send at once; busy: gather up to one flush interval
                    due = last + limits.WEB_FLUSH_INTERVAL
                    while self._out and self._pty_ended is None and not self.done.is_set():
                        left = due - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    data = bytes(self._out)
                    self._out.clear()
                    ended = self._pty_ended
                    self._cv.notify_all()
                if data:
                    self.ws.send_binary(data)
                    last = time.monotonic()
                if ended is not None and not data:
                    break
            # the shell ended (or the host link broke): say so, then close the WebSocket
            if ended.startswith("error"):
                self.error(ended[len("error: "):])
            self.status(_SESSION_CLOSED)
            self.done.set()
            self.ws.close(CLOSE_NORMAL, "closed")
            # the browser answers our close and the reader returns; if it does not, cut it off
            timer = threading.Timer(limits.WS_CLOSE_TIMEOUT, self.ws.shutdown)
            timer.daemon = True
            timer.start()
        except (OSError, ConnectionClosed):
            self.done.set()
            self.ws.shutdown()

    # -- both
    def _keepalive(self) -> None:
        next_ws = time.monotonic() + limits.WS_PING_INTERVAL
        next_pty = time.monotonic() + limits.PING_INTERVAL
        ping_sent: Optional[float] = None
        while not self.done.wait(0.5):
            now = time.monotonic()
            if ping_sent is not None and self.ws.last_pong < ping_sent and now - ping_sent > limits.WS_PONG_TIMEOUT:
                log.info("web: %s: no pong for %.0fs: closing", self.peer, now - ping_sent)
                try:
                    self.ws.close(CLOSE_GOING_AWAY, "ping timeout")
                except (OSError, ConnectionClosed):
                    pass
                self.ws.shutdown()
                return
            if now >= next_ws:
                next_ws = now + limits.WS_PING_INTERVAL
                if ping_sent is None or self.ws.last_pong >= ping_sent:
                    ping_sent = now
                    try:
                        self.ws.ping(b"skypty")
                    except (OSError, ConnectionClosed):
                        return
            if now >= next_pty:
                next_pty = now + limits.PING_INTERVAL
                try:
                    # keeps a dmsg stream's idle deadline from firing; a no-op on TCP and unix
                    self.client.ping(timeout=limits.PING_INTERVAL)
                except Exception as e:
                    if not self.done.is_set():
                        log.info("web: %s: pty ping failed: %s", self.peer, e)


def _parse_resize(data: bytes) -> Optional[Tuple[int, int]]:
    """`{"type":"resize","cols":C,"rows":R}` -> (rows, cols); None for anything else (= input)."""
    try:
        msg = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(msg, dict) or msg.get("type") != "resize":
        return None
    cols, rows = msg.get("cols"), msg.get("rows")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (cols, rows)):
        return None
    if not (0 < cols <= 0xFFFF and 0 < rows <= 0xFFFF):
        return None
    return rows, cols


# ------------------------------------------------------------------------------- handler

class PtyWebHandler(BaseHTTPRequestHandler):
    """The page, its assets and the WebSocket bridge; configured by `make_handler`."""

    server_version = "skypty"
    protocol_version = "HTTP/1.1"
    timeout = limits.WS_HEADER_TIMEOUT     # every read before the upgrade (header read, keep-alive)
    options: WebOptions

    def version_string(self) -> str:
        return self.server_version

    # socket timeouts bound each recv; this bounds the whole request head (a peer trickling
    # one byte at a time would otherwise hold the thread forever)
    def handle_one_request(self) -> None:
        timer = threading.Timer(limits.WS_HEADER_TIMEOUT, self._head_expired)
        timer.daemon = True
        self._head_timer = timer
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self._head_timer.cancel()
        return ok

    def _head_expired(self) -> None:
        log.info("web: %s: request head not complete in %.0fs: dropping", self.client_address,
                 limits.WS_HEADER_TIMEOUT)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, fmt: str, *args) -> None:
        log.debug("web: %s %s", self.address_string(), fmt % args)

    # -- replies
    def _send(self, status: int, body: bytes, ctype: str, extra: Iterable[Tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json_error(self, status: int, msg: str) -> None:
        body = json.dumps({"error_code": status, "error_msg": msg}, separators=(",", ":")).encode("utf-8")
        self._send(status, body, "application/json")

    def _method_not_allowed(self) -> None:
        path = urlsplit(self.path).path
        self.close_connection = True
        self._json_error(405, f"http method {self.command} is invalid for path {path}")

    def __getattr__(self, name: str):
        # every method but GET is answered 405 as Go does (http.server would say 501)
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    # -- GET
    def do_GET(self) -> None:
        opts = self.options
        host = self.headers.get("Host") or ""
        if opts.allowed_hosts is not None and not opts.allowed_hosts(host):
            self.close_connection = True
            self._json_error(403, f"host {host[:100]!r} is not allowed here (DNS-rebinding guard)")
            return
        try:
            allowed = bool(opts.authorize(self.client_address))
        except Exception as e:  # a broken gate must fail closed
            log.warning("web: authorize failed: %s", e)
            allowed = False
        if not allowed:
            self.close_connection = True
            self._json_error(403, "forbidden")
            return
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=False, max_num_fields=32)
        if (self.headers.get("Upgrade") or "").strip().lower() == "websocket":
            self._websocket(parts.path, query, host)
        elif parts.path.endswith("/favicon.ico"):
            self._json_error(404, "no favicon")
        elif "asset" in query:
            self._asset(query["asset"][0])
        else:
            self._file(*_PAGE, extra=(("Content-Security-Policy", _CSP), ("X-Frame-Options", "DENY"),
                                      ("Cache-Control", "no-store")))

    def _asset(self, name: str) -> None:
        entry = _ASSETS.get(name)
        if entry is None:
            self._json_error(404, "no such asset")
            return
        self._file(*entry, extra=(("Cache-Control", "max-age=3600"),))

    def _file(self, fname: str, ctype: str, extra=()) -> None:
        try:
            data = _static(fname)
        except OSError:
            self._json_error(500, f"missing static file {fname}")
            return
        extra = list(extra)
        if fname.endswith(".gz"):
            extra.append(("Vary", "Accept-Encoding"))
            if _accepts_gzip(self.headers.get("Accept-Encoding")):
                extra.append(("Content-Encoding", "gzip"))
            else:
                data = _gunzip(data)
        self._send(200, data, ctype, extra)

    def _websocket(self, path: str, query: Dict[str, list], host: str) -> None:
        self.close_connection = True
        try:
            accept = validate_upgrade(self.command, self.headers)
        except HandshakeRefused as e:
            log.info("web: %s: websocket refused: %s", self.address_string(), e)
            self._send(e.status, (str(e) + "\n").encode("utf-8", "replace"), "text/plain; charset=utf-8", e.headers)
            return
        self.wfile.write(response_101(accept))
        self.wfile.flush()
        self.connection.settimeout(None)     # the keepalive thread watches the link from now on
        ws = WebSocket(self.connection, reader=self.rfile.read1)
        log.info("web: %s: websocket open on %s", self.address_string(), path)
        _Bridge(ws, self.options, query, host + path, self.client_address).run()


def make_handler(dial: Callable[[], object], *, authorize: Optional[Callable[[object], bool]] = None,
                 cmd: str = "/bin/bash", args: Sequence[str] = (), allow_url_commands: bool = False,
                 allowed_hosts: Optional[Callable[[str], bool]] = None, pty_desc: str = "",
                 reattach_grace: float = limits.WEB_REATTACH_GRACE) -> type:
    """A handler class for http.server: `dial()` returns a fresh PtyClient per tab;
    `authorize(peer)` (default: allow) gates every request. `handler.options.shutdown()` stops
    every shell it started (call it when the server stops)."""
    opts = WebOptions(dial, authorize=authorize, cmd=cmd, args=args, allow_url_commands=allow_url_commands,
                      allowed_hosts=allowed_hosts, pty_desc=pty_desc, reattach_grace=reattach_grace)
    return type("PtyWebHandler", (PtyWebHandler,), {"options": opts})


# ------------------------------------------------------------------------------- server

def parse_listen(addr: str) -> Tuple[str, int]:
    """'127.0.0.1:8080', ':8080' (all interfaces), '[::1]:8080', 'localhost:8080' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"bad --addr {addr!r}: want host:port, e.g. 127.0.0.1:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    h = host.strip().lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def loopback_host_header(value: str) -> bool:
    """A Host header naming a loopback address (a page fetched through a rebinding DNS name
    carries that name instead, so it is refused)."""
    v = value.strip()
    if v.startswith("["):
        name = v[1:].partition("]")[0]
    else:
        name = v.rpartition(":")[0] if v.count(":") == 1 else v
    return bool(name) and is_loopback_host(name)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(host: str, port: int, handler: type) -> ThreadingHTTPServer:
    cls = _Server
    if ":" in host:
        cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        return cls((host, port), handler)
    except OSError as e:
        raise SkyptyError(f"cannot listen on {host or '*'}:{port}: {e.strerror or e}") from None


def cmd_http(args) -> int:
    """`app pty http` / `dmsg pty ui`: serve the terminal page, bridged to a host's control socket."""
    from skypty.cli import default_cliaddr
    from skypty.netutil import steady_allocator

    steady_allocator()   # terminal output may come in bulk: see netutil
    hnet = args.hnet or "unix"
    haddr = args.haddr or default_cliaddr()
    host, port = parse_listen(args.addr)
    loopback = is_loopback_host(host) if host else False
    if not loopback:
        sys.stderr.write(f"pty http: warning: serving on {args.addr} beyond this machine: the bridge has no "
                         f"public-key gate, anyone who can reach it gets a shell as this user\n")

    def dial():
        from skypty.client import open_pty_control
        return open_pty_control(hnet, haddr)

    handler = make_handler(dial, cmd=args.cmd, args=args.arg, allow_url_commands=args.allow_url_commands,
                           allowed_hosts=loopback_host_header if loopback else None,
                           pty_desc=f"{hnet}:{haddr}")
    server = make_server(host, port, handler)
    bound = server.server_address
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    log.info("pty http: serving http://%s:%d/ (pty host %s:%s)", shown, bound[1], hnet, haddr)
    sys.stderr.write(f"pty http: open http://{shown}:{bound[1]}/ in a browser\n")
    sys.stderr.flush()

    def on_term(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        signal.signal(signal.SIGTERM, old)
        handler.options.shutdown()
        server.server_close()
    return 0
