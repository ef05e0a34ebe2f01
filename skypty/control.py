"""Clients of a host's local control socket (pty.md §7.1, §10.4): `app pty exec …`.

- `app pty exec`                       interactive local shell (or remote via --addr <pk>[:port],
                                       which the host proxies: URI dmsgpty/proxy?pk=…&port=…)
- `app pty exec exec -- cmd …`         one command; the exit code mirrors the remote (124 timeout)
- `app pty exec whitelist[-add|-remove]`  the host's whitelist (URI dmsgpty/whitelist)

The control address is, per key: --clinet/--cliaddr > $DMSGPTY_CLINET/$DMSGPTY_CLIADDR >
the config given with -p/--confpath > unix $TMPDIR/pty.sock. The socket is the only
authentication (its 0600 mode), so no keys are involved here.
"""
from __future__ import annotations

import os
import sys
from typing import Any, List, Tuple

from skypty.errors import ProtocolError, UsageError
from skypty.limits import DEFAULT_DMSG_PORT

__all__ = ["cmd_local_shell", "cmd_local_exec", "cmd_whitelist", "cmd_whitelist_add", "cmd_whitelist_remove",
           "control_address", "proxy_uri", "WHITELIST_URI", "PTY_URI", "PROXY_URI"]

PTY_URI = "dmsgpty/pty"
PROXY_URI = "dmsgpty/proxy"
WHITELIST_URI = "dmsgpty/whitelist"
_ENV_PREFIX = "DMSGPTY"
_CALL_TIMEOUT = 30.0


def control_address(args: Any) -> Tuple[str, str]:
    """(net, addr) of the control socket for a client verb."""
    net = getattr(args, "clinet", None) or os.environ.get(f"{_ENV_PREFIX}_CLINET") or None
    addr = getattr(args, "cliaddr", None) or os.environ.get(f"{_ENV_PREFIX}_CLIADDR") or None
    confpath = getattr(args, "confpath", None)
    if confpath and (net is None or addr is None):
        from skypty.config import read_document

        doc, _ = read_document(confpath)
        if net is None and doc.get("clinet"):
            net = str(doc["clinet"])
        if addr is None and doc.get("cliaddr"):
            addr = str(doc["cliaddr"])
    if net is None:
        net = "unix"
    if addr is None:
        from skypty.cli import default_cliaddr

        addr = default_cliaddr()
    if net not in ("unix", "tcp", "tcp4", "tcp6"):
        raise UsageError(f"--clinet {net!r}: use unix or tcp")
    return net, addr


def proxy_uri(text: str) -> str:
    """`<pk>[:<port>]` (port default 22) -> the host's proxy URI."""
    from skypty.keys import PubKey

    pk_text, sep, port_text = text.strip().partition(":")
    try:
        pk = PubKey.from_hex(pk_text)
    except UsageError as e:
        raise UsageError(f"--addr: {e}") from None
    if pk.is_null():
        raise UsageError("--addr: the null key is not a host")
    port = DEFAULT_DMSG_PORT
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError(f"--addr {text!r}: bad port {port_text!r}")
        port = int(port_text)
    return f"{PROXY_URI}?pk={pk.hex()}&port={port}"


def _open_pty(args: Any):
    from skypty.client import open_pty_control

    net, addr = control_address(args)
    uri = proxy_uri(args.addr) if getattr(args, "addr", None) else PTY_URI
    return open_pty_control(net, addr, uri)


def cmd_local_shell(args: Any) -> int:
    """`app pty exec [--addr pk[:port]] [-c cmd] [-a arg…]`: interactive shell through the host."""
    from skypty.terminal import interactive_env, run_interactive

    client = _open_pty(args)
    try:
        return run_interactive(client, args.cmd or "/bin/bash", list(args.args or []), interactive_env())
    finally:
        client.close()


def _parse_env(items: List[str]) -> List[str]:
    for item in items or ():
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UsageError(f"-e/--env wants KEY=VALUE, got {item!r}")
    return list(items or ())


def _write(stream, data: bytes) -> None:
    if data:
        stream.write(data)
        stream.flush()


def cmd_local_exec(args: Any) -> int:
    """`app pty exec exec [-t 30s] [-e K=V] -- cmd args…`: one command, exit code mirrored."""
    from skypty.client import exit_code_for

    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or not command[0]:
        raise UsageError("missing command (app pty exec exec -- cmd args…)")
    env = _parse_env(args.env)
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    timeout_ms = max(1, int(round(args.timeout * 1000)))
    client = _open_pty(args)
    try:
        res = client.exec(command[0], command[1:], env=env, timeout_ms=timeout_ms)
    finally:
        client.close()
    _write(sys.stdout.buffer, res.get("Stdout") or b"")
    _write(sys.stderr.buffer, res.get("Stderr") or b"")
    for name in ("stdout", "stderr"):
        if res.get(name.capitalize() + "Truncated"):
            sys.stderr.write(f"[{name} truncated at 16MiB]\n")
    if res.get("TimedOut"):
        sys.stderr.write(f"[timed out after {timeout_ms}ms]\n")
    return exit_code_for(res)


# ---------------------------------------------------------------- whitelist

def _whitelist_call(args: Any, method: str, pks):
    """One call of the `whitelist` service on a fresh control connection."""
    net, addr = control_address(args)   # first: a bad -p config is exit 2 before anything else
    from skypty import gob, gobtypes, mux, rpc
    from skypty.transport.unixsock import dial_control

    sock = dial_control(net, addr)
    try:
        # A local host answers at once: bounded waits so a wedged host never hangs a script.
        try:
            mux.request(sock, WHITELIST_URI, timeout=_CALL_TIMEOUT)
        except ProtocolError as e:   # say which socket failed, not just "Broken pipe"
            raise ProtocolError(f"control socket {addr}: {e}") from None
        client = rpc.RPCClient(sock)
        try:
            if method == "Whitelist":
                return client.call("whitelist.Whitelist", gob.EMPTY, {}, gobtypes.PubKeyList,
                                   timeout=_CALL_TIMEOUT)
            client.call("whitelist." + method, gobtypes.PubKeyList, [bytes(pk) for pk in pks], gob.EMPTY,
                        timeout=_CALL_TIMEOUT)
            return None
        finally:
            client.close()
    finally:
        sock.close()


def _parse_pks(items: List[str]):
    from skypty.config import parse_pk_list

    pks = parse_pk_list(items, "pk")
    if not pks:
        raise UsageError("no public keys given")
    return pks


def cmd_whitelist(args: Any) -> int:
    """`app pty exec whitelist`: one PK per line, in the host's order."""
    from skypty.keys import PubKey

    reply = _whitelist_call(args, "Whitelist", ())
    out = "".join(PubKey(bytes(pk)).hex() + "\n" for pk in (reply or []))
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


def cmd_whitelist_add(args: Any) -> int:
    _whitelist_call(args, "WhitelistAdd", _parse_pks(args.pks))
    return 0


def cmd_whitelist_remove(args: Any) -> int:
    _whitelist_call(args, "WhitelistRemove", _parse_pks(args.pks))
    return 0
