"""The ssh-shaped clients: `cli pty shell`, `cli pty exec`, `cli pty start`.

`PtyClient` speaks the `pty` net/rpc service over any stream on which `dmsgpty/pty` (or the
control socket's `dmsgpty/proxy?…`) was already accepted. The dial helpers turn the failures a
user can meet (unreachable host, wrong pinned key, client key not whitelisted) into one-line
`SkyptyError`s. Exit codes follow pty.md §4.3 (constants in skypty/errors.py).
"""
from __future__ import annotations

import _socket   # not socket: see netutil
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from . import limits
from .dest import Dest, format_hostport, parse_dest, parse_via
from .errors import (EXIT_REMOTE_FAILED, EXIT_TIMEOUT, HandshakeError, KeyFormatError,
                     ProtocolError, RejectedError, RequestDroppedError, SkyptyError, UsageError)
from .keys import PubKey, SecKey, generate_keypair
from .logs import get_logger
from .netutil import connect_tcp

__all__ = [
    "PtyClient", "open_pty_tcp", "open_interactive_tcp", "open_pty_control", "open_pty_standalone", "dial_uri_tcp",
    "dial_optional_uri_tcp", "resolve_identity", "exit_code_for", "result_json", "exec_stream_tcp", "node_exec",
    "cmd_shell", "cmd_exec", "cmd_start", "PTY_URI", "DEFAULT_VISOR_CONFIGS",
]

log = get_logger("skypty.client")

PTY_URI = "dmsgpty/pty"
PROXY_URI = "dmsgpty/proxy"
DEFAULT_CMD = "/bin/bash"
# Where upstream looks for the node's config when borrowing its key (first that exists wins).
DEFAULT_VISOR_CONFIGS = ("./skywire-config.json", "/opt/skywire/skywire-config.json")
# Error texts of `pty.Read` that mean "the remote program ended" rather than "the link broke".
_ENDED_TEXTS = ("EOF", "unexpected EOF", "io: read/write on closed pipe", "no active pty session")
_ENDED_SUBSTRINGS = ("input/output error", "file already closed")
_NO_METHOD = ("rpc: can't find method", "rpc: can't find service")


_GOB: Optional[tuple] = None


def _gob():
    global _GOB
    if _GOB is None:   # imported on first use, then cached: every keystroke asks
        from . import gob, gobtypes
        _GOB = (gob, gobtypes)
    return _GOB


def _is_ended_error(text: str) -> bool:
    return text in _ENDED_TEXTS or any(s in text for s in _ENDED_SUBSTRINGS)


