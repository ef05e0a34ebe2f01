"""net/rpc over real socketpairs: replaying Go's transcripts (gob_rpc.json) against our server
and our client, then concurrency, errors and connection death.

Our server and client use Go's first type id (64) in the replays, so their bytes must equal a
fresh Go process's bytes exactly; with the default ids only the id numbers would differ
(test_gob.py checks that by decoding).
"""
from __future__ import annotations

import io
import socket
import threading

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
        dec = gob.Decoder(rpc.BufferedReader(go_client).read_exact)
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
        dec = gob.Decoder(rpc.BufferedReader(a).read_exact)
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
        dec = gob.Decoder(rpc.BufferedReader(a).read_exact)
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
    r = rpc.BufferedReader(Src(), bufsize=1000)
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
        dec = gob.Decoder(rpc.BufferedReader(a).read_exact)
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
