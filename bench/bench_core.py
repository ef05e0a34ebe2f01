#!/usr/bin/env python3
"""Security core: XK handshake CPU per side (target <= 2 ms) and SecureConn one-way throughput over a
loopback socketpair with full 4070-byte records (target >= 400 MB/s; median of 3 runs after a
warm-up), classical and ML-KEM hybrid.

The throughput test runs the sender in a forked child process (as a real peer would be), so the
two sides do not share one GIL. `main()` returns (name, value, unit) rows and prints them.
"""
from __future__ import annotations

import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from skypty import noise  # noqa: E402
from skypty.keys import generate_keypair  # noqa: E402
from skypty.noise import Handshake, client_handshake, server_handshake  # noqa: E402

HANDSHAKES = int(os.environ.get("BENCH_HANDSHAKES", "300"))
THROUGHPUT_MB = int(os.environ.get("BENCH_MB", "512"))
WRITE_SIZE = 64 * 4070  # one sendall = 64 full records


def handshake_cpu_ms(pq: bool, n: int = HANDSHAKES):
    """Mean CPU per side (ms): process time spent inside each side's own handshake calls."""
    c_sk, s_sk = generate_keypair()[1], generate_keypair()[1]
    s_pk = s_sk.pubkey()
    t_i = t_r = 0.0
    clock = time.process_time
    for _ in range(n):
        t0 = clock()
        hi = Handshake("XK", True, c_sk, s_pk, pq=pq)
        m1 = hi.write_message()
        t1 = clock()
        hr = Handshake("XK", False, s_sk, pq=pq)
        hr.read_message(m1)
        m2 = hr.write_message()
        t2 = clock()
        hi.read_message(m2)
        m3 = hi.write_message()
        hi.split()
        t3 = clock()
        hr.read_message(m3)
        hr.split()
        t4 = clock()
        t_i += (t1 - t0) + (t3 - t2)
        t_r += (t2 - t1) + (t4 - t3)
    return t_i / n * 1000, t_r / n * 1000


def handshake_wall_ms(pq: bool, n: int = 100) -> float:
    """Full client_handshake + server_handshake over a socketpair (two threads), wall time."""
    import threading

    c_sk, s_sk = generate_keypair()[1], generate_keypair()[1]
    t0 = time.perf_counter()
    for _ in range(n):
        a, b = socket.socketpair()
        res = {}
        th = threading.Thread(target=lambda: res.update(s=server_handshake(b, s_sk, timeout=10, pq=pq)))
        th.start()
        c = client_handshake(a, c_sk, s_sk.pubkey(), timeout=10, pq=pq)
        th.join()
        c.close()
        res["s"].close()
    return (time.perf_counter() - t0) / n * 1000


def throughput_mb_s(pq: bool, total_mb: int = THROUGHPUT_MB) -> float:
    """One-way SecureConn throughput: a forked child sends, this process receives and times."""
    c_sk, s_sk = generate_keypair()[1], generate_keypair()[1]
    a, b = socket.socketpair()
    total = total_mb * 1024 * 1024
    payload = os.urandom(WRITE_SIZE)
    pid = os.fork()
    if pid == 0:  # the sender
        code = 0
        try:
            b.close()
            c = client_handshake(a, c_sk, s_sk.pubkey(), timeout=10, pq=pq)
            sent = 0
            while sent < total:
                n = min(WRITE_SIZE, total - sent)
                c.sendall(payload if n == WRITE_SIZE else payload[:n])
                sent += n
            c.shutdown_write()
            c.recv(1)  # wait for the receiver to finish before closing
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    a.close()
    try:
        s = server_handshake(b, s_sk, timeout=10, pq=pq)
        got = 0
        t0 = None
        while True:
            d = s.recv(1 << 20)
            if not d:
                break
            if t0 is None:
                t0 = time.perf_counter()
                first = len(d)
            got += len(d)
        dt = time.perf_counter() - t0
        s.close()
    finally:
        _, status = os.waitpid(pid, 0)
    if got != total or status != 0:
        raise RuntimeError(f"throughput run failed: got {got} of {total} bytes, sender status {status}")
    return (got - first) / dt / 1e6


def seal_open_mb_s(n_records: int = 20000):
    """Single-core CPU cost of the record layer alone (no sockets): seal and open rates."""
    key = os.urandom(32)
    send, recv = noise.SendCipher(key), noise.RecvCipher(key)
    data = os.urandom(64 * 4070)
    t_seal = t_open = 0.0
    for _ in range(max(1, n_records // 64)):
        t0 = time.perf_counter()
        buf = send.seal_frames(data)
        t1 = time.perf_counter()
        mv = memoryview(buf)
        pos = 0
        while pos < len(buf):
            ln = (buf[pos] << 8) | buf[pos + 1]
            recv.open(mv[pos + 2:pos + 2 + ln])
            pos += 2 + ln
        mv.release()
        t_seal += t1 - t0
        t_open += time.perf_counter() - t1
    size = max(1, n_records // 64) * len(data)
    return size / t_seal / 1e6, size / t_open / 1e6


def main():
    rows = []
    throughput_mb_s(False, 64)  # warm-up: the first fork and buffers run cold
    for pq in (False, True):
        if pq and not noise.pq_available():
            rows.append(("XK handshake (ML-KEM hybrid)", "n/a", "ML-KEM unavailable"))
            continue
        tag = "hybrid" if pq else "classical"
        ini, res = handshake_cpu_ms(pq)
        rows.append((f"XK handshake CPU, initiator ({tag})", round(ini, 3), "ms"))
        rows.append((f"XK handshake CPU, responder ({tag})", round(res, 3), "ms"))
        rows.append((f"XK handshake wall, socketpair ({tag})", round(handshake_wall_ms(pq), 3), "ms"))
        runs = sorted(throughput_mb_s(pq, THROUGHPUT_MB // 3) for _ in range(3))
        rows.append((f"SecureConn 1-way throughput ({tag})", round(runs[1], 1), "MB/s"))
    seal, opn = seal_open_mb_s()
    rows.append(("record seal, 4070 B records, 1 core", round(seal, 1), "MB/s"))
    rows.append(("record open, 4070 B records, 1 core", round(opn, 1), "MB/s"))
    for r in rows:
        print(f"{r[0]:<52} {r[1]:>10} {r[2]}")
    return rows


if __name__ == "__main__":
    main()
