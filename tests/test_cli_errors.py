"""Bad input at every verb: one clear line on stderr, the right exit class, nothing left running.

The project rule: every bad input (malformed key, bad destination, garbage on a socket,
oversized frame, unknown peer) gets a one-line error prefixed with the verb, exit 2 for usage
errors, 1 for transport/RPC failures, and no process survives the failed command.

Every case is a real `python skypty.py …` subprocess. The cases run in parallel threads (one
module fixture runs the selected ones and the parametrized test checks each result), against
real listeners on 127.0.0.1: fake servers that send garbage, an oversized frame, a bad
handshake message or just hang up; a real `cli pty host` that does not whitelist our key; a
port kept busy. Each subprocess carries a unique marker in its environment, so a leftover
(grand)child is found by scanning /proc after it exits.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional

import pytest

from conftest import SKYPTY, free_port, stop_process, wait_port
from skypty.keys import generate_keypair

# ------------------------------------------------------------------------------ keys

_PK_A, _SK_A = generate_keypair()       # our client identity (not whitelisted anywhere)
_PK_B, _SK_B = generate_keypair()       # the only key the real host allows
PK = _PK_A.hex()
SK = _SK_A.hex()
OTHER = _PK_B.hex()
BAD_PKS = {
    "short": PK[:-2],
    "long": PK + "00",
    "nonhex": "zz" + PK[2:],
    "offcurve": "02" + (5).to_bytes(32, "big").hex(),   # x=5: x^3+7 is not a square mod p
    "prefix": "05" + PK[2:],
    "null": "0" * 66,
}
BAD_SKS = {
    "short": "ab" * 31,
    "long": "ab" * 33,
    "nonhex": "g" * 64,
    "zero": "0" * 64,
    "order": "f" * 64,    # >= the group order n
}

EXIT_USAGE, EXIT_FAIL = 2, 1
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")

# --------------------------------------------------------------------------- the cases


class Case(NamedTuple):
    id: str
    argv: List[str]         # placeholders: {PK} {SK} {FREE} {GARBAGE} {BIGFRAME} {BADMSG} {CLOSE} {BUSY}
    code: int               # {HOST} {HOSTPK} {TMP} {CTLGARBAGE} {CTLCLOSE} {CTLMISSING} {DIR}
    prefix: str             # the line starts with prefix + ": " ("" : no prefix, e.g. a result line)
    must: str               # regex (case-insensitive) the line must contain
    env: Optional[Dict[str, str]] = None
    logs: bool = False      # a long-running verb may log before failing: ignore log lines
    xfail: Optional[str] = None
    timeout: float = 20.0
    extra: Optional[str] = None   # regex of one more line the verb may print first (a notice)


C: List[Case] = []


def case(*a, **kw) -> None:
    C.append(Case(*a, **kw))


# ---- cli pty shell
SH = ["cli", "pty", "shell"]
for name, bad in BAD_PKS.items():
    case(f"shell-pk-{name}", SH + [f"{bad}@127.0.0.1:{{FREE}}", "--sk", "{SK}", "--", "true"], EXIT_USAGE,
         "pty shell", "null key" if name == "null" else r"public key")
for name, bad in BAD_SKS.items():
    case(f"shell-sk-{name}", SH + ["{PK}@127.0.0.1:{FREE}", "--sk", bad, "--", "true"], EXIT_USAGE,
         "pty shell", r"--sk: invalid secret key")
    case(f"shell-envsk-{name}", SH + ["{PK}@127.0.0.1:{FREE}", "--", "true"], EXIT_USAGE,
         "pty shell", r"\$DMSGPTY_SK: invalid secret key", env={"DMSGPTY_SK": bad})
for name, dest, must in (
        ("no-at", "{PK}", r"wants <pk>@host"),
        ("port0", "{PK}@127.0.0.1:0", r"port 0 out of range"),
        ("port65536", "{PK}@127.0.0.1:65536", r"port 65536 out of range"),
        ("port-nan", "{PK}@127.0.0.1:ssh", r"invalid port 'ssh'"),
        ("port-empty", "{PK}@127.0.0.1:", r"empty port"),
        ("ipv6-bare", "{PK}@::1:2022", r"IPv6 addresses must be bracketed"),
        ("ipv6-bad", "{PK}@[::zz]:2022", r"invalid IPv6 address"),
        ("ipv6-unterminated", "{PK}@[::1:2022", r"unterminated"),
        ("empty-host", "{PK}@:2022", r"empty host"),
        ("bad-host", "{PK}@ho/st:2022", r"invalid host"),
        ("two-at", "{PK}@a@b:1", r"more than one '@'"),
        ("empty", "", r"empty destination"),
        ("scheme", "http://{PK}@127.0.0.1:1", r"unknown scheme"),
):
    case(f"shell-dest-{name}", SH + [dest, "--sk", "{SK}", "--", "true"], EXIT_USAGE, "pty shell", must)
case("shell-flag-port0", SH + ["{PK}@127.0.0.1", "-p", "0", "--sk", "{SK}", "--", "true"], EXIT_USAGE,
     "pty shell", r"port 0 out of range")
case("shell-flag-port-big", SH + ["{PK}@127.0.0.1", "-p", "70000", "--sk", "{SK}", "--", "true"], EXIT_USAGE,
     "pty shell", r"port 70000 out of range")
case("shell-duration-bad", SH + ["{PK}@127.0.0.1:{FREE}", "-t", "5x", "--", "true"], EXIT_USAGE,
     "skypty cli pty shell", r"invalid duration '5x'")
case("shell-duration-zero", SH + ["{PK}@127.0.0.1:{FREE}", "-t", "0s", "--sk", "{SK}", "--", "true"], EXIT_USAGE,
     "pty shell", r"--timeout must be positive")
case("shell-no-pty-no-cmd", SH + ["{PK}@127.0.0.1:{FREE}", "--no-pty", "--sk", "{SK}"], EXIT_USAGE,
     "pty shell", r"--no-pty needs a command")
case("shell-env-bad", SH + ["{PK}@127.0.0.1:{FREE}", "-e", "NOEQUALS", "--sk", "{SK}", "--", "true"], EXIT_USAGE,
     "pty shell", r"KEY=VALUE")
# argparse reports stray flags from the root parser: the prefix is "skypty", not the verb
case("shell-unknown-flag", SH + ["{PK}@127.0.0.1:{FREE}", "--bogus"], EXIT_USAGE,
     "skypty", r"unrecognized arguments: --bogus")
case("shell-missing-dest", SH, EXIT_USAGE, "skypty cli pty shell", r"required: dest")
case("shell-visor-config-missing", SH + ["{PK}@127.0.0.1:{FREE}", "--visor-config", "{TMP}/nope.json", "--", "true"],
     EXIT_USAGE, "pty shell", r"nope\.json")
case("shell-unreachable", SH + ["{PK}@127.0.0.1:{FREE}", "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty shell", r"cannot reach 127\.0\.0\.1:\d+: connection refused")
case("shell-unreachable-interactive", SH + ["{PK}@127.0.0.1:{FREE}", "--sk", "{SK}"], EXIT_FAIL,
     "pty shell", r"cannot reach 127\.0\.0\.1:\d+: connection refused")
case("shell-unresolvable", SH + ["{PK}@no-such-host.invalid:2022", "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty shell", r"cannot resolve no-such-host\.invalid")
for srv in ("GARBAGE", "BIGFRAME", "BADMSG", "CLOSE"):
    case(f"shell-{srv.lower()}-listener", SH + ["{PK}@127.0.0.1:{%s}" % srv, "--sk", "{SK}", "--", "true"],
         EXIT_FAIL, "pty shell", r"127\.0\.0\.1:\d+.*(handshake|frame|EOF|decrypt|server key)")
case("shell-unknown-peer", SH + ["{HOSTPK}@127.0.0.1:{HOST}", "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty shell", r"not whitelisted \(pk " + PK)
case("shell-unknown-peer-interactive", SH + ["{HOSTPK}@127.0.0.1:{HOST}", "--sk", "{SK}"], EXIT_FAIL,
     "pty shell", r"not whitelisted")
case("shell-no-sk-unreachable", SH + ["{PK}@127.0.0.1:{FREE}", "--", "true"], EXIT_FAIL,
     "pty shell", r"cannot reach 127\.0\.0\.1:\d+", extra=r"^pty shell: no --sk, .*fresh random key [0-9a-f]{66} ")
case("shell-timeout", SH + ["{HOSTPK}@127.0.0.1:{HOST}", "--sk", "{SKB}", "-t", "300ms", "--", "sleep", "7.2513"],
     124, "", r"^\[timed out after 300ms\]$")
case("shell-wrong-server-key", SH + ["{PK}@127.0.0.1:{HOST}", "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty shell", r"wrong server key")

# ---- cli pty exec
EX = ["cli", "pty", "exec"]
for name, bad in BAD_PKS.items():
    case(f"exec-pk-{name}", EX + [f"tcp://{bad}@127.0.0.1:{{FREE}}", "--sk", "{SK}", "--", "true"], EXIT_USAGE,
         "pty exec", "null key" if name == "null" else r"public key")
    case(f"exec-barepk-{name}", EX + [bad, "--rpc", "127.0.0.1:{FREE}", "--", "true"], EXIT_USAGE,
         "pty exec", "null key" if name == "null" else r"public key")
for name, bad in BAD_SKS.items():
    case(f"exec-sk-{name}", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "-s", bad, "--", "true"], EXIT_USAGE,
         "pty exec", r"--sk: invalid secret key")
case("exec-envsk-bad", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "--", "true"], EXIT_USAGE,
     "pty exec", r"\$DMSGPTY_SK: invalid secret key", env={"DMSGPTY_SK": "xyz"})
case("exec-missing-command", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "--sk", "{SK}"], EXIT_USAGE,
     "pty exec", r"missing command")
case("exec-missing-command-dashdash", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "--"], EXIT_USAGE,
     "pty exec", r"missing command")
case("exec-missing-target", EX, EXIT_USAGE, "skypty cli pty exec", r"required: target")
case("exec-tcp-no-at", EX + ["tcp://{PK}", "--", "true"], EXIT_USAGE, "pty exec", r"tcp:// needs <pk>@host:port")
case("exec-tcp-port0", EX + ["tcp://{PK}@127.0.0.1:0", "--", "true"], EXIT_USAGE, "pty exec", r"port 0 out of range")
case("exec-tcp-port65536", EX + ["tcp://{PK}@127.0.0.1:65536", "--", "true"], EXIT_USAGE, "pty exec",
     r"port 65536 out of range")
case("exec-tcp-ipv6-bare", EX + ["tcp://{PK}@::1:2022", "--", "true"], EXIT_USAGE, "pty exec", r"bracketed")
case("exec-tcp-empty-host", EX + ["tcp://{PK}@:2022", "--", "true"], EXIT_USAGE, "pty exec", r"empty host")
case("exec-dmsg-port0", EX + ["dmsg://{PK}:0", "--", "true"], EXIT_USAGE, "pty exec", r"port 0 out of range")
case("exec-flag-port0", EX + ["{PK}", "-p", "0", "--rpc", "127.0.0.1:{FREE}", "--", "true"], EXIT_USAGE,
     "pty exec", r"port 0 out of range")
case("exec-scheme", EX + ["ssh://{PK}@127.0.0.1:1", "--", "true"], EXIT_USAGE, "pty exec", r"unknown scheme")
case("exec-via-no-scheme", EX + ["{PK}", "--via", "{PK}@127.0.0.1:{FREE}", "--", "true"], EXIT_USAGE,
     "pty exec", r"--via wants tcp://")
case("exec-via-no-port", EX + ["{PK}", "--via", "tcp://{PK}@127.0.0.1", "--", "true"], EXIT_USAGE,
     "pty exec", r"missing port")
case("exec-via-other-key", EX + ["{PK}", "--via", "tcp://{OTHER}@127.0.0.1:{FREE}", "--", "true"], EXIT_USAGE,
     "pty exec", r"different key")
case("exec-via-bad-pk", EX + ["{PK}", "--via", "tcp://%s@127.0.0.1:1" % BAD_PKS["offcurve"], "--", "true"],
     EXIT_USAGE, "pty exec", r"not a point")
case("exec-transport-conflict", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "--transport", "dmsg", "--", "true"],
     EXIT_USAGE, "pty exec", r"conflicts")
case("exec-transport-bad", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "--transport", "udp", "--", "true"],
     EXIT_USAGE, "skypty cli pty exec", r"invalid choice: 'udp'")
case("exec-duration-bad", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "-t", "soon", "--", "true"], EXIT_USAGE,
     "skypty cli pty exec", r"invalid duration 'soon'")
case("exec-duration-zero", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "-t", "0", "--sk", "{SK}", "--", "true"],
     EXIT_USAGE, "pty exec", r"--timeout must be positive")
case("exec-env-bad", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "-e", "=x", "--", "true"], EXIT_USAGE,
     "pty exec", r"KEY=VALUE")
case("exec-stream-node", EX + ["{PK}", "--stream", "--rpc", "127.0.0.1:{FREE}", "--", "true"], EXIT_USAGE,
     "pty exec", r"--stream needs a direct tcp://")
case("exec-rpc-bad", EX + ["{PK}", "--rpc", "nocolon", "--", "true"], EXIT_USAGE, "pty exec", r"--rpc wants host:port")
case("exec-rpc-unreachable", EX + ["{PK}", "--rpc", "127.0.0.1:{FREE}", "--", "true"], EXIT_FAIL,
     "pty exec", r"no local node RPC at 127\.0\.0\.1:\d+")
case("exec-rpc-garbage", EX + ["{PK}", "--rpc", "127.0.0.1:{GARBAGE}", "--", "true"], EXIT_FAIL,
     "pty exec", r"node|rpc|gob|protocol")
case("exec-rpc-close", EX + ["{PK}", "--rpc", "127.0.0.1:{CLOSE}", "--", "true"], EXIT_FAIL,
     "pty exec", r"node|rpc|EOF|closed")
case("exec-standalone-disc-unreachable", EX + ["{PK}", "--standalone", "--dmsgdisc", "http://127.0.0.1:{FREE}",
                                                "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty exec", r"discovery|127\.0\.0\.1:\d+")
case("exec-standalone-disc-garbage", EX + ["{PK}", "--standalone", "--dmsgdisc", "http://127.0.0.1:{GARBAGE}",
                                            "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty exec", r"discovery|127\.0\.0\.1:\d+")
case("exec-standalone-disc-bad-url", EX + ["{PK}", "--standalone", "--dmsgdisc", "not a url",
                                            "--sk", "{SK}", "--", "true"], EXIT_USAGE,
     "pty exec", r"dmsgdisc|discovery|url")
case("exec-unreachable", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty exec", r"cannot reach 127\.0\.0\.1:\d+: connection refused")
case("exec-stream-unreachable", EX + ["tcp://{PK}@127.0.0.1:{FREE}", "--stream", "--sk", "{SK}", "--", "true"],
     EXIT_FAIL, "pty exec", r"cannot reach 127\.0\.0\.1:\d+: connection refused")
for srv in ("GARBAGE", "BIGFRAME", "BADMSG", "CLOSE"):
    case(f"exec-{srv.lower()}-listener", EX + ["tcp://{PK}@127.0.0.1:{%s}" % srv, "--sk", "{SK}", "--", "true"],
         EXIT_FAIL, "pty exec", r"127\.0\.0\.1:\d+.*(handshake|frame|EOF|decrypt|server key)")
case("exec-unknown-peer", EX + ["tcp://{HOSTPK}@127.0.0.1:{HOST}", "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty exec", r"not whitelisted")
case("exec-stream-unknown-peer", EX + ["tcp://{HOSTPK}@127.0.0.1:{HOST}", "--stream", "--sk", "{SK}", "--", "true"],
     EXIT_FAIL, "pty exec", r"not whitelisted")
case("exec-via-unknown-peer", EX + ["{HOSTPK}", "--via", "tcp://{HOSTPK}@127.0.0.1:{HOST}", "--sk", "{SK}",
                                     "--", "true"], EXIT_FAIL, "pty exec", r"not whitelisted")
for name, extra in (("", []), ("-stream", ["--stream"]), ("-json", ["--json"])):
    case(f"exec-timeout{name}", EX + ["tcp://{HOSTPK}@127.0.0.1:{HOST}", "--sk", "{SKB}", "-t", "300ms"] + extra
         + ["--", "sleep", "7.2513"], 124, "", r"^\[timed out after 300ms\]$")
case("exec-wrong-server-key", EX + ["tcp://{PK}@127.0.0.1:{HOST}", "--sk", "{SK}", "--", "true"], EXIT_FAIL,
     "pty exec", r"wrong server key")

# ---- cli pty start
ST = ["cli", "pty", "start"]
for name in ("short", "offcurve", "null"):
    case(f"start-pk-{name}", ST + [BAD_PKS[name], "--cliaddr", "{CTLMISSING}"], EXIT_USAGE,
         "pty start", "null key" if name == "null" else r"public key")
for name in ("short", "zero"):
    case(f"start-sk-{name}", ST + ["--via", "tcp://{PK}@127.0.0.1:{FREE}", "--sk", BAD_SKS[name]], EXIT_USAGE,
         "pty start", r"--sk: invalid secret key")
case("start-envsk-bad", ST + ["--via", "tcp://{PK}@127.0.0.1:{FREE}"], EXIT_USAGE,
     "pty start", r"\$DMSGPTY_SK: invalid secret key", env={"DMSGPTY_SK": "12"})
case("start-via-no-scheme", ST + ["--via", "{PK}@127.0.0.1:{FREE}"], EXIT_USAGE, "pty start", r"--via wants tcp://")
case("start-via-port0", ST + ["--via", "tcp://{PK}@127.0.0.1:0"], EXIT_USAGE, "pty start", r"port 0 out of range")
case("start-standalone-no-pk", ST + ["--standalone"], EXIT_USAGE, "pty start", r"--standalone needs a <pk>")
case("start-transport-tcp-no-via", ST + ["{PK}", "--transport", "tcp"], EXIT_USAGE, "pty start", r"--via")
case("start-control-missing", ST + ["--cliaddr", "{CTLMISSING}"], EXIT_FAIL, "pty start",
     r"control socket .*missing\.sock")
case("start-control-garbage", ST + ["--cliaddr", "{CTLGARBAGE}"], EXIT_FAIL, "pty start", r"control|protocol|gob")
case("start-control-close", ST + ["--cliaddr", "{CTLCLOSE}"], EXIT_FAIL, "pty start", r"closed the control connection")
case("start-control-proxy-close", ST + ["{PK}", "--cliaddr", "{CTLCLOSE}"], EXIT_FAIL, "pty start",
     r"could not reach the remote pty")
case("start-unreachable", ST + ["--via", "tcp://{PK}@127.0.0.1:{FREE}", "--sk", "{SK}"], EXIT_FAIL,
     "pty start", r"cannot reach 127\.0\.0\.1:\d+: connection refused")
case("start-garbage-listener", ST + ["--via", "tcp://{PK}@127.0.0.1:{GARBAGE}", "--sk", "{SK}"], EXIT_FAIL,
     "pty start", r"127\.0\.0\.1:\d+")
case("start-unknown-peer", ST + ["--via", "tcp://{HOSTPK}@127.0.0.1:{HOST}", "--sk", "{SK}"], EXIT_FAIL,
     "pty start", r"not whitelisted")

# ---- cli pty fs mount / umount
FM = ["cli", "pty", "fs", "mount"]
for name in ("short", "nonhex", "offcurve", "null"):
    case(f"mount-pk-{name}", FM + [f"{BAD_PKS[name]}@127.0.0.1:{{FREE}}", "{DIR}", "--sk", "{SK}"], EXIT_USAGE,
         "pty fs mount", "null key" if name == "null" else r"public key")
case("mount-sk-bad", FM + ["{PK}@127.0.0.1:{FREE}", "{DIR}", "--sk", BAD_SKS["order"]], EXIT_USAGE,
     "pty fs mount", r"secret key")
case("mount-envsk-bad", FM + ["{PK}@127.0.0.1:{FREE}", "{DIR}"], EXIT_USAGE,
     "pty fs mount", r"DMSGPTY_SK", env={"DMSGPTY_SK": BAD_SKS["short"]})
case("mount-bare-pk", FM + ["{PK}", "{DIR}", "--sk", "{SK}"], EXIT_USAGE, "pty fs mount", r"needs --standalone")
case("mount-port0", FM + ["{PK}@127.0.0.1:0", "{DIR}", "--sk", "{SK}"], EXIT_USAGE, "pty fs mount",
     r"port 0 out of range")
case("mount-ipv6-bare", FM + ["{PK}@::1:2022", "{DIR}", "--sk", "{SK}"], EXIT_USAGE, "pty fs mount", r"bracketed")
case("mount-no-mountpoint-arg", FM + ["{PK}@127.0.0.1:{FREE}"], EXIT_USAGE, "skypty cli pty fs mount",
     r"required: mountpoint")
case("mount-mountpoint-missing", FM + ["{PK}@127.0.0.1:{FREE}", "{TMP}/no-such-dir", "--sk", "{SK}"], EXIT_USAGE,
     "pty fs mount", r"mountpoint .*no-such-dir is not a directory")
case("mount-ttl-bad", FM + ["{PK}@127.0.0.1:{FREE}", "{DIR}", "--attr-ttl", "1y"], EXIT_USAGE,
     "skypty cli pty fs mount", r"invalid duration '1y'")
case("mount-unreachable", FM + ["{PK}@127.0.0.1:{FREE}", "{DIR}", "--sk", "{SK}"], EXIT_FAIL,
     "pty fs mount", r"cannot reach 127\.0\.0\.1:\d+: connection refused")
case("mount-garbage-listener", FM + ["{PK}@127.0.0.1:{GARBAGE}", "{DIR}", "--sk", "{SK}"], EXIT_FAIL,
     "pty fs mount", r"127\.0\.0\.1:\d+")
case("mount-unknown-peer", FM + ["{HOSTPK}@127.0.0.1:{HOST}", "{DIR}", "--sk", "{SK}"], EXIT_FAIL,
     "pty fs mount", r"not whitelisted")
FU = ["cli", "pty", "fs", "umount"]
case("umount-not-mounted", FU + ["{DIR}"], EXIT_FAIL, "pty fs umount", r"is not mounted")
case("umount-missing-dir", FU + ["{TMP}/no-such-dir"], EXIT_FAIL, "pty fs umount", r"no-such-dir is not mounted")
case("umount-not-fuse", FU + ["/proc"], EXIT_FAIL, "pty fs umount", r"not a skypty one")
case("umount-no-arg", FU, EXIT_USAGE, "skypty cli pty fs umount", r"required: mountpoint")

# ---- cli pty host
HO = ["cli", "pty", "host", "-l", "127.0.0.1:{FREE}"]
for name, bad in BAD_PKS.items():
    case(f"host-allow-{name}", HO + ["--allow", bad], EXIT_USAGE, "pty host",
         "null key" if name == "null" else r"--allow: invalid public key", timeout=8.0)
case("host-allow-second-bad", HO + ["--allow", "{OTHER}," + BAD_PKS["short"]], EXIT_USAGE, "pty host",
     r"--allow: invalid public key")
case("host-no-allow", HO, EXIT_USAGE, "pty host", r"empty whitelist")
for name, addr, must in (("nocolon", "2022", r"bad listen address"),
                         ("port-big", "127.0.0.1:65536", r"bad port"),
                         ("port-nan", "127.0.0.1:ssh", r"bad port"),
                         ("ipv6-bare", "::1:2022", r"brackets")):
    case(f"host-listen-{name}", ["cli", "pty", "host", "-l", addr, "--allow", "{OTHER}"], EXIT_USAGE, "pty host", must)
case("host-port-busy", ["cli", "pty", "host", "-l", "127.0.0.1:{BUSY}", "--allow", "{OTHER}"], EXIT_FAIL,
     "pty host", r"127\.0\.0\.1:\d+.*(in use|cannot listen)|(in use|cannot listen).*\d+", logs=True)
case("host-conf-missing", HO + ["--conf", "{TMP}/nope.yaml"], EXIT_USAGE, "pty host", r"nope\.yaml: no such file")
case("host-conf-garbage", HO + ["--conf", "{TMP}/garbage.bin"], EXIT_USAGE, "pty host", r"garbage\.bin")
case("host-conf-bad-sk", HO + ["--conf", "{TMP}/badsk.json"], EXIT_USAGE, "pty host", r"badsk\.json: sk")
case("host-visor-missing", HO + ["--allow", "{OTHER}", "--sk-from-visor", "{TMP}/nope-visor.json"], EXIT_USAGE,
     "pty host", r"nope-visor\.json")
case("host-max-unauth-nan", HO + ["--allow", "{OTHER}", "--max-unauth", "x"], EXIT_USAGE, "skypty cli pty host",
     r"invalid int value")

# ---- app pty dmsg / dmsg pty host (standalone host) and confgen
for pre, prefix, aprefix in ((["app", "pty", "dmsg"], "pty host", "skypty app pty dmsg"),
                             (["dmsg", "pty", "host"], "dmsg pty host", "skypty dmsg pty host")):
    tag = "appdmsg" if pre[0] == "app" else "dmsgptyhost"
    base = pre + ["--no-dmsg", "--cliaddr", "{SOCK}"]
    case(f"{tag}-conf-missing", pre + ["-c", "{TMP}/nope.json"], EXIT_USAGE, prefix, r"nope\.json: no such file")
    case(f"{tag}-conf-dir", pre + ["-c", "{TMP}"], EXIT_USAGE, prefix, r"is a directory")
    case(f"{tag}-conf-garbage", pre + ["-c", "{TMP}/garbage.bin"], EXIT_USAGE, prefix, r"garbage\.bin")
    case(f"{tag}-conf-yaml-list", pre + ["-c", "{TMP}/list.yaml"], EXIT_USAGE, prefix, r"expected a mapping")
    case(f"{tag}-conf-bad-sk", pre + ["-c", "{TMP}/badsk.json"], EXIT_USAGE, prefix, r"badsk\.json: sk")
    case(f"{tag}-conf-pk-mismatch", pre + ["-c", "{TMP}/mismatch.json"], EXIT_USAGE, prefix, r"pk does not match sk")
    case(f"{tag}-conf-bad-wl", pre + ["-c", "{TMP}/badwl.json"], EXIT_USAGE, prefix, r"wl")
    case(f"{tag}-conf-null-wl", pre + ["-c", "{TMP}/nullwl.json"], EXIT_USAGE, prefix, r"null key")
    case(f"{tag}-conf-unknown-key", pre + ["-c", "{TMP}/unknownkey.json"], EXIT_USAGE, prefix, r"unknown key 'bogus'")
    case(f"{tag}-conf-no-sk", pre + ["-c", "{TMP}/nosk.json"], EXIT_USAGE, prefix, r"no secret key")
    case(f"{tag}-wl-bad", base + ["-c", "{TMP}/good.json", "--wl", BAD_PKS["offcurve"]], EXIT_USAGE, prefix,
         r"not a point")
    case(f"{tag}-wl-null", base + ["-c", "{TMP}/good.json", "--wl", BAD_PKS["null"]], EXIT_USAGE, prefix,
         r"null key")
    case(f"{tag}-tcplisten-bad", base + ["-c", "{TMP}/good.json", "--tcplisten", "::1:2022"], EXIT_USAGE, prefix,
         r"brackets")
    case(f"{tag}-tcplisten-busy", base + ["-c", "{TMP}/good.json", "--tcplisten", "127.0.0.1:{BUSY}"], EXIT_FAIL,
         prefix, r"in use|cannot listen", logs=True)
    case(f"{tag}-clinet-bad", base + ["-c", "{TMP}/good.json", "--clinet", "udp"], EXIT_USAGE, prefix, r"udp")
    case(f"{tag}-cliaddr-no-dir", pre + ["--no-dmsg", "-c", "{TMP}/good.json", "--cliaddr", "{TMP}/no-such-dir/p.sock"],
         EXIT_USAGE, prefix, r"no-such-dir does not exist")
    case(f"{tag}-listen-fd-closed", pre + ["-c", "{TMP}/good.json", "--listen-fd", "97"], EXIT_USAGE, prefix,
         r"--listen-fd 97")
    case(f"{tag}-visor-needs-no-dmsg", pre + ["-c", "{TMP}/good.json", "--sk-from-visor", "{TMP}/v.json"],
         EXIT_USAGE, prefix, r"needs --no-dmsg")
    case(f"{tag}-dmsgport-nan", pre + ["--dmsgport", "x"], EXIT_USAGE, aprefix, r"invalid int value")
    cg = pre + ["confgen"]
    cprefix = " ".join(pre) + " confgen"
    case(f"{tag}-confgen-exists", cg + ["{TMP}/good.json"], EXIT_USAGE, cprefix, r"already exists")
    case(f"{tag}-confgen-dir", cg + ["{TMP}"], EXIT_USAGE, cprefix, r"is a directory")
    case(f"{tag}-confgen-no-parent", cg + ["{TMP}/no-such-dir/c.json"], EXIT_FAIL, cprefix,
         r"cannot write .*no-such-dir")

# ---- app pty tcp
AT = ["app", "pty", "tcp", "--cliaddr", "{SOCK}"]
case("apptcp-conf-missing", AT + ["-c", "{TMP}/nope.json", "--addr", "127.0.0.1:{FREE}"], EXIT_USAGE, "pty tcp",
     r"nope\.json: no such file")
case("apptcp-addr-bad", AT + ["-c", "{TMP}/good.json", "--addr", "nocolon"], EXIT_USAGE, "pty tcp",
     r"bad listen address")
case("apptcp-addr-port-big", AT + ["-c", "{TMP}/good.json", "--addr", "127.0.0.1:99999"], EXIT_USAGE, "pty tcp",
     r"bad port")
case("apptcp-addr-busy", AT + ["-c", "{TMP}/good.json", "--addr", "127.0.0.1:{BUSY}"], EXIT_FAIL, "pty tcp",
     r"in use|cannot listen", logs=True)
case("apptcp-wl-bad", AT + ["-c", "{TMP}/good.json", "--addr", "127.0.0.1:{FREE}", "--wl", BAD_PKS["short"]],
     EXIT_USAGE, "pty tcp", r"public key")

# ---- app pty http / dmsg pty ui
for pre, prefix, aprefix in ((["app", "pty", "http"], "pty http", "skypty app pty http"),
                             (["dmsg", "pty", "ui"], "dmsg pty ui", "skypty dmsg pty ui")):
    tag = "http" if pre[0] == "app" else "ui"
    hbase = pre + ["--haddr", "{CTLMISSING}"]
    case(f"{tag}-addr-busy", hbase + ["--addr", "127.0.0.1:{BUSY}"], EXIT_FAIL, prefix,
         r"cannot listen on 127\.0\.0\.1:\d+: address already in use")
    case(f"{tag}-addr-nocolon", hbase + ["--addr", "8080"], EXIT_USAGE, prefix, r"bad --addr '8080'")
    case(f"{tag}-addr-port-big", hbase + ["--addr", "127.0.0.1:65536"], EXIT_USAGE, prefix, r"bad --addr")
    case(f"{tag}-addr-port-nan", hbase + ["--addr", "127.0.0.1:http"], EXIT_USAGE, prefix, r"bad --addr")
    case(f"{tag}-log-level-bad", hbase + ["--log-level", "loud"], EXIT_USAGE, aprefix, r"invalid choice: 'loud'")

# ---- app pty exec / dmsg pty cli (control-socket clients)
for pre, vprefix, aprefix in ((["app", "pty", "exec"], "pty exec", "skypty app pty exec"),
                              (["dmsg", "pty", "cli"], "dmsg pty cli", "skypty dmsg pty cli")):
    tag = "appexec" if pre[0] == "app" else "dmsgcli"
    # interactive shell through the control socket
    case(f"{tag}-shell-missing", pre + ["-r", "{CTLMISSING}"], EXIT_FAIL, vprefix,
         r"control socket .*missing\.sock")
    case(f"{tag}-shell-garbage", pre + ["-r", "{CTLGARBAGE}"], EXIT_FAIL, vprefix, r"control|protocol|gob")
    case(f"{tag}-shell-close", pre + ["-r", "{CTLCLOSE}"], EXIT_FAIL, vprefix, r"closed the control connection")
    case(f"{tag}-shell-not-socket", pre + ["-r", "{TMP}/good.json"], EXIT_FAIL, vprefix, r"good\.json")
    case(f"{tag}-shell-addr-bad-pk", pre + ["-r", "{CTLMISSING}", "--addr", BAD_PKS["short"]], EXIT_USAGE, vprefix,
         r"--addr: invalid public key")
    case(f"{tag}-shell-addr-null", pre + ["-r", "{CTLMISSING}", "--addr", BAD_PKS["null"]], EXIT_USAGE, vprefix,
         r"null key")
    case(f"{tag}-shell-addr-port0", pre + ["-r", "{CTLMISSING}", "--addr", "{PK}:0"], EXIT_USAGE, vprefix,
         r"bad port '0'")
    case(f"{tag}-shell-addr-port-big", pre + ["-r", "{CTLMISSING}", "--addr", "{PK}:65536"], EXIT_USAGE, vprefix,
         r"bad port '65536'")
    case(f"{tag}-shell-addr-proxy-close", pre + ["-r", "{CTLCLOSE}", "--addr", "{PK}"], EXIT_FAIL, vprefix,
         r"could not reach the remote pty")
    case(f"{tag}-shell-clinet-bad", pre + ["-n", "udp"], EXIT_USAGE, vprefix, r"--clinet 'udp'")
    case(f"{tag}-shell-tcp-cliaddr-bad", pre + ["-n", "tcp", "-r", "nocolon"], EXIT_USAGE, vprefix,
         r"control address 'nocolon'")
    case(f"{tag}-shell-confpath-missing", pre + ["-p", "{TMP}/nope.json"], EXIT_USAGE, vprefix,
         r"nope\.json: no such file")
    case(f"{tag}-shell-confpath-garbage", pre + ["-p", "{TMP}/garbage.bin"], EXIT_USAGE, vprefix, r"garbage\.bin")
    # exec
    e = pre + ["exec"]
    ep = vprefix + " exec"
    case(f"{tag}-exec-missing-command", e + ["-r", "{CTLMISSING}"], EXIT_USAGE, ep, r"missing command")
    case(f"{tag}-exec-duration-bad", e + ["-r", "{CTLMISSING}", "-t", "ten", "--", "true"], EXIT_USAGE,
         aprefix + " exec", r"invalid duration 'ten'")
    case(f"{tag}-exec-duration-zero", e + ["-r", "{CTLMISSING}", "-t", "0ms", "--", "true"], EXIT_USAGE, ep,
         r"--timeout must be positive")
    case(f"{tag}-exec-env-bad", e + ["-r", "{CTLMISSING}", "-e", "X", "--", "true"], EXIT_USAGE, ep, r"KEY=VALUE")
    case(f"{tag}-exec-missing", e + ["-r", "{CTLMISSING}", "--", "true"], EXIT_FAIL, ep,
         r"control socket .*missing\.sock")
    case(f"{tag}-exec-garbage", e + ["-r", "{CTLGARBAGE}", "--", "true"], EXIT_FAIL, ep, r"protocol|gob|rpc|control")
    case(f"{tag}-exec-close", e + ["-r", "{CTLCLOSE}", "--", "true"], EXIT_FAIL, ep, r"closed the control connection")
    case(f"{tag}-exec-addr-bad-pk", e + ["-r", "{CTLMISSING}", "--addr", BAD_PKS["nonhex"], "--", "true"],
         EXIT_USAGE, ep, r"--addr: invalid public key")
    # whitelist verbs
    for w in ("whitelist", "whitelist-add", "whitelist-remove"):
        wa = pre + [w]
        wp = f"{vprefix} {w}"
        pks = [] if w == "whitelist" else ["{OTHER}"]
        case(f"{tag}-{w}-missing", wa + ["-r", "{CTLMISSING}"] + pks, EXIT_FAIL, wp,
             r"control socket .*missing\.sock")
        case(f"{tag}-{w}-garbage", wa + ["-r", "{CTLGARBAGE}"] + pks, EXIT_FAIL, wp, r"protocol|gob|rpc|control")
        case(f"{tag}-{w}-close", wa + ["-r", "{CTLCLOSE}"] + pks, EXIT_FAIL, wp,
             r"control socket .*ctlclose\.sock: failed to (write request|read response)")
        case(f"{tag}-{w}-confpath-missing", wa + ["-p", "{TMP}/nope.json"] + pks, EXIT_USAGE, wp,
             r"nope\.json: no such file")
        if w != "whitelist":
            for name in ("short", "long", "nonhex", "offcurve", "null"):
                case(f"{tag}-{w}-pk-{name}", wa + ["-r", "{CTLMISSING}", "{OTHER}", BAD_PKS[name]], EXIT_USAGE, wp,
                     "null key" if name == "null" else r"public key")
            case(f"{tag}-{w}-no-pk", wa + ["-r", "{CTLMISSING}"], EXIT_USAGE, f"{aprefix} {w}",
                 r"required: pk")

# ---- dmsg server / disc
DS = ["dmsg", "server", "--dmsgdisc", "http://127.0.0.1:{FREE}"]
for name, bad in BAD_SKS.items():
    case(f"server-sk-{name}", DS + ["--sk", bad, "-l", "127.0.0.1:{FREE}"], EXIT_USAGE, "dmsg server",
         r"secret key")
case("server-listen-busy", DS + ["--sk", "{SK}", "-l", "127.0.0.1:{BUSY}"], EXIT_FAIL, "dmsg server",
     r"cannot listen on 127\.0\.0\.1:\d+: address already in use", logs=True)
case("server-listen-bad", DS + ["--sk", "{SK}", "-l", "nocolon"], EXIT_USAGE, "dmsg server", r"nocolon")
case("server-listen-port-big", DS + ["--sk", "{SK}", "-l", "127.0.0.1:65536"], EXIT_USAGE, "dmsg server", r"65536")
case("server-conf-missing", DS + ["-c", "{TMP}/nope.json", "-l", "127.0.0.1:{FREE}"], EXIT_USAGE, "dmsg server",
     r"nope\.json")
case("server-conf-garbage", DS + ["-c", "{TMP}/garbage.bin", "-l", "127.0.0.1:{FREE}"], EXIT_USAGE, "dmsg server",
     r"garbage\.bin")
case("server-conf-bad-sk", DS + ["-c", "{TMP}/server-badsk.json", "-l", "127.0.0.1:{FREE}"], EXIT_USAGE,
     "dmsg server", r"secret key")
case("server-max-sessions-nan", DS + ["--max-sessions", "many"], EXIT_USAGE, "skypty dmsg server",
     r"invalid int value")
DD = ["dmsg", "disc"]
case("disc-addr-busy", DD + ["-a", "127.0.0.1:{BUSY}"], EXIT_FAIL, "dmsg disc",
     r"cannot listen on 127\.0\.0\.1:\d+: address already in use", logs=True)
case("disc-addr-bad", DD + ["-a", "nocolon"], EXIT_USAGE, "dmsg disc", r"nocolon")
case("disc-addr-port-big", DD + ["-a", "127.0.0.1:65536"], EXIT_USAGE, "dmsg disc", r"65536")
case("disc-ttl-bad", DD + ["-a", "127.0.0.1:{FREE}", "--entry-ttl", "forever"], EXIT_USAGE, "skypty dmsg disc",
     r"invalid duration 'forever'")
case("disc-ttl-zero", DD + ["-a", "127.0.0.1:{FREE}", "--entry-ttl", "0s"], EXIT_USAGE, "dmsg disc",
     r"--entry-ttl must be positive")

# ---- the root
case("root-unknown-verb", ["bogus"], EXIT_USAGE, "skypty", r"invalid choice: 'bogus'")
case("root-unknown-subverb", ["cli", "pty", "bogus"], EXIT_USAGE, "skypty cli pty", r"invalid choice: 'bogus'")
case("root-unknown-app-verb", ["app", "pty", "ssh"], EXIT_USAGE, "skypty app pty", r"invalid choice: 'ssh'")
case("root-unknown-flag", ["--bogus"], EXIT_USAGE, "skypty", r"unrecognized arguments: --bogus")

_IDS = [c.id for c in C]
assert len(_IDS) == len(set(_IDS)), "duplicate case ids"
_BY_ID = {c.id: c for c in C}

# ------------------------------------------------------------------------- fake servers


class _FakeServer:
    """A listener that misbehaves: `behaviour(conn)` runs per accepted connection."""

    def __init__(self, sock: socket.socket, behaviour) -> None:
        self.sock = sock
        self.behaviour = behaviour
        self.closed = False
        self.threads: List[threading.Thread] = []
        t = threading.Thread(target=self._loop, daemon=True)
        t.start()
        self.threads.append(t)

    def _loop(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._one, args=(conn,), daemon=True)
            t.start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(3.0)
            self.behaviour(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_some(conn: socket.socket) -> None:
    try:
        conn.recv(65536)
    except OSError:
        pass


def _garbage(conn: socket.socket) -> None:
    # what a stray SSH or HTTP server says: not a noise frame (its "length" is 0x5353 > 4094)
    _read_some(conn)
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(range(256)) * 4)
    time.sleep(1.0)


def _bigframe(conn: socket.socket) -> None:
    _read_some(conn)
    conn.sendall(b"\xff\xff" + b"\x00" * 512)
    time.sleep(1.0)


def _badmsg(conn: socket.socket) -> None:
    # a well-framed handshake reply whose content is random: the AEAD must refuse it
    _read_some(conn)
    conn.sendall(b"\x00\x60" + os.urandom(0x60))
    time.sleep(1.0)


def _close(conn: socket.socket) -> None:
    pass


def _ctl_garbage(conn: socket.socket) -> None:
    # accept the mux request, then answer the RPC with bytes that are no gob
    _read_some(conn)
    conn.sendall(b"\x00")
    time.sleep(0.2)
    conn.sendall(b"\x7f" + b"\xfe\xed\xfa\xce" * 64)
    time.sleep(1.0)


def _tcp_listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def _unix_listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(64)
    return s


# ------------------------------------------------------------------------------ helpers

def _marked_pids(marker: str) -> List[int]:
    """Live processes whose environment or command line carries `marker`."""
    found = []
    needle = marker.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        for part in ("environ", "cmdline"):
            try:
                with open(f"/proc/{d}/{part}", "rb") as f:
                    if needle in f.read():
                        found.append(int(d))
                        break
            except OSError:
                break
    return found


def _children_of(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(d))
    return out


def _digests(tmp: str) -> Dict[str, str]:
    import hashlib

    out = {}
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _write_configs(tmp: str, cliaddr: str) -> None:
    pk, sk = generate_keypair()
    good = {"sk": sk.hex(), "pk": pk.hex(), "cliaddr": cliaddr, "clinet": "unix", "wl": [OTHER]}
    docs = {
        "good.json": good,
        "badsk.json": dict(good, sk=BAD_SKS["short"], pk=None),
        "mismatch.json": dict(good, pk=OTHER),
        "badwl.json": dict(good, wl=[BAD_PKS["nonhex"]]),
        "nullwl.json": dict(good, wl=[BAD_PKS["null"]]),
        "unknownkey.json": dict(good, bogus=1),
        "nosk.json": {"cliaddr": cliaddr, "clinet": "unix"},
        "server-badsk.json": {"secret_key": BAD_SKS["nonhex"], "public_address": "127.0.0.1:1"},
    }
    for name, doc in docs.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump({k: v for k, v in doc.items() if v is not None}, f)
        os.chmod(os.path.join(tmp, name), 0o600)
    with open(os.path.join(tmp, "garbage.bin"), "wb") as f:
        f.write(b"\x00\xff\xfe garbage {[: \x80\x81")
    with open(os.path.join(tmp, "list.yaml"), "w") as f:
        f.write("- a\n- b\n")


class Result(NamedTuple):
    code: Optional[int]     # None: still running at the deadline (killed)
    stdout: str
    stderr: str
    leftovers: List[int]
    stale: List[str]        # files the case left behind (its control socket)


def _run_case(c: Case, subst: Dict[str, str], cwd: str) -> Result:
    marker = f"skypty-qa-{uuid.uuid4().hex}"
    env = dict(os.environ)
    for k in ("DMSGPTY_SK", "DMSGPTY_CLIADDR", "DMSGPTY_CLINET", "SKYPTY_DEBUG"):
        env.pop(k, None)
    env.update(c.env or {})
    env["SKYPTY_QA_MARKER"] = marker
    subst = dict(subst, SOCK=os.path.join(subst["TMP"], c.id + ".sock"))   # one control socket per case
    argv = [a.format(**subst) for a in c.argv]
    p = subprocess.Popen(SKYPTY + argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=c.timeout)
        code: Optional[int] = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        code = None
    leftovers = _marked_pids(marker)
    for pid in leftovers:   # never leave them behind, even when the case fails
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    stale = [subst["SOCK"]] if os.path.lexists(subst["SOCK"]) else []
    return Result(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), leftovers, stale)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("clierr"))
    os.makedirs(os.path.join(tmp, "mnt"))
    cwd = os.path.join(tmp, "cwd")   # no ./skywire-config.json or ./config.json to pick up
    os.makedirs(cwd)
    _write_configs(tmp, os.path.join(tmp, "host.sock"))
    servers = []
    subst = {"PK": PK, "SK": SK, "OTHER": OTHER, "SKB": _SK_B.hex(), "TMP": tmp, "DIR": os.path.join(tmp, "mnt"),
             "CTLMISSING": os.path.join(tmp, "missing.sock")}
    for name, fn in (("GARBAGE", _garbage), ("BIGFRAME", _bigframe), ("BADMSG", _badmsg), ("CLOSE", _close)):
        s = _tcp_listener()
        servers.append(_FakeServer(s, fn))
        subst[name] = str(s.getsockname()[1])
    for name, fn in (("CTLGARBAGE", _ctl_garbage), ("CTLCLOSE", _close)):
        path = os.path.join(tmp, name.lower() + ".sock")
        servers.append(_FakeServer(_unix_listener(path), fn))
        subst[name] = path
    busy = _tcp_listener()              # a port somebody already listens on
    subst["BUSY"] = str(busy.getsockname()[1])
    subst["FREE"] = str(free_port())    # a port nobody listens on
    # a real host that whitelists only OTHER: our key is an unknown peer there
    hport = free_port()
    marker = f"skypty-qa-host-{uuid.uuid4().hex}"
    host = subprocess.Popen(SKYPTY + ["cli", "pty", "host", "-l", f"127.0.0.1:{hport}", "--allow", OTHER,
                                      "--log-level", "error"],
                            cwd=cwd, env=dict(os.environ, SKYPTY_QA_MARKER=marker), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        host_pk = host.stdout.readline().decode().strip()
        assert re.fullmatch(r"0[23][0-9a-f]{64}", host_pk), host_pk
        wait_port(hport)
        subst["HOST"] = str(hport)
        subst["HOSTPK"] = host_pk
        yield {"subst": subst, "cwd": cwd, "tmp": tmp, "host": host, "host_marker": marker,
               "files": _digests(tmp)}
    finally:
        stop_process(host)
        host.stdout.close()
        for s in servers:
            s.close()
        busy.close()
        assert _marked_pids(marker) == []


@pytest.fixture(scope="module")
def results(world, request):
    """Run every selected case once, in parallel, before the first check."""
    wanted = [item.callspec.params["cid"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_error_case" and hasattr(item, "callspec")]
    cases = [_BY_ID[i] for i in wanted]
    # the slow ones (handshake retries, dial timeouts) first, so the pool drains evenly
    cases.sort(key=lambda c: 0 if any(k in " ".join(c.argv) for k in ("{CLOSE}", "{HOST}", "standalone")) else 1)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futs = {c.id: pool.submit(_run_case, c, world["subst"], world["cwd"]) for c in cases}
        return {k: f.result() for k, f in futs.items()}


# --------------------------------------------------------------------------------- tests

def _params():
    out = []
    for c in C:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        out.append(pytest.param(c.id, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("cid", _params())
def test_error_case(cid, results):
    c = _BY_ID[cid]
    r = results[cid]
    where = f"{cid}: argv={c.argv}\nexit={r.code}\nstderr={r.stderr!r}\nstdout={r.stdout[:300]!r}"
    assert r.leftovers == [], f"processes left running: {r.leftovers}\n{where}"
    assert r.stale == [], f"left behind: {r.stale}\n{where}"
    assert r.code is not None, f"still running after {c.timeout}s (killed)\n{where}"
    assert r.code == c.code, where
    assert "Traceback" not in r.stderr, where
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if c.logs:
        lines = [ln for ln in lines if not _LOG_LINE.match(ln)]
    if c.extra and len(lines) == 2 and re.search(c.extra, lines[0]):
        lines = lines[1:]
    assert len(lines) == 1, f"want exactly one error line\n{where}"
    line = lines[0]
    if c.prefix:
        assert line.startswith(c.prefix + ": "), f"want prefix {c.prefix!r}\n{where}"
    assert re.search(c.must, line, re.IGNORECASE), f"want /{c.must}/\n{where}"
    # a key the user typed is never echoed back whole when it was a secret
    for bad in BAD_SKS.values():
        if len(bad) == 64 and bad in c.argv and bad != "0" * 64:
            assert bad not in r.stderr, where


def test_nothing_left_or_lost(results, world):
    """After every case: only the fixture's own host is still our child, nothing of the host's
    (the timed-out `sleep 7.2513`) survives, and no input file was changed or removed."""
    kids = set(_children_of(os.getpid())) - {world["host"].pid}
    assert kids == set(), f"left-over children: {kids}"
    leftover = [pid for pid in _marked_pids(world["tmp"]) if pid != world["host"].pid]
    assert leftover == [], f"processes mentioning {world['tmp']}: {leftover}"
    deadline = time.monotonic() + 5   # the host kills a timed-out command at its deadline
    while time.monotonic() < deadline and [p for p in _marked_pids("7.2513") if p != world["host"].pid]:
        time.sleep(0.1)
    host_kids = [p for p in _marked_pids(world["host_marker"]) + _marked_pids("7.2513") if p != world["host"].pid]
    assert host_kids == [], f"the host left these running: {host_kids}"
    assert {k: v for k, v in _digests(world["tmp"]).items() if k in world["files"]} == world["files"]


def test_host_survives_garbage(world):
    """Garbage and oversized frames at a real host: it stays up and still answers a client."""
    port = int(world["subst"]["HOST"])
    for payload in (b"\xff\xff" + b"A" * 4096, b"GET / HTTP/1.1\r\n\r\n", os.urandom(2048), b""):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            if payload:
                try:
                    s.sendall(payload)
                except OSError:
                    pass
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
    assert world["host"].poll() is None, "the host died on garbage input"
    c = _BY_ID["exec-unknown-peer"]
    r = _run_case(c, world["subst"], world["cwd"])
    assert r.code == EXIT_FAIL and "not whitelisted" in r.stderr, r


_HELP_PATHS = [
    [], ["cli"], ["cli", "pty"], ["cli", "pty", "exec"], ["cli", "pty", "shell"], ["cli", "pty", "start"],
    ["cli", "pty", "fs"], ["cli", "pty", "fs", "mount"], ["cli", "pty", "fs", "umount"], ["cli", "pty", "host"],
    ["app"], ["app", "pty"], ["app", "pty", "dmsg"], ["app", "pty", "dmsg", "confgen"], ["app", "pty", "tcp"],
    ["app", "pty", "http"], ["app", "pty", "exec"], ["app", "pty", "exec", "exec"],
    ["app", "pty", "exec", "whitelist"], ["app", "pty", "exec", "whitelist-add"],
    ["app", "pty", "exec", "whitelist-remove"],
    ["dmsg"], ["dmsg", "server"], ["dmsg", "disc"], ["dmsg", "pty"], ["dmsg", "pty", "host"],
    ["dmsg", "pty", "host", "confgen"], ["dmsg", "pty", "cli"], ["dmsg", "pty", "cli", "exec"],
    ["dmsg", "pty", "cli", "whitelist"], ["dmsg", "pty", "cli", "whitelist-add"],
    ["dmsg", "pty", "cli", "whitelist-remove"], ["dmsg", "pty", "ui"],
]


def test_help_of_every_verb(tmp_path):
    def one(path):
        p = subprocess.run(SKYPTY + path + ["--help"], capture_output=True, timeout=30, cwd=str(tmp_path),
                           stdin=subprocess.DEVNULL)
        return path, p

    with ThreadPoolExecutor(max_workers=6) as pool:
        done = list(pool.map(one, _HELP_PATHS))
    bad = [(" ".join(path), p.returncode, p.stderr[-300:]) for path, p in done
           if p.returncode != 0 or b"usage: skypty" not in p.stdout or p.stderr.strip()]
    assert bad == []


def _verbs(parser, path=()):
    """{path: (option strings, positional dests, defaults)} of every parser in the tree."""
    import argparse

    opts = sorted(o for a in parser._actions for o in a.option_strings)
    pos = [a.dest for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    out = {path: (opts, pos, sorted(parser._defaults.items()))}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.update(_verbs(sub, path + (name,)))
    return out


def test_the_tree_built_for_a_command_line_has_that_verb_whole():
    """main() builds only the named verb's flags: each verb must come out exactly as in the
    whole tree, and at every level on its way all the names must be there to list or refuse."""
    from skypty.cli import build_parser

    def children(tree, p):
        return sorted(k[-1] for k in tree if k[:-1] == p and len(k) == len(p) + 1)

    full = _verbs(build_parser())
    assert len(full) > 30 and ("cli", "pty", "shell") in full and ("dmsg", "pty", "cli", "exec") in full
    for path, want in full.items():
        lazy = _verbs(build_parser(list(path) + ["x"]))
        for i in range(len(path) + 1):
            p = path[:i]
            assert lazy[p] == full[p], " ".join(p)
            assert children(lazy, p) == children(full, p), " ".join(p)
    # a verb's flags before its sub-verb, as the host's own hints print them
    for argv, target in ((["app", "pty", "exec", "--cliaddr", "/s", "whitelist-add", "k"], "cmd_whitelist_add"),
                         (["dmsg", "pty", "cli", "-r", "/s", "whitelist"], "cmd_whitelist"),
                         (["dmsg", "pty", "cli", "-n", "unix", "exec", "--", "true"], "cmd_local_exec"),
                         (["app", "pty", "dmsg", "--confpath", "x.json", "confgen"], "cmd_confgen")):
        ns = build_parser(argv).parse_args(argv)
        assert ns._target.endswith(":" + target), argv
    # a group the command line does not name is a bare name: no subtree behind it
    bare = _verbs(build_parser(["--version"]))
    assert children(bare, ()) == children(full, ()) == ["app", "cli", "dmsg"]
    assert all(bare[(g,)] == (["--help", "-h"], [], []) for g in children(full, ())) and len(bare) == 4
    other = _verbs(build_parser(["cli", "pty", "exec", "x"]))
    assert ("cli", "pty", "shell") in other and ("app", "pty") not in other and ("cli", "pty", "fs", "mount") not in other


def test_a_flag_a_sub_verb_shares_with_its_parent_keeps_the_parents_value():
    """argparse copies every dest of a sub-verb's namespace over its parent's, so a sub-verb
    flag of the same name with a default would erase what was given before the sub-verb
    (`app pty exec --cliaddr S whitelist-add PK` dialed the default socket). Shared flags
    carry no default in the sub-verb. The one exception means something else there, on
    purpose: the host's --unsafe (a non-loopback control address) must never reach confgen
    as "overwrite the key file"."""
    import argparse

    from skypty.cli import build_parser

    different_meaning = {("confgen", "unsafe")}
    found = []

    def walk(p, path=()):
        own = {a.dest for a in p._actions if a.option_strings and a.dest not in ("help", "version")}
        for s in (a for a in p._actions if isinstance(a, argparse._SubParsersAction)):
            for name, sub in s.choices.items():
                for a in sub._actions:
                    if a.option_strings and a.dest in own:
                        found.append((path + (name,), a.dest))
                        if (name, a.dest) not in different_meaning:
                            assert a.default is argparse.SUPPRESS, (" ".join(path + (name,)), a.dest)
                walk(sub, path + (name,))

    walk(build_parser())
    # the check saw the flags it is about, under both spellings of the control-socket client
    for verb in (("app", "pty", "exec", "whitelist-add"), ("dmsg", "pty", "cli", "exec")):
        assert {d for v, d in found if v == verb} >= {"clinet", "cliaddr", "confpath"}, verb
    assert (("app", "pty", "exec", "exec"), "addr") in found


def _blast(port: int) -> None:
    """Garbage, an oversized noise frame, a half HTTP request, an empty connection."""
    for payload in (b"\xff\xff" + b"A" * 8192, b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n", os.urandom(4096),
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), b""):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                while s.recv(65536):
                    pass
            except OSError:
                pass


def _http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        s.settimeout(5)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


@pytest.mark.parametrize("verb", ["disc", "http", "server"])
def test_servers_survive_garbage(verb, world):
    """A long-running verb fed garbage keeps serving, and stops cleanly on SIGTERM."""
    port = free_port()
    argv = {"disc": ["dmsg", "disc", "-a", f"127.0.0.1:{port}"],
            "http": ["app", "pty", "http", "--addr", f"127.0.0.1:{port}", "--haddr", world["subst"]["CTLMISSING"]],
            "server": ["dmsg", "server", "--sk", SK, "-l", f"127.0.0.1:{port}",
                       "--dmsgdisc", f"http://127.0.0.1:{world['subst']['FREE']}"]}[verb]
    marker = f"skypty-qa-{verb}-{uuid.uuid4().hex}"
    p = subprocess.Popen(SKYPTY + argv + ["--log-level", "error"], cwd=world["cwd"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=dict(os.environ, SKYPTY_QA_MARKER=marker))
    try:
        wait_port(port)
        _blast(port)
        assert p.poll() is None, f"{verb} died on garbage: {p.stderr.read()!r}"
        if verb == "disc":
            assert _http_get(port, "/health").startswith(b"HTTP/1.1 200"), "disc stopped answering"
        elif verb == "http":
            assert _http_get(port, "/").startswith(b"HTTP/1.1 200"), "http stopped answering"
        else:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        p.terminate()
        p.wait(10)
        err = p.stderr.read().decode("utf-8", "replace")
        assert "Traceback" not in err, err
    finally:
        stop_process(p)
        p.stderr.close()
    assert _marked_pids(marker) == []
