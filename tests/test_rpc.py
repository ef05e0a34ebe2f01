"""net/rpc over real socketpairs: replaying Go's transcripts (gob_rpc.json) against our server
and our client, then concurrency, errors and connection death.

Our server and client use Go's first type id (64) in the replays, so their bytes must equal a
fresh Go process's bytes exactly; with the default ids only the id numbers would differ
(test_gob.py checks that by decoding).
"""
from __future__ import annotations

import io
import logging
import os
import random
import socket
import threading
import time

import pytest

from conftest import load_vector, recv_exact
from skypty import gob, rpc
from skypty import gobtypes as T
from skypty.errors import ProtocolError
from test_gob import SCENARIOS, method_types, py_value

GOB = load_vector("gob_rpc.json")


class ServerThread:
    def __init__(self, conn, services, **kw):
        self.server = rpc.RPCServer(conn, **kw)
        for svc in services:
            self.server.register(*svc)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def scripted_services(sc):
    """A pty/whitelist service whose methods check the documented args and answer the
    documented replies, in call order (the replay sends one call at a time)."""
    calls = list(sc["calls"])
    lock = threading.Lock()
    services = {}

    def make(method):
        at, rt = method_types(sc["scenario"], method)

        def fn(arg):
            with lock:
                call = calls.pop(0)
            assert call["method"] == method
            assert arg == py_value(call["args"], at)
            if call["error"]:
                raise RuntimeError(call["error"])
            return py_value(call["reply"], rt)
        return rpc.Method(method.split(".")[1], at, rt, fn)

    for call in sc["calls"]:
        svc, name = call["method"].split(".")
        services.setdefault(svc, {})[name] = make(call["method"])
    return [(svc, list(ms.values())) for svc, ms in services.items()]


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s["scenario"])
def test_server_answers_go_client_bytes_exactly(sc, pair):
    go_client, ours = pair
    srv = ServerThread(ours, scripted_services(sc), first_id=64)
    try:
        for call in sc["calls"]:
            go_client.sendall(bytes.fromhex(call["c2s_hex"]))
            want = bytes.fromhex(call["s2c_hex"])
            assert recv_exact(go_client, len(want)).hex() == call["s2c_hex"]
        go_client.shutdown(socket.SHUT_WR)
        assert go_client.recv(1) == b""       # server closes after the peer's EOF
    finally:
        srv.stop()


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s["scenario"])
def test_server_with_default_ids_gives_same_values(sc, pair):
    go_client, ours = pair
    srv = ServerThread(ours, scripted_services(sc))
    try:
        go_client.sendall(b"".join(bytes.fromhex(c["c2s_hex"]) for c in sc["calls"][:1]))
        dec = gob.Decoder(gob.BufferedReader(go_client).read_exact)
        call = sc["calls"][0]
        hdr = dec.decode(T.RPC_RESPONSE)
        assert hdr == {"ServiceMethod": call["method"], "Seq": call["seq"], "Error": call["error"] or ""}
        _, rt = method_types(sc["scenario"], call["method"])
        assert dec.decode(rt if not call["error"] else T.EMPTY) == (
            py_value(call["reply"], rt) if not call["error"] else {})
    finally:
        srv.stop()


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s["scenario"])
def test_client_sends_go_bytes_exactly(sc, pair):
    ours, go_server = pair
    seen = []

    def fake_go_server():
        for call in sc["calls"]:
            got = recv_exact(go_server, len(call["c2s_hex"]) // 2)
            seen.append(got.hex() == call["c2s_hex"])
            go_server.sendall(bytes.fromhex(call["s2c_hex"]))
    t = threading.Thread(target=fake_go_server, daemon=True)
    t.start()
    client = rpc.RPCClient(ours, first_id=64)
    try:
        for call in sc["calls"]:
            at, rt = method_types(sc["scenario"], call["method"])
            arg = py_value(call["args"], at)
            if call["error"]:
                with pytest.raises(rpc.RPCError) as ei:
                    client.call(call["method"], at, arg, rt, timeout=20)
                assert str(ei.value) == call["error"]
            else:
                assert client.call(call["method"], at, arg, rt, timeout=20) == py_value(call["reply"], rt)
        t.join(10)
        assert seen == [True] * len(sc["calls"])
    finally:
        client.close()


# ---------------------------------------------------------------------------- behaviour

def echo_services(state):
    def block(arg):
        state["started"].set()
        state["release"].wait(20)
        return b"late"

    def fail(arg):
        raise ValueError("dmsgpty: Exec: empty command name")

    def bad_reply(arg):
        return "not an int"
    return [("pty", [
        rpc.Method("Read", T.READ_ARG, T.READ_REPLY, block),
        rpc.Method("Write", T.WRITE_ARG, T.WRITE_REPLY, len),
        rpc.Method("Fail", T.EMPTY, T.EMPTY, fail),
        rpc.Method("Bad", T.EMPTY, T.INT, bad_reply),
    ])]


def new_state():
    return {"started": threading.Event(), "release": threading.Event()}


@pytest.fixture
def echo_rpc(pair):
    """(state, client, a, b): echo_services served on b, an RPCClient on a; all stopped after."""
    st = new_state()
    a, b = pair
    srv = ServerThread(b, echo_services(st))
    client = rpc.RPCClient(a)
    yield st, client, a, b
    st["release"].set()
    client.close()
    srv.stop()


def test_blocked_call_does_not_stall_others(echo_rpc):
    st, client, _, _ = echo_rpc
    res = []
    t = threading.Thread(target=lambda: res.append(client.call("pty.Read", T.INT, 10, T.BYTES)))
    t.start()
    assert st["started"].wait(20)
    for i in range(20):
        assert client.call("pty.Write", T.BYTES, b"x" * i, T.INT, timeout=20) == i
    assert not res
    st["release"].set()
    t.join(20)
    assert res == [b"late"]


def test_replies_out_of_order_on_the_wire(pair):
    st = new_state()
    a, b = pair
    srv = ServerThread(b, echo_services(st))
    try:
        enc = gob.Encoder(None)
        a.sendall(enc.encode_many([(T.RPC_REQUEST, {"ServiceMethod": "pty.Read", "Seq": 0}), (T.INT, 5)]))
        assert st["started"].wait(20)
        a.sendall(enc.encode_many([(T.RPC_REQUEST, {"ServiceMethod": "pty.Write", "Seq": 1}), (T.BYTES, b"abc")]))
        dec = gob.Decoder(gob.BufferedReader(a).read_exact)
        assert dec.decode(T.RPC_RESPONSE)["Seq"] == 1
        assert dec.decode(T.INT) == 3
        st["release"].set()
        assert dec.decode(T.RPC_RESPONSE)["Seq"] == 0
        assert dec.decode(T.BYTES) == b"late"
    finally:
        st["release"].set()
        srv.stop()


def test_error_texts(pair):
    a, b = pair
    srv = ServerThread(b, echo_services(new_state()))
    client = rpc.RPCClient(a)
    try:
        cases = [("pty.StartSession", "rpc: can't find method pty.StartSession"),
                 ("nope.Start", "rpc: can't find service nope.Start"),
                 ("ptyStart", "rpc: service/method request ill-formed: ptyStart"),
                 ("pty.Fail", "dmsgpty: Exec: empty command name")]
        for method, text in cases:
            with pytest.raises(rpc.RPCError) as ei:
                client.call(method, T.CommandReq, {"Name": "/bin/sh", "Arg": ["-c", "x"]}, T.STRING, timeout=20)
            assert str(ei.value) == text
        with pytest.raises(rpc.RPCError, match="cannot encode reply"):
            client.call("pty.Bad", T.EMPTY, {}, T.INT, timeout=20)
        # a wrong argument type is reported and the connection stays usable
        with pytest.raises(rpc.RPCError, match="^gob: type mismatch"):
            client.call("pty.Write", T.STRING, "abc", T.INT, timeout=20)
        assert client.call("pty.Write", T.BYTES, b"abcd", T.INT, timeout=20) == 4
    finally:
        client.close()
        srv.stop()


def test_unknown_method_reply_bytes_match_go(pair):
    """pty.md §2.5: Go's reply to an unknown method, byte for byte (ids as Go's fresh host)."""
    a, b = pair
    srv = ServerThread(b, [("pty", [rpc.Method("Start", T.CommandReq, T.EMPTY, lambda a: {})])], first_id=64)
    try:
        enc = gob.Encoder(None, 64)
        a.sendall(enc.encode_many([(T.RPC_REQUEST, {"ServiceMethod": "pty.StartSession", "Seq": 0}),
                                   (T.CommandReq, {"Name": "/bin/bash"})]))
        dec = gob.Decoder(gob.BufferedReader(a).read_exact)
        assert dec.decode(T.RPC_RESPONSE)["Error"] == "rpc: can't find method pty.StartSession"
        assert dec.decode(T.EMPTY) == {}
    finally:
        srv.stop()


def test_connection_death_fails_pending_calls(echo_rpc):
    st, client, _, b = echo_rpc
    errors = []

    def pending():
        try:
            client.call("pty.Read", T.INT, 1, T.BYTES)
        except Exception as e:
            errors.append(e)
    t = threading.Thread(target=pending)
    t.start()
    assert st["started"].wait(20)
    b.shutdown(socket.SHUT_RDWR)     # the server side of the stream dies
    t.join(20)
    assert len(errors) == 1 and isinstance(errors[0], rpc.RPCClosedError)
    assert isinstance(errors[0], ConnectionError)
    with pytest.raises(rpc.RPCClosedError):
        client.call("pty.Write", T.BYTES, b"x", T.INT, timeout=20)


def test_client_close_fails_pending_and_later_calls(echo_rpc):
    st, client, _, _ = echo_rpc
    errors = []
    t = threading.Thread(target=lambda: errors.append(
        pytest.raises(rpc.RPCClosedError, client.call, "pty.Read", T.INT, 1, T.BYTES)))
    t.start()
    assert st["started"].wait(20)
    client.close()
    t.join(20)
    assert len(errors) == 1
    with pytest.raises(rpc.RPCClosedError, match="shut down"):
        client.call("pty.Write", T.BYTES, b"x", T.INT)


def test_timeout_keeps_connection_usable(echo_rpc):
    st, client, _, _ = echo_rpc
    with pytest.raises(rpc.RPCTimeout):
        client.call("pty.Read", T.INT, 1, T.BYTES, timeout=0.2)
    st["release"].set()                 # the late reply arrives and is skipped
    assert client.call("pty.Write", T.BYTES, b"xy", T.INT, timeout=20) == 2
    assert client.call("pty.Read", T.INT, 1, T.BYTES, timeout=20) == b"late"


def test_on_close_runs_when_peer_goes(pair):
    a, b = pair
    closed = threading.Event()
    server = rpc.RPCServer(b)
    server.register("pty", [rpc.Method("Write", T.BYTES, T.INT, len)], on_close=closed.set)
    t = threading.Thread(target=server.serve)
    t.start()
    client = rpc.RPCClient(a)
    assert client.call("pty.Write", T.BYTES, b"abc", T.INT, timeout=20) == 3
    client.close()
    assert closed.wait(20)
    t.join(20)
    assert not t.is_alive()


def test_garbage_ends_the_server(pair):
    a, b = pair
    closed = threading.Event()
    server = rpc.RPCServer(b)
    server.on_close(closed.set)
    t = threading.Thread(target=server.serve)
    t.start()
    a.sendall(b"\x05\x01\x02\x03\x04\x05" + b"\xfa" * 10)
    assert closed.wait(20)
    t.join(20)
    assert a.recv(10) == b""


def test_inflight_calls_are_bounded(pair):
    a, b = pair
    started = threading.Semaphore(0)
    release = threading.Event()
    count = {"n": 0}
    lock = threading.Lock()

    def block(arg):
        with lock:
            count["n"] += 1
        started.release()
        release.wait(20)
        return arg
    srv = ServerThread(b, [("s", [rpc.Method("Block", T.INT, T.INT, block)])], max_inflight=2)
    client = rpc.RPCClient(a)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(client.call("s.Block", T.INT, i, T.INT)))
               for i in range(3)]
    try:
        for t in threads:
            t.start()
        assert started.acquire(timeout=20) and started.acquire(timeout=20)
        # the third call is not started while two are running (the server stopped reading)
        assert not started.acquire(timeout=0.3)
        assert count["n"] == 2
        release.set()
        assert started.acquire(timeout=20)
        for t in threads:
            t.join(20)
        assert sorted(results) == [0, 1, 2]
    finally:
        release.set()
        client.close()
        srv.stop()


