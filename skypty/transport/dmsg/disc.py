"""dmsg discovery: entry signing (crypto-dmsg.md §6.3), an HTTP client, and `skypty dmsg disc`.

An entry is a plain dict in Go's field order. The bytes that are signed are exactly what
json-iterator ConfigFastest produces for Go's struct: compact, keys in struct order, the
omitempty rules of §6.2, no HTML escaping, and no key Go does not know — `canonical_json`
builds them and `parse_entry` normalises a received entry to the same shape first, so a
verifier signs over Go's re-encoding and never over the bytes it was sent.

Gap (documented, not built): discovery over dmsg (`dmsg://<pk>:80`, §6.4). Only http:// and
https:// discovery URLs are accepted; a dmsg:// URL is a usage error.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

from skypty import __version__, keys, limits
from skypty.errors import ProtocolError, SkyptyError, UsageError
from skypty.keys import PubKey, SecKey

__all__ = [
    "ENTRY_VERSION", "DiscoveryError", "EntryNotFoundError", "canonical_json", "parse_entry",
    "sign_entry", "verify_entry", "new_client_entry", "new_server_entry", "DiscClient",
    "DiscStore", "DiscServer", "cmd_disc",
]

log = logging.getLogger("skypty.dmsg.disc")

ENTRY_VERSION = "0.0.1"
_PREFIX = "/dmsg-discovery"
_U64 = (1 << 64) - 1
_I64 = (1 << 63) - 1

MSG_NOT_FOUND = "entry of public key is not found"
MSG_NO_SERVERS = "no delegated dmsg servers available for remote"
MSG_BAD_SIG = "invalid signature"
MSG_WRONG_SEQ = "entry validation error: sequence field of new entry is not sequence of old entry + 1"
MSG_OUTDATED = "entry validation error: advertised entry has outdated timestamp"


class DiscoveryError(SkyptyError):
    """The discovery answered with an error or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class EntryNotFoundError(DiscoveryError):
    pass


# ---------------------------------------------------------------- entries

def _dumps(obj: Any) -> bytes:
    # Go/jsoniter ConfigFastest: compact, raw UTF-8, control characters as \u00XX
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _ordered(entry: Dict[str, Any], with_sig: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "version": entry.get("version", ""),
        "sequence": int(entry.get("sequence", 0)),
        "timestamp": int(entry.get("timestamp", 0)),
        "static": entry.get("static", ""),
    }
    client = entry.get("client")
    if client is not None:
        ds = client.get("delegated_servers")
        out["client"] = {"delegated_servers": None if ds is None else list(ds)}
    if entry.get("client_type"):
        out["client_type"] = entry["client_type"]
    server = entry.get("server")
    if server is not None:
        srv: Dict[str, Any] = {"address": server.get("address", ""),
                               "availableSessions": int(server.get("availableSessions", 0))}
        if server.get("serverType"):
            srv["serverType"] = server["serverType"]
        out["server"] = srv
    if with_sig and entry.get("signature"):
        out["signature"] = entry["signature"]
    return out


def canonical_json(entry: Dict[str, Any], with_sig: bool = True) -> bytes:
    """Go's marshalling of the entry; `with_sig=False` gives the signed bytes."""
    return _dumps(_ordered(entry, with_sig))


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(f"invalid discovery entry: {what}")


def _pk_text(v: Any, what: str) -> str:
    _want(isinstance(v, str), f"{what} is not a string")
    try:
        return PubKey.from_hex(v).hex()
    except SkyptyError as e:
        raise ProtocolError(f"invalid discovery entry: {what}: {e}") from None


