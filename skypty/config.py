"""The standalone host config (pty.md §9.1): load, validate, generate, rewrite.

Shape: one mapping with Go's key names (`sk`, `pk`, `dmsgdisc`, `dmsgsessions`, `dmsgport`,
`clinet`, `cliaddr`, `wl`, `ssh_listen`; the older `tcplisten` is accepted). It is read as
JSON when it looks like JSON (no yaml import, the fast path) and as YAML otherwise.

Precedence, per key: command-line flag > environment (`<PREFIX>_DMSGDISC`, `_DMSGSESSIONS`,
`_DMSGPORT`, `_CLINET`, `_CLIADDR`; prefix from --envprefix, default DMSGPTY) > config file >
built-in default. `--sk-from-visor` replaces the secret key of the file. Unlike upstream, a key
absent from the file keeps its default instead of becoming a zero value.

Every problem with a config is one line and `UsageError` (exit 2); a bad file is never rewritten.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from skypty.errors import KeyFormatError, SkyptyError, UsageError
from skypty.keys import PubKey, SecKey, generate_keypair
from skypty.limits import CONFIG_MAX_BYTES, DEFAULT_DMSG_PORT

__all__ = [
    "HostConfig", "load_host_config", "read_visor_sk", "default_visor_config_path", "cmd_confgen",
    "read_document", "write_document", "rewrite_config", "atomic_write", "parse_wl", "parse_pk_list",
    "DEFAULT_DMSGDISC", "DEFAULT_CLINET", "CONFIG_KEYS", "ENV_KEYS",
]

log = logging.getLogger(__name__)

# dmsg.DiscAddr(false): the production discovery (crypto-dmsg.md §7).
DEFAULT_DMSGDISC = "http://dmsgd.skywire.skycoin.com"
DEFAULT_DMSGSESSIONS = 1
DEFAULT_CLINET = "unix"
CLI_NETWORKS = ("unix", "tcp", "tcp4", "tcp6")

# Go's key order (pty.Config); confgen writes them in this order.
CONFIG_KEYS = ("dmsgdisc", "dmsgsessions", "dmsgport", "clinet", "cliaddr", "sk", "pk", "wl", "ssh_listen")
_LEGACY_KEYS = {"tcplisten": "ssh_listen"}
ENV_KEYS = ("dmsgdisc", "dmsgsessions", "dmsgport", "clinet", "cliaddr")
_DEFAULT_CONFPATH = "./config.json"
_VISOR_CONFIG_PATHS = ("./skywire-config.json", "/opt/skywire/skywire.json", "/opt/skywire/skywire-config.json")


def _default_cliaddr() -> str:
    from skypty.cli import default_cliaddr   # the one place for $TMPDIR/pty.sock

    return default_cliaddr()


@dataclass
class HostConfig:
    """The effective host configuration after flags, environment, file and defaults."""

    sk: Optional[SecKey] = None
    pk: Optional[PubKey] = None
    dmsgdisc: str = DEFAULT_DMSGDISC
    dmsgsessions: int = DEFAULT_DMSGSESSIONS
    dmsgport: int = DEFAULT_DMSG_PORT
    clinet: str = DEFAULT_CLINET
    cliaddr: str = field(default_factory=_default_cliaddr)
    wl: List[PubKey] = field(default_factory=list)        # file wl ∪ --wl/--allow
    ssh_listen: str = ""
    path: Optional[str] = None                            # the file that was read (None: stdin/none)
    wl_extra: List[PubKey] = field(default_factory=list)  # keys from flags only (not persisted)
    sources: Dict[str, str] = field(default_factory=dict)  # key -> flag|env|file|default|visor


# ---------------------------------------------------------------- documents (JSON or YAML)

def _read_bounded(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"config {path}: no such file (create one with `skypty app pty dmsg confgen {path}`)") from None
    except IsADirectoryError:
        raise UsageError(f"config {path}: is a directory") from None
    except OSError as e:
        raise UsageError(f"config {path}: {e.strerror or e}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise UsageError(f"config {path}: larger than {CONFIG_MAX_BYTES} bytes")
    return data


def _parse_text(data: bytes, origin: str) -> Tuple[Dict[str, Any], str]:
    """Parse a config document; return (mapping, "json"|"yaml")."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"config {origin}: not UTF-8 text") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    doc: Any
    fmt = "json"
    stripped = text.strip()
    if not stripped:
        return {}, "json"
    try:
        if not stripped.startswith("{"):
            raise ValueError("not JSON")
        doc = json.loads(stripped)
    except ValueError:
        fmt = "yaml"
        import yaml   # lazily: only YAML configs pay for it

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "malformed YAML"
            raise UsageError(f"config {origin}: malformed YAML/JSON{where}: {problem}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise UsageError(f"config {origin}: expected a mapping of keys to values, got {_kind(doc)}")
    for k in doc:
        if not isinstance(k, str):
            raise UsageError(f"config {origin}: key {k!r} is not a string")
    return doc, fmt


def read_document(path: str) -> Tuple[Dict[str, Any], str]:
    """Read and parse a config file without validating its values: (mapping, "json"|"yaml")."""
    return _parse_text(_read_bounded(path), path)


def write_document(path: str, doc: Dict[str, Any], fmt: str) -> None:
    """Atomically rewrite `path` (0600) with `doc` in the same format it was read in."""
    if fmt == "yaml":
        import yaml

        data = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).encode("utf-8")
    else:
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    atomic_write(path, data)


