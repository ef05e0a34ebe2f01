#!/usr/bin/env python3
"""The floor for echo latency: a pure-Python relay with skypty's process shape (a client that
forwards its terminal over loopback TCP to a host that runs a shell in a pty) and none of its
layers (no noise, no gob, no rpc, one select loop per side). Reference only, never skypty.

    _relay.py host PORT      serve 127.0.0.1:PORT, a thread per session, each `sh` in a pty
    _relay.py client PORT    raw-mode terminal <-> that host
"""
from __future__ import annotations

import os
import pty
import select
import signal
import socket
import sys
import threading
import tty


def _pump(a_read, a_write, b_sock) -> None:
    try:
        while True:
            r, _, _ = select.select([a_read, b_sock], [], [])
            if a_read in r:
                data = os.read(a_read, 65536)
                if not data:
                    return
                b_sock.sendall(data)
            if b_sock in r:
                data = b_sock.recv(65536)
                if not data:
                    return
                os.write(a_write, data)
    except OSError:   # the pty ended (EIO) or the peer went away
        return


def _session(s) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("sh", ["sh"])
    _pump(fd, fd, s)
    s.close()
    os.close(fd)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "host":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(4)
        while True:   # a thread per session, until killed (a probe that only connects is one)
            s, _ = ls.accept()
            threading.Thread(target=_session, args=(s,), daemon=True).start()
    else:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if os.isatty(0):
            tty.setraw(0)
        _pump(0, 1, s)


if __name__ == "__main__":
    main()
