"""Process and port helpers shared by the bench scripts (loopback only)."""
from __future__ import annotations

import socket
import subprocess
import time
from typing import Optional

__all__ = ["free_port", "wait_port", "stop_process", "ensure_bytecode", "start_sshd"]


def free_port() -> int:
    """A loopback TCP port free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Return once something accepts on 127.0.0.1:port; RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def stop_process(p: Optional[subprocess.Popen], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reaped either way. None is a no-op."""
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def ensure_bytecode(root: str) -> None:
    """Compile the skypty package to __pycache__, as `pip install` does. Without it, a box
    with PYTHONDONTWRITEBYTECODE set (or a read-only checkout) compiles every module on every
    spawn, and a CLI start measures the compiler (~20 ms here), not skypty."""
    import compileall
    import os

    compileall.compile_dir(os.path.join(root, "skypty"), quiet=1)


def start_sshd(cfg: str, workdir: str) -> "tuple[subprocess.Popen, str]":
    """A throwaway `sshd -D -f cfg` whose root account has a fresh home (Debian's /etc/skel rc
    files), and a note saying which account the ssh side ran as.

    sshd runs every command through the user's shell, and Debian's bash sources ~/.bashrc
    for it: a bench box's own rc files (pyenv, cargo, … measured at ~140 ms a command here)
    would be counted as ssh's cost. So sshd gets a private mount namespace in which
    /etc/passwd gives root a home under `workdir`; nothing outside that process tree sees
    it. Without `unshare` (util-linux) it runs as is, and the note says so."""
    import os
    import shutil

    home = os.path.join(workdir, "fresh-home")
    if os.path.isdir("/etc/skel"):
        shutil.copytree("/etc/skel", home, symlinks=True)
    else:
        os.makedirs(home)
    passwd = os.path.join(workdir, "passwd")
    with open("/etc/passwd") as src, open(passwd, "w") as dst:
        for line in src:
            f = line.rstrip("\n").split(":")
            if len(f) == 7 and f[0] == "root":
                f[5] = home
            dst.write(":".join(f) + "\n")
    sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", cfg]
    if shutil.which("unshare"):
        # unshare and sh exec in place: the Popen's pid is sshd's own, so stop_process stops it
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" /etc/passwd && exec "$@"', passwd] + sshd
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05)
        if p.poll() is None:
            return p, "ssh side: a fresh account (/etc/skel rc files)"
    p = subprocess.Popen(sshd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, "ssh side: root with this box's own rc files (no unshare)"
