#!/usr/bin/env python3
"""gob and net/rpc costs on the hot paths: a 32 KiB pty.Read reply ([]byte), a CommandExecResult
(small and 1 MiB of stdout), and one pty.Write round trip over a socketpair."""
from __future__ import annotations

import io
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skypty import gob, rpc  # noqa: E402
from skypty import gobtypes as T  # noqa: E402


def _per_op_us(fn, min_time: float = 0.3) -> float:
    n, t = 0, 0.0
    t0 = time.perf_counter()
    while t < min_time:
        for _ in range(50):
            fn()
        n += 50
        t = time.perf_counter() - t0
    return t / n * 1e6


def _codec_rows(label: str, t, value) -> list:
    """Steady state (definitions already sent, as on a long-lived connection)."""
    enc = gob.Encoder(None)
    hdr = {"ServiceMethod": "pty.Read", "Seq": 1, "Error": ""}
    first = enc.encode_many([(T.RPC_RESPONSE, hdr), (t, value)])
    msg = enc.encode_many([(T.RPC_RESPONSE, hdr), (t, value)])
    enc_us = _per_op_us(lambda: enc.encode_many([(T.RPC_RESPONSE, hdr), (t, value)]))

    dec = gob.Decoder(io.BytesIO(first).read)
    dec.decode(T.RPC_RESPONSE)
    dec.decode(t)
    src = io.BytesIO()

    def one_decode():
        src.seek(0)
        dec._read = src.read  # reuse the decoder: its definitions are known
        dec.decode(T.RPC_RESPONSE)
        dec.decode(t)
    src.write(msg)
    dec_us = _per_op_us(one_decode)
    mb = len(msg) / 1e6
    # per Response header + reply value, definitions already sent
    return [(f"gob encode {label}", enc_us, "us"),
            (f"gob decode {label}", dec_us, "us"),
            (f"gob encode {label}", mb / (enc_us / 1e6), "MB/s"),
            (f"gob decode {label}", mb / (dec_us / 1e6), "MB/s")]


def _rpc_round_trip_us() -> float:
    a, b = socket.socketpair()
    server = rpc.RPCServer(b)
    server.register("pty", [rpc.Method("Write", T.BYTES, T.INT, len)])
    import threading
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    client = rpc.RPCClient(a)
    try:
        return _per_op_us(lambda: client.call("pty.Write", T.BYTES, b"ls\r", T.INT, timeout=10), 0.5)
    finally:
        client.close()
        th.join(10)


def main() -> list:
    read32k = os.urandom(32 * 1024)
    small = dict(gob.zero_value(T.CommandExecResult), Stdout=b"out\n", Stderr=b"err\n", ExitCode=3,
                 DurationMS=12)
    big = dict(small, Stdout=os.urandom(1 << 20))
    rows = []
    rows += _codec_rows("32KiB Read reply", T.READ_REPLY, read32k)
    rows += _codec_rows("ExecResult small", T.CommandExecResult, small)[:2]
    rows += _codec_rows("ExecResult 1MiB stdout", T.CommandExecResult, big)
    rows.append(("rpc pty.Write round trip (socketpair)", _rpc_round_trip_us(), "us"))
    return rows


if __name__ == "__main__":
    for name, value, unit in main():
        print(f"{name:<44} {value:>12.2f} {unit}")