class PtyClient:
    """Client of the `pty` service on an accepted connection (thread-safe; calls may overlap)."""

    def __init__(self, conn) -> None:
        from .rpc import RPCClient, RPCError

        self.conn = conn
        self._rpc = RPCClient(conn)
        self._rpc_error = RPCError
        gob, _ = _gob()
        self._bytes_t, self._int_t = gob.BYTES, gob.INT   # every keystroke asks
        self._started = False
        self._ended = False
        self._closed = False
        self._close_lock = threading.Lock()

    # -- plumbing
    def _call(self, method: str, arg_type, arg, reply_type, timeout: Optional[float] = None):
        return self._rpc.call("pty." + method, arg_type, arg, reply_type, timeout=timeout)

    @staticmethod
    def _winsize(rows: int, cols: int, x: int = 0, y: int = 0) -> dict:
        clamp = lambda v: max(0, min(int(v), 0xFFFF))  # noqa: E731  (uint16 on the wire)
        return {"Rows": clamp(rows), "Cols": clamp(cols), "X": clamp(x), "Y": clamp(y)}

    def _command_req(self, name: str, args: Sequence[str], size, env) -> dict:
        return {"Name": name, "Arg": list(args or ()),
                "Size": self._winsize(*size) if size else None, "Env": list(env or ())}

    # -- interactive
    def start(self, name: str = DEFAULT_CMD, args: Sequence[str] = (), size: Optional[Tuple[int, int]] = None,
              env: Optional[Sequence[str]] = None) -> None:
        gob, gt = _gob()
        self._call("Start", gt.CommandReq, self._command_req(name, args, size, env), gob.EMPTY)
        self._started = True

    def start_session(self, name: str = DEFAULT_CMD, args: Sequence[str] = (),
                      size: Optional[Tuple[int, int]] = None, env: Optional[Sequence[str]] = None) -> str:
        gob, gt = _gob()
        sid = self._call("StartSession", gt.CommandReq, self._command_req(name, args, size, env), gob.STRING)
        self._started = True
        return sid

    def attach(self, sid: str) -> None:
        gob, _ = _gob()
        self._call("Attach", gob.STRING, sid, gob.EMPTY)
        self._started = True

    def read(self, n: int = limits.CLIENT_READ_SIZE) -> bytes:
        """Block until the remote pty has output. EOFError once the remote program ended."""
        from .rpc import RPCError

        gob, _ = _gob()
        try:
            data = self._call("Read", gob.INT, int(n), gob.BYTES)
        except RPCError as e:
            if _is_ended_error(str(e)):
                self._ended = True
                raise EOFError(str(e)) from None
            raise
        return bytes(data or b"")

    def write(self, data: bytes) -> int:
        gob, _ = _gob()
        return int(self._call("Write", gob.BYTES, bytes(data), gob.INT) or 0)

    # -- the same without waiting: fn runs on the rpc reader thread (see RPCClient.go)
    def read_then(self, fn: Callable[[bytes, Optional[BaseException]], Any],
                  n: int = limits.CLIENT_READ_SIZE) -> None:
        """Issue a Read; fn(data, None) with its output, or fn(b"", err) where err is an
        EOFError once the remote program ended. Raises if the call cannot be sent."""
        rpc_error = self._rpc_error

        def done(call) -> None:
            err = call.error
            if isinstance(err, rpc_error) and _is_ended_error(str(err)):
                self._ended = True
                err = EOFError(str(err))
            fn(b"" if err is not None else bytes(call.reply or b""), err)

        self._rpc.go("pty.Read", self._int_t, int(n), self._bytes_t, callback=done)

    def write_then(self, data: bytes, fn: Callable[[Optional[BaseException]], Any]) -> None:
        """Issue a Write; fn(None) once the host took it, fn(err) if it failed."""
        self._rpc.go("pty.Write", self._bytes_t, bytes(data), self._int_t, callback=lambda call: fn(call.error))

    def set_size(self, rows: int, cols: int, x: int = 0, y: int = 0) -> None:
        gob, gt = _gob()
        self._call("SetPtySize", gt.WinSize, self._winsize(rows, cols, x, y), gob.EMPTY)

    def ping(self, timeout: Optional[float] = None) -> None:
        from .rpc import RPCError

        gob, _ = _gob()
        try:
            self._call("Ping", gob.EMPTY, {}, gob.EMPTY, timeout=timeout)
        except RPCError as e:
            if not str(e).startswith(_NO_METHOD):   # an older host has no Ping: fine on TCP
                raise

    def stop(self, timeout: Optional[float] = None) -> None:
        gob, _ = _gob()
        self._call("Stop", gob.EMPTY, {}, gob.EMPTY, timeout=timeout)

    # -- one-shot
    def exec(self, name: str, args: Sequence[str] = (), env: Sequence[str] = (), stdin: bytes = b"",
             timeout_ms: int = limits.EXEC_DEFAULT_TIMEOUT_MS) -> dict:
        """Run one command (pty.Exec) and return the CommandExecResult as a dict of Go field names."""
        _, gt = _gob()
        if not name:
            raise UsageError("empty command name")
        if len(stdin or b"") > limits.EXEC_STDIN_MAX:
            raise UsageError(f"stdin {len(stdin)} > max {limits.EXEC_STDIN_MAX}")
        req = {"Name": name, "Arg": list(args), "Env": list(env), "Stdin": bytes(stdin or b""),
               "TimeoutMS": int(timeout_ms)}
        eff_ms = timeout_ms if timeout_ms > 0 else limits.EXEC_DEFAULT_TIMEOUT_MS
        budget = min(eff_ms, limits.EXEC_MAX_TIMEOUT_MS) / 1000.0 + limits.EXEC_CALL_SLACK
        return _result_defaults(self._call("Exec", gt.CommandExecReq, req, gt.CommandExecResult, timeout=budget))

    def close(self) -> None:
        """Stop a running pty (briefly, the host stops it at connection end anyway) and hang up."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._started and not self._ended:
            try:
                self.stop(timeout=1.0)
            except Exception:  # the link may already be gone; closing is all that is left
                pass
        for f in (self._rpc.close, self.conn.close):
            try:
                f()
            except Exception:
                pass

    def __enter__(self) -> "PtyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _result_defaults(res: Optional[dict]) -> dict:
    res = dict(res or {})
    for k, v in (("Stdout", b""), ("Stderr", b""), ("StdoutTruncated", False), ("StderrTruncated", False),
                 ("ExitCode", 0), ("TimedOut", False), ("DurationMS", 0)):
        if res.get(k) is None:
            res[k] = v
    res["Stdout"], res["Stderr"] = bytes(res["Stdout"]), bytes(res["Stderr"])
    return res


# ---------------------------------------------------------------------------------- dialing

def _connect_tcp(host: str, port: int, timeout: float):
    where = format_hostport(host, port)
    try:
        # an ASCII host goes down as bytes: a str is IDNA-encoded first, which imports the
        # idna codec (and unicodedata) on every cold start for nothing
        sock = connect_tcp(host.encode("ascii") if host.isascii() else host, port, timeout)
    except _socket.timeout:
        raise SkyptyError(f"cannot reach {where}: connection timed out") from None
    except _socket.gaierror as e:
        raise SkyptyError(f"cannot resolve {host}: {e.strerror or e}") from None
    except OSError as e:
        raise SkyptyError(f"cannot reach {where}: {e.strerror or e}") from None
    return sock


def _mux_request(conn, uri: str, timeout: float, not_listed: str) -> None:
    from . import mux

    try:
        mux.request(conn, uri, timeout=timeout)
    except ProtocolError as e:
        if str(e).endswith("timeout"):
            raise SkyptyError(f"no answer to the {uri.split('?')[0]} request within {timeout:g}s") from None
        raise RequestDroppedError(not_listed) from None
    except OSError:   # the request write itself failed: the host hung up right after auth
        raise RequestDroppedError(not_listed) from None


def _backoff(delays: List[float]) -> None:
    import random   # only a retry needs it (cold start)

    time.sleep(delays.pop(0) * random.uniform(0.5, 1.0))


def _load_next() -> None:
    """What comes right after the handshake (the mux request, then rpc and gob): imported
    while the host answers message 1, ~1 ms of a one-shot exec's cold start."""
    from . import mux  # noqa: F401  (imports rpc, gob and gobtypes)


