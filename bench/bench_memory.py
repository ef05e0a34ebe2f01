#!/usr/bin/env python3
"""Memory of a host holding N idle interactive shells: the skypty host process vs all sshd
processes (sshd forks per connection), shells themselves excluded on both sides."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from bench_ssh import SkyptyPeer, SSHPeer  # noqa: E402

SHELLS = int(os.environ.get("BENCH_SHELLS", "200"))


def _children() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _tree_rss(root: int, names: tuple) -> int:
    """RSS (KiB) of root and its descendants whose command name starts with one of names."""
    kids, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        if pid == root or _comm(pid).startswith(names):
            total += _rss_kib(pid)
        todo.extend(kids.get(pid, []))
    return total


def skypty_rss(tmp: str, n: int) -> tuple:
    from skypty.client import open_interactive_tcp

    peer = SkyptyPeer(tmp)
    clients = []
    try:
        idle = _rss_kib(peer.proc.pid)
        for _ in range(n):   # as `cli pty shell` from a terminal: pty-stream sessions
            c = open_interactive_tcp("127.0.0.1", peer.port, peer.host_pk, peer.client_sk)
            c.start("/bin/sh", size=(24, 80))
            clients.append(c)
        time.sleep(2)
        return idle, _tree_rss(peer.proc.pid, ("python",))
    finally:
        for c in clients:
            c.close()
        peer.close()


def ssh_rss(tmp: str, n: int) -> tuple:
    peer = SSHPeer(tmp)
    procs = []
    try:
        idle = _rss_kib(peer.proc.pid)
        for _ in range(n):
            procs.append(subprocess.Popen(peer.shell_cmd(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        time.sleep(5)
        return idle, _tree_rss(peer.proc.pid, ("sshd",))
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        peer.close()


def main() -> list:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s_idle, s_busy = skypty_rss(tmp, SHELLS)
        ssh = None
        if os.path.exists("/usr/sbin/sshd") and os.geteuid() == 0:
            ssh = ssh_rss(tmp, SHELLS)
    rows.append(("memory: host RSS, no sessions", s_idle / 1024, ssh[0] / 1024 if ssh else None, "MiB",
                 "" if ssh else "sshd not installed or not root"))
    rows.append((f"memory: host RSS with {SHELLS} idle shells", s_busy / 1024, ssh[1] / 1024 if ssh else None,
                 "MiB", "server processes only, shells excluded"))
    rows.append(("memory: per idle shell", (s_busy - s_idle) / SHELLS, (ssh[1] - ssh[0]) / SHELLS if ssh else None,
                 "KiB", ""))
    return rows


if __name__ == "__main__":
    for r in main():
        print(r)
