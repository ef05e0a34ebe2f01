#!/usr/bin/env python3
"""fs mount throughput: skypty (`cli pty fs mount` on a `cli pty host`) vs sshfs, in one run.

Phases, each on a fresh mount with the page cache dropped first:
  seq-write  write one 256 MiB file in 1 MiB blocks (open -> close; close waits for every ack)
  seq-read   read it back in 1 MiB blocks (checksum compared with the host's copy)
  small      listdir + stat + read of 2,000 small files (1-8 KiB) created on the host side

sshfs runs against a throwaway sshd on a loopback port (temporary host and user keys, its own
config, stopped afterwards); it is skipped, with a note, when sshfs or sshd is missing.
Needs root and /dev/fuse. Prints a table; `main()` returns the rows.

    python bench/bench_fs.py [--size-mib 256] [--files 2000] [--repeat 2] [--no-sshfs]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from _util import ensure_bytecode, free_port as _free_port, stop_process as _stop, wait_port as _wait_port  # noqa: E402

SKYPTY = [sys.executable, os.path.join(ROOT, "skypty.py")]
BLOCK = 1024 * 1024


def _mounted(path: str) -> bool:
    from skypty.fs import find_mount

    return find_mount(path) is not None


def _wait_mounted(path: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _mounted(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"mount process exited {proc.returncode}: {_tail(proc)}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not get mounted")


def _tail(proc: subprocess.Popen) -> str:
    try:
        return (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()[-1]
    except Exception:
        return "?"


def _unmount(path: str) -> None:
    for cmd in (["fusermount", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not _mounted(path):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)


def _drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass   # not allowed here: fresh mounts still avoid the FUSE page cache


# ---------------------------------------------------------------------------------- the peers

class _MountPeer:
    """A server process plus the mount processes started against it (mnt -> Popen)."""

    server: Optional[subprocess.Popen] = None
    mounts: Dict[str, subprocess.Popen]

    def _ask_umount(self, mnt: str) -> None:
        """The peer's own way to unmount, tried before fusermount."""

    def umount(self, mnt: str) -> None:
        self._ask_umount(mnt)
        _unmount(mnt)
        p = self.mounts.pop(mnt, None)
        if p is not None:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                _stop(p)

    def close(self) -> None:
        for mnt in list(self.mounts):
            self.umount(mnt)
        _stop(self.server)