def _handshake(host: str, port: int, remote_pk: PubKey, sk: SecKey, timeout: float):
    """Connect + XK. A host over its pre-auth cap resets the connection before replying
    (netutil.reset_close): that alone is retried, a few times. A wrong pinned key makes the
    host close after reading message 1, an EOF here, which is reported at once."""
    from . import noise

    delays = list(limits.CLIENT_HANDSHAKE_RETRY_DELAYS)
    while True:
        try:
            sock = _connect_tcp(host, port, timeout)
        except SkyptyError as e:   # the reset can beat connect() itself on a fast link
            if "reset" not in str(e) or not delays:
                raise
            _backoff(delays)
            continue
        try:
            return noise.client_handshake(sock, sk, remote_pk, timeout=min(timeout, limits.HANDSHAKE_TIMEOUT),
                                          while_waiting=_load_next)
        except HandshakeError as e:
            sock.close()
            text = str(e)
            shed = "reset" in text or "roken pipe" in text
            if shed and delays:
                _backoff(delays)
                continue
            hint = (" (host busy: too many pending connections)" if shed else
                    " (wrong server key?)" if text.endswith("EOF") else "")
            raise HandshakeError(f"{format_hostport(host, port)}: {text}{hint}") from None
        except OSError as e:
            sock.close()
            raise HandshakeError(f"noise handshake with {format_hostport(host, port)} failed:"
                                 f" {e.strerror or e}") from None


