"""The pty-stream subsystem (skypty's own, for skypty <-> skypty interactive sessions).

The framing and the Start parser on their own, then a real `cli pty host` subprocess on a
loopback port spoken to frame by frame over a real Noise XK connection: a session's output and
end, Start failures, resize, and every malformed input, each of which must end the session and
leave no process behind.
"""
from __future__ import annotations

import os
import random
import select
import re
import socket
import threading
import time

import pytest

from conftest import HostProc, process_alive, trickle, wait_gone
from skypty.client import dial_uri_tcp
from skypty.client_ptystream import PtyStreamClient
from skypty.errors import ProtocolError, SkyptyError
from skypty.services.ptystream import (MAX_PAYLOAD, PTY_STREAM_URI, T_DATA, T_ENDED, T_FAILED, T_PING, T_SIZE,
                                       T_START, T_STARTED, FrameReader, frame, parse_start, start_payload,
                                       winsize_payload)


# ---------------------------------------------------------------------------------- framing

class _Chunks:
    """A stream that hands out fixed pieces (the transport under FrameReader, not FrameReader)."""

    def __init__(self, data: bytes, cuts) -> None:
        self.pieces = []
        prev = 0
        for c in sorted(cuts) + [len(data)]:
            if c > prev:
                self.pieces.append(data[prev:c])
                prev = c

    def recv(self, n: int) -> bytes:
        if not self.pieces:
            return b""
        p = self.pieces.pop(0)
        if len(p) > n:
            self.pieces.insert(0, p[n:])
            p = p[:n]
        return p


FRAMES = [(T_DATA, b"a"), (T_PING, b""), (T_SIZE, winsize_payload(24, 80)), (T_DATA, os.urandom(70000)[:MAX_PAYLOAD]),
          (T_DATA, b"\x00" * 5), (T_ENDED, b"EOF")]


def test_frames_come_back_whole_however_the_stream_is_cut():
    wire = b"".join(frame(t, p) for t, p in FRAMES)
    rnd = random.Random(7)
    for _ in range(60):
        cuts = rnd.sample(range(1, len(wire)), rnd.randint(0, 40))
        rd = FrameReader(_Chunks(wire, cuts))
        assert [rd.next() for _ in FRAMES] == FRAMES
        assert rd.next() is None


def test_a_frame_over_the_cap_is_refused_before_it_is_read():
    rd = FrameReader(_Chunks(frame(T_DATA, b"x") + bytes([T_DATA]) + (MAX_PAYLOAD + 1).to_bytes(4, "big"), []))
    assert rd.next() == (T_DATA, b"x")
    with pytest.raises(ProtocolError, match="frame of 65537 bytes"):
        rd.next()


@pytest.mark.parametrize("cut", [1, 4, 5, 9])
def test_a_stream_cut_inside_a_frame_is_an_error_not_an_end(cut):
    rd = FrameReader(_Chunks(frame(T_DATA, b"12345")[:cut], []))
    with pytest.raises(ProtocolError, match="inside a frame"):
        rd.next()


def test_the_deadline_bounds_the_whole_frame_not_each_read():
    a, b = socket.socketpair()
    with a, b, trickle(a, frame(T_START, b"{}" * 40)):   # each read quick, the frame never whole
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            FrameReader(b).next(time.monotonic() + 0.4)
        assert time.monotonic() - t0 < 2.0


# ---------------------------------------------------------------------------------- Start

def test_start_round_trips_as_a_command_request():
    req = parse_start(start_payload("/bin/sh", ["-c", "echo"], ["TERM=xterm"], (24, 80)))
    assert req == {"Name": "/bin/sh", "Arg": ["-c", "echo"], "Env": ["TERM=xterm"],
                   "Size": {"Rows": 24, "Cols": 80, "X": 0, "Y": 0}}
    assert parse_start(b'{"Name": "sh"}') == {"Name": "sh", "Arg": [], "Env": [], "Size": None}


