"""Destination strings, parsed in one place.

Accepted forms (PK = 66 hex characters, any case; normalised to lower case):

  <pk>@host[:port]          direct noise-XK TCP (`pty shell`, `pty fs`); port from default_port
  tcp://<pk>@host[:port]    the same, explicit
  <pk>@[::1][:port]         IPv6 literals must be bracketed (a bare `::1` is ambiguous with the port)
  <pk>                      through the local node (its dmsg/skynet dialer), port = default_port
  dmsg://<pk>[:port]        through the node, dmsg only
  skynet://<pk>[:port]      through the node, skynet only

`parse_via` parses the `--via tcp://<pk>@host:port` flag (the tcp scheme is mandatory there).
Every malformed input raises `errors.DestinationError` (exit 2) with a one-line reason.
"""
from __future__ import annotations

from typing import Optional

from .errors import DestinationError, KeyFormatError
from .keys import PUBKEY_LEN, PubKey, is_hex
from .limits import DEFAULT_TCP_PORT

__all__ = ["Dest", "parse_dest", "parse_via", "parse_pk", "parse_port", "format_hostport"]

_SCHEMES = ("tcp", "dmsg", "skynet")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _valid_hostname(host: str) -> bool:
    """RFC 1123 host names plus IPv4 literals: at most 253 characters of letters, digits, '_',
    '.' and '-', neither first nor last a '.' or '-' (one trailing root '.' aside); no spaces,
    slashes, '@' or other URL syntax. Checked by hand: a regex compile is on every cold start."""
    if not 1 <= len(host) <= 253 or not _HOST_CHARS.issuperset(host):
        return False
    core = host[:-1] if host.endswith(".") else host
    return bool(core) and core[0] not in ".-" and core[-1] not in ".-"


class Dest:
    """A parsed destination. `scheme` is "tcp", "dmsg", "skynet" or "" (node chooses)."""

    __slots__ = ("pk", "host", "port", "scheme")

    def __init__(self, pk: PubKey, host: Optional[str], port: int, scheme: str) -> None:
        self.pk = pk
        self.host = host      # None unless scheme == "tcp"; IPv6 without brackets
        self.port = port
        self.scheme = scheme

    @property
    def is_tcp(self) -> bool:
        return self.scheme == "tcp"

    def hostport(self) -> str:
        return format_hostport(self.host or "", self.port)

    def __str__(self) -> str:
        if self.scheme == "tcp":
            return f"tcp://{self.pk.hex()}@{self.hostport()}"
        prefix = f"{self.scheme}://" if self.scheme else ""
        return f"{prefix}{self.pk.hex()}:{self.port}"

    def __repr__(self) -> str:
        return f"Dest({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dest):
            return NotImplemented
        return (self.pk, self.host, self.port, self.scheme) == (other.pk, other.host, other.port, other.scheme)

    def __hash__(self) -> int:
        return hash((self.pk, self.host, self.port, self.scheme))


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _short(s: str) -> str:
    return s if len(s) <= 90 else s[:87] + "..."


def parse_pk(text: str, what: str = "public key") -> PubKey:
    """A 66-hex PK (any case) that is a real point; the null key is refused."""
    if not text:
        raise DestinationError(f"missing {what}")
    if not is_hex(text):
        raise DestinationError(f"invalid {what} {_short(text)!r}: not hexadecimal")
    if len(text) != PUBKEY_LEN * 2:
        raise DestinationError(f"invalid {what} {_short(text)!r}: {len(text)} hex characters, want {PUBKEY_LEN * 2}")
    try:
        pk = PubKey.from_hex(text.lower())
    except KeyFormatError as e:
        raise DestinationError(f"invalid {what} {text.lower()}: not a point on secp256k1") from e
    if pk.is_null():
        raise DestinationError(f"invalid {what}: the null key (all zeros) names no host")
    return pk


