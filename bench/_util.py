"""Process and port helpers shared by the bench scripts (loopback only)."""
from __future__ import annotations

import socket
import subprocess
import time
from typing import Optional

__all__ = ["free_port", "wait_port", "stop_process", "ensure_bytecode"]


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