@pytest.mark.parametrize("payload, why", [
    (b"not json", "bad json"),
    (b"\xff\xfe", "bad json"),
    (b"[1]", "not a JSON object"),
    (b'{"Name": 5}', "Name must be a string"),
    (b'{"Name": "sh", "Arg": "-c"}', "Arg must be a list of strings"),
    (b'{"Name": "sh", "Arg": [1]}', "Arg must be a list of strings"),
    (b'{"Name": "sh", "Env": [null]}', "Env must be a list of strings"),
    (b'{"Name": "sh", "Size": [24, 80]}', "Size must be an object"),
    (b'{"Name": "sh", "Size": {"Rows": 70000}}', "out of range"),
    (b'{"Name": "sh", "Size": {"Rows": -1}}', "out of range"),
    (b'{"Name": "sh", "Size": {"Rows": true}}', "Rows must be an integer"),
    (b'{"Name": "sh", "Size": {"Rows": NaN}}', "bad json"),
    (b"[" * 100000, "bad json"),
])
def test_a_malformed_start_is_refused(payload, why):
    with pytest.raises(ProtocolError, match=why):
        parse_start(payload)


# ---------------------------------------------------------------------------------- a real host

def _dial(host):
    return dial_uri_tcp("127.0.0.1", host.port, host.pk, host.client_sk, PTY_STREAM_URI)


def _session(host, *argv: str, size=None):
    conn = _dial(host)
    conn.sendall(frame(T_START, start_payload(argv[0], argv[1:], ["TERM=dumb"], size)))
    rd = FrameReader(conn)
    conn.settimeout(20)
    return conn, rd


def _until(rd: FrameReader, pattern: bytes) -> bytes:
    """Output frames until pattern shows up; the frames seen must all be output."""
    out = b""
    while not re.search(pattern, out):
        got = rd.next()
        assert got is not None, out
        assert got[0] == T_DATA, got
        out += got[1]
    return out


def _rest(rd: FrameReader):
    """(output, end text) up to the host's close: 'X' must be the last frame."""
    out, end = b"", None
    while True:
        got = rd.next()
        if got is None:
            return out, end
        assert end is None, "a frame after 'X'"
        if got[0] == T_DATA:
            out += got[1]
        else:
            assert got[0] == T_ENDED, got
            end = got[1].decode()


def test_a_session_streams_output_then_says_it_ended(host):
    conn, rd = _session(host, "/bin/sh", "-c", "echo one; sleep 0.2; echo two")
    try:
        assert rd.next() == (T_STARTED, b"")
        out, end = _rest(rd)
    finally:
        conn.close()
    assert out.replace(b"\r", b"") == b"one\ntwo\n"
    assert end == "read /dev/ptmx: input/output error"   # what pty.Read says then


def test_input_size_and_resize(host):
    conn, rd = _session(host, "/bin/sh", size=(7, 33))
    try:
        assert rd.next() == (T_STARTED, b"")
        conn.sendall(frame(T_DATA, b"stty size; echo D''ONE\n"))
        assert b"7 33" in _until(rd, b"DONE")
        conn.sendall(frame(T_SIZE, winsize_payload(41, 121)) + frame(T_PING))
        conn.sendall(frame(T_DATA, b"stty size; echo A''GAIN\n"))
        assert b"41 121" in _until(rd, b"AGAIN")
        conn.sendall(frame(T_DATA, b"exit\n"))
        _, end = _rest(rd)
        assert end is not None
    finally:
        conn.close()


def test_a_start_that_fails_says_why(host):
    conn, rd = _session(host, "/no/such/program")
    try:
        tag, text = rd.next()
        assert tag == T_FAILED
        assert text.decode().startswith("fork/exec /no/such/program: no such file or directory")
        assert rd.next() is None   # and the host hangs up
    finally:
        conn.close()


def test_the_client_class_raises_a_start_failure_as_one_line(host):
    c = PtyStreamClient(_dial(host))
    try:
        with pytest.raises(SkyptyError, match="fork/exec /no/such/program"):
            c.start("/no/such/program")
    finally:
        c.close()


