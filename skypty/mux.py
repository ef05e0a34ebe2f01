"""One request per connection (pty.md §2.1): client sends [u8 len][URI], host answers one
byte, 0x00 accept / 0x01 reject, then the connection belongs to the URI's subsystem.

The host strips one leading "/", parses the URI, and matches its path exactly against the
registered paths in registration order. No match or an unreadable request: 0x01 and close.
An rpc factory that raises: close without writing a byte (the client sees EOF).
"""
from __future__ import annotations

import _socket   # not socket: see netutil
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from . import limits
from .errors import ProtocolError, RejectedError, UsageError
from .logs import get_logger
from .rpc import RPCServer

if TYPE_CHECKING:  # pragma: no cover
    from .keys import PubKey

__all__ = ["Peer", "MuxTable", "request", "parse_request", "ACCEPT", "REJECT"]

log = get_logger("skypty.mux")

ACCEPT = b"\x00"
REJECT = b"\x01"


class Peer:
    """Who is on the other end: pk None on the (unauthenticated) control socket.

    A plain class, not a NamedTuple: building one at import compiles its annotations and a
    __new__ (~3 ms of every one-shot client's cold start, which imports this module)."""

    __slots__ = ("pk", "addr", "path")

    def __init__(self, pk: Optional["PubKey"], addr: str, path: str) -> None:
        self.pk = pk
        self.addr = addr
        self.path = path   # "tcp" | "dmsg" | "control"

    def __repr__(self) -> str:
        return f"Peer({self.describe()})"

    def describe(self) -> str:
        pk = self.pk.hex() if self.pk is not None else "-"
        return f"{pk}@{self.addr} ({self.path})"


# --------------------------------------------------------------------------------- client

def request(conn: Any, uri: str, timeout: Optional[float] = None) -> None:
    """Ask for `uri` on a fresh authenticated stream; returns when the host accepted.
    Raises RejectedError on 0x01 and ProtocolError when no answer byte arrives."""
    data = uri.encode("utf-8") if isinstance(uri, str) else bytes(uri)
    if len(data) > limits.MUX_MAX_URI:
        raise UsageError(f"request URI longer than {limits.MUX_MAX_URI} bytes")
    try:
        conn.sendall(bytes((len(data),)) + data)
    except OSError as e:
        raise ProtocolError(f"failed to write request: {e.strerror or e}") from None
    if timeout is not None and hasattr(conn, "settimeout"):
        conn.settimeout(timeout)
    try:
        r = conn.recv(1)
    except _socket.timeout:
        raise ProtocolError("failed to read response: timeout") from None
    except OSError as e:
        raise ProtocolError(f"failed to read response: {e.strerror or e}") from None
    finally:
        if timeout is not None and hasattr(conn, "settimeout"):
            try:
                conn.settimeout(None)
            except OSError:
                pass
    if not r:
        raise ProtocolError("failed to read response: EOF")
    if r[0] != 0:
        raise RejectedError("request rejected by remote dmsgpty-host")


# --------------------------------------------------------------------------------- server

def _read_request(conn: Any, timeout: float) -> bytes:
    """[u8 len][len bytes], never reading past it (the subsystem owns what follows)."""
    deadline = time.monotonic() + timeout
    has_timeout = hasattr(conn, "settimeout")

    def read(n: int) -> bytes:
        out = b""
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("mux request timed out")
            if has_timeout:
                conn.settimeout(left)
            try:
                chunk = conn.recv(n - len(out))
            except _socket.timeout:
                raise ProtocolError("mux request timed out") from None
            if not chunk:
                raise ProtocolError("EOF before the mux request")
            out += chunk
        return out

    try:
        n = read(1)[0]
        return read(n) if n else b""
    finally:
        if has_timeout:
            try:
                conn.settimeout(None)
            except OSError:
                pass


def parse_request(raw: bytes) -> Optional[Tuple[str, Dict[str, str]]]:
    """(path, query) of a request URI as the host matches it, or None if it does not parse.
    Query values: the first value of each key (Go's url.Values.Get)."""
    from urllib.parse import parse_qs, urlsplit   # host side only: a client's cold start skips it

    try:
        uri = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return None   # Go's url.Parse refuses control characters
    if uri.startswith("/"):
        uri = uri[1:]
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    if parts.scheme or parts.netloc:
        return None
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return parts.path, query


RPCFactory = Callable[[Any, Dict[str, str], Peer], Any]
RawHandler = Callable[[Any, Dict[str, str], Peer], Any]


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        pass


class MuxTable:
    """The URI table of one listener (remote or local)."""

    def __init__(self) -> None:
        self._routes: List[Tuple[str, str, Callable]] = []

    def add_rpc(self, path: str, factory: RPCFactory) -> None:
        """factory(conn, query, peer) -> [(service_name, [Method…]) or
        (service_name, [Method…], on_close)]; raising = close without a byte."""
        self._routes.append((path, "rpc", factory))

    def add_raw(self, path: str, handler: RawHandler) -> None:
        """handler(conn, query, peer) owns the connection after 0x00 was written."""
        self._routes.append((path, "raw", handler))

    def paths(self) -> List[str]:
        return [p for p, _, _ in self._routes]

    def _match(self, path: str) -> Optional[Tuple[str, Callable]]:
        for p, kind, fn in self._routes:
            if p == path:
                return kind, fn
        return None

    def serve(self, conn: Any, peer: Peer, timeout: float = limits.MUX_REQUEST_TIMEOUT) -> None:
        """Read the request, dispatch, and run the subsystem until it ends; always closes conn."""
        try:
            self._serve(conn, peer, timeout)
        finally:
            _close(conn)

    def _reject(self, conn: Any, peer: Peer, why: str) -> None:
        log.info("mux: reject %s: %s", peer.describe(), why)
        try:
            conn.sendall(REJECT)
        except OSError:
            pass

    def _serve(self, conn: Any, peer: Peer, timeout: float) -> None:
        try:
            raw = _read_request(conn, timeout)
        except (ProtocolError, OSError) as e:
            self._reject(conn, peer, f"unreadable request: {e}")
            return
        parsed = parse_request(raw)
        if parsed is None:
            self._reject(conn, peer, f"bad request URI {raw[:64]!r}")
            return
        path, query = parsed
        route = self._match(path)
        if route is None:
            self._reject(conn, peer, f"no handler for {path!r}")
            return
        kind, fn = route
        if kind == "raw":
            try:
                conn.sendall(ACCEPT)
            except OSError:
                return
            log.info("mux: accept %s %s", peer.describe(), path)
            fn(conn, query, peer)
            return
        try:
            services = fn(conn, query, peer)
            if isinstance(services, tuple) and services and isinstance(services[0], str):
                services = [services]
            server = RPCServer(conn)
            for svc in services:
                server.register(svc[0], svc[1], svc[2] if len(svc) > 2 else None)
        except Exception as e:
            log.info("mux: %s %s refused: %s", peer.describe(), path, e)
            return
        try:
            conn.sendall(ACCEPT)
        except OSError:
            pass   # serve() notices the dead stream at once and still runs on_close
        log.info("mux: accept %s %s", peer.describe(), path)
        server.serve()