def test_many_concurrent_callers(pair):
    a, b = pair
    srv = ServerThread(b, [("pty", [rpc.Method("Write", T.BYTES, T.INT, len)])])
    client = rpc.RPCClient(a)
    bad = []

    def worker(k):
        for i in range(50):
            n = (k * 7 + i) % 300
            if client.call("pty.Write", T.BYTES, b"z" * n, T.INT, timeout=20) != n:
                bad.append((k, i))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not bad
    finally:
        client.close()
        srv.stop()


def test_bad_argument_raises_locally_and_sends_nothing(pair):
    a, b = pair
    srv = ServerThread(b, [("pty", [rpc.Method("Write", T.BYTES, T.INT, len)])])
    client = rpc.RPCClient(a)
    try:
        with pytest.raises(ValueError):
            client.call("pty.SetPtySize", T.WinSize, {"Rows": -1}, T.EMPTY)
        assert client.call("pty.Write", T.BYTES, b"ok", T.INT, timeout=20) == 2
    finally:
        client.close()
        srv.stop()


def test_buffered_reader_exact_and_eof():
    data = bytes(range(256)) * 1000

    class Src:
        def __init__(self):
            self.f = io.BytesIO(data)

        def recv(self, n):
            return self.f.read(min(n, 777))
    r = gob.BufferedReader(Src(), bufsize=1000)
    assert r.read_exact(10) == data[:10]
    assert r.read_exact(100000) == data[10:100010]
    assert r.read_exact(10 ** 6) == data[100010:]
    assert r.read_exact(1) == b""