def dial_uri_tcp(host: str, port: int, remote_pk: PubKey, sk: SecKey, uri: str,
                 timeout: float = limits.TCP_DIAL_TIMEOUT):
    """TCP connect + Noise XK (server PK pinned) + mux request `uri`: a SecureConn ready for it."""
    conn = _handshake(host, port, remote_pk, sk, timeout)
    try:
        _mux_request(conn, uri, timeout,
                     "host closed the connection after the handshake: this client key is probably not"
                     f" whitelisted (pk {sk.pubkey().hex()})")
    except BaseException:
        conn.close()
        raise
    return conn


def dial_optional_uri_tcp(host: str, port: int, remote_pk: PubKey, sk: SecKey, uri: str,
                          timeout: float = limits.TCP_DIAL_TIMEOUT):
    """dial_uri_tcp, or None when the host answers `uri` with 0x01 (no such subsystem: a Go
    host, an older skypty); a host that drops our key still raises."""
    try:
        return dial_uri_tcp(host, port, remote_pk, sk, uri, timeout)
    except RequestDroppedError:
        raise
    except RejectedError:
        return None


def open_pty_tcp(host: str, port: int, remote_pk: PubKey, sk: SecKey,
                 timeout: float = limits.TCP_DIAL_TIMEOUT) -> PtyClient:
    return PtyClient(dial_uri_tcp(host, port, remote_pk, sk, PTY_URI, timeout))


def open_interactive_tcp(host: str, port: int, remote_pk: PubKey, sk: SecKey,
                         timeout: float = limits.TCP_DIAL_TIMEOUT):
    """A client for an interactive session: the pty-stream subsystem on a skypty host (one
    message per keystroke and per output chunk), `dmsgpty/pty` on a host without it (a Go
    host answers the request with 0x01; that costs one more handshake, once per session)."""
    from .client_ptystream import PtyStreamClient
    from .services.ptystream import PTY_STREAM_URI

    conn = dial_optional_uri_tcp(host, port, remote_pk, sk, PTY_STREAM_URI, timeout)
    if conn is not None:
        return PtyStreamClient(conn)
    return open_pty_tcp(host, port, remote_pk, sk, timeout)


def open_pty_standalone(pk: PubKey, port: int, sk: SecKey, disc_url: Optional[str] = None) -> PtyClient:
    """An ephemeral dmsg client (no node needed) dials pk:port and opens `dmsgpty/pty`."""
    from .config import DEFAULT_DMSGDISC
    from .transport.dmsg.client import dial_standalone

    try:
        conn = dial_standalone(pk, port, sk, disc_url or DEFAULT_DMSGDISC, PTY_URI)
    except RejectedError:
        raise RejectedError(f"{pk.hex()}:{port} refused the request: this client key is probably not"
                            f" whitelisted (pk {sk.pubkey().hex()})") from None
    except ProtocolError as e:
        raise SkyptyError(f"dmsg stream to {pk.hex()}:{port} failed: {e}") from None
    return PtyClient(conn)


