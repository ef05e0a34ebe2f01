"""Shared test helpers: the vectors (copied from the Go implementation) and skypty subprocesses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "tests", "vectors")
SKYPTY = [sys.executable, os.path.join(ROOT, "skypty.py")]


def load_vector(name: str) -> dict:
    with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def vectors():
    return load_vector


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def run_skypty(*args: str, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    """Run `python skypty.py ARGS…` to completion and capture its output (bytes)."""
    return subprocess.run(SKYPTY + list(args), capture_output=True, timeout=timeout, **kw)


def stop_process(p: subprocess.Popen, timeout: float = 5.0) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