def rewrite_config(path: str, mutate: Callable[[Dict[str, Any]], None]) -> None:
    """Read `path`, let `mutate` change the mapping in place, write it back atomically.

    Keys `mutate` does not touch are preserved (comments of a YAML file are not).
    """
    doc, fmt = read_document(path)
    mutate(doc)
    write_document(path, doc, fmt)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


# ---------------------------------------------------------------- atomic file writes

def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: temp file (0600) in the same directory, fsync, rename, fsync dir.

    A symlinked config is followed so the link survives; the owner of an existing file is kept
    when we run as root (a root host rewriting a user's config must not steal it).
    """
    real = os.path.realpath(path)
    d = os.path.dirname(real) or "."
    try:
        old = os.stat(real)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(real) + ".", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, mode)   # mkstemp already creates 0600; be explicit about the final mode
        if old is not None and os.geteuid() == 0 and (old.st_uid, old.st_gid) != (0, 0):
            os.fchown(fd, old.st_uid, old.st_gid)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, real)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def _create_exclusive(path: str, data: bytes) -> None:
    """Create a new file 0600 from its first byte (O_EXCL: never follows or replaces anything)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)   # the umask can only narrow 0600; make the mode exact anyway
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------- value validation

def _pk_from_hex(text: Any, what: str) -> PubKey:
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected a 66-character hex string, got {_kind(text)} (quote it in YAML)")
    try:
        pk = PubKey.from_hex(text.strip())
    except KeyFormatError as e:
        raise UsageError(f"{what}: {e}") from None
    return pk


def parse_pk_list(items: Iterable[str], what: str) -> List[PubKey]:
    """Comma-separated / repeated PK flags into a de-duplicated list (null keys refused)."""
    out: List[PubKey] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            pk = _pk_from_hex(part, what)
            if pk.is_null():
                raise UsageError(f"{what}: the null key cannot be whitelisted")
            if pk not in out:
                out.append(pk)
    return out