def parse_port(text: str, whole: str = "") -> int:
    where = f" in {_short(whole)!r}" if whole else ""
    if not text:
        raise DestinationError(f"empty port{where}")
    if not text.isdigit() or not text.isascii():
        raise DestinationError(f"invalid port {_short(text)!r}{where}: not a number")
    n = int(text)
    if not 1 <= n <= 65535:
        raise DestinationError(f"port {n} out of range 1-65535{where}")
    return n


def _parse_hostport(text: str, default_port: Optional[int], whole: str) -> "tuple[str, int]":
    if not text:
        raise DestinationError(f"empty host in {_short(whole)!r} (want <pk>@host[:port])")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise DestinationError(f"unterminated '[' in {_short(whole)!r} (want [ipv6]:port)")
        host, rest = text[1:end], text[end + 1:]
        if not host:
            raise DestinationError(f"empty host in {_short(whole)!r}")
        import ipaddress   # only IPv6 literals need it: keep `cli pty exec` cold start small

        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise DestinationError(f"invalid IPv6 address {host!r} in {_short(whole)!r}") from None
        if rest == "":
            port_s = None
        elif rest.startswith(":"):
            port_s = rest[1:]
        else:
            raise DestinationError(f"unexpected {rest!r} after ']' in {_short(whole)!r}")
    else:
        if text.count(":") > 1:
            raise DestinationError(f"IPv6 addresses must be bracketed, e.g. <pk>@[::1]:2022 (got {_short(whole)!r})")
        host, sep, port_s = text.partition(":")
        if not sep:
            port_s = None
        if not host:
            raise DestinationError(f"empty host in {_short(whole)!r} (want <pk>@host[:port])")
        if not _valid_hostname(host):
            raise DestinationError(f"invalid host {_short(host)!r} in {_short(whole)!r}")
    if port_s is None:
        if default_port is None:
            raise DestinationError(f"missing port in {_short(whole)!r} (want host:port)")
        return host, parse_port(str(default_port), whole)   # a bad -p/--port is a usage error too
    return host, parse_port(port_s, whole)


def parse_dest(text: str, default_port: int = DEFAULT_TCP_PORT, *, require_port: bool = False) -> Dest:
    """Parse any destination form (module docstring). `require_port` refuses a tcp form without one."""
    if not isinstance(text, str):
        raise DestinationError("missing destination")
    whole = text.strip()
    if not whole:
        raise DestinationError("empty destination (want <pk>@host[:port], tcp://…, dmsg://<pk> or <pk>)")
    if any(c.isspace() for c in whole):
        raise DestinationError(f"destination {_short(whole)!r} contains whitespace")
    scheme = ""
    rest = whole
    if "://" in whole:
        scheme, _, rest = whole.partition("://")
        scheme = scheme.lower()
        if scheme not in _SCHEMES:
            raise DestinationError(f"unknown scheme {scheme!r}:// in {_short(whole)!r} (use tcp://, dmsg:// or skynet://)")
    if "@" in rest:
        if scheme not in ("", "tcp"):
            raise DestinationError(f"{scheme}:// takes a bare <pk>[:port], not <pk>@host (got {_short(whole)!r})")
        pk_s, _, hp = rest.partition("@")
        pk = parse_pk(pk_s)
        if "@" in hp:
            raise DestinationError(f"more than one '@' in {_short(whole)!r}")
        host, port = _parse_hostport(hp, None if require_port else default_port, whole)
        return Dest(pk, host, port, "tcp")
    if scheme == "tcp":
        raise DestinationError(f"tcp:// needs <pk>@host:port (got {_short(whole)!r})")
    pk_s, sep, port_s = rest.partition(":")
    pk = parse_pk(pk_s)
    port = parse_port(port_s if sep else str(default_port), whole)
    return Dest(pk, None, port, scheme)


def parse_via(text: str, default_port: Optional[int] = None) -> Dest:
    """`--via tcp://<pk>@host:port`: a tcp destination with its scheme spelled out."""
    if not isinstance(text, str) or not text.strip().lower().startswith("tcp://"):
        raise DestinationError(f"--via wants tcp://<pk>@host:port (got {_short(str(text))!r})")
    return parse_dest(text, default_port if default_port is not None else 0,
                      require_port=default_port is None)
