#!/usr/bin/env python3
"""Cold start: import cost of `cli pty exec`, and time from process spawn to the first byte on the wire
(XK message 1) for `python skypty.py`, the zipapp and the PyInstaller one-file binary (if built: make dist)."""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PK = "02" + "11" * 32  # never reached: the listener below reads message 1 and hangs up
RUNS = int(os.environ.get("BENCH_RUNS", "7"))


def _valid_pk() -> str:
    sys.path.insert(0, ROOT)
    from skypty.keys import generate_keypair

    return generate_keypair()[0].hex()


def first_byte_ms(argv_prefix: list, pk: str) -> float:
    """Spawn `<prefix> cli pty exec tcp://pk@127.0.0.1:P -- true` and time until its first byte arrives."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        t0 = time.perf_counter()
        p = subprocess.Popen(argv_prefix + ["cli", "pty", "exec", f"tcp://{pk}@127.0.0.1:{port}", "-s",
                                            "11" * 32, "--", "true"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ls.settimeout(30)
            c, _ = ls.accept()
            with c:
                c.recv(1)
                t1 = time.perf_counter()
        finally:
            # SIGTERM, not SIGKILL: a PyInstaller one-file binary passes it to its Python and
            # then removes its unpack dir (/tmp/_MEI…), which a kill leaves behind. (Only closing
            # our end is not enough: the reset makes the client retry its handshake.)
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return (t1 - t0) * 1000


def wall_ms(argv: list) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - t0) * 1000


def import_ms(pk: str) -> tuple:
    """Self time of all imports, from -X importtime, for the exec path (bounded by a dead port)."""
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "skypty.py"), "cli", "pty",
                        "exec", f"tcp://{pk}@127.0.0.1:9", "-s", "11" * 32, "--", "true"],
                       capture_output=True, text=True, timeout=60)
    total_us, mods = 0, []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = [x.strip() for x in line[len("import time:"):].split("|")]
            if parts[0].isdigit():
                total_us += int(parts[0])
                mods.append(parts[2].strip())
    return total_us / 1000, mods


def main() -> list:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _util import ensure_bytecode

    ensure_bytecode(ROOT)
    pk = _valid_pk()
    rows = []
    imp, mods = import_ms(pk)
    heavy = [m for m in ("fuse", "paramiko", "yaml", "http.server", "skypty.web", "skypty.fs") if m in mods]
    rows.append(("cold start: imports of `cli pty exec` (self time)", imp, None, "ms",
                 f"{len(mods)} modules; heavy: {', '.join(heavy) or 'none'}"))
    variants = [("python skypty.py", [sys.executable, os.path.join(ROOT, "skypty.py")])]
    pyz = os.path.join(ROOT, "dist", "skypty.pyz")
    if os.path.exists(pyz):
        variants.append(("zipapp skypty.pyz", [sys.executable, pyz]))
    binary = os.path.join(ROOT, "dist", "skypty")
    if os.path.exists(binary):
        variants.append(("PyInstaller one-file", [binary]))
    onedir = os.path.join(ROOT, "dist", "skypty-dir", "skypty-dir")
    if os.path.exists(onedir):
        variants.append(("PyInstaller one-folder", [onedir]))
    for label, argv in variants:
        fb = [first_byte_ms(argv, pk) for _ in range(RUNS)]
        rows.append((f"cold start: spawn -> first byte on wire, {label}", statistics.median(fb), None, "ms",
                     f"median of {RUNS}"))
        vs = [wall_ms(argv + ["--version"]) for _ in range(RUNS)]
        rows.append((f"cold start: `--version` wall time, {label}", statistics.median(vs), None, "ms",
                     f"median of {RUNS}"))
    if len(variants) < 3:
        rows.append(("cold start: zipapp / one-file", None, None, "", "not built: run `make dist` first"))
    return rows


if __name__ == "__main__":
    for r in main():
        print(r)
