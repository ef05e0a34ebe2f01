#!/usr/bin/env python3
"""dmsg on loopback: stream dial latency (KK through the server), echo round trip on an open
stream, one-way stream throughput (256 MiB by default, BENCH_DMSG_MB), and — when a mode-2
host can run here — the exec round trip over dmsg (fresh standalone client per exec).

Processes: `skypty dmsg disc`, `skypty dmsg server`, a sink/echo dmsg client (or a mode-2
host) in its own process, and the measuring client in this one, so no two peers share a GIL.
`main()` returns (name, value, unit) rows.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _util import ensure_bytecode, free_port, stop_process, wait_port  # noqa: E402
from skypty.keys import generate_keypair  # noqa: E402
from skypty.transport.dmsg import disc as dmsgdisc  # noqa: E402
from skypty.transport.dmsg.client import DmsgClient  # noqa: E402

SKYPTY = [sys.executable, os.path.join(ROOT, "skypty.py")]
MB = int(os.environ.get("BENCH_DMSG_MB", "256"))
DIALS = int(os.environ.get("BENCH_DMSG_DIALS", "30"))
ECHOES = int(os.environ.get("BENCH_DMSG_ECHOES", "300"))
EXECS = int(os.environ.get("BENCH_DMSG_EXECS", "10"))

# A peer in its own process: port 9 discards and reports the byte count at EOF, port 7 echoes.
_PEER = r"""
import sys, threading
sys.path.insert(0, sys.argv[3])
from skypty.keys import SecKey
from skypty.transport.dmsg.client import DmsgClient
c = DmsgClient(SecKey.from_hex(sys.argv[1]), sys.argv[2]).start()
if not c.wait_ready(30):
    sys.exit(1)
def sink(conn):
    n = 0
    while True:
        b = conn.recv(1 << 20)
        if not b:
            break
        n += len(b)
    conn.sendall(str(n).encode())
    conn.close()
def echo(conn):
    while True:
        b = conn.recv(65536)
        if not b:
            break
        conn.sendall(b)
    conn.close()
def serve(port, fn):
    lis = c.listen(port)
    while True:
        s = lis.accept()
        threading.Thread(target=fn, args=(s,), daemon=True).start()
