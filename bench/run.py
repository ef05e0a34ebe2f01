#!/usr/bin/env python3
"""`make bench`: run every benchmark script in bench/ and print one table, skypty beside its peer.

Each bench module has `main() -> rows`. A row is one of
  (name, value, unit)                      a skypty-only number
  (name, skypty, peer, unit)               a side-by-side number (peer None when the peer is absent)
  {"name":…, "skypty":…, "peer":…, "unit":…, "note":…}
A module may raise SkipBench("why") or return [] when it cannot run here; that is printed, not hidden.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

MODULES = ["bench_core", "bench_gob", "bench_coldstart", "bench_ssh", "bench_memory", "bench_fs", "bench_dmsg"]


def _norm(row) -> dict:
    if isinstance(row, dict):
        peer = next((row[k] for k in ("peer", "ssh", "sshfs") if k in row), None)
        note = row.get("note") or (f"target {row['target']}" if row.get("target") else "")
        return {"name": row.get("name") or row.get("metric") or "?", "skypty": row.get("skypty", row.get("value")),
                "peer": peer, "unit": row.get("unit", ""), "note": note}
    if len(row) == 3:
        return {"name": row[0], "skypty": row[1], "peer": None, "unit": row[2], "note": ""}
    if len(row) >= 4:
        return {"name": row[0], "skypty": row[1], "peer": row[2], "unit": row[3],
                "note": row[4] if len(row) > 4 else ""}
    raise ValueError(f"bad bench row {row!r}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def machine_facts() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {_commit()}; "
            f"{platform.machine()} {cpu}; {os.cpu_count()} cores; Python {platform.python_version()}; "
            f"{platform.platform()}; speed: {_loop_ms():.1f} ms per 1M-iteration Python loop")


def _commit() -> str:
    import subprocess
    try:
        r = subprocess.run(["git", "-C", os.path.dirname(HERE), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _loop_ms() -> float:
    """How fast this machine runs Python right now (median of 5): shared VMs vary by 2x over
    a day, so two results files are comparable only next to this."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(1_000_000):
            pass
        times.append(time.perf_counter() - t0)
    return sorted(times)[2] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="module names to run (default: all)")
    ap.add_argument("-o", "--out", help="also write the table to this file")
    a = ap.parse_args()
    lines = [f"# skypty bench — {machine_facts()}", "",
             f"| {'benchmark':<44} | {'skypty':>12} | {'peer':>12} | {'ratio':>7} | unit | note |",
             f"|{'-' * 46}|{'-' * 14}|{'-' * 14}|{'-' * 9}|------|------|"]
    for name in (a.only or MODULES):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            lines.append(f"| {name:<44} | {'-':>12} | {'-':>12} | {'-':>7} | | not available: {e} |")
            continue
        t0 = time.monotonic()
        saved_argv, sys.argv = sys.argv, [name]   # a module's own argparse must not see ours
        try:
            rows = mod.main() or []
        except Exception as e:  # a bench that breaks is reported, the others still run
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
            lines.append(f"| {name:<44} | {'-':>12} | {'-':>12} | {'-':>7} | | skipped: {e} |")
            continue
        finally:
            sys.argv = saved_argv
        for r in map(_norm, rows):
            ratio = "-"
            if isinstance(r["skypty"], (int, float)) and isinstance(r["peer"], (int, float)) and r["peer"]:
                ratio = f"{r['skypty'] / r['peer']:.2f}"
            lines.append(f"| {r['name']:<44} | {_fmt(r['skypty']):>12} | {_fmt(r['peer']):>12} | {ratio:>7} "
                         f"| {r['unit']} | {r['note']} |")
        sys.stderr.write(f"bench: {name} done in {time.monotonic() - t0:.1f}s\n")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