def test_protocol_error_is_surfaced_to_pending_calls(pair):
    a, b = pair
    client = rpc.RPCClient(a)
    errors = []
    t = threading.Thread(target=lambda: errors.append(
        pytest.raises(rpc.RPCClosedError, client.call, "pty.Write", T.BYTES, b"x", T.INT)))
    t.start()
    try:
        recv_exact(b, 5)
        b.sendall(b"\x03\x7f\x00\x00")    # an empty type definition: garbage
        t.join(20)
        assert len(errors) == 1 and "gob" in str(errors[0].value)
    finally:
        client.close()
    assert issubclass(rpc.RPCClosedError, ConnectionError) and not issubclass(ProtocolError, ConnectionError)


def test_ordered_method_keeps_arrival_order(pair):
    """Pipelined ordered calls (pty.Write) run in arrival order; a blocked Read does not wait."""
    a, b = pair
    st = new_state()
    log = []
    lock = threading.Lock()

    def write(data):
        with lock:
            log.append(data)
        return len(data)
    srv = ServerThread(b, [("pty", [rpc.Method("Write", T.BYTES, T.INT, write, ordered=True),
                                    echo_services(st)[0][1][0]])])
    try:
        enc = gob.Encoder(None)
        a.sendall(enc.encode_many([(T.RPC_REQUEST, {"ServiceMethod": "pty.Read", "Seq": 0}), (T.INT, 5)]))
        assert st["started"].wait(20)
        n = 200
        a.sendall(b"".join(enc.encode_many([(T.RPC_REQUEST, {"ServiceMethod": "pty.Write", "Seq": i}),
                                            (T.BYTES, str(i).encode())]) for i in range(1, n + 1)))
        dec = gob.Decoder(gob.BufferedReader(a).read_exact)
        seqs = []
        for _ in range(n):
            seqs.append(dec.decode(T.RPC_RESPONSE)["Seq"])
            dec.decode(T.INT)
        assert seqs == list(range(1, n + 1))
        assert log == [str(i).encode() for i in range(1, n + 1)]
        st["release"].set()
        assert dec.decode(T.RPC_RESPONSE)["Seq"] == 0
    finally:
        st["release"].set()
        srv.stop()


class _GetHook(dict):
    """A struct argument whose encoding runs `hook` first: the window between call()'s two locks."""

    def __init__(self, hook, *a):
        super().__init__(*a)
        self._hook = hook

    def get(self, *a):
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()
        return super().get(*a)


def test_call_racing_connection_death_does_not_hang(pair):
    """The reader dies while a call is being encoded: the call fails, it is not left waiting forever."""
    a, b = pair
    client = rpc.RPCClient(a)

    def peer_goes_away():
        b.shutdown(socket.SHUT_WR)       # EOF for the client's reader; the client can still send
        for _ in range(2000):
            if client.closed:
                return
            threading.Event().wait(0.005)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(
        rpc.RPCClosedError, client.call, "pty.Start", T.CommandReq, _GetHook(peer_goes_away, {"Name": "sh"}),
        T.EMPTY)))
    t.start()
    try:
        t.join(20)
        assert not t.is_alive() and len(done) == 1
    finally:
        client.close()
        t.join(5)


class _Unencodable:
    def __bytes__(self):
        raise RuntimeError("boom")


def test_unencodable_reply_of_any_kind_still_answers(pair):
    a, b = pair
    srv = ServerThread(b, [("pty", [rpc.Method("Odd", T.EMPTY, T.BYTES, lambda arg: _Unencodable())])])
    client = rpc.RPCClient(a)
    try:
        with pytest.raises(rpc.RPCError, match="cannot encode reply: boom"):
            client.call("pty.Odd", T.EMPTY, {}, T.BYTES, timeout=20)
    finally:
        client.close()
        srv.stop()