def parse_entry(obj: Any) -> Dict[str, Any]:
    """Decode a JSON entry the way Go does: known keys only, typed, PKs re-encoded lowercase."""
    _want(isinstance(obj, dict), "not a JSON object")
    e: Dict[str, Any] = {}
    v = obj.get("version", "")
    _want(isinstance(v, str), "version is not a string")
    e["version"] = v
    seq = obj.get("sequence", 0)
    _want(isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= _U64, "bad sequence")
    e["sequence"] = seq
    ts = obj.get("timestamp", 0)
    _want(isinstance(ts, int) and not isinstance(ts, bool) and -_I64 - 1 <= ts <= _I64, "bad timestamp")
    e["timestamp"] = ts
    e["static"] = _pk_text(obj.get("static", ""), "static")
    client = obj.get("client")
    if client is not None:
        _want(isinstance(client, dict), "client is not an object")
        ds = client.get("delegated_servers")
        if ds is not None:
            _want(isinstance(ds, list) and len(ds) <= 4096, "bad delegated_servers")
            ds = [_pk_text(x, "delegated server") for x in ds]
        e["client"] = {"delegated_servers": ds}
    else:
        e["client"] = None
    ct = obj.get("client_type", "")
    _want(isinstance(ct, str), "client_type is not a string")
    e["client_type"] = ct
    server = obj.get("server")
    if server is not None:
        _want(isinstance(server, dict), "server is not an object")
        addr = server.get("address", "")
        n = server.get("availableSessions", 0)
        st = server.get("serverType", "")
        _want(isinstance(addr, str), "server.address is not a string")
        _want(isinstance(n, int) and not isinstance(n, bool) and -_I64 - 1 <= n <= _I64, "bad availableSessions")
        _want(isinstance(st, str), "serverType is not a string")
        e["server"] = {"address": addr, "availableSessions": n, "serverType": st}
    else:
        e["server"] = None
    sig = obj.get("signature", "")
    _want(isinstance(sig, str), "signature is not a string")
    e["signature"] = sig
    return e


def sign_entry(entry: Dict[str, Any], sk: SecKey) -> Dict[str, Any]:
    entry["signature"] = ""
    entry["signature"] = keys.sign(sk, canonical_json(entry, with_sig=False)).hex()
    return entry


def verify_entry(entry: Dict[str, Any]) -> None:
    """Raise keys.SignatureError unless `signature` is `static`'s over the canonical bytes."""
    sig_hex = entry.get("signature", "")
    try:
        sig = bytes.fromhex(sig_hex)
    except ValueError:
        raise keys.SignatureError("signature is not hex") from None
    keys.verify(PubKey.from_hex(entry["static"]), canonical_json(entry, with_sig=False), sig)


def _now_ns() -> int:
    return time.time_ns()


def new_client_entry(pk: PubKey, delegated: List[PubKey], client_type: str = "",
                     sequence: int = 0) -> Dict[str, Any]:
    return {"version": ENTRY_VERSION, "sequence": sequence, "timestamp": _now_ns(), "static": pk.hex(),
            "client": {"delegated_servers": [p.hex() for p in delegated]}, "client_type": client_type,
            "server": None, "signature": ""}


def new_server_entry(pk: PubKey, address: str, available: int, sequence: int = 0) -> Dict[str, Any]:
    return {"version": ENTRY_VERSION, "sequence": sequence, "timestamp": _now_ns(), "static": pk.hex(),
            "client": None, "client_type": "",
            "server": {"address": address, "availableSessions": available, "serverType": ""},
            "signature": ""}


# ---------------------------------------------------------------- client