def open_pty_control(net: str, addr: str, uri: str = PTY_URI) -> PtyClient:
    """A PtyClient over the local host's control socket (no Noise: the socket's mode is the auth)."""
    from .transport.unixsock import dial_control

    try:
        sock = dial_control(net, addr, timeout=limits.TCP_DIAL_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        raise SkyptyError(f"no pty host on the control socket {addr}: start one with `skypty app pty dmsg`") from None
    except PermissionError:
        raise SkyptyError(f"permission denied on the control socket {addr}: run as the host's user") from None
    proxied = uri.startswith(PROXY_URI)
    try:
        _mux_request(sock, uri, limits.CLIENT_PROXY_REQUEST_TIMEOUT if proxied else limits.MUX_REQUEST_TIMEOUT,
                     "the host could not reach the remote pty (dial failed or not whitelisted there)"
                     if proxied else "the host closed the control connection")
    except BaseException:
        sock.close()
        raise
    return PtyClient(sock)


# ---------------------------------------------------------------------------------- identity

def _read_visor_sk(path: str) -> SecKey:
    from .config import read_visor_sk

    return read_visor_sk(path)


def resolve_identity(args, verb: str = "pty") -> SecKey:
    """--sk > $DMSGPTY_SK > the node's key (with --visor-key) > a fresh random key (said on stderr)."""
    sk_hex = getattr(args, "sk", None)
    if sk_hex:
        try:
            return SecKey.from_hex(sk_hex.strip())
        except KeyFormatError as e:
            raise KeyFormatError(f"--sk: {e}") from None
    env = os.environ.get("DMSGPTY_SK", "").strip()
    if env:
        try:
            return SecKey.from_hex(env)
        except KeyFormatError as e:
            raise KeyFormatError(f"$DMSGPTY_SK: {e}") from None
    if getattr(args, "visor_key", False):
        path = getattr(args, "visor_config", None)
        if path:
            return _read_visor_sk(path)
        for p in DEFAULT_VISOR_CONFIGS:
            if os.path.isfile(p):
                return _read_visor_sk(p)
    pk, sk = generate_keypair()
    sys.stderr.write(f"{verb}: no --sk, $DMSGPTY_SK or node key: using a fresh random key {pk.hex()}"
                     " (no whitelist knows it)\n")
    return sk


# ---------------------------------------------------------------------------------- results

def exit_code_for(res: dict) -> int:
    if res.get("TimedOut"):
        return EXIT_TIMEOUT
    code = int(res.get("ExitCode") or 0)
    if code < 0:
        return EXIT_REMOTE_FAILED
    return code & 0xFF if code > 255 else code


def _text_or_b64(b: bytes) -> Tuple[str, str]:
    import base64

    try:
        return b.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(b).decode("ascii"), "base64"


def result_json(res: dict) -> str:
    import json

    out, out_enc = _text_or_b64(res["Stdout"])
    err, err_enc = _text_or_b64(res["Stderr"])
    return json.dumps({
        "stdout": out, "stdout_encoding": out_enc, "stderr": err, "stderr_encoding": err_enc,
        "exit_code": int(res["ExitCode"]), "timed_out": bool(res["TimedOut"]),
        "stdout_truncated": bool(res["StdoutTruncated"]), "stderr_truncated": bool(res["StderrTruncated"]),
        "duration_ms": int(res["DurationMS"]),
    })


def _write_all(stream, data: bytes) -> None:
    if data:
        stream.write(data)
        stream.flush()


def _emit_result(res: dict, as_json: bool, timeout_ms: int) -> int:
    if as_json:
        sys.stdout.write(result_json(res) + "\n")
        sys.stdout.flush()
    else:
        _write_all(sys.stdout.buffer, res["Stdout"])
        _write_all(sys.stderr.buffer, res["Stderr"])
    for name in ("stdout", "stderr"):
        if res[name.capitalize() + "Truncated"]:
            sys.stderr.write(f"[{name} truncated at 16MiB]\n")
    if res["TimedOut"]:
        sys.stderr.write(f"[timed out after {timeout_ms}ms]\n")
    return exit_code_for(res)


def _parse_env(items: Iterable[str]) -> List[str]:
    out = []
    for item in items or ():
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UsageError(f"-e/--env wants KEY=VALUE, got {item!r}")
        out.append(item)
    return out


def _timeout_ms(seconds: float) -> int:
    if seconds <= 0:
        raise UsageError("--timeout must be positive")
    return max(1, int(round(seconds * 1000)))


# ---------------------------------------------------------------------------------- verbs

_STREAM_NAMES = ("exec_stream_tcp", "node_exec", "_HTTPReader", "_read_headers", "_body_chunks", "_Sink",
                 "_capped", "_read_frames")


def __getattr__(name: str):
    if name in _STREAM_NAMES:   # they live in client_stream.py, loaded only when used
        from . import client_stream

        return getattr(client_stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_exec_tcp(dest: Dest, sk: SecKey, command: List[str], env: List[str], timeout_ms: int,
                  stream: bool, as_json: bool, verb: str) -> int:
    name, argv = command[0], command[1:]
    if stream:
        from .client_stream import exec_stream_tcp

        res = exec_stream_tcp(dest, sk, name, argv, env, timeout_ms, keep=as_json)
        if res is not None:
            return _emit_result(res, as_json, timeout_ms) if as_json else _finish_stream(res, timeout_ms)
        sys.stderr.write(f"{verb}: the host has no exec-stream subsystem (older binary?): using buffered exec\n")
    client = open_pty_tcp(dest.host, dest.port, dest.pk, sk)
    try:
        res = client.exec(name, argv, env, timeout_ms=timeout_ms)
    finally:
        client.close()
    # the host clamps a buffered exec to 5 min: report the deadline that really applied
    return _emit_result(res, as_json, min(timeout_ms, limits.EXEC_MAX_TIMEOUT_MS))


def _finish_stream(res: dict, timeout_ms: int) -> int:
    if res["TimedOut"]:
        sys.stderr.write(f"[timed out after {timeout_ms}ms]\n")
    return exit_code_for(res)


def _interactive_env() -> List[str]:
    from .terminal import interactive_env

    return interactive_env()


def _read_stdin_script() -> bytes:
    data = bytearray()
    while len(data) <= limits.EXEC_STDIN_MAX:
        part = os.read(0, 65536)
        if not part:
            return bytes(data)
        data += part
    raise UsageError(f"standard input is not a terminal and holds more than {limits.EXEC_STDIN_MAX} bytes;"
                     " pass a command (after --) instead")


def _stdin_is_tty() -> bool:
    try:
        return os.isatty(0)
    except (OSError, ValueError):
        return False


def _interactive_opener(args):
    """pty-stream for a terminal session unless told otherwise; a piped script needs Exec (rpc)."""
    if _stdin_is_tty() and not getattr(args, "no_pty_stream", False):
        return open_interactive_tcp
    return open_pty_tcp


def _run_interactive(client: PtyClient, timeout_ms: int = limits.EXEC_DEFAULT_TIMEOUT_MS) -> int:
    """A shell in a remote pty wired to our terminal. When our stdin is not a terminal, do what
    ssh does: no pty; the shell reads its commands from our stdin (<= 1 MiB) and exits at its end
    (a pty shell would race its startup against the ^D that ends a piped script)."""
    from .terminal import run_interactive

    if not _stdin_is_tty():
        script = _read_stdin_script()
        res = client.exec(DEFAULT_CMD, [], env=_interactive_env(), stdin=script, timeout_ms=timeout_ms)
        return _emit_result(res, False, min(timeout_ms, limits.EXEC_MAX_TIMEOUT_MS))
    return run_interactive(client, DEFAULT_CMD, [], _interactive_env())


def cmd_shell(args) -> int:
    """`cli pty shell <pk>@host[:port] [-- cmd…]`: interactive, or exec when a command is given."""
    if getattr(args, "standalone", False):
        raise UsageError("--standalone needs the dmsg client; use <pk>@host[:port] over TCP")
    dest = parse_dest(args.dest, default_port=args.port)
    if not dest.is_tcp:
        raise UsageError(f"pty shell wants <pk>@host[:port]; for {args.dest} over dmsg use `cli pty start`")
    command = list(args.command or [])
    env = _parse_env(args.env)
    if args.no_pty and not command:
        raise UsageError("--no-pty needs a command (after --)")
    timeout_ms = _timeout_ms(args.timeout)
    sk = resolve_identity(args, "pty shell")
    if command:
        return _run_exec_tcp(dest, sk, command, env, timeout_ms, args.stream, args.json, "pty shell")
    if args.json or args.stream:
        raise UsageError("--json and --stream apply to a command (after --)")
    client = _interactive_opener(args)(dest.host, dest.port, dest.pk, sk)
    try:
        return _run_interactive(client, timeout_ms)
    finally:
        client.close()


def _target_and_via(args, default_port: int) -> Tuple[Optional[Dest], Optional[Dest]]:
    target = parse_dest(args.target, default_port=default_port) if args.target else None
    if target is not None and target.is_tcp:
        # -p is the dmsg port (22); a tcp:// target without a port means the TCP default
        target = parse_dest(args.target, default_port=limits.DEFAULT_TCP_PORT)
    via = parse_via(args.via) if args.via else None
    if via is not None and target is not None:
        if target.is_tcp:
            raise UsageError("give either tcp://<pk>@host:port or <pk> --via tcp://…, not both")
        if target.pk != via.pk:
            raise UsageError(f"--via {via} names a different key than the target {target.pk.hex()}")
    return target, via


def cmd_exec(args) -> int:
    """`cli pty exec <target> -- cmd…` (tcp://, --via, or through the node RPC)."""
    command = list(args.command or [])
    if not command or not command[0]:
        raise UsageError("missing command (cli pty exec <target> -- cmd args…)")
    target, via = _target_and_via(args, args.port)
    env = _parse_env(args.env)
    timeout_ms = _timeout_ms(args.timeout)
    tcp = via or (target if target is not None and target.is_tcp else None)
    if tcp is not None:
        if args.transport not in ("auto", "tcp"):
            raise UsageError(f"--transport {args.transport} conflicts with a tcp:// destination")
        sk = resolve_identity(args, "pty exec")
        return _run_exec_tcp(tcp, sk, command, env, timeout_ms, args.stream, args.json, "pty exec")
    if args.transport == "tcp":
        raise UsageError("--transport tcp needs tcp://<pk>@host:port or --via tcp://…")
    if args.standalone:
        if target.scheme == "skynet" or args.transport == "skynet":
            raise UsageError("--standalone speaks dmsg only (no skynet without a node)")
        if args.stream:
            raise UsageError("--stream needs a direct tcp:// destination")
        sk = resolve_identity(args, "pty exec")
        client = open_pty_standalone(target.pk, target.port, sk, getattr(args, "dmsgdisc", None))
        try:
            res = client.exec(command[0], command[1:], env, timeout_ms=timeout_ms)
        finally:
            client.close()
        return _emit_result(res, args.json, min(timeout_ms, limits.EXEC_MAX_TIMEOUT_MS))
    if args.stream:
        raise UsageError("--stream needs a direct tcp:// destination (the node RPC is buffered)")
    scheme = args.scheme or target.scheme or ("" if args.transport == "auto" else args.transport)
    from .client_stream import node_exec

    res = node_exec(args.rpc, target, scheme, command[0], command[1:], env, timeout_ms)
    return _emit_result(res, args.json, min(timeout_ms, limits.EXEC_MAX_TIMEOUT_MS))


def cmd_start(args) -> int:
    """`cli pty start [<pk>]`: an interactive shell over --via tcp://…, an ephemeral dmsg client
    (--standalone), or the local host's control socket (its dmsg proxy for a <pk>)."""
    target, via = _target_and_via(args, args.port)
    tcp = via or (target if target is not None and target.is_tcp else None)
    if tcp is None and (args.transport == "skynet" or (target is not None and target.scheme == "skynet")):
        raise UsageError("pty start does not support skynet; use dmsg or --via tcp://…")
    if tcp is None and args.transport == "tcp":
        raise UsageError("--transport tcp needs --via tcp://<pk>@host:port")
    if tcp is not None:
        client = _interactive_opener(args)(tcp.host, tcp.port, tcp.pk, resolve_identity(args, "pty start"))
    elif args.standalone:
        if target is None:
            raise UsageError("--standalone needs a <pk> to dial")
        client = open_pty_standalone(target.pk, target.port, resolve_identity(args, "pty start"),
                                     getattr(args, "dmsgdisc", None))
    else:
        from .cli import default_cliaddr

        addr = args.cliaddr or default_cliaddr()
        uri = PTY_URI if target is None else f"{PROXY_URI}?pk={target.pk.hex()}&port={target.port}"
        client = open_pty_control("unix", addr, uri)
    try:
        return _run_interactive(client)
    finally:
        client.close()