def test_peer_that_takes_no_replies_ends_the_connection(pair):
    """A reply that cannot be written ends serve() (and runs on_close): no serving a peer that is gone."""
    a, b = pair
    closed = threading.Event()
    srv = ServerThread(b, [("pty", [rpc.Method("Write", T.BYTES, T.INT, len)], closed.set)])
    try:
        a.shutdown(socket.SHUT_RD)   # our replies now fail with EPIPE; the caller can still send
        a.sendall(gob.Encoder(None).encode_many([(T.RPC_REQUEST, {"ServiceMethod": "pty.Write", "Seq": 0}),
                                                 (T.BYTES, b"x")]))
        srv.thread.join(20)
        assert not srv.thread.is_alive() and closed.is_set()
    finally:
        srv.stop()


def test_no_thread_outlives_a_vanished_peer(pair):
    """Peer gone: the client's reader and the server's call threads all end."""
    a, b = pair
    st = new_state()
    before = set(threading.enumerate())
    srv = ServerThread(b, [("pty", echo_services(st)[0][1], st["release"].set)])   # on_close unblocks Read
    client = rpc.RPCClient(a)
    t = threading.Thread(target=lambda: pytest.raises(rpc.RPCClosedError, client.call, "pty.Read", T.INT, 1, T.BYTES))
    t.start()
    assert st["started"].wait(20)
    a.shutdown(socket.SHUT_RDWR)         # the client's end of the link vanishes
    t.join(20)
    srv.thread.join(20)
    for x in set(threading.enumerate()) - before:
        x.join(20)
        assert not x.is_alive(), x.name
    client.close()


def test_calls_reuse_worker_threads(echo_rpc):
    """Calls run on pooled workers: sequential calls do not each start a thread, and a Read
    blocked on one worker still leaves Writes their own."""
    st, client, _, _ = echo_rpc
    before = {t for t in threading.enumerate() if t.name.startswith("rpc-worker")}
    res = []
    t = threading.Thread(target=lambda: res.append(client.call("pty.Read", T.INT, 10, T.BYTES)))
    t.start()
    assert st["started"].wait(20)
    for i in range(50):
        assert client.call("pty.Write", T.BYTES, b"x" * i, T.INT, timeout=20) == i
    workers = {t for t in threading.enumerate() if t.name.startswith("rpc-worker")} - before
    assert 2 <= len(workers) < 25   # one held by Read, the Writes share the rest
    st["release"].set()
    t.join(20)
    assert res == [b"late"]


# ------------------------------------------------------------- Method(now=...): Later, Wait


@pytest.fixture
def pipe():
    """An os.pipe() (r, w); both closed after the test."""
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def _until(pred, timeout=5.0):
    """Wait until pred() is true; False if it is not within timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _ping():
    return rpc.Method("Ping", T.INT, T.INT, lambda x: x + 1)


def _pipe_wait(r, log_, release=None, until=None):
    """A Wait on r whose ready() reads what is there and replies with it (records its thread);
    with `until`, it waits again until that byte has arrived."""
    got = bytearray()

    def ready():
        log_.append(threading.current_thread())
        got.extend(os.read(r, 100))
        if until is not None and until not in got:
            return rpc.AGAIN
        return bytes(got)
    return rpc.Wait([r], ready, release)


def test_now_reply_comes_from_the_serve_thread(pair):
    a, b = pair
    seen = []

    def now(x):
        seen.append(threading.current_thread())
        return x * 2

    def fn(x):
        raise AssertionError("fn must not run when now() answered")
    srv = ServerThread(b, [("s", [rpc.Method("Dbl", T.INT, T.INT, fn, now=now),
                                  rpc.Method("ODbl", T.INT, T.INT, fn, ordered=True, now=now)])])
    client = rpc.RPCClient(a)
    try:
        assert client.call("s.Dbl", T.INT, 21, T.INT, timeout=20) == 42
        assert client.call("s.ODbl", T.INT, 5, T.INT, timeout=20) == 10
        assert seen == [srv.thread, srv.thread]
    finally:
        client.close()
        srv.stop()


def test_later_finishes_on_a_worker_and_errors_travel(pair):
    a, b = pair
    seen = {}

    def now(x):
        seen["now"] = threading.current_thread()
        if x < 0:
            raise ValueError("now says no")
        if x == 0:
            return rpc.Later(lambda: (_ for _ in ()).throw(RuntimeError("finish says no")))

        def finish():
            seen["finish"] = threading.current_thread()
            return x + 100
        return rpc.Later(finish)
    def fn(x):   # a call that comes in while the previous one is finishing goes here: the same
        r = now(x)
        return r.finish() if isinstance(r, rpc.Later) else r
    srv = ServerThread(b, [("s", [rpc.Method("L", T.INT, T.INT, fn, ordered=True, now=now)])])
    client = rpc.RPCClient(a)
    try:
        assert client.call("s.L", T.INT, 1, T.INT, timeout=20) == 101
        assert seen["now"] is srv.thread
        assert seen["finish"] is not srv.thread and seen["finish"].name.startswith("rpc-worker")
        with pytest.raises(rpc.RPCError) as ei:
            client.call("s.L", T.INT, -1, T.INT, timeout=20)
        assert str(ei.value) == "now says no"
        with pytest.raises(rpc.RPCError) as ei:
            client.call("s.L", T.INT, 0, T.INT, timeout=20)
        assert str(ei.value) == "finish says no"
        assert client.call("s.L", T.INT, 2, T.INT, timeout=20) == 102   # still serving, in turn
    finally:
        client.close()
        srv.stop()


def test_parked_wait_is_answered_when_its_fd_is_readable(pair, pipe):
    """The serve thread polls the parked call's fd itself and keeps answering other calls."""
    a, b = pair
    r, w = pipe
    ran = []
    srv = ServerThread(b, [("s", [rpc.Method("Get", T.INT, T.BYTES, lambda x: b"worker", ordered=True,
                                             now=lambda x: _pipe_wait(r, ran)), _ping()])])
    client = rpc.RPCClient(a)
    try:
        call = client.go("s.Get", T.INT, 0, T.BYTES)
        for i in range(20):
            assert client.call("s.Ping", T.INT, i, T.INT, timeout=5) == i + 1
        assert not call.event.is_set() and ran == []
        os.write(w, b"xyz")
        assert call.wait(5) == b"xyz"
        assert ran == [srv.thread]
        assert client.call("s.Ping", T.INT, 1, T.INT, timeout=5) == 2
    finally:
        client.close()
        srv.stop()