threading.Thread(target=serve, args=(9, sink), daemon=True).start()
threading.Thread(target=serve, args=(7, echo), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def _network(procs):
    dport, sport = free_port(), free_port()
    url = f"http://127.0.0.1:{dport}"
    devnull = subprocess.DEVNULL
    procs.append(subprocess.Popen(SKYPTY + ["dmsg", "disc", "--addr", f"127.0.0.1:{dport}", "--log-level", "error"],
                                  stdout=devnull, stderr=devnull))
    wait_port(dport)
    _, ssk = generate_keypair()
    procs.append(subprocess.Popen(SKYPTY + ["dmsg", "server", "--sk", ssk.hex(), "--listen", f"127.0.0.1:{sport}",
                                            "--dmsgdisc", url, "--log-level", "error"], stdout=devnull, stderr=devnull))
    wait_port(sport)
    dc = dmsgdisc.DiscClient(url)
    deadline = time.monotonic() + 15
    while not dc.available_servers():
        if time.monotonic() > deadline:
            raise RuntimeError("dmsg server did not register")
        time.sleep(0.05)
    return url


def _start_host(url, tmp, name, wl, procs):
    pk, sk = generate_keypair()
    sock = os.path.join(tmp, f"{name}.sock")
    cfg = os.path.join(tmp, f"{name}.json")
    with open(cfg, "w") as f:
        json.dump({"sk": sk.hex(), "pk": pk.hex(), "dmsgdisc": url, "dmsgsessions": 1, "dmsgport": 22,
                   "cliaddr": sock, "clinet": "unix", "wl": [p.hex() for p in wl]}, f)
    os.chmod(cfg, 0o600)
    procs.append(subprocess.Popen(SKYPTY + ["app", "pty", "dmsg", "-c", cfg, "--dmsgdisc", url, "--cliaddr", sock,
                                            "--log-level", "error"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return pk, sock


def _wait_entry(url, pk) -> bool:
    dc = dmsgdisc.DiscClient(url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if dc.entry(pk)["client"]["delegated_servers"]:
                return True
        except dmsgdisc.DiscoveryError:
            pass
        time.sleep(0.1)
    return False


def _exec_rows(url: str, procs, tmp: str) -> list:
    """Exec round trips through real mode-2 host processes (skipped if the host is not built)."""
    name = "dmsg exec round trip"
    try:
        from skypty.transport.dmsg.client import dial_standalone
        from skypty.client import PtyClient, open_pty_control
    except ImportError as e:
        return [{"name": name, "unit": "ms", "note": f"skipped: {e}"}]
    cpk, csk = generate_keypair()
    a_pk, a_sock = _start_host(url, tmp, "a", [], procs)
    if not _wait_entry(url, a_pk):
        return [{"name": name, "unit": "ms", "note": "skipped: host did not come up"}]
    b_pk, _ = _start_host(url, tmp, "b", [cpk, a_pk], procs)
    if not _wait_entry(url, b_pk):
        return [{"name": name, "unit": "ms", "note": "skipped: host did not come up"}]
    cold, warm = [], []
    for _ in range(EXECS):
        t0 = time.perf_counter()
        conn = dial_standalone(b_pk, 22, csk, url, "dmsgpty/pty")
        try:
            r = PtyClient(conn).exec("true")
        finally:
            conn.close()
        cold.append(time.perf_counter() - t0)
        assert r.get("ExitCode", 0) == 0, r
        t0 = time.perf_counter()
        c = open_pty_control("unix", a_sock, f"dmsgpty/proxy?pk={b_pk.hex()}&port=22")
        try:
            r = c.exec("true")
        finally:
            c.close()
        warm.append(time.perf_counter() - t0)
        assert r.get("ExitCode", 0) == 0, r
    return [("dmsg exec `true`: standalone (new session+stream), median", statistics.median(cold) * 1000, "ms"),
            ("dmsg exec `true`: via host A's control-socket proxy, median", statistics.median(warm) * 1000, "ms")]


def main() -> list:
    ensure_bytecode(ROOT)
    procs: list = []
    rows = []
    tmp = tempfile.mkdtemp(prefix="skypty-bench-")
    try:
        url = _network(procs)
        _, psk = generate_keypair()
        peer = subprocess.Popen([sys.executable, "-c", _PEER, psk.hex(), url, ROOT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(peer)
        if peer.stdout.readline().strip() != b"ready":
            raise RuntimeError("peer did not come up")
        me = DmsgClient(generate_keypair()[1], url).start()
        try:
            if not me.wait_ready(20):
                raise RuntimeError("client not ready")
            ppk = psk.pubkey()
            dials = []
            for _ in range(DIALS):
                t0 = time.perf_counter()
                s = me.dial(ppk, 7)
                dials.append(time.perf_counter() - t0)
                s.close()
            rows.append(("dmsg stream dial (KK via server), median", statistics.median(dials) * 1000, "ms"))
            s = me.dial(ppk, 7)
            rtts = []
            for _ in range(ECHOES):
                t0 = time.perf_counter()
                s.sendall(b"x" * 64)
                s.recv_exact(64)
                rtts.append(time.perf_counter() - t0)
            s.close()
            rows.append(("dmsg echo round trip 64 B on a stream, median", statistics.median(rtts) * 1e6, "us"))
            s = me.dial(ppk, 9)
            block = os.urandom(256 * 1024)
            total = MB * 1024 * 1024
            t0 = time.perf_counter()
            for _ in range(total // len(block)):
                s.sendall(block)
            s.shutdown_write()
            n = int(s.recv(64))
            dt = time.perf_counter() - t0
            s.close()
            if n != total:
                raise RuntimeError(f"sink counted {n} of {total} bytes")
            rows.append((f"dmsg stream one-way throughput ({MB} MiB)", total / dt / 1e6, "MB/s"))
        finally:
            me.close()
        rows.extend(_exec_rows(url, procs, tmp))
    finally:
        for p in reversed(procs):
            stop_process(p)
        shutil.rmtree(tmp, ignore_errors=True)   # the hosts' configs, once they are stopped
    for r in rows:
        print(*(r.values() if isinstance(r, dict) else r))
    return rows


if __name__ == "__main__":
    main()
