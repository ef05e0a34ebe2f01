"""terminal._Writer, the interactive loop's input side, against a real pty service: a real
PtyClient on one end of a socketpair, the host's mux + rpc server + pty on the other."""
from __future__ import annotations

import threading
import time

import pytest

from skypty import limits
from skypty.client import PtyClient
from skypty.terminal import _Writer
from test_pty_service import _Conn

pytestmark = pytest.mark.timeout(60)

READY = b"READY\n"


class _RecordingClient(PtyClient):
    """The real client; it only notes the size of each Write the writer issues."""

    def __init__(self, conn):
        super().__init__(conn)
        self.sizes = []

    def write_then(self, data, fn):
        self.sizes.append(len(data))
        super().write_then(data, fn)


@pytest.fixture
def remote():
    """A PtyClient whose remote pty runs `cat` in raw mode without echo: what we write comes
    back exactly once, byte for byte."""
    c = _Conn(_RecordingClient)
    try:
        c.c.start("/bin/sh", ["-c", "stty raw -echo && printf READY\\\\n && exec cat"], env=[])
        out = b""
        while READY not in out:
            out += c.c.read()
        assert out.endswith(READY), out
        yield c.c
    finally:
        c.close()


def _read_back(client, n: int, timeout: float = 20.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += client.read()
    return out


class _Events:
    def __init__(self):
        self.errors = []
        self.room = threading.Event()
        self.room_calls = 0

    def on_error(self, e):
        self.errors.append(e)

    def on_room(self):
        self.room_calls += 1
        self.room.set()


def test_writer_batches_small_sends_in_order(remote):
    ev = _Events()
    w = _Writer(remote, ev.on_error, ev.on_room)
    chunks = [b"%05d," % i for i in range(3000)]
    want = b"".join(chunks)
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("out", _read_back(remote, len(want))))
    reader.start()
    for ch in chunks:   # as fast as keys could ever come: one Write in flight, the rest batched
        assert w.send(ch)
    reader.join(30)
    assert got["out"] == want
    assert ev.errors == [] and w.error is None
    assert sum(remote.sizes) == len(want)
    assert 1 < len(remote.sizes) < len(chunks)        # batched, not one Write per send
    assert max(remote.sizes) <= limits.CLIENT_READ_SIZE


def test_writer_has_no_room_while_a_full_batch_waits(remote):
    ev = _Events()
    w = _Writer(remote, ev.on_error, ev.on_room)
    assert w.has_room()
    size = limits.CLIENT_READ_SIZE
    data = bytes((i * 7 + i // 251) % 256 for i in range(3 * size + 123))
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("out", _read_back(remote, len(data) + 3)))
    ev.room.clear()
    assert w.send(data)          # one batch goes out, more than a batch waits
    assert not w.has_room()
    reader.start()
    while not w.has_room():      # what the input loop does: wait for on_room, ask again
        assert ev.room.wait(10), "on_room never came"
        ev.room.clear()
    assert w.send(b"end")
    reader.join(30)
    assert ev.room_calls >= 1    # has_room() said no once: on_room came when room returned
    assert got["out"] == data + b"end"           # every byte (all 256 values), in order
    assert ev.errors == []
    assert max(remote.sizes) <= size and sum(remote.sizes) == len(data) + 3


def test_writer_reports_a_failed_write_once(remote):
    ev = _Events()
    w = _Writer(remote, ev.on_error, ev.on_room)
    remote.stop()                # the pty is gone: every Write fails with EOF
    deadline = time.monotonic() + 5
    while not ev.errors and time.monotonic() < deadline:
        w.send(b"ab")            # True while the failure is not in yet (it comes on the reader thread)
        time.sleep(0.01)
    assert len(ev.errors) == 1 and str(ev.errors[0]) == "EOF"
    assert w.error is ev.errors[0]
    for _ in range(3):
        assert w.send(b"more") is False
    time.sleep(0.1)
    assert len(ev.errors) == 1


def test_writer_on_a_closed_connection(remote):
    ev = _Events()
    w = _Writer(remote, ev.on_error, ev.on_room)
    remote.close()
    assert w.send(b"x") is False              # the Write could not even be sent
    assert len(ev.errors) == 1
    assert w.send(b"y") is False and len(ev.errors) == 1


def test_a_session_and_a_host_take_their_start_up_heap_out_of_the_collectors_sight():
    """Once an interactive session started, and once a host is up, what is loaded lives as
    long as the process: gc.freeze() keeps it out of every later collection (bench/: a full
    collection of it was a ~5 ms pause of one keystroke)."""
    import gc
    import os

    from skypty.host import _Stopper
    from skypty.terminal import run_interactive

    gc.unfreeze()
    r, w = os.pipe()
    out = os.open(os.devnull, os.O_WRONLY)
    c = _Conn(PtyClient)
    try:
        run_interactive(c.c, "/bin/sh", ["-c", "exit 0"], env=[], stdin_fd=r, stdout_fd=out)
        session = gc.get_freeze_count()
        gc.unfreeze()
        stopper = _Stopper()
        stopper.event.set()
        try:
            stopper.wait()
        finally:
            stopper.restore()
        host = gc.get_freeze_count()
    finally:
        gc.unfreeze()
        c.close()
        for fd in (r, w, out):
            os.close(fd)
    assert session > 0 and host > 0
