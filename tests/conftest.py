"""Shared test helpers: the vectors (copied from the Go implementation), skypty subprocesses,
socketpairs, and the fixed-nonce signer the known-answer signature tests need."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import coincurve
import pytest
from coincurve._libsecp256k1 import ffi

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


@pytest.fixture
def pair():
    """A connected socketpair (a, b); 20 s timeouts make a stuck test fail, not hang. Closed after."""
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    yield a, b
    for s in (a, b):
        try:
            s.close()
        except OSError:
            pass


def recv_exact(sock, n: int) -> bytes:
    """Exactly n bytes from a socket; a test failure if the peer closes first."""
    buf = b""
    while len(buf) < n:
        c = sock.recv(n - len(buf))
        assert c, f"peer closed early ({len(buf)} of {n} bytes)"
        buf += c
    return buf


def sign_hash_fixed_nonce(sk, digest: bytes, k: bytes) -> bytes:
    """r||s||v over a 32-byte digest with the explicit nonce k, as the Go vectors were made.
    Known-answer tests only: a fixed nonce leaks the secret key, so production never has this."""
    k = bytes(k)

    @ffi.callback("int(unsigned char *, const unsigned char *, const unsigned char *,"
                  " const unsigned char *, void *, unsigned int)")
    def nonce(out, msg, key, algo, data, attempt):  # called from C: only the first attempt has k
        if attempt:
            return 0
        ffi.memmove(out, k, 32)
        return 1

    return coincurve.PrivateKey(bytes(sk)).sign_recoverable(bytes(digest), hasher=None, custom_nonce=(nonce, ffi.NULL))


def process_alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


def wait_gone(pids, bound: float = 10.0) -> list:
    """Wait until none of pids is alive; return those still alive after `bound` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if not any(process_alive(p) for p in pids):
            return []
        time.sleep(0.05)
    return [p for p in pids if process_alive(p)]


class HostProc:
    """A `cli pty host` subprocess on a loopback port that allows one fresh client key, its
    output in tmp/host.log. `dest` and `sk_args` are what a client command line needs."""

    def __init__(self, tmp: str) -> None:
        from skypty.keys import generate_keypair

        self.pk, sk = generate_keypair()
        self.client_pk, self.client_sk = generate_keypair()
        conf = os.path.join(tmp, "skywire-config.json")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"sk": sk.hex(), "pk": self.pk.hex()}, f)
        self.port = free_port()
        self.log_path = os.path.join(tmp, "host.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(SKYPTY + ["cli", "pty", "host", "-l", f"127.0.0.1:{self.port}",
                                               "--sk-from-visor", conf, "--allow", self.client_pk.hex()],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_port(self.port, timeout=20)
        except Exception:
            self.stop()
            raise
        self.dest = f"{self.pk.hex()}@127.0.0.1:{self.port}"
        self.sk_args = ["--sk", self.client_sk.hex()]

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def host():
    """One HostProc per test module (a module with a `host` fixture of its own uses that)."""
    with tempfile.TemporaryDirectory() as tmp:
        h = HostProc(tmp)
        try:
            yield h
        finally:
            h.stop()


@contextmanager
def trickle(sock, data: bytes, every: float = 0.05):
    """Send data one byte every `every` seconds on a thread while the block runs (a peer that
    keeps each read quick and never completes a message); stopped and joined after it."""
    stop = threading.Event()

    def run() -> None:
        for byte in data:
            if stop.wait(every):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