class SkyptyPeer(_MountPeer):
    name = "skypty"

    def __init__(self, work: str, srv: str) -> None:
        from skypty.keys import generate_keypair

        self.work, self.srv = work, srv
        self.hpk, hsk = generate_keypair()
        self.cpk, self.csk = generate_keypair()
        self.port = _free_port()
        conf = os.path.join(work, "host.json")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"sk": hsk.hex(), "pk": self.hpk.hex(), "wl": [self.cpk.hex()]}, f)
        self.server = subprocess.Popen(
            SKYPTY + ["cli", "pty", "host", "-l", f"127.0.0.1:{self.port}", "-c", conf,
                      "--allow", self.cpk.hex(), "--sftp-root", srv, "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        self.mounts: Dict[str, subprocess.Popen] = {}

    def mount(self, mnt: str) -> None:
        p = subprocess.Popen(SKYPTY + ["cli", "pty", "fs", "mount", f"{self.hpk.hex()}@127.0.0.1:{self.port}",
                                       mnt, "--sk", self.csk.hex()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.mounts[mnt] = p
        _wait_mounted(mnt, p)

    def _ask_umount(self, mnt: str) -> None:
        subprocess.run(SKYPTY + ["cli", "pty", "fs", "umount", mnt], capture_output=True, timeout=30)


class SshfsPeer(_MountPeer):
    name = "sshfs"

    @staticmethod
    def missing() -> Optional[str]:
        for tool in ("sshfs", "ssh-keygen"):
            if shutil.which(tool) is None:
                return f"{tool} not installed (apt install sshfs openssh-server)"
        if not os.path.exists("/usr/sbin/sshd"):
            return "sshd not installed (apt install openssh-server)"
        return None

    def __init__(self, work: str, srv: str) -> None:
        self.work, self.srv = work, srv
        d = os.path.join(work, "ssh")
        os.makedirs(d, mode=0o700)
        self.hostkey = os.path.join(d, "host_ed25519")
        self.userkey = os.path.join(d, "user_ed25519")
        for k in (self.hostkey, self.userkey):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], check=True)
        auth = os.path.join(d, "authorized_keys")
        shutil.copy(self.userkey + ".pub", auth)
        os.chmod(auth, 0o600)
        self.port = _free_port()
        sftp_server = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                        "/usr/lib/ssh/sftp-server") if os.path.exists(p)), "internal-sftp")
        cfg = os.path.join(d, "sshd_config")
        with open(cfg, "w") as f:
            f.write(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.hostkey}\n"
                    f"AuthorizedKeysFile {auth}\nPidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin yes\n"
                    f"Subsystem sftp {sftp_server}\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation directory
        from _util import start_sshd

        self.server, self.note = start_sshd(cfg, d)
        _wait_port(self.port)
        self.mounts: Dict[str, subprocess.Popen] = {}

    def mount(self, mnt: str) -> None:
        user = os.environ.get("USER") or "root"
        p = subprocess.Popen(["sshfs", "-f", f"{user}@127.0.0.1:{self.srv}", mnt, "-p", str(self.port),
                              "-o", f"IdentityFile={self.userkey}", "-o", "StrictHostKeyChecking=no",
                              "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                              "-o", "BatchMode=yes"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.mounts[mnt] = p
        _wait_mounted(mnt, p)



# ---------------------------------------------------------------------------------- phases

def _fresh(peer, mnt: str, fn: Callable[[str], float]) -> float:
    _drop_caches()
    peer.mount(mnt)
    try:
        return fn(mnt)
    finally:
        peer.umount(mnt)


def seq_write(mnt: str, name: str, data: bytes) -> float:
    t0 = time.perf_counter()
    with open(os.path.join(mnt, name), "wb", buffering=0) as f:
        mv = memoryview(data)
        for off in range(0, len(mv), BLOCK):
            f.write(mv[off:off + BLOCK])
    return time.perf_counter() - t0   # close() returned: every block was acknowledged


def seq_read(mnt: str, name: str, want: bytes) -> float:
    h = hashlib.sha256()
    t0 = time.perf_counter()
    with open(os.path.join(mnt, name), "rb", buffering=0) as f:
        while True:
            b = f.read(BLOCK)
            if not b:
                break
            h.update(b)
    dt = time.perf_counter() - t0
    if h.digest() != want:
        raise RuntimeError("read back different bytes")
    return dt


def small_files(mnt: str, count: int, want_bytes: int) -> float:
    d = os.path.join(mnt, "small")
    t0 = time.perf_counter()
    total = 0
    names = sorted(os.listdir(d))
    for n in names:
        p = os.path.join(d, n)
        st = os.stat(p)
        with open(p, "rb", buffering=0) as f:
            total += len(f.read(st.st_size + 1))
    dt = time.perf_counter() - t0
    if len(names) != count or total != want_bytes:
        raise RuntimeError(f"saw {len(names)} files / {total} bytes, want {count} / {want_bytes}")
    return dt


def _make_small(srv: str, count: int) -> int:
    d = os.path.join(srv, "small")
    os.makedirs(d, exist_ok=True)
    total = 0
    for i in range(count):
        with open(os.path.join(d, f"f{i:05d}.txt"), "wb") as f:
            total += f.write(os.urandom(1024 + (i * 7919) % 7168))
    return total


def main(argv: Optional[List[str]] = None) -> List[dict]:
    ensure_bytecode(ROOT)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per phase; the best one counts")
    ap.add_argument("--no-sshfs", action="store_true")
    if argv is None and __name__ != "__main__":
        argv = []   # called by bench/run.py: its command line is not ours
    a = ap.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench_fs: needs root and /dev/fuse; skipped")
        return []
    data = os.urandom(a.size_mib * BLOCK)
    digest = hashlib.sha256(data).digest()
    work = tempfile.mkdtemp(prefix="skypty-bench-fs-")
    srv = os.path.join(work, "srv")
    os.makedirs(srv)
    small_bytes = _make_small(srv, a.files)
    peers = []
    note = SshfsPeer.missing() if not a.no_sshfs else "--no-sshfs"
    results: Dict[str, Dict[str, float]] = {}
    try:
        peers.append(SkyptyPeer(work, srv))
        if note is None:
            peers.append(SshfsPeer(work, srv))
        for peer in peers:
            mnt = os.path.join(work, "mnt-" + peer.name)
            os.makedirs(mnt)
            name = f"seq-{peer.name}.bin"
            w = min(_fresh(peer, mnt, lambda m: seq_write(m, name, data)) for _ in range(a.repeat))
            if hashlib.sha256(open(os.path.join(srv, name), "rb").read()).digest() != digest:
                raise RuntimeError(f"{peer.name}: the host's copy differs")
            r = min(_fresh(peer, mnt, lambda m: seq_read(m, name, digest)) for _ in range(a.repeat))
            s = min(_fresh(peer, mnt, lambda m: small_files(m, a.files, small_bytes)) for _ in range(a.repeat))
            os.unlink(os.path.join(srv, name))
            results[peer.name] = {"seq-write": a.size_mib / w, "seq-read": a.size_mib / r, "small": a.files / s}
    finally:
        for peer in peers:
            try:
                peer.close()
            except Exception as e:
                print(f"bench_fs: cleanup of {peer.name}: {e}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    units = {"seq-write": "MiB/s", "seq-read": "MiB/s", "small": "files/s"}
    targets = {"seq-write": 1.2, "seq-read": 1.2, "small": 1.0}
    for phase in ("seq-write", "seq-read", "small"):
        sky = results["skypty"][phase]
        ssh = results.get("sshfs", {}).get(phase)
        rows.append({"name": f"fs {phase}", "phase": phase, "unit": units[phase], "skypty": round(sky, 1),
                     "peer": None if ssh is None else round(ssh, 1), "sshfs": None if ssh is None else round(ssh, 1),
                     "ratio": None if not ssh else round(sky / ssh, 2), "target": targets[phase],
                     "note": f"peer: sshfs; target >= {targets[phase]}x" if ssh else f"sshfs skipped: {note}"})
    print(f"fs bench: {a.size_mib} MiB sequential, {a.files} small files, best of {a.repeat}")
    print(f"{'phase':<10} {'unit':<8} {'skypty':>9} {'sshfs':>9} {'ratio':>7} {'target':>7}")
    for r in rows:
        ssh = "-" if r["sshfs"] is None else f"{r['sshfs']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['phase']:<10} {r['unit']:<8} {r['skypty']:>9.1f} {ssh:>9} {ratio:>7} {r['target']:>6.1f}x")
    if note is not None:
        print(f"sshfs skipped: {note}")
    return rows


if __name__ == "__main__":
    main()