def test_wait_ready_may_wait_again(pair, pipe):
    """ready() returning a Wait (a spurious wake-up, or not enough yet) keeps the call parked."""
    a, b = pair
    r, w = pipe
    calls = {"n": 0}
    got = bytearray()

    def now(x):
        def ready():
            calls["n"] += 1
            if calls["n"] == 1:
                return rpc.AGAIN       # spurious: drains nothing, waits on
            got.extend(os.read(r, 100))
            return bytes(got) if b"\n" in got else rpc.AGAIN
        return rpc.Wait([r], ready)
    srv = ServerThread(b, [("s", [rpc.Method("Line", T.INT, T.BYTES, lambda x: b"", ordered=True, now=now),
                                  _ping()])])
    client = rpc.RPCClient(a)
    try:
        call = client.go("s.Line", T.INT, 0, T.BYTES)
        assert client.call("s.Ping", T.INT, 1, T.INT, timeout=5) == 2
        os.write(w, b"ab")
        deadline = time.monotonic() + 5
        while calls["n"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls["n"] >= 2                                    # woken twice: spurious, then "ab"
        assert client.call("s.Ping", T.INT, 2, T.INT, timeout=5) == 3
        assert not call.event.is_set()
        os.write(w, b"c\n")
        assert call.wait(5) == b"abc\n"
    finally:
        client.close()
        srv.stop()


def test_ordered_waits_answer_in_arrival_order(pair, pipe):
    """A second call of an ordered method while the first is parked runs (on a worker) only
    after the first replied: both read the same pipe, yet each gets its own byte in order."""
    a, b = pair
    r, w = pipe
    threads = {}

    def make(x):
        def ready():
            threads[x] = threading.current_thread()
            return b"%d" % x + os.read(r, 1)
        return rpc.Wait([r], ready)

    def fn(x):   # a worker's call: the same, blocking
        return make(x).block()
    srv = ServerThread(b, [("s", [rpc.Method("Get", T.INT, T.BYTES, fn, ordered=True, now=make), _ping()])])
    client = rpc.RPCClient(a)
    order = []
    try:
        for i in (0, 1):
            client.go("s.Get", T.INT, i, T.BYTES, callback=lambda c: order.append(c.reply))
        assert client.call("s.Ping", T.INT, 1, T.INT, timeout=5) == 2   # both calls were read
        os.write(w, b"A")
        assert _until(lambda: order == [b"0A"])
        assert client.call("s.Ping", T.INT, 1, T.INT, timeout=5) == 2
        assert order == [b"0A"]                                          # the second still waits
        os.write(w, b"B")
        assert _until(lambda: len(order) == 2)
        assert order == [b"0A", b"1B"]
        assert threads[0] is srv.thread and threads[1] is not srv.thread
        # with both bytes already there, pipelined calls still take them in order
        os.write(w, b"CD")
        calls = [client.go("s.Get", T.INT, i, T.BYTES) for i in (2, 3)]
        assert [c.wait(5) for c in calls] == [b"2C", b"3D"]
    finally:
        os.write(w, b"zz")   # never leave a worker blocked in poll()
        client.close()
        srv.stop()


def test_parked_call_is_released_once_when_the_client_goes(pair, pipe):
    a, b = pair
    r, w = pipe
    released = []
    ran = []
    srv = ServerThread(b, [("s", [rpc.Method("Get", T.INT, T.BYTES, lambda x: b"", ordered=True,
                                             now=lambda x: _pipe_wait(r, ran, lambda: released.append(1))),
                                  _ping()])])
    client = rpc.RPCClient(a)
    errors = []
    client.go("s.Get", T.INT, 0, T.BYTES, callback=lambda c: errors.append(c.error))
    assert client.call("s.Ping", T.INT, 1, T.INT, timeout=5) == 2   # the Get is parked by now
    client.close()
    srv.thread.join(10)
    assert not srv.thread.is_alive()
    assert released == [1]
    os.write(w, b"late")
    time.sleep(0.1)
    assert ran == [] and released == [1]
    assert len(errors) == 1 and isinstance(errors[0], rpc.RPCClosedError)
    srv.stop()


class _NoFileno:
    """A socket without a usable fileno(): the server cannot poll it beside parked calls."""

    def __init__(self, sock):
        self._s = sock

    def fileno(self):
        raise OSError("no fd here")

    def sendall(self, data):
        return self._s.sendall(data)

    def recv(self, n):
        return self._s.recv(n)

    def close(self):
        self._s.close()

    def shutdown(self, how):
        self._s.shutdown(how)

    def settimeout(self, t):
        self._s.settimeout(t)


def test_wait_on_a_connection_without_fileno_runs_on_a_worker(pair, pipe):
    a, b = pair
    r, w = pipe
    ran = []
    def now(x):
        return _pipe_wait(r, ran, until=b"!")

    def fn(x):   # a call right behind the previous one (still passing its turn on) comes here
        return now(x).block()
    srv = ServerThread(_NoFileno(b), [("s", [rpc.Method("Get", T.INT, T.BYTES, fn, ordered=True, now=now),
                                             _ping()])])
    client = rpc.RPCClient(a)
    try:
        call = client.go("s.Get", T.INT, 0, T.BYTES)
        for i in range(5):
            assert client.call("s.Ping", T.INT, i, T.INT, timeout=5) == i + 1
        assert not call.event.is_set()
        os.write(w, b"ab")
        time.sleep(0.05)
        os.write(w, b"!")
        assert call.wait(5) == b"ab!"
        assert ran and all(t is not srv.thread and t.name.startswith("rpc-worker") for t in ran)
        os.write(w, b"!")   # already readable: the worker's first poll returns at once
        assert client.call("s.Get", T.INT, 0, T.BYTES, timeout=5) == b"!"
    finally:
        os.write(w, b"!!")
        client.close()
        srv.stop()


def test_unordered_wait_is_refused_and_released(pair, pipe):
    a, b = pair
    r, w = pipe
    released = []
    ran = []
    srv = ServerThread(b, [("s", [rpc.Method("Get", T.INT, T.BYTES, lambda x: b"", ordered=False,
                                             now=lambda x: _pipe_wait(r, ran, lambda: released.append(1))),
                                  _ping()])])
    client = rpc.RPCClient(a)
    try:
        with pytest.raises(rpc.RPCError) as ei:
            client.call("s.Get", T.INT, 0, T.BYTES, timeout=5)
        assert str(ei.value) == "rpc: s.Get may not wait unordered"
        assert released == [1]
        os.write(w, b"x")
        assert client.call("s.Ping", T.INT, 1, T.INT, timeout=5) == 2
        assert ran == [] and released == [1]
    finally:
        client.close()
        srv.stop()


# ------------------------------------------------------------------- RPCClient.go(callback=)

def test_go_callbacks_run_on_the_reader_thread_in_reply_order(echo_rpc):
    st, client, _, _ = echo_rpc
    seen = []
    done = threading.Event()

    def cb(call):
        seen.append((call.method, call.reply, call.error, threading.current_thread()))
        if len(seen) == 3:
            done.set()
    client.go("pty.Read", T.INT, 1, T.BYTES, callback=cb)        # blocks on the server
    assert st["started"].wait(20)
    client.go("pty.Write", T.BYTES, b"abc", T.INT, callback=cb)
    client.go("pty.Fail", T.EMPTY, {}, T.EMPTY, callback=cb)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [s[0] for s in seen] == ["pty.Write", "pty.Fail"]
    st["release"].set()
    assert done.wait(5)
    assert [s[:2] for s in seen] == [("pty.Write", 3), ("pty.Fail", None), ("pty.Read", b"late")]
    assert seen[0][2] is None and seen[2][2] is None
    assert isinstance(seen[1][2], rpc.RPCError) and str(seen[1][2]) == "dmsgpty: Exec: empty command name"
    reader = client._reader
    assert all(s[3] is reader for s in seen) and reader is not threading.current_thread()


def test_pending_callbacks_get_closed_error_when_the_link_dies(echo_rpc):
    st, client, _, b = echo_rpc
    got = []
    done = threading.Event()

    def cb(call):
        got.append(call.error)
        done.set()
    call = client.go("pty.Read", T.INT, 1, T.BYTES, callback=cb)
    assert st["started"].wait(20)
    b.shutdown(socket.SHUT_RDWR)
    assert done.wait(5)
    assert len(got) == 1 and isinstance(got[0], rpc.RPCClosedError) and call.reply is None
    assert client.closed


def test_pending_callbacks_run_on_client_close(echo_rpc):
    st, client, _, _ = echo_rpc
    got = []
    client.go("pty.Read", T.INT, 1, T.BYTES, callback=lambda c: got.append(c.error))
    assert st["started"].wait(20)
    client.close()
    assert len(got) == 1 and isinstance(got[0], rpc.RPCClosedError)


def test_a_raising_callback_is_logged_and_the_reader_lives_on(echo_rpc, caplog):
    _, client, _, _ = echo_rpc

    ran = []

    def bad(call):
        ran.append(call.reply)
        raise RuntimeError("callback bug")
    with caplog.at_level(logging.ERROR, logger="skypty.rpc"):
        client.go("pty.Write", T.BYTES, b"ab", T.INT, callback=bad)
        assert _until(lambda: ran == [2])
        for i in range(5):
            assert client.call("pty.Write", T.BYTES, b"x" * i, T.INT, timeout=5) == i
    assert not client.closed
    assert any("reply callback failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_callback_may_issue_further_calls(echo_rpc):
    """A chain of calls, each issued from the previous one's callback on the reader thread."""
    _, client, _, _ = echo_rpc
    replies = []
    done = threading.Event()

    def next_call(call=None):
        if call is not None:
            replies.append((call.reply, threading.current_thread() is client._reader))
        if len(replies) == 30:
            done.set()
            return
        n = len(replies)
        client.go("pty.Write", T.BYTES, b"q" * n, T.INT, callback=next_call)
    next_call()
    assert done.wait(10)
    assert replies == [(i, True) for i in range(30)]


def test_full_slots_behind_a_parked_call_do_not_stall_it(pair, pipe):
    """All in-flight slots taken by calls waiting their turn behind a parked call: the serve
    thread must go on polling the parked one (only it can finish it), or nothing ever moves."""
    a, b = pair
    r, w = pipe

    def make(x):
        return rpc.Wait([r], lambda: b"%d" % x + os.read(r, 1))

    def fn(x):
        return make(x).block()
    srv = ServerThread(b, [("s", [rpc.Method("Get", T.INT, T.BYTES, fn, ordered=True, now=make), _ping()])],
                       max_inflight=1)
    client = rpc.RPCClient(a)
    try:
        calls = [client.go("s.Get", T.INT, i, T.BYTES) for i in range(3)]   # parked, slot, blocked reader
        ping = client.go("s.Ping", T.INT, 1, T.INT)
        time.sleep(0.1)
        os.write(w, b"ABC")
        assert [c.wait(5) for c in calls] == [b"0A", b"1B", b"2C"]
        assert ping.wait(5) == 2
    finally:
        os.write(w, b"zzz")
        client.close()
        srv.stop()


class _Breakable:
    """A socket whose sendall can be made to fail (a peer gone mid-session)."""

    def __init__(self, sock):
        self._s = sock
        self.broken = False

    def sendall(self, data):
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        return self._s.sendall(data)

    def __getattr__(self, name):
        return getattr(self._s, name)


def test_a_failed_send_runs_callbacks_that_may_call_again(pair):
    """A send that fails ends the connection and runs the pending callbacks on the sending
    thread; a callback issuing a call must get an error, not a deadlock on the send lock."""
    a, b = pair
    conn = _Breakable(a)
    client = rpc.RPCClient(conn)
    seen = []

    def cb(call):
        seen.append(type(call.error).__name__)
        try:
            client.go("s.Get", T.INT, 1, T.INT, callback=lambda c: None)
        except rpc.RPCClosedError:
            seen.append("refused")
    try:
        client.go("s.Get", T.INT, 0, T.INT, callback=cb)   # pending: the peer never answers
        conn.broken = True
        done = threading.Event()
        t = threading.Thread(target=lambda: (client.go("s.Get", T.INT, 2, T.INT, callback=cb), done.set()),
                             daemon=True)
        t.start()
        assert done.wait(5), "go() deadlocked running callbacks under its send lock"
        assert seen.count("RPCClosedError") == 2 and seen.count("refused") == 2
        assert client.closed
    finally:
        client.close()


class _SlowFirstSend:
    """A socket whose first sendall blocks until released (a send stuck in the kernel)."""

    def __init__(self, sock):
        self._s = sock
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sends = []   # (thread, data)

    def sendall(self, data):
        self.sends.append((threading.current_thread(), bytes(data)))
        if len(self.sends) == 1:
            self.entered.set()
            assert self.release.wait(10)
        return self._s.sendall(data)

    def __getattr__(self, name):
        return getattr(self._s, name)


def test_a_caller_never_waits_behind_another_send(pair):
    """While one thread is inside a send, another go() queues its call and returns at once;
    the sending thread sends it next, in seq order, and both calls get their replies."""
    a, b = pair
    conn = _SlowFirstSend(a)
    srv = ServerThread(b, [("s", [_ping()])])
    client = rpc.RPCClient(conn)
    try:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("call", client.go("s.Ping", T.INT, 1, T.INT)))
        t.start()
        assert conn.entered.wait(5)
        returned = threading.Event()
        second = {}

        def other():
            second["call"] = client.go("s.Ping", T.INT, 2, T.INT)
            returned.set()
        threading.Thread(target=other, daemon=True).start()
        assert returned.wait(5), "go() waited behind another thread's send"
        assert len(conn.sends) == 1   # not sent yet: left to the sender
        conn.release.set()
        t.join(5)
        assert first["call"].wait(5) == 2 and second["call"].wait(5) == 3
        assert [th for th, _ in conn.sends] == [t, t]   # the first sender sent both
        assert client.call("s.Ping", T.INT, 3, T.INT, timeout=5) == 4
    finally:
        conn.release.set()
        client.close()
        srv.stop()


def test_rpc_marks_secure_conns_for_small_reads(pair):
    """An rpc connection over SecureConn reads its small replies with the cheap small-buffer
    path (noise.SecureConn.prefer_small_reads), not 256 KiB recv()s."""
    from skypty import noise

    class Counting:
        def __init__(self, sock):
            self._s, self.calls = sock, []

        def recv(self, n):
            self.calls.append("recv")
            return self._s.recv(n)

        def recv_into(self, buf):
            self.calls.append("recv_into")
            return self._s.recv_into(buf)

        def __getattr__(self, name):
            return getattr(self._s, name)

    a, b = pair
    k1, k2 = os.urandom(32), os.urandom(32)
    wa = Counting(a)
    ca = noise.SecureConn(wa, noise.SendCipher(k1), noise.RecvCipher(k2), None, None)
    cb = noise.SecureConn(b, noise.SendCipher(k2), noise.RecvCipher(k1), None, None)
    srv = ServerThread(cb, [("s", [_ping()])])
    client = rpc.RPCClient(ca)
    try:
        for i in range(5):
            assert client.call("s.Ping", T.INT, i, T.INT, timeout=5) == i + 1
        assert "recv_into" in wa.calls and "recv" not in wa.calls
    finally:
        client.close()
        srv.stop()


def test_calls_queued_behind_a_parked_one_end_with_the_connection(pair, pipe):
    """Pipelined calls of an ordered method wait (on workers) for the parked first one; when
    the client goes, the parked call is released and the queued ones get their turn, so the
    server finishes at once instead of after RPC_DRAIN_TIMEOUT."""
    a, b = pair
    r, w = pipe
    released = []

    def make(x):
        return rpc.Wait([r], lambda: os.read(r, 1), lambda: released.append(x))

    def fn(x):
        return b"worker"
    srv = ServerThread(b, [("s", [rpc.Method("Get", T.INT, T.BYTES, fn, ordered=True, now=make), _ping()])])
    client = rpc.RPCClient(a)
    for i in range(3):
        client.go("s.Get", T.INT, i, T.BYTES, callback=lambda c: None)
    assert client.call("s.Ping", T.INT, 1, T.INT, timeout=5) == 2   # all three were read
    t0 = time.monotonic()
    client.close()
    srv.thread.join(10)
    assert not srv.thread.is_alive(), "serve() still waiting for calls queued behind the parked one"
    assert time.monotonic() - t0 < 5
    assert released == [0]


# ---------------------------------------------------------------------------- header short cuts

_SEQS = [0, 1, 2, 127, 128, 255, 256, 65535, 65536, (1 << 32) + 5, (1 << 64) - 1]


@pytest.mark.parametrize("t", [T.RPC_REQUEST, T.RPC_RESPONSE], ids=["request", "response"])
def test_header_template_gives_the_general_encoders_bytes(t):
    enc = gob.Encoder()
    enc.encode_many([(t, {"ServiceMethod": "pty.Write", "Seq": 0})])   # defines t
    for sm in ("pty.Write", "pty.Read", "x.y", "Srv.Méthode", "a." + "m" * 100):
        head = rpc._header_template(enc, t, sm)
        assert head is not None, sm
        for seq in _SEQS:
            assert rpc._header_bytes(head, seq) == enc.encode_many([(t, {"ServiceMethod": sm, "Seq": seq})])
    # a name whose header needs a two-byte length gets no template (the general path)
    assert rpc._header_template(enc, t, "a." + "m" * 130) is None


def _messages(*items):
    enc = gob.Encoder()
    data = enc.encode_many(items)
    return gob.Decoder(gob.BufferedReader(_OneRead(data)))


class _OneRead:
    def __init__(self, data):
        self.data = data

    def recv(self, n):
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_parse_header_agrees_with_the_decoder_or_declines():
    rng = random.Random(3)
    cases = [(sm, seq) for sm in ("pty.Read", "a.b", "x." + "y" * 120) for seq in _SEQS]
    cases += [("s.m" + str(rng.randrange(10 ** 6)), rng.randrange(1 << 64)) for _ in range(300)]
    for sm, seq in cases:
        for t in (T.RPC_REQUEST, T.RPC_RESPONSE):
            dec = _messages((t, {"ServiceMethod": sm, "Seq": 0}), (t, {"ServiceMethod": sm, "Seq": seq}))
            dec.decode(t)
            tid, buf, pos = dec.next_value()
            # Seq 0 (a connection's first call) is left to the general decoder
            assert rpc._parse_header(buf, pos) == ((sm, seq) if seq else None)
            assert dec.value(tid, buf, pos, t)["Seq"] == seq
    # shapes it leaves to the general decoder
    def body_of(t, hdr):
        dec = _messages((t, hdr), (t, hdr))
        dec.decode(t)
        return dec.next_value()[1:]
    assert rpc._parse_header(*body_of(T.RPC_RESPONSE, {"ServiceMethod": "a.b", "Seq": 3, "Error": "no"})) is None
    assert rpc._parse_header(*body_of(T.RPC_REQUEST, {"ServiceMethod": "", "Seq": 3})) is None
    assert rpc._parse_header(*body_of(T.RPC_REQUEST, {"ServiceMethod": "é.b", "Seq": 3})) is None
    assert rpc._parse_header(*body_of(T.RPC_REQUEST, {"ServiceMethod": "a." + "b" * 130, "Seq": 3})) is None
    buf, pos = body_of(T.RPC_REQUEST, {"ServiceMethod": "a.b", "Seq": 300})
    for cut in range(pos, len(buf)):
        assert rpc._parse_header(buf[:cut], pos) is None
    assert rpc._parse_header(buf + b"\x00", pos) is None
    assert rpc._parse_header(buf[:pos] + b"\x01\x03a.b\x01\xf7" + b"\x01" * 9 + b"\x00", pos) is None
    # a multi-byte name length whose first byte, read as a length, lands on a plausible Seq
    assert rpc._parse_header(buf[:pos] + b"\x01\xfe" + b"a" * 254 + b"\x01\x05\x00", pos) is None


@pytest.mark.parametrize("fields", [
    [("Seq", gob.UINT), ("ServiceMethod", gob.STRING)],   # another order: legal gob, served
    [("Method", gob.STRING), ("Seq", gob.UINT)],          # Go's shape, another name: no ServiceMethod
], ids=["reordered", "renamed"])
def test_peer_request_layouts_are_read_by_field_name(pair, fields):
    """Wire fields are matched by name, call after call (past the first, where the short cuts
    start): a reordered Request is served; one whose method field has another name has no
    ServiceMethod and is answered as ill-formed, never read by position."""
    peer, ours = pair
    srv = ServerThread(ours, [("pty", [rpc.Method("Write", T.BYTES, T.INT, len)])])
    req = gob.Struct("Request", fields)
    served = any(name == "ServiceMethod" for name, _ in fields)
    enc = gob.Encoder()
    dec = gob.Decoder(gob.BufferedReader(peer))
    try:
        for seq in range(1, 6):
            hdr = {name: "pty.Write" if t is gob.STRING else seq for name, t in fields}
            peer.sendall(enc.encode_many([(req, hdr), (T.BYTES, b"x" * seq)]))
            if served:
                assert dec.decode(T.RPC_RESPONSE) == {"ServiceMethod": "pty.Write", "Seq": seq, "Error": ""}
                assert dec.decode(T.INT) == seq
            else:
                assert dec.decode(T.RPC_RESPONSE) == {
                    "ServiceMethod": "", "Seq": seq, "Error": "rpc: service/method request ill-formed: "}
                dec.skip()
    finally:
        srv.stop()


def test_a_server_with_another_response_layout_is_read_the_general_way(pair):
    ours, peer = pair
    rsp = gob.Struct("Response", [("Error", gob.STRING), ("Seq", gob.UINT), ("ServiceMethod", gob.STRING)])

    def fake_server():
        enc = gob.Encoder()
        dec = gob.Decoder(gob.BufferedReader(peer))
        try:
            while True:
                hdr = dec.decode(T.RPC_REQUEST)
                n = dec.decode(T.INT)
                err = "boom" if n == 3 else ""
                peer.sendall(enc.encode_many([(rsp, dict(hdr, Error=err)),
                                              (T.EMPTY, {}) if err else (T.BYTES, b"r" * n)]))
        except (EOFError, OSError, ProtocolError):
            pass
    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    client = rpc.RPCClient(ours)
    try:
        for n in (1, 2, 3, 4, 5):
            if n == 3:
                with pytest.raises(rpc.RPCError, match="boom"):
                    client.call("pty.Read", T.INT, n, T.BYTES, timeout=20)
            else:
                assert client.call("pty.Read", T.INT, n, T.BYTES, timeout=20) == b"r" * n
    finally:
        client.close()
        t.join(10)


def test_errors_after_the_short_cuts_are_in_use(pair):
    """Once a method's template and parser are in use, an error reply, an unknown method and
    a bad argument still get their general answers."""
    a, b = pair
    calls = []

    def write(data):
        calls.append(data)
        if data == b"fail":
            raise RuntimeError("write failed")
        return len(data)
    srv = ServerThread(b, [("pty", [rpc.Method("Write", T.BYTES, T.INT, write)])])
    client = rpc.RPCClient(a)
    try:
        for i in range(200):   # Seq past one byte
            assert client.call("pty.Write", T.BYTES, b"k" * (i % 7), T.INT, timeout=20) == i % 7
        with pytest.raises(rpc.RPCError, match="write failed"):
            client.call("pty.Write", T.BYTES, b"fail", T.INT, timeout=20)
        with pytest.raises(rpc.RPCError, match="can't find method pty.Nope"):
            client.call("pty.Nope", T.BYTES, b"x", T.INT, timeout=20)
        with pytest.raises(rpc.RPCError):
            client.call("pty.Write", T.INT, 5, T.INT, timeout=20)   # wrong argument type
        assert client.call("pty.Write", T.BYTES, b"after", T.INT, timeout=20) == 5
    finally:
        client.close()
        srv.stop()