class DiscClient:
    """HTTP client of the discovery API (one connection per request, bounded answers)."""

    def __init__(self, base_url: str, timeout: float = limits.DISC_HTTP_TIMEOUT) -> None:
        u = urllib.parse.urlsplit(base_url.strip())
        if u.scheme == "dmsg":
            raise UsageError("discovery over dmsg (dmsg://<pk>:80) is not supported; "
                             "give an http:// discovery URL (--dmsgdisc)")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"invalid discovery URL {base_url!r} (want http://host:port)")
        self.base_url = base_url
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._path = u.path.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Optional[bytes] = None) -> Tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            headers = {"Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, self._path + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(limits.DISC_MAX_RESPONSE + 1)
            if len(data) > limits.DISC_MAX_RESPONSE:
                raise DiscoveryError(f"discovery {self.base_url}: answer too large")
            return resp.status, data
        except OSError as e:
            raise DiscoveryError(f"discovery {self.base_url} unreachable: {e.strerror or e}") from None
        except http.client.HTTPException as e:
            # the peer's bytes may hold CR/LF: keep the user's error to one printable line
            detail = " ".join(repr(str(e))[1:-1].split())[:120]
            raise DiscoveryError(f"discovery {self.base_url}: bad HTTP answer ({detail})") from None
        finally:
            conn.close()

    def _check(self, status: int, data: bytes) -> Any:
        try:
            obj = json.loads(data.decode("utf-8")) if data else None
        except (ValueError, UnicodeDecodeError):
            obj = None
        if status == 200:
            if obj is None and data:
                raise DiscoveryError(f"discovery {self.base_url}: answer is not JSON")
            return obj
        msg = obj.get("message") if isinstance(obj, dict) and isinstance(obj.get("message"), str) else f"HTTP {status}"
        if status == 404:
            raise EntryNotFoundError(msg, status)
        raise DiscoveryError(msg, status)

    def entry(self, pk: PubKey) -> Dict[str, Any]:
        return parse_entry(self._check(*self._request("GET", f"{_PREFIX}/entry/{pk.hex()}")))

    def current_entry(self, pk: PubKey) -> Optional[Dict[str, Any]]:
        """pk's entry, or None when discovery holds none."""
        try:
            return self.entry(pk)
        except EntryNotFoundError:
            return None

    def post_entry(self, entry: Dict[str, Any]) -> None:
        self._check(*self._request("POST", f"{_PREFIX}/entry/", canonical_json(entry)))

    def post_after(self, entry: Dict[str, Any], cur: Optional[Dict[str, Any]], sk: SecKey) -> Dict[str, Any]:
        """Sign and POST `entry` as the successor of `cur` (what discovery holds now, or None):
        discovery wants the sequence to follow and the timestamp never to go back."""
        if cur is not None:
            entry["sequence"] = cur["sequence"] + 1
            entry["timestamp"] = max(entry["timestamp"], cur["timestamp"])
        sign_entry(entry, sk)
        self.post_entry(entry)
        return entry

    def put_entry(self, entry: Dict[str, Any], sk: SecKey) -> Dict[str, Any]:
        """Update: sequence+1, fresh timestamp, re-sign, POST (retried once on a sequence race)."""
        entry["sequence"] = int(entry.get("sequence", 0)) + 1
        entry["timestamp"] = _now_ns()
        sign_entry(entry, sk)
        try:
            self.post_entry(entry)
        except DiscoveryError as e:
            if "sequence" not in str(e):
                raise
            remote = self.entry(sk.pubkey())
            entry["timestamp"] = _now_ns()
            self.post_after(entry, remote, sk)
        return entry

    def delete_entry(self, entry: Dict[str, Any]) -> None:
        self._check(*self._request("DELETE", f"{_PREFIX}/entry", canonical_json(entry)))

    def _servers(self, path: str) -> List[Dict[str, Any]]:
        try:
            obj = self._check(*self._request("GET", f"{_PREFIX}/{path}"))
        except EntryNotFoundError:
            return []
        if not isinstance(obj, list):
            raise DiscoveryError(f"discovery {self.base_url}: server list is not an array")
        out = []
        for x in obj[:limits.DISC_MAX_SERVERS_LISTED * 4]:
            try:
                e = parse_entry(x)
            except ProtocolError:
                continue
            if e["server"] and e["server"]["address"]:
                out.append(e)
        return out

    def available_servers(self) -> List[Dict[str, Any]]:
        return self._servers("available_servers")

    def all_servers(self) -> List[Dict[str, Any]]:
        return self._servers("all_servers")

    def entries(self) -> List[str]:
        obj = self._check(*self._request("GET", f"{_PREFIX}/entries"))
        return [x for x in obj if isinstance(x, str)] if isinstance(obj, list) else []


# ---------------------------------------------------------------- server

class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DiscStore:
    """In-memory entries with expiry: server entries live `ttl` seconds past their last
    update (Go: 2 × the 1-minute refresh); client entries never expire unless posted with
    ?timeout=true (3 minutes), as in Go."""

    def __init__(self, ttl: float = 120.0, max_entries: int = limits.DISC_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: Dict[str, Tuple[Dict[str, Any], Optional[float]]] = {}

    def _expire(self, now: float) -> None:
        dead = [k for k, (_, exp) in self._entries.items() if exp is not None and exp <= now]
        for k in dead:
            del self._entries[k]

    def get(self, pk_hex: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            self._expire(time.monotonic())
            item = self._entries.get(pk_hex)
            return None if item is None else item[0]

    def put(self, entry: Dict[str, Any], legacy_timeout: bool) -> str:
        """Validate an update against the stored entry and store it; the success message."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            old = self._entries.get(entry["static"])
            if old is not None:
                prev = old[0]
                if entry["sequence"] <= prev["sequence"]:
                    raise _HTTPError(422, MSG_WRONG_SEQ)
                if entry["timestamp"] < prev["timestamp"]:
                    raise _HTTPError(422, "entry validation error: previous entry timestamp is not set "
                                          "before current entry timestamp")
            elif len(self._entries) >= self.max_entries:
                raise _HTTPError(500, "something unexpected happened")
            if entry["server"] is not None:
                exp: Optional[float] = now + self.ttl
            elif legacy_timeout:
                exp = now + limits.DISC_CLIENT_TIMEOUT_TTL
            else:
                exp = None
            self._entries[entry["static"]] = (entry, exp)
        return "wrote new entry iteration" if old is not None else "wrote a new entry"

    def delete(self, pk_hex: str) -> bool:
        with self._lock:
            return self._entries.pop(pk_hex, None) is not None

    def all(self) -> List[Dict[str, Any]]:
        with self._lock:
            self._expire(time.monotonic())
            return [e for e, _ in self._entries.values()]


def _validate(entry: Dict[str, Any]) -> None:
    if not entry["version"]:
        raise _HTTPError(422, "entry validation error: entry version cannot be empty")
    if not entry["signature"]:
        raise _HTTPError(422, "entry validation error: entry signature cannot be empty")
    if PubKey.from_hex(entry["static"]).is_null():
        raise _HTTPError(422, "entry validation error: public key cannot be null")
    if entry["client"] is None and entry["server"] is None:
        raise _HTTPError(422, "entry validation error: entry must have a client or server field")
    if entry["server"] is not None and not entry["server"]["address"]:
        raise _HTTPError(422, "entry validation error: server address cannot be empty")


def _check_server_time(entry: Dict[str, Any]) -> None:
    # Go checks the timestamp of entries without a client part only (server entries)
    if entry["client"] is not None:
        return
    now = time.time_ns()
    ts = entry["timestamp"]
    if ts < now - int(limits.DISC_SERVER_TS_PAST * 1e9):
        raise _HTTPError(422, MSG_OUTDATED)
    if ts > now + int(limits.DISC_SERVER_TS_FUTURE * 1e9):
        raise _HTTPError(422, "entry validation error: advertised entry timestamp is in the future")


class _Handler(BaseHTTPRequestHandler):
    server_version = "skypty-disc/" + __version__
    protocol_version = "HTTP/1.1"
    timeout = limits.DISC_SERVER_IO_TIMEOUT

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    @property
    def store(self) -> DiscStore:
        return self.server.store  # type: ignore[attr-defined]

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _msg(self, status: int, message: str) -> None:
        self._send(status, _dumps({"message": message, "code": status}))

    def _body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te:
            self.close_connection = True
            raise _HTTPError(400, "chunked request bodies are not supported")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if n < 0 or n > limits.DISC_MAX_BODY:
            self.close_connection = True
            raise _HTTPError(413, "request body too large")
        return self.rfile.read(n) if n else b""

    def _entry_from_body(self) -> Dict[str, Any]:
        raw = self._body()
        try:
            return parse_entry(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, ProtocolError) as e:
            raise _HTTPError(400, f"{e}") from None

    def _dispatch(self) -> None:
        u = urllib.parse.urlsplit(self.path)
        path, query = u.path, urllib.parse.parse_qs(u.query)
        m = self.command
        if path == "/health" and m == "GET":
            return self._send(200, _dumps({"build_info": {"version": __version__, "commit": "", "date": ""},
                                           "started_at": self.server.started_at}))  # type: ignore[attr-defined]
        if not path.startswith(_PREFIX + "/"):
            raise _HTTPError(404, "404 page not found")
        rest = path[len(_PREFIX) + 1:]
        if rest.startswith("entry/") and m == "GET":
            try:
                pk = PubKey.from_hex(rest[len("entry/"):])
            except SkyptyError as e:
                raise _HTTPError(400, str(e)) from None
            e = self.store.get(pk.hex())
            if e is None:
                raise _HTTPError(404, MSG_NOT_FOUND)
            return self._send(200, canonical_json(e))
        if (rest == "entry/" or rest.startswith("entry/")) and m == "POST":
            entry = self._entry_from_body()
            _validate(entry)
            try:
                verify_entry(entry)
            except SkyptyError:
                raise _HTTPError(401, MSG_BAD_SIG) from None
            _check_server_time(entry)
            msg = self.store.put(entry, query.get("timeout", [""])[0] == "true")
            log.info("entry %s seq %d (%s)", entry["static"], entry["sequence"],
                     "server " + entry["server"]["address"] if entry["server"] else "client")
            return self._msg(200, msg)
        if rest in ("entry", "entry/") and m == "DELETE":
            entry = self._entry_from_body()
            try:
                verify_entry(entry)
            except SkyptyError:
                raise _HTTPError(401, MSG_BAD_SIG) from None
            if not self.store.delete(entry["static"]):
                raise _HTTPError(404, MSG_NOT_FOUND)
            return self._msg(200, "deleted entry")
        if rest in ("available_servers", "all_servers") and m == "GET":
            servers = [e for e in self.store.all() if e["server"] is not None]
            if rest == "available_servers":
                servers = [e for e in servers if e["server"]["availableSessions"] > 0]
                random.shuffle(servers)
                servers = servers[:limits.DISC_MAX_SERVERS_LISTED]
                servers.sort(key=lambda e: e["server"]["availableSessions"], reverse=True)
            if not servers:
                raise _HTTPError(404, MSG_NO_SERVERS)
            return self._send(200, b"[" + b",".join(canonical_json(e) for e in servers) + b"]")
        if rest == "entries" and m == "GET":
            return self._send(200, _dumps([e["static"] for e in self.store.all() if e["client"] is not None]))
        if rest == "visorEntries" and m == "GET":
            return self._send(200, _dumps([e["static"] for e in self.store.all() if e["client_type"] == "visor"]))
        raise _HTTPError(404, "404 page not found")

    def _handle(self) -> None:
        try:
            self._dispatch()
        except _HTTPError as e:
            self._msg(e.status, e.message)
        except Exception:  # pragma: no cover - never leak a traceback to the peer
            log.exception("discovery handler failed")
            self._msg(500, "something unexpected happened")

    do_GET = do_POST = do_DELETE = _handle


class DiscServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    max_connections = 256     # ours: a connection flood costs threads, so cap them

    def __init__(self, addr: Tuple[str, int], ttl: float = 120.0) -> None:
        super().__init__(addr, _Handler)
        self.store = DiscStore(ttl)
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _split_addr(addr: str) -> Tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid listen address {addr!r} (want host:port or :port)")
    return host.strip("[]"), int(port)


def cmd_disc(args: argparse.Namespace) -> int:
    host, port = _split_addr(args.addr)
    if args.entry_ttl <= 0:
        raise UsageError("--entry-ttl must be positive")
    try:
        srv = DiscServer((host, port), ttl=args.entry_ttl)
    except OSError as e:
        raise SkyptyError(f"cannot listen on {args.addr}: {os.strerror(e.errno) if e.errno else e}") from None
    log.info("dmsg discovery listening on %s:%d (in-memory, server entry TTL %gs)", host or "*",
             srv.server_address[1], args.entry_ttl)
    try:
        srv.serve_forever(poll_interval=0.5)
    finally:
        srv.server_close()
    return 0