def parse_wl(value: Any, origin: str) -> List[PubKey]:
    """The `wl` value of a config (null or a list of 66-hex PKs) as a de-duplicated list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UsageError(f"config {origin}: wl: expected a list of public keys, got {_kind(value)}")
    out: List[PubKey] = []
    for i, item in enumerate(value):
        pk = _pk_from_hex(item, f"config {origin}: wl[{i}]")
        if pk.is_null():
            raise UsageError(f"config {origin}: wl[{i}]: the null key cannot be whitelisted")
        if pk not in out:
            out.append(pk)
    return out


def _int_value(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        else:
            raise UsageError(f"{what}: expected an integer, got {_kind(v) if not isinstance(v, str) else repr(v)}")
    if not lo <= v <= hi:
        raise UsageError(f"{what}: {v} is out of range ({lo}..{hi})")
    return v


def _str_value(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise UsageError(f"{what}: expected a string, got {_kind(v)}")
    return v


def _clinet(v: Any, what: str) -> str:
    s = _str_value(v, what).strip()
    if s not in CLI_NETWORKS:
        raise UsageError(f"{what}: unknown network {s!r} (use unix or tcp)")
    return s


def _validate(key: str, v: Any, what: str) -> Any:
    if key == "dmsgdisc":
        return _str_value(v, what)
    if key == "dmsgsessions":
        return _int_value(v, what, 1, 1024)
    if key == "dmsgport":
        return _int_value(v, what, 1, 65535)
    if key == "clinet":
        return _clinet(v, what)
    if key in ("cliaddr", "ssh_listen"):
        return _str_value(v, what) if v is not None else ""
    raise AssertionError(key)


def _file_values(doc: Dict[str, Any], origin: str) -> Dict[str, Any]:
    """Validate a parsed config mapping into typed values (only keys present in the file)."""
    unknown = [k for k in doc if k not in CONFIG_KEYS and k not in _LEGACY_KEYS]
    if unknown:
        raise UsageError(f"config {origin}: unknown key {unknown[0]!r} (known: {', '.join(CONFIG_KEYS)}, tcplisten)")
    out: Dict[str, Any] = {}
    for key in ("dmsgdisc", "dmsgsessions", "dmsgport", "clinet", "cliaddr"):
        if key in doc and doc[key] is not None:
            out[key] = _validate(key, doc[key], f"config {origin}: {key}")
    listen = doc.get("ssh_listen")
    legacy = doc.get("tcplisten")
    if listen is not None and legacy is not None and listen != legacy:
        raise UsageError(f"config {origin}: ssh_listen and tcplisten disagree (keep ssh_listen only)")
    if listen is None:
        listen = legacy
    if listen is not None:
        out["ssh_listen"] = _validate("ssh_listen", listen, f"config {origin}: ssh_listen")
    sk_text = doc.get("sk")
    if sk_text not in (None, ""):
        if not isinstance(sk_text, str):
            raise UsageError(f"config {origin}: sk: expected a 64-character hex string, got {_kind(sk_text)}"
                             " (quote it in YAML)")
        try:
            out["sk"] = SecKey.from_hex(sk_text.strip())
        except KeyFormatError as e:
            raise UsageError(f"config {origin}: sk: {e}") from None
    pk_text = doc.get("pk")
    if pk_text is not None:
        pk = _pk_from_hex(pk_text, f"config {origin}: pk")
        if not pk.is_null():
            out["pk"] = pk
    if "sk" in out and "pk" in out and out["sk"].pubkey() != out["pk"]:
        raise UsageError(f"config {origin}: pk does not match sk (the public key of sk is {out['sk'].pubkey().hex()})")
    if "wl" in doc:
        out["wl"] = parse_wl(doc["wl"], origin)
    return out


# ---------------------------------------------------------------- visor key

def default_visor_config_path() -> str:
    for p in _VISOR_CONFIG_PATHS:
        if os.path.exists(p):
            return p
    raise UsageError("no node config found (looked for " + ", ".join(_VISOR_CONFIG_PATHS)
                     + "); pass --sk-from-visor PATH")


def read_visor_sk(path: Optional[str]) -> SecKey:
    """The node's secret key: the top-level "sk" of its skywire-config.json."""
    if not path:
        path = default_visor_config_path()
    data = _read_bounded(path)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"node config {path}: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("sk") in (None, ""):
        raise UsageError(f"node config {path}: no top-level \"sk\"")
    if not isinstance(doc["sk"], str):
        raise UsageError(f"node config {path}: \"sk\" is not a string")
    try:
        return SecKey.from_hex(doc["sk"].strip())
    except KeyFormatError as e:
        raise UsageError(f"node config {path}: sk: {e}") from None


# ---------------------------------------------------------------- load

