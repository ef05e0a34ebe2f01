"""The command tree: `skypty cli pty …`, `skypty app pty …`, hidden `skypty dmsg pty …`.

Every verb is a thin call into a layer. Handlers are named as "module:function" strings and
imported only when their verb runs, so `cli pty exec` never imports FUSE, paramiko, yaml or
the web server (cold start is a budget, see bench/).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Callable, List, Optional, Sequence

from skypty import __version__, logs
from skypty.errors import EXIT_INTERRUPTED, EXIT_USAGE, SkyptyError, UsageError
from skypty.limits import DEFAULT_DMSG_PORT, DEFAULT_TCP_PORT

# a pattern, not a compiled regex: re compiles it when a duration is first given (cold start)
_DURATION_RE = r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)"
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go-style duration ("30s", "1m30s", "250ms", bare seconds) into seconds."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    pos, total = 0, 0.0
    for m in re.finditer(_DURATION_RE, s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (try 30s, 1m, 500ms)")
    return total


def default_cliaddr() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), "pty.sock")


# Building the tree is on every command's cold start. argparse looks up each of its messages
# with gettext in the default "messages" domain, for which no system ships a catalogue: the
# answer is always the message itself, but the first lookup imports `locale` and every one
# searches the locale directories (together ~4 ms of a one-shot exec). Answer it directly.
# argparse also sizes the terminal for every argument: _Formatter remembers that.
argparse._ = str
argparse.ngettext = lambda singular, plural, n: singular if n == 1 else plural


class _Formatter(argparse.HelpFormatter):
    _width: Optional[int] = None

    def __init__(self, prog: str, **kw) -> None:
        if kw.get("width") is None:
            if _Formatter._width is None:   # as shutil.get_terminal_size, without importing shutil
                try:
                    cols = int(os.environ.get("COLUMNS", "0"))
                except ValueError:
                    cols = 0
                if cols <= 0:
                    try:
                        cols = os.get_terminal_size(sys.__stdout__.fileno()).columns
                    except (AttributeError, ValueError, OSError):
                        cols = 0
                _Formatter._width = (cols or 80) - 2
            kw["width"] = _Formatter._width
        super().__init__(prog, **kw)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit 2."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def _handler(p: argparse.ArgumentParser, target: str, verb: str, one_shot: bool = False) -> None:
    """The verb's function; one_shot marks a client verb that is all done when it returns."""
    p.set_defaults(_target=target, _verb=verb, _one_shot=one_shot)


def _subparsers(p: argparse.ArgumentParser, hidden: tuple = ()) -> "_HidingSubparsers":
    return _HidingSubparsers(p.add_subparsers(dest="_sub_" + p.prog.replace(" ", "_")), hidden)


class _HidingSubparsers:
    """Sub-command group whose hidden members work but never show in help."""

    def __init__(self, action, hidden: tuple):
        self._action = action
        self._hidden = set(hidden)
        self._visible: List[str] = []

    def add(self, name: str, help: Optional[str] = None, **kw) -> argparse.ArgumentParser:
        hidden = name in self._hidden
        if hidden:
            p = self._action.add_parser(name, **kw)
            self._action._choices_actions = [a for a in self._action._choices_actions if a.dest != name]
        else:
            p = self._action.add_parser(name, help=help, **kw)
            self._visible.append(name)
        self._action.metavar = "{" + ",".join(self._visible) + "}"
        return p


def _log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "warning", "error"],
                   help="logging level on stderr (default info)")