@pytest.mark.parametrize("first", [frame(T_DATA, b"ls\n"), frame(T_START, b"{bad"), b"\x53\xff\xff\xff\xff"])
def test_no_session_without_a_good_start(host, first):
    conn = _dial(host)
    try:
        conn.sendall(first)
        conn.settimeout(20)
        rd = FrameReader(conn)
        got = rd.next()
        if first.startswith(frame(T_START, b"{bad")[:5]):
            assert got is not None and got[0] == T_FAILED and b"bad json" in got[1]
            got = rd.next()
        assert got is None   # closed, nothing started
    finally:
        conn.close()


def _started_pid(host):
    conn, rd = _session(host, "/bin/sh", "-c", "echo PID=$$; exec sleep 600")
    assert rd.next() == (T_STARTED, b"")
    pid = int(re.search(rb"PID=(\d+)", _until(rd, rb"PID=\d+\r?\n")).group(1))
    assert process_alive(pid)
    return conn, rd, pid


@pytest.mark.parametrize("garbage", [
    bytes([T_DATA]) + (MAX_PAYLOAD + 1).to_bytes(4, "big"),   # oversized
    frame(ord("Z"), b"?"),                                     # unknown tag
    frame(T_START, start_payload("/bin/sh", [], [], None)),    # a second Start
    frame(T_SIZE, b"\x00\x18"),                                # a short window size
])
def test_garbage_mid_session_ends_it_and_the_program(host, garbage):
    conn, rd, pid = _started_pid(host)
    try:
        conn.sendall(garbage)
        assert wait_gone([pid]) == []
        assert _rest(rd)[1] in (None, "EOF")   # Stop's end text, or the cut alone
    finally:
        conn.close()


def test_hanging_up_stops_the_program(host):
    conn, _, pid = _started_pid(host)
    conn.close()
    assert wait_gone([pid]) == []
    assert f"accept {host.client_pk.hex()}" in host.log_text()


_NOT_READING = "stty raw -echo; echo PID=$$; exec sleep 600"   # raw: a full pty refuses input


def test_a_fin_while_the_host_holds_input_back_stops_the_program(host):
    """The pty is full, so the host reads no frames (back-pressure); our input all reached it,
    so our FIN does too, and it must end the session although no frame is read."""
    conn, rd = _session(host, "/bin/sh", "-c", _NOT_READING)
    try:
        assert rd.next() == (T_STARTED, b"")
        pid = int(re.search(rb"PID=(\d+)", _until(rd, rb"PID=\d+\r?\n")).group(1))
        for _ in range(96):   # ~96 KiB: more than the pty takes, less than the host's socket buffer
            conn.sendall(frame(T_DATA, b"x" * 1000 + b"\r"))
        time.sleep(0.5)
        assert process_alive(pid)
    finally:
        conn.close()   # SecureConn.close: shutdown, so a FIN
    assert wait_gone([pid]) == []


def test_the_client_hangs_up_past_input_the_host_holds_back(host):
    """Megabytes of input to a program that reads none fill every buffer up to our socket,
    where a FIN would wait behind them: PtyStreamClient.close() resets instead, so the host
    sees the hang-up at once and stops the program."""
    c = PtyStreamClient(_dial(host))
    out = []

    def on_read(data, err):
        if err is None:
            out.append(data)
            c.read_then(on_read)

    try:
        c.start("/bin/sh", ["-c", _NOT_READING], env=["TERM=dumb"])
        c.read_then(on_read)
        deadline = time.monotonic() + 20
        while not re.search(rb"PID=\d+\r?\n", b"".join(out)) and time.monotonic() < deadline:
            if c.output_waiting() or select.select([c.output_fd()], [], [], 1)[0]:
                assert c.deliver()
        pid = int(re.search(rb"PID=(\d+)", b"".join(out)).group(1))
        c.conn.settimeout(3)
        with pytest.raises(socket.timeout):   # everything fills up: the host holds input back
            for _ in range(64):
                c.write(b"x" * (256 * 1024))
        assert process_alive(pid)
    finally:
        c.close()
    assert wait_gone([pid]) == []