def _warn_if_readable(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return
    if st.st_mode & 0o077:
        log.warning("config %s holds a secret key and is readable by others (mode %o); chmod 600 it",
                    path, stat.S_IMODE(st.st_mode))


def load_host_config(args: Any) -> HostConfig:
    """Build the effective HostConfig from parsed argparse args (any host verb).

    Reads `confpath` (standalone host) or `conf` (`cli pty host`), or standard input with
    `--confstdin`. The default ./config.json may be absent (defaults apply); a path given
    explicitly must exist.
    """
    visor = getattr(args, "sk_from_visor", None)
    if visor is not None:
        # As upstream: two hosts on dmsg with one key would fight over the node's sessions.
        dmsg_on = hasattr(args, "no_dmsg") and not args.no_dmsg and getattr(args, "_verb", "") != "pty tcp"
        if dmsg_on:
            raise UsageError("--sk-from-visor needs --no-dmsg (the node already uses this key on dmsg)")
    cfg = HostConfig()
    for k in ("dmsgdisc", "dmsgsessions", "dmsgport", "clinet", "cliaddr", "ssh_listen", "wl"):
        cfg.sources[k] = "default"
    file_vals: Dict[str, Any] = {}
    if getattr(args, "confstdin", False):
        data = sys.stdin.buffer.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:
            raise UsageError(f"config stdin: larger than {CONFIG_MAX_BYTES} bytes")
        doc, _ = _parse_text(data, "stdin")
        file_vals = _file_values(doc, "stdin")
    else:
        path = getattr(args, "confpath", None) or getattr(args, "conf", None)
        if path:
            if path == _DEFAULT_CONFPATH and not os.path.exists(path):
                log.info("no %s: using defaults (create one with `skypty app pty dmsg confgen`)", path)
            else:
                doc, _ = read_document(path)
                file_vals = _file_values(doc, path)
                cfg.path = path
                if "sk" in file_vals:
                    _warn_if_readable(path)
    for k, v in file_vals.items():
        setattr(cfg, k, v)
        cfg.sources[k] = "file"
    if cfg.sk is not None and cfg.pk is None:
        cfg.pk = cfg.sk.pubkey()
    if cfg.sk is not None:
        cfg.sources["sk"] = "file"

    prefix = getattr(args, "envprefix", None) or "DMSGPTY"
    for k in ENV_KEYS:
        name = f"{prefix}_{k.upper()}"
        if name in os.environ:
            setattr(cfg, k, _validate(k, os.environ[name], f"environment {name}"))
            cfg.sources[k] = "env"

    flag_vals = {
        "dmsgdisc": getattr(args, "dmsgdisc", None),
        "dmsgsessions": getattr(args, "dmsgsessions", None),
        "dmsgport": getattr(args, "dmsgport", None),
        "clinet": getattr(args, "clinet", None),
        "cliaddr": getattr(args, "cliaddr", None),
        "ssh_listen": getattr(args, "tcplisten", None),
    }
    for k, v in flag_vals.items():
        if v is not None:
            setattr(cfg, k, _validate(k, v, f"--{'tcplisten' if k == 'ssh_listen' else k}"))
            cfg.sources[k] = "flag"

    extra = parse_pk_list(list(getattr(args, "wl", None) or []) + list(getattr(args, "allow", None) or []),
                          "--wl/--allow")
    cfg.wl_extra = extra
    for pk in extra:
        if pk not in cfg.wl:
            cfg.wl.append(pk)
    if extra:
        cfg.sources["wl"] = "file+flag" if "wl" in file_vals else "flag"

    if visor is not None:
        cfg.sk = read_visor_sk(visor)
        cfg.pk = cfg.sk.pubkey()
        cfg.sources["sk"] = "visor"
    return cfg


# ---------------------------------------------------------------- confgen

def cmd_confgen(args: Any) -> int:
    """`app pty dmsg confgen [path] [--unsafe]`: a fresh keypair config, 0600 from creation."""
    path = getattr(args, "path", None) or _DEFAULT_CONFPATH
    unsafe = bool(getattr(args, "unsafe", False))
    pk, sk = generate_keypair()
    doc = {
        "dmsgdisc": DEFAULT_DMSGDISC,
        "dmsgsessions": DEFAULT_DMSGSESSIONS,
        "dmsgport": DEFAULT_DMSG_PORT,
        "clinet": DEFAULT_CLINET,
        "cliaddr": _default_cliaddr(),
        "sk": sk.hex(),
        "pk": pk.hex(),
        "wl": None,
    }
    data = (json.dumps(doc, indent=4) + "\n").encode("utf-8")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory")
    try:
        if unsafe and os.path.lexists(path):
            atomic_write(path, data)
        else:
            _create_exclusive(path, data)
    except FileExistsError:
        raise UsageError(f"{path} already exists; pass --unsafe to overwrite it") from None
    except OSError as e:
        raise SkyptyError(f"cannot write {path}: {e.strerror or e}") from None
    sys.stderr.write(f"wrote {path} (mode 0600)\n")
    sys.stdout.write(pk.hex() + "\n")
    sys.stdout.flush()
    return 0