def _identity_flags(p: argparse.ArgumentParser, visor_key_default: bool) -> None:
    p.add_argument("-s", "--sk", help="client secret key (hex); default $DMSGPTY_SK, then the node's key, then a random key")
    p.add_argument("--visor-key", dest="visor_key", action="store_true", default=visor_key_default,
                   help="borrow the local node's key from skywire-config.json when no --sk is given")
    p.add_argument("--no-visor-key", dest="visor_key", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--visor-config", help="path of the node's skywire-config.json (for --visor-key)")


def _host_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the standalone host (modes 2 and 3): `app pty dmsg`, `app pty tcp`, `dmsg pty host`."""
    p.add_argument("-c", "--confpath", default="./config.json", help="host config, YAML or JSON (default ./config.json)")
    p.add_argument("--wl", action="append", default=[], help="extra whitelisted client PKs (comma separated, repeatable)")
    p.add_argument("--dmsgdisc", help="dmsg discovery URL")
    p.add_argument("--dmsgsessions", type=int, help="dmsg sessions to keep (default 1)")
    p.add_argument("--dmsgport", type=int, help=f"dmsg port to listen on (default {DEFAULT_DMSG_PORT})")
    p.add_argument("--clinet", help="control socket network: unix or tcp (default unix)")
    p.add_argument("--cliaddr", help="control socket address (default $TMPDIR/pty.sock)")
    p.add_argument("--tcplisten", "--ssh-listen", dest="tcplisten", help="also serve noise-XK over TCP on this address, e.g. :2022")
    p.add_argument("--no-dmsg", action="store_true", help="do not join dmsg (TCP and control socket only)")
    p.add_argument("--sk-from-visor", nargs="?", const="", default=None, metavar="PATH",
                   help="use the node's secret key from its skywire-config.json (requires --no-dmsg)")
    p.add_argument("--listen-fd", type=int, default=-1, help="serve one already-accepted connection on this fd and exit (systemd Accept=yes)")
    p.add_argument("--envprefix", default="DMSGPTY", help="prefix of environment overrides (default DMSGPTY)")
    p.add_argument("--confstdin", action="store_true", help="read the config from standard input")
    p.add_argument("--unsafe", action="store_true", help="allow a non-loopback tcp control address")
    p.add_argument("--sftp-root", help="confine the SFTP subsystem to this directory")
    p.add_argument("--sftp-readonly", action="store_true", help="serve SFTP read-only")
    p.add_argument("--require-pq", action="store_true", help="refuse handshakes without the ML-KEM-768 hybrid")
    _preauth_flags(p)
    _log_level(p)


def _preauth_flags(p: argparse.ArgumentParser) -> None:
    """Hidden knobs of the TCP listener's pre-auth caps (tests use small values)."""
    p.add_argument("--max-unauth", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-unauth-per-source", type=int, default=None, help=argparse.SUPPRESS)


Want = Callable[[argparse.ArgumentParser], bool]


def _leaf(sub: _HidingSubparsers, name: str, help: str, flags: Callable[[argparse.ArgumentParser], None],
          want: Want) -> argparse.ArgumentParser:
    """A verb whose flags are only added when the command line is headed its way."""
    p = sub.add(name, help=help)
    if want(p):
        flags(p)
    return p


def _confgen(sub: _HidingSubparsers, verb: str, want: Want) -> None:
    def flags(g: argparse.ArgumentParser) -> None:
        g.add_argument("path", nargs="?", default="./config.json")
        g.add_argument("--unsafe", "--force", dest="unsafe", action="store_true", help="overwrite an existing file")
        _handler(g, "skypty.config:cmd_confgen", verb + " confgen")
    _leaf(sub, "confgen", "write a fresh keypair config (0600)", flags, want)


def _pty_cli_tree(p: argparse.ArgumentParser, verb: str, want: Want) -> None:
    """`app pty exec` / `dmsg pty cli`: clients of the local control socket."""
    if not want(p):
        return

    # The flags work before the sub-verb too (`app pty exec --cliaddr S whitelist-add PK`, as
    # the host's own hint prints it). argparse copies every dest of a sub-verb's namespace over
    # the parent's, so there the shared flags have no default: an absent one must not erase a
    # value given to the parent (which would dial the default socket: another host, maybe).
    def common(q: argparse.ArgumentParser, default=None) -> None:
        q.add_argument("-n", "--clinet", default=default, help="control socket network (default unix)")
        q.add_argument("-r", "--cliaddr", default=default, help="control socket address (default $TMPDIR/pty.sock)")
        q.add_argument("-p", "--confpath", default=default, help="host config to read clinet/cliaddr from")

    def addr(q: argparse.ArgumentParser, default=None) -> None:
        q.add_argument("--addr", default=default, help="remote host <pk>[:<port>] reached through the host's dmsg proxy")

    common(p)
    addr(p)
    p.add_argument("-c", "--cmd", default="/bin/bash", help="command to run (default /bin/bash)")
    p.add_argument("-a", "--args", action="append", default=[], help="command arguments (repeatable)")
    _handler(p, "skypty.control:cmd_local_shell", verb, one_shot=True)
    sub = _subparsers(p)

    def exec_flags(e: argparse.ArgumentParser) -> None:
        common(e, argparse.SUPPRESS)
        addr(e, argparse.SUPPRESS)
        e.add_argument("-t", "--timeout", type=parse_duration, default=30.0, help="timeout (default 30s)")
        e.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE for the command (repeatable)")
        e.add_argument("command", nargs=argparse.REMAINDER)
        _handler(e, "skypty.control:cmd_local_exec", verb + " exec", one_shot=True)
    _leaf(sub, "exec", "run one command through the control socket", exec_flags, want)

    def whitelist_flags(name: str, target: str) -> Callable[[argparse.ArgumentParser], None]:
        def flags(w: argparse.ArgumentParser) -> None:
            common(w, argparse.SUPPRESS)
            if name != "whitelist":
                w.add_argument("pks", nargs="+", metavar="pk")
            _handler(w, "skypty.control:" + target, verb + " " + name, one_shot=True)
        return flags
    for name, target, hlp in (("whitelist", "cmd_whitelist", "print the whitelist"),
                              ("whitelist-add", "cmd_whitelist_add", "add client PKs"),
                              ("whitelist-remove", "cmd_whitelist_remove", "remove client PKs")):
        _leaf(sub, name, hlp, whitelist_flags(name, target), want)


def _http_flags(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--hnet", default="unix", help="network of the host's control socket (default unix)")
    p.add_argument("--haddr", default=None, help="address of the host's control socket (default $TMPDIR/pty.sock)")
    p.add_argument("--addr", default="127.0.0.1:8080", help="address to serve the page on (default 127.0.0.1:8080)")
    p.add_argument("--cmd", default="/bin/bash", help="command the terminal runs (default /bin/bash)")
    p.add_argument("--arg", action="append", default=[], help="argument for --cmd (repeatable)")
    p.add_argument("--allow-url-commands", action="store_true", help="honour ?commands= in the page URL")
    _log_level(p)
    _handler(p, "skypty.web:cmd_http", verb)


def _exec_flags(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("target", help="<pk>, dmsg://<pk> or tcp://<pk>@host:port")
    ex.add_argument("command", nargs="*", help="command and arguments (after --)")
    ex.add_argument("--rpc", default="localhost:3435", help="node RPC address (default localhost:3435)")
    ex.add_argument("-p", "--port", type=int, default=DEFAULT_DMSG_PORT, help="remote pty port (default 22)")
    ex.add_argument("-t", "--timeout", type=parse_duration, default=30.0, help="remote timeout (default 30s)")
    ex.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE for the command (repeatable)")
    ex.add_argument("--via", help="reach <pk> over tcp://<pk>@host:port")
    ex.add_argument("--transport", default="auto", choices=["auto", "dmsg", "skynet", "tcp"])
    ex.add_argument("--standalone", action="store_true", help="use an ephemeral dmsg client instead of the node")
    ex.add_argument("--stream", action="store_true", help="stream output live (exec-stream), no 16 MiB cap")
    ex.add_argument("--json", action="store_true", help="print one JSON object with the result")
    ex.add_argument("--dmsgdisc", help="dmsg discovery URL (with --standalone)")
    ex.add_argument("--scheme", help=argparse.SUPPRESS)
    ex.add_argument("--via-visor", action="store_true", help=argparse.SUPPRESS)
    _identity_flags(ex, visor_key_default=False)
    _handler(ex, "skypty.client:cmd_exec", "pty exec", one_shot=True)


def _start_flags(st: argparse.ArgumentParser) -> None:
    st.add_argument("target", nargs="?", help="<pk>, dmsg://<pk> or tcp://<pk>@host:port")
    st.add_argument("--rpc", default="localhost:3435", help="node RPC address (default localhost:3435)")
    st.add_argument("-p", "--port", type=int, default=DEFAULT_DMSG_PORT, help="remote pty port (default 22)")
    st.add_argument("--via", help="reach <pk> over tcp://<pk>@host:port")
    st.add_argument("--transport", default="auto", choices=["auto", "dmsg", "skynet", "tcp"])
    st.add_argument("--standalone", action="store_true", help="use an ephemeral dmsg client instead of the node")
    st.add_argument("--cliaddr", help="local control socket used for the dmsg proxy")
    st.add_argument("--dmsgdisc", help="dmsg discovery URL (with --standalone)")
    st.add_argument("--via-visor", action="store_true", help=argparse.SUPPRESS)
    st.add_argument("--no-pty-stream", action="store_true",
                    help="interactive: speak the Go pty protocol (dmsgpty/pty calls) to a skypty host too")
    _identity_flags(st, visor_key_default=False)
    _handler(st, "skypty.client:cmd_start", "pty start", one_shot=True)


def _shell_flags(sh: argparse.ArgumentParser) -> None:
    sh.add_argument("dest", help="<pk>@host[:port] (default port 2022)")
    sh.add_argument("command", nargs="*", help="run this instead of an interactive shell (after --)")
    sh.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE (repeatable)")
    sh.add_argument("-t", "--timeout", type=parse_duration, default=30.0, help="exec timeout (default 30s)")
    sh.add_argument("--no-pty", action="store_true", help="never allocate a pty (exec mode)")
    sh.add_argument("-p", "--port", type=int, default=DEFAULT_TCP_PORT, help="port when the destination has none (2022)")
    sh.add_argument("--transport", default="auto", choices=["auto", "tcp"])
    sh.add_argument("--standalone", action="store_true", help=argparse.SUPPRESS)
    sh.add_argument("--stream", action="store_true", help="stream exec output live (exec-stream)")
    sh.add_argument("--json", action="store_true", help="print one JSON object with the exec result")
    sh.add_argument("--no-pty-stream", action="store_true",
                    help="interactive: speak the Go pty protocol (dmsgpty/pty calls) to a skypty host too")
    _identity_flags(sh, visor_key_default=True)
    _handler(sh, "skypty.client:cmd_shell", "pty shell", one_shot=True)


def _mount_flags(mo: argparse.ArgumentParser) -> None:
    mo.add_argument("dest", help="<pk>@host[:port] or <pk>")
    mo.add_argument("mountpoint")
    mo.add_argument("-p", "--port", type=int, default=DEFAULT_TCP_PORT, help="port when the destination has none (2022)")
    mo.add_argument("--transport", default="auto", choices=["auto", "dmsg", "tcp"])
    _identity_flags(mo, visor_key_default=True)
    mo.add_argument("--standalone", action="store_true", help="use an ephemeral dmsg client")
    mo.add_argument("--dmsgdisc", help="dmsg discovery URL (with --standalone)")
    mo.add_argument("--ro", action="store_true", help="mount read-only")
    mo.add_argument("--debug", action="store_true", help="FUSE debug output")
    mo.add_argument("--attr-ttl", type=parse_duration, default=1.0, help="attribute cache TTL (default 1s)")
    mo.add_argument("--entry-ttl", type=parse_duration, default=1.0, help="entry cache TTL (default 1s)")
    mo.add_argument("--remote-root", default="/", help="remote directory to mount (default /)")
    _handler(mo, "skypty.fs:cmd_mount", "pty fs mount")


def _umount_flags(um: argparse.ArgumentParser) -> None:
    um.add_argument("mountpoint")
    um.add_argument("-z", "--lazy", action="store_true", help="detach now even if busy (cleaned up when no longer in use)")
    _handler(um, "skypty.fs:cmd_umount", "pty fs umount")


def _cli_host_flags(ho: argparse.ArgumentParser) -> None:
    ho.add_argument("-l", "--listen", default=f":{DEFAULT_TCP_PORT}", help="listen address (default :2022)")
    ho.add_argument("--allow", action="append", default=[], help="whitelisted client PKs, comma separated (repeatable)")
    ho.add_argument("-c", "--conf", help="standalone host config to take sk and wl from")
    ho.add_argument("--sk-from-visor", nargs="?", const="", default=None, metavar="PATH",
                    help="use the node's secret key (default path of skywire-config.json)")
    ho.add_argument("--sftp-root", help="confine the SFTP subsystem to this directory")
    ho.add_argument("--sftp-readonly", action="store_true", help="serve SFTP read-only")
    ho.add_argument("--require-pq", action="store_true", help="refuse handshakes without the ML-KEM-768 hybrid")
    _preauth_flags(ho)
    _log_level(ho)
    _handler(ho, "skypty.host:cmd_cli_host", "pty host")


def _app_tcp_flags(at: argparse.ArgumentParser) -> None:
    _host_flags(at)
    at.add_argument("--addr", default=f":{DEFAULT_TCP_PORT}", help="TCP listen address (default :2022)")
    _handler(at, "skypty.host:cmd_app_tcp", "pty tcp")


def _dmsg_server_flags(ds: argparse.ArgumentParser) -> None:
    ds.add_argument("-c", "--config", help="server config (sk, public address, discovery)")
    ds.add_argument("--sk", help="server secret key (hex); default: from --config or random")
    ds.add_argument("-l", "--listen", default=":8081", help="listen address (default :8081)")
    ds.add_argument("--public-address", help="address advertised in discovery (default the listen address)")
    ds.add_argument("--dmsgdisc", default="http://127.0.0.1:9090", help="discovery URL")
    ds.add_argument("--max-sessions", type=int, default=2048)
    _log_level(ds)
    _handler(ds, "skypty.transport.dmsg.server:cmd_server", "dmsg server")


def _dmsg_disc_flags(dd: argparse.ArgumentParser) -> None:
    dd.add_argument("-a", "--addr", default=":9090", help="listen address (default :9090)")
    dd.add_argument("--entry-ttl", type=parse_duration, default=120.0, help="entry expiry (default 2m)")
    _log_level(dd)
    _handler(dd, "skypty.transport.dmsg.disc:cmd_disc", "dmsg disc")


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The command tree. Given the command line, only the verb it names gets its flags: the
    others stay bare names with their help line, which is all that listing them or refusing
    a wrong one needs (building every verb's flags was 7 ms of each cold start)."""
    path = None if argv is None else tuple(argv)

    def want(p: argparse.ArgumentParser) -> bool:
        # p's words in order anywhere in argv: a verb's own flags may come before its sub-verb
        # (`app pty exec --cliaddr S whitelist-add PK`); building one verb too many is harmless
        if path is None:
            return True
        rest = iter(path)
        return all(any(tok == w for tok in rest) for w in p.prog.split()[1:])

    root = _Parser(prog="skypty", description="Skywire pty: remote shell, exec, fs and web terminal over Noise XK.")
    root.add_argument("--version", action="version", version=f"skypty {__version__}")
    top = _subparsers(root)

    # A group the command line does not name stays a bare name too: its whole subtree is
    # only built when it is headed for (23 parsers for the full tree, 10 for `cli pty exec`).
    # ---- skypty cli pty …
    cli = top.add("cli", help="client commands")
    if want(cli):
        _cli_tree(cli, want)
    # ---- skypty app pty …
    app = top.add("app", help="the pty app (host, web terminal, control-socket client)")
    if want(app):
        _app_tree(app, want)
    # ---- skypty dmsg … (hidden legacy aliases + private-network servers)
    dm = top.add("dmsg", help="dmsg tools")
    if want(dm):
        _dmsg_tree(dm, want)
    return root


def _cli_tree(cli: argparse.ArgumentParser, want: Want) -> None:
    pty = _subparsers(cli).add("pty", help="remote shell, exec, fs mount and the TCP host")
    if not want(pty):
        return
    ptys = _subparsers(pty)
    _leaf(ptys, "exec", "run one command on a remote host and mirror its exit code", _exec_flags, want)
    _leaf(ptys, "start", "interactive shell on a remote host (or a local one)", _start_flags, want)
    _leaf(ptys, "shell", "ssh-like: <pk>@host[:port] [-- cmd args…]", _shell_flags, want)
    fs = ptys.add("fs", help="mount a remote filesystem over the sftp subsystem (FUSE)")
    if want(fs):
        fss = _subparsers(fs)
        _leaf(fss, "mount", "mount <pk>@host[:port] on a local directory (foreground)", _mount_flags, want)
        _leaf(fss, "umount", "unmount a skypty mount", _umount_flags, want)
    _leaf(ptys, "host", "standalone TCP host (mode 3), like sshd", _cli_host_flags, want)


def _app_tree(app: argparse.ArgumentParser, want: Want) -> None:
    apty = _subparsers(app).add("pty", help="pty app commands")
    if not want(apty):
        return
    apps = _subparsers(apty)
    ad = _leaf(apps, "dmsg", "standalone host: dmsg (mode 2), optional TCP, control socket",
               lambda p: (_host_flags(p), _handler(p, "skypty.host:cmd_standalone_host", "pty host")), want)
    if want(ad):
        _confgen(_subparsers(ad), "app pty dmsg", want)
    _leaf(apps, "tcp", "standalone TCP host (mode 3) with control socket, no dmsg", _app_tcp_flags, want)
    _leaf(apps, "http", "browser terminal bridged to a host's control socket", lambda p: _http_flags(p, "pty http"), want)
    _pty_cli_tree(apps.add("exec", help="shell, exec and whitelist verbs over the local control socket"), "pty exec", want)


def _dmsg_tree(dm: argparse.ArgumentParser, want: Want) -> None:
    dms = _subparsers(dm, hidden=("pty",))
    dpty = dms.add("pty", help="legacy aliases")
    if want(dpty):
        dptys = _subparsers(dpty)
        dh = _leaf(dptys, "host", "standalone host",
                   lambda p: (_host_flags(p), _handler(p, "skypty.host:cmd_standalone_host", "dmsg pty host")), want)
        if want(dh):
            _confgen(_subparsers(dh), "dmsg pty host", want)
        _pty_cli_tree(dptys.add("cli", help="control-socket client"), "dmsg pty cli", want)
        _leaf(dptys, "ui", "browser terminal", lambda p: _http_flags(p, "dmsg pty ui"), want)
    _leaf(dms, "server", "a small dmsg server for private networks and tests", _dmsg_server_flags, want)
    _leaf(dms, "disc", "a small in-memory dmsg discovery", _dmsg_disc_flags, want)


def resolve(target: str) -> Callable[[argparse.Namespace], int]:
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def main(argv: Optional[List[str]] = None, fast_exit: bool = False) -> int:
    """Run the command line; the exit code. With fast_exit (the entry points), a one-shot
    client verb ends the process itself once its output is flushed: the interpreter's
    teardown (unloading every module) was ~10 % of a `cli pty exec` (bench/)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    # Flags may follow the destination (`shell <dest> --sk K -- cmd -x`): parse what is before
    # the first `--` and hand everything after it to the verb's command untouched.
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
    args = parser.parse_args(head)
    if tail is not None:
        if hasattr(args, "command"):
            args.command = list(args.command or []) + tail
        else:
            args = parser.parse_args(argv)
    target = getattr(args, "_target", None)
    if target is None:
        # a group with no verb of its own: show its help
        parser.parse_args(head + ["--help"])
        return EXIT_USAGE
    code = _run_verb(args, target)
    # a profiler or tracer (cProfile, coverage) writes its results at the normal exit
    if fast_exit and getattr(args, "_one_shot", False) and sys.getprofile() is None and sys.gettrace() is None:
        _leave(code)
    return code


def _run_verb(args: argparse.Namespace, target: str) -> int:
    if getattr(args, "_one_shot", False):   # a client prints results, not progress
        logs.setup(getattr(args, "log_level", None) or "warning", now=False)
    else:
        logs.setup(getattr(args, "log_level", None))
    verb = args._verb
    try:
        handler = resolve(target)
    except (ImportError, AttributeError) as e:
        # a build that left a layer out (a trimmed zipapp, a missing optional library)
        if getattr(args, "log_level", None) == "debug" or os.environ.get("SKYPTY_DEBUG"):
            raise
        sys.stderr.write(f"{verb}: not available in this build ({e})\n")
        return EXIT_USAGE
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"{verb}: interrupted\n")
        return EXIT_INTERRUPTED
    except SkyptyError as e:
        sys.stderr.write(f"{verb}: {e}\n")
        return e.exit_code
    except BrokenPipeError:
        return 0
    except OSError as e:
        if os.environ.get("SKYPTY_DEBUG"):
            raise
        sys.stderr.write(f"{verb}: {e.strerror or e}\n")
        return 1


def _leave(code: int) -> None:
    """Exit now, skipping the interpreter's teardown: only for a client verb that is done (no
    server, no mount, no thread with work left; its daemon threads die either way)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass   # the reader went away: as main() treats it
        except (OSError, ValueError):
            code = code or 1   # output that could not be written is a failure
    os._exit(code)


def run() -> int:
    """The entry points: main() that may end a one-shot client verb early (see main)."""
    return main(fast_exit=True)


__all__ = ["main", "run", "build_parser", "parse_duration", "default_cliaddr", "UsageError"]