def test_a_host_stopping_ends_its_sessions(tmp_path):
    """SIGTERM: the program is killed, the client hears the end ('X', or the cut), the host exits 0."""
    h = HostProc(str(tmp_path))
    try:
        conn, rd, pid = _started_pid(h)
        t0 = time.monotonic()
        h.proc.terminate()
        assert h.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
        assert wait_gone([pid]) == []
        assert _rest(rd)[1] in (None, "EOF")
        conn.close()
    finally:
        h.stop()


def test_the_client_delivers_output_then_the_end_and_can_be_drained(host):
    """deliver() from a select loop: the output in order, then EOFError with the end text.
    terminal._drain_output is what run_interactive uses when input failed first."""
    from skypty.terminal import _drain_output

    c = PtyStreamClient(_dial(host))
    got, ends = [], []

    def on_read(data, err):
        if err is None:
            got.append(data)
            c.read_then(on_read)
        else:
            ends.append(err)

    try:
        c.start("/bin/sh", ["-c", "for i in 1 2 3; do echo line$i; done"], size=(24, 80))
        c.read_then(on_read)
        _drain_output(c, 20.0)
    finally:
        c.close()
    assert b"".join(got).replace(b"\r", b"") == b"line1\nline2\nline3\n"
    assert len(ends) == 1 and isinstance(ends[0], EOFError)
    assert str(ends[0]) == "read /dev/ptmx: input/output error"


def test_a_callback_that_does_not_rearm_stops_the_delivery(host):
    c = PtyStreamClient(_dial(host))
    seen = []
    try:
        c.start("/bin/sh", ["-c", "echo one; sleep 0.3; echo two; sleep 600"])
        c.read_then(lambda data, err: seen.append((data, err)))   # no read_then again
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            if c.output_waiting() or select.select([c.output_fd()], [], [], 1)[0]:
                if not c.deliver():
                    break
    finally:
        c.close()
    assert len(seen) == 1 and seen[0][1] is None and b"one" in seen[0][0]


class _NoFileno:
    """A real socket seen as a stream that cannot be polled (as a dmsg/yamux stream)."""

    def __init__(self, sock) -> None:
        self._s = sock

    def fileno(self) -> int:
        raise OSError("no file descriptor")

    def __getattr__(self, name):
        return getattr(self._s, name)


def test_over_a_stream_that_cannot_be_polled_start_fails_with_a_reason():
    from skypty.services.ptystream import serve_pty_stream

    a, b = socket.socketpair()
    t = threading.Thread(target=serve_pty_stream, args=(_NoFileno(b),), daemon=True)
    t.start()
    try:
        a.sendall(frame(T_START, start_payload("/bin/sh", [], [], None)))
        a.settimeout(20)
        rd = FrameReader(a)
        tag, text = rd.next()
        assert tag == T_FAILED and b"needs a TCP connection" in text
        assert rd.next() is None
    finally:
        a.close()
        t.join(10)
    assert not t.is_alive()


def test_a_session_collects_garbage_when_idle_not_during_traffic(host):
    """pty-stream sessions switch the automatic collector off (a collection in the middle of
    an echo was a measured share of the slow ones) and collect once idle for a second."""
    import gc

    from skypty.terminal import run_interactive

    seen, collections = [], []

    def watch():
        while not stop.is_set():
            seen.append(gc.isenabled())
            time.sleep(0.05)

    def on_gc(phase, info):
        if phase == "start":
            collections.append(time.monotonic())

    stop = threading.Event()
    r, w = os.pipe()
    out = os.open(os.devnull, os.O_WRONLY)
    c = PtyStreamClient(_dial(host))
    t = threading.Thread(target=watch, daemon=True)
    gc.callbacks.append(on_gc)
    try:
        t0 = time.monotonic()
        t.start()
        code = run_interactive(c, "/bin/sh", ["-c", "sleep 2"], env=[], stdin_fd=r, stdout_fd=out)
        t_end = time.monotonic()
    finally:
        stop.set()
        t.join(5)
        gc.callbacks.remove(on_gc)
        gc.unfreeze()
        for fd in (r, w, out):
            os.close(fd)
    assert code == 0
    assert gc.isenabled() and False in seen
    assert any(t0 + 0.9 < at < t_end for at in collections)   # the idle one, about a second in
