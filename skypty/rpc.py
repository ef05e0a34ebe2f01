"""Go net/rpc (gob codec) over any byte stream: a concurrent server and a concurrent client.

Wire (pty.md §2.5): a call is gob Request{ServiceMethod, Seq} then the argument; a reply is
gob Response{ServiceMethod, Seq, Error} then the reply value, or struct{} when Error is set.
One gob encoder and one decoder per direction for the connection's lifetime.

`conn` is anything socket-like: sendall(data), recv(n) (b"" at EOF), close(); shutdown()
and settimeout() are used when present. The rpc layer clears the socket timeout (sessions
idle for hours); RPCClient.call(timeout=…) bounds each call instead.
"""
from __future__ import annotations

import _socket   # not socket: see netutil
import select
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import limits
from .errors import ProtocolError, SkyptyError
from .gob import (DEFAULT_FIRST_ID, EMPTY, STRING, UINT, BufferedReader, Decoder, Encoder, GobType, enc_uint,
                  rd_uint)
from .gobtypes import RPC_REQUEST, RPC_RESPONSE
from .logs import get_logger

__all__ = [
    "RPCError", "RPCClosedError", "RPCTimeout", "Method", "Later", "Wait", "AGAIN", "RPCServer", "RPCClient",
]

log = get_logger("skypty.rpc")


class RPCError(SkyptyError):
    """The remote method failed: str(exc) is Response.Error exactly."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RPCClosedError(SkyptyError, ConnectionError):
    """The rpc connection ended (or was closed) before the call got its reply."""


class RPCTimeout(SkyptyError, TimeoutError):
    """No reply within the call's timeout (the connection stays usable)."""


class Later:
    """What a Method's `now` returns when the call would block: `finish()` gives the reply
    (or raises) and runs on a worker thread like any other call."""

    __slots__ = ("finish",)

    def __init__(self, finish: Callable[[], Any]):
        self.finish = finish


class Wait:
    """What a Method's `now` returns when the call waits for input on file descriptors.

    The connection's reading thread polls `fds` beside the connection itself and calls
    `ready()` once one is readable: it returns the reply, raises, or returns AGAIN (nothing
    there after all: keep waiting). A connection without a fileno() hands the call to a
    worker, which does the same polling. `release()` runs if the connection ends first.
    Only an ordered method may wait this way, so at most one call per method is parked.
    The fds should include one that fires when the call must end (the pty's stop pipe,
    which the connection's end triggers): on a worker nothing else ends the wait."""

    __slots__ = ("fds", "ready", "release")

    def __init__(self, fds: Sequence[int], ready: Callable[[], Any],
                 release: Optional[Callable[[], Any]] = None):
        self.fds, self.ready, self.release = tuple(fds), ready, release

    def block(self) -> Any:
        """ready()'s final reply, polling on this thread."""
        p = select.poll()
        for fd in self.fds:
            p.register(fd, select.POLLIN)
        while True:
            p.poll()
            reply = self.ready()
            if reply is not AGAIN:
                return reply


AGAIN = object()   # what Wait.ready() returns when the call is to go on waiting


class Method:
    """One rpc method: fn(arg) -> reply; raising makes the call fail with str(exc).

    Calls run concurrently, as in Go. ordered=True runs this method's calls one at a time in
    arrival order (pipelined pty.Write calls must not overtake each other); other methods,
    e.g. a blocked Read, are not held up by it.

    `now(arg)`, when given, is tried first on the connection's reading thread whenever no
    earlier call of the method is still running: it must not block, and returns the reply, a
    `Later` or a `Wait`. A keystroke's Write and the Read that carries its echo then cost no
    thread hand-off at all: that is the interactive echo latency."""

    __slots__ = ("name", "arg_type", "reply_type", "fn", "ordered", "now")

    def __init__(self, name: str, arg_type: GobType, reply_type: GobType, fn: Callable[[Any], Any],
                 ordered: bool = False, now: Optional[Callable[[Any], Any]] = None):
        self.name, self.arg_type, self.reply_type, self.fn = name, arg_type, reply_type, fn
        self.ordered = ordered
        self.now = now

    def __repr__(self) -> str:
        return f"Method({self.name!r})"


def _rpc_stream(conn: Any) -> None:
    """Ready a connection for rpc: no socket timeout (sessions idle for hours; a timeout would
    kill one mid-message), and cheap small reads where the stream offers them."""
    small = getattr(conn, "prefer_small_reads", None)
    if small is not None:
        small()
    _no_timeout(conn)


def _no_timeout(conn: Any) -> None:
    # an idle session is normal: a socket timeout would kill it mid-message
    settimeout = getattr(conn, "settimeout", None)
    if settimeout is not None:
        try:
            settimeout(None)
        except OSError:
            pass


def _shutdown(conn: Any) -> None:
    try:
        conn.shutdown(_socket.SHUT_RDWR)
    except Exception:  # not a socket, already closed, or no shutdown(): close() will do
        pass
    try:
        conn.close()
    except Exception:
        pass


Service = Tuple[str, Sequence[Method]]


# ---- header short cuts ------------------------------------------------------------------
# Every call and reply starts with a Request/Response header. Through the general gob code a
# header costs as much as the rest of a keystroke's work, so the common shape is written and
# read here directly: a byte template per method for sending, a parser for receiving. Both
# check themselves against the general code once and leave anything else to it.

_TEMPLATES_MAX = 64   # methods with a send template, per connection and direction
_REQUEST_WIRE = (("ServiceMethod", STRING.wire_id), ("Seq", UINT.wire_id))
_RESPONSE_WIRE = _REQUEST_WIRE + (("Error", STRING.wire_id),)


def _remember_template(heads: Dict[str, Optional[bytes]], enc: Encoder, t: GobType, sm: str) -> None:
    """After sm's first header went out the general way: its template (or None), once, for
    at most _TEMPLATES_MAX names."""
    if sm not in heads and len(heads) < _TEMPLATES_MAX:
        heads[sm] = _header_template(enc, t, sm)


def _header_template(enc: Encoder, t: GobType, sm: str) -> Optional[bytes]:
    """The header message for (sm, Seq 0, no Error) without its length byte and final 0x00,
    once t is defined on enc's stream; None if _header_bytes could not rebuild what the
    general encoder gives (then the method always takes the general path)."""
    msg = enc.encode_many(((t, {"ServiceMethod": sm, "Seq": 0}),))
    if not msg or msg[0] != len(msg) - 1 or msg[-1] != 0:
        return None   # a long method name: two-byte length, not worth a template
    head = msg[1:-1]
    for seq in (0, 1, 127, 128, 65535, (1 << 64) - 1):
        if _header_bytes(head, seq) != enc.encode_many(((t, {"ServiceMethod": sm, "Seq": seq}),)):
            return None
    return head


def _header_bytes(head: bytes, seq: int) -> bytes:
    # Seq is field 1 (delta 1 after ServiceMethod); zero is not sent; 0x00 ends the struct
    body = head + b"\x01" + enc_uint(seq) + b"\x00" if seq else head + b"\x00"
    return enc_uint(len(body)) + body


def _parse_header(buf: bytes, pos: int) -> Optional[Tuple[str, int]]:
    """(ServiceMethod, Seq) of a header value laid out as _REQUEST_WIRE / _RESPONSE_WIRE:
    [0x01 len<128 ASCII name][0x01 Seq>0][0x00], no Error. None for any other bytes (Seq 0,
    an Error, a long or non-ASCII name, garbage), which the general decoder then reads."""
    try:
        n = buf[pos + 1]
        p = pos + 2 + n          # Seq's field delta
        seq, end = rd_uint(buf, p + 1)
        if buf[end] or end + 1 != len(buf) or buf[pos] != 1 or buf[p] != 1 or n >= 0x80:
            return None
    except (IndexError, ProtocolError):   # cut short, or a Seq gob cannot hold
        return None
    sm = buf[pos + 2:p]
    if not sm.isascii():
        return None
    return sm.decode("ascii"), seq


class RPCServer:
    """Serves registered services on one connection. serve() blocks until the peer stops
    sending; each call runs on its own (pooled) worker thread, replies go out in completion order."""

    def __init__(self, conn: Any, max_inflight: int = limits.RPC_MAX_INFLIGHT,
                 first_id: int = DEFAULT_FIRST_ID):
        self._conn = conn
        _rpc_stream(conn)
        self._services: Dict[str, Dict[str, Method]] = {}
        self._found: Dict[str, Tuple[Method, str]] = {}   # _lookup's hits by ServiceMethod
        self._on_close: List[Callable[[], Any]] = []
        self._enc = Encoder(None, first_id)
        self._reader = BufferedReader(conn)
        self._dec = Decoder(self._reader)
        self._heads: Dict[str, Optional[bytes]] = {}   # Response templates (see _header_template)
        self._req_tid = -1   # the peer's Request type id, once its layout is known to be _REQUEST_WIRE
        self._wlock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_inflight)
        # Reusable workers (at most max_inflight, as many as calls ever overlapped): starting
        # a thread per call put its start-up handshake on every keystroke's critical path.
        # A call is handed to an idle worker or to a new one, never queued behind a busy one,
        # so a blocked Read still never stalls a Write.
        self._threads: List[threading.Thread] = []
        self._tlock = threading.Lock()   # _threads, _idle, _jobs puts
        self._idle = 0                   # workers waiting for a job and not yet promised one
        import queue   # here, not at the top: a client process never needs it (cold start)

        self._jobs: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._write_failed = False
        # ordered methods: name -> [next ticket, ticket now allowed to run]
        self._tickets: Dict[str, List[int]] = {}
        # _turn_lock guards the tickets; the Condition on it wakes workers waiting for their
        # turn, and is only notified when there are any (a keystroke's calls never wait)
        self._turn_lock = threading.Lock()
        self._turn = threading.Condition(self._turn_lock)
        self._turn_waiters = 0
        self._skipped: set = set()
        # calls waiting on fds, polled by the serve thread itself (see Wait)
        self._parked: List[tuple] = []
        self._poller: Any = None   # _pump's poll object and the fds it has (None: do not reuse)
        self._poll_key: Optional[tuple] = None
        try:
            self._fileno: Optional[int] = conn.fileno()
        except (AttributeError, OSError, ValueError):
            self._fileno = None
        self._pending = getattr(conn, "pending", None) or (lambda: 0)

    def register(self, service_name: str, methods: Sequence[Method],
                 on_close: Optional[Callable[[], Any]] = None) -> None:
        self._services.setdefault(service_name, {}).update({m.name: m for m in methods})
        self._found.clear()
        if on_close is not None:
            self._on_close.append(on_close)

    def on_close(self, fn: Callable[[], Any]) -> None:
        """Run fn() (once) when the connection ends, before waiting for running calls."""
        self._on_close.append(fn)

    # ---------------------------------------------------------------------------------
    def _lookup(self, sm: str) -> Tuple[Optional[Method], str]:
        found = self._found.get(sm)
        if found is not None:
            return found
        dot = sm.rfind(".")
        if dot < 0:
            return None, "rpc: service/method request ill-formed: " + sm
        svc = self._services.get(sm[:dot])
        if svc is None:
            return None, "rpc: can't find service " + sm
        m = svc.get(sm[dot + 1:])
        if m is None:
            return None, "rpc: can't find method " + sm
        self._found[sm] = found = (m, "")   # only registered names: the table stays small
        return found

    def _send(self, sm: str, seq: int, err: str, reply_type: GobType, reply: Any) -> None:
        with self._wlock:
            if self._write_failed:
                return
            enc = self._enc
            try:
                head = None if err else self._heads.get(sm)
                if head:
                    data = _header_bytes(head, seq) + enc.value_message(reply_type, reply)
                else:
                    hdr = {"ServiceMethod": sm, "Seq": seq, "Error": err}
                    data = enc.encode_many([(RPC_RESPONSE, hdr), (reply_type, reply)])
                    if not err:   # only registered methods answer without an error
                        _remember_template(self._heads, enc, RPC_RESPONSE, sm)
            except Exception as e:   # a method's bad return value must still answer the caller
                log.warning("rpc: cannot encode reply of %s: %s", sm, e)
                hdr = {"ServiceMethod": sm, "Seq": seq, "Error": f"rpc: cannot encode reply: {e}"}
                data = self._enc.encode_many([(RPC_RESPONSE, hdr), (EMPTY, {})])
            try:
                self._conn.sendall(data)
            except (OSError, ProtocolError) as e:
                # A peer that cannot take replies is gone: end the connection so serve()
                # stops reading calls and runs on_close, instead of working for nobody.
                self._write_failed = True
                log.debug("rpc: reply to %s not sent: %s", sm, e)
                _shutdown(self._conn)

    def _run(self, m: Method, sm: str, seq: int, arg: Any, ticket: int) -> None:
        try:
            if ticket >= 0:
                with self._turn_lock:
                    self._turn_waiters += 1
                    try:
                        while self._tickets[sm][1] != ticket:
                            self._turn.wait()
                    finally:
                        self._turn_waiters -= 1
            try:
                if isinstance(arg, Later):
                    reply = arg.finish()
                elif isinstance(arg, Wait):
                    reply = arg.block()
                else:
                    reply = m.fn(arg)
            except Exception as e:  # any failure travels to the caller as its text
                text = str(e) or type(e).__name__
                self._send(sm, seq, text, EMPTY, {})
            else:
                self._send(sm, seq, "", m.reply_type, reply)
        finally:
            if ticket >= 0:
                self._done_turn(sm, ticket)

    def _done_turn(self, sm: str, ticket: int) -> None:
        with self._turn_lock:
            tk = self._tickets[sm]
            if tk[1] == ticket and not self._skipped:   # in turn, nothing left behind (a keystroke)
                tk[1] += 1
            else:
                self._skipped.add((sm, ticket))
                while (sm, tk[1]) in self._skipped:   # a call that never ran passes its turn on too
                    self._skipped.discard((sm, tk[1]))
                    tk[1] += 1
            if self._turn_waiters:
                self._turn.notify_all()

    def _worker(self, job: Optional[tuple]) -> None:
        jobs, lock = self._jobs, self._tlock
        while job is not None:
            try:
                self._run(*job)
            finally:
                with lock:
                    self._idle += 1
                # the slot is given back only once this worker can take the next call, so
                # there are never more workers than max_inflight
                self._slots.release()
            job = jobs.get()   # None: the connection ended

    def _try_now(self, m: Method, sm: str, seq: int, arg: Any) -> Any:
        """Run m.now on this thread if no earlier call of m is still running. Returns what
        still has to go to a worker (a Later, a Wait, or the original arg), else None."""
        if m.ordered:
            # No lock: only this thread moves tk[0]; a worker that just moved tk[1] makes
            # us see "busy" a moment too long, which only sends this call to a worker.
            tk = self._tickets.get(sm)
            if tk is not None and tk[0] != tk[1]:
                return arg   # an earlier call is running: wait for it, in order
        try:
            reply = m.now(arg)
        except Exception as e:
            self._send(sm, seq, str(e) or type(e).__name__, EMPTY, {})
            return None
        if isinstance(reply, Wait):
            if not m.ordered:
                reply.release and reply.release()
                self._send(sm, seq, f"rpc: {sm} may not wait unordered", EMPTY, {})
                return None
            if self._fileno is None:
                return reply
            with self._turn_lock:   # parked, it holds its method's turn like a running call
                tk = self._tickets.setdefault(sm, [0, 0])
                ticket = tk[0]
                tk[0] += 1
            self._parked.append((reply, m, sm, seq, ticket))
            return None
        if isinstance(reply, Later):
            return reply
        self._send(sm, seq, "", m.reply_type, reply)
        return None

    def _pump(self, timeout: Optional[float] = None) -> None:
        """Serve parked calls until a request is readable (or buffered) on the connection.
        With a timeout (ms): one round that ignores the connection (see _take_slot)."""
        conn_fd = self._fileno if timeout is None else -1
        while self._parked:
            if timeout is None and (self._reader.buffered() or self._pending()):
                return
            parked = self._parked
            # the same fds keystroke after keystroke (the pty's Read): reuse their poll object
            key = (conn_fd, parked[0][0].fds) if len(parked) == 1 else None
            p = self._poller if key is not None and key == self._poll_key else None
            if p is None:
                p = select.poll()
                if conn_fd >= 0:
                    p.register(conn_fd, select.POLLIN)
                for w, *_ in parked:
                    for fd in w.fds:
                        p.register(fd, select.POLLIN)
                self._poller, self._poll_key = p, key
            fired = {fd for fd, _ in p.poll(timeout)}
            for entry in [e for e in self._parked if not fired.isdisjoint(e[0].fds)]:
                self._parked.remove(entry)
                self._resume(*entry)
            if conn_fd in fired or timeout is not None:
                return

    def _take_slot(self) -> None:
        """Bounded in-flight calls: stop reading requests until one ends. Parked calls are
        still served meanwhile: the calls that fill the slots may be waiting for their turn
        behind one of them, and only this thread can finish it."""
        while not self._slots.acquire(blocking=not self._parked):
            self._pump(timeout=limits.RPC_SLOT_POLL_MS)

    def _resume(self, w: "Wait", m: Method, sm: str, seq: int, ticket: int) -> None:
        try:
            reply = w.ready()
        except Exception as e:
            self._send(sm, seq, str(e) or type(e).__name__, EMPTY, {})
        else:
            if reply is AGAIN:
                self._parked.append((w, m, sm, seq, ticket))
                return
            self._send(sm, seq, "", m.reply_type, reply)
        self._done_turn(sm, ticket)

    def _spawn(self, m: Method, sm: str, seq: int, arg: Any) -> None:
        ticket = -1
        if m.ordered:
            with self._turn_lock:
                tk = self._tickets.setdefault(sm, [0, 0])
                ticket = tk[0]
                tk[0] += 1
        job = (m, sm, seq, arg, ticket)
        with self._tlock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put(job)
                return
            t = threading.Thread(target=self._worker, args=(job,), daemon=True,
                                 name=f"rpc-worker-{len(self._threads)}")
            self._threads.append(t)
        try:
            t.start()
        except RuntimeError as e:   # out of threads: fail this call, keep the connection
            with self._tlock:
                self._threads.remove(t)
            if ticket >= 0:
                self._done_turn(sm, ticket)
            self._slots.release()
            self._send(sm, seq, f"rpc: cannot start call: {e}", EMPTY, {})

    def serve(self) -> None:
        dec = self._dec
        try:
            while True:
                if self._parked:
                    self._pump()
                try:
                    tid, buf, pos = dec.next_value()
                except EOFError:
                    break
                got = _parse_header(buf, pos) if tid == self._req_tid else None
                if got is None:
                    hdr = dec.value(tid, buf, pos, RPC_REQUEST)
                    if dec.struct_fields(tid) == _REQUEST_WIRE:
                        self._req_tid = tid
                    got = hdr["ServiceMethod"], hdr["Seq"]
                sm, seq = got
                m, err = self._lookup(sm)
                if m is None:
                    dec.skip()
                    self._send(sm, seq, err, EMPTY, {})
                    continue
                try:
                    arg = dec.decode(m.arg_type)
                except ProtocolError as e:
                    if dec.broken:
                        raise
                    # the message was read whole: say why, keep serving (as Go does)
                    self._send(sm, seq, str(e), EMPTY, {})
                    continue
                if m.now is not None:
                    arg = self._try_now(m, sm, seq, arg)
                    if arg is None:
                        continue
                self._take_slot()
                self._spawn(m, sm, seq, arg)
        except EOFError:
            log.debug("rpc: peer closed mid-call")
        except (ProtocolError, OSError) as e:
            log.info("rpc: connection ended: %s", e)
        finally:
            self._finish()

    def _finish(self) -> None:
        for fn in self._on_close:
            try:
                fn()
            except Exception:
                log.exception("rpc: on_close callback failed")
        self._on_close = []
        parked, self._parked = self._parked, []
        for w, _m, sm, _seq, ticket in parked:
            if w.release is not None:
                try:
                    w.release()
                except Exception:
                    log.exception("rpc: releasing a parked call failed")
            self._done_turn(sm, ticket)   # a call queued behind it must not wait for ever
        with self._tlock:
            threads = list(self._threads)
            for _ in threads:   # one stop mark per worker: idle ones leave now, busy ones after their call
                self._jobs.put(None)
        deadline = time.monotonic() + limits.RPC_DRAIN_TIMEOUT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        _shutdown(self._conn)

    def close(self) -> None:
        """Close the connection (serve() then returns after the cleanup)."""
        _shutdown(self._conn)


class _Call:
    """One call in flight (what RPCClient.go returns): wait() gives its reply or raises."""

    __slots__ = ("method", "reply_type", "event", "reply", "error", "callback", "_client", "_seq")

    def __init__(self, method: str, reply_type: GobType, callback: Optional[Callable[["_Call"], Any]] = None):
        self.method = method
        self.reply_type = reply_type
        # a callback call is never waited for: no Event (a Condition and a Lock) per keystroke
        self.event = threading.Event() if callback is None else None
        self.reply: Any = None
        self.error: Optional[BaseException] = None
        self.callback = callback
        self._client: Optional["RPCClient"] = None
        self._seq = -1

    def _done(self) -> None:
        if self.event is not None:
            self.event.set()
        cb = self.callback
        if cb is not None:
            try:
                cb(self)
            except Exception:   # a callback's bug must not kill the reader (or other calls)
                log.exception("rpc %s: reply callback failed", self.method)

    def wait(self, timeout: Optional[float] = None) -> Any:
        if self.event is None:
            raise RuntimeError("a call with a callback cannot be waited for")
        if not self.event.wait(timeout):
            c = self._client
            if c is not None:
                with c._lock:
                    c._pending.pop(self._seq, None)
            if not self.event.is_set():
                raise RPCTimeout(f"rpc {self.method}: no reply within {timeout:g}s")
        if self.error is not None:
            raise self.error
        return self.reply


class RPCClient:
    """A net/rpc client: call() is thread-safe; concurrent calls are matched by Seq."""

    def __init__(self, conn: Any, first_id: int = DEFAULT_FIRST_ID):
        self._conn = conn
        _rpc_stream(conn)
        self._enc = Encoder(None, first_id)
        self._dec = Decoder(BufferedReader(conn))
        self._heads: Dict[str, Optional[bytes]] = {}   # Request templates (see _header_template)
        self._seq = 0
        self._pending: Dict[int, _Call] = {}
        self._lock = threading.Lock()     # _pending, _dead
        self._wlock = threading.Lock()    # encoder, seq and _out: seq order == wire order
        self._slock = threading.Lock()    # the one thread sending _out (see _flush)
        self._out: List[bytes] = []
        self._dead: Optional[str] = None
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="rpc-client")
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._dead is not None

    def call(self, method: str, arg_type: GobType, arg: Any, reply_type: GobType,
             timeout: Optional[float] = None) -> Any:
        return self.go(method, arg_type, arg, reply_type).wait(timeout)

    def go(self, method: str, arg_type: GobType, arg: Any, reply_type: GobType,
           callback: Optional[Callable[[_Call], Any]] = None) -> _Call:
        """Send the call now, wait for its reply later (`.wait(timeout)`), as Go's Client.Go:
        lets a caller keep a call outstanding while it does something else.

        callback(call), if given, runs on the reader thread once the reply (or error) is in,
        before later replies are read: no thread hand-off, and replies are seen in order. It
        must not block for long; it may issue further calls. On a connection already known
        dead go() raises and the callback never runs. If sending fails, every pending call
        fails with the reason, on the thread that was sending (which may be another caller's)."""
        c = _Call(method, reply_type, callback)
        c._client = self
        with self._wlock:
            if self._dead is not None:   # checked again under _lock below
                raise RPCClosedError(f"rpc {method}: {self._dead}")
            seq = self._seq   # only ever changed under _wlock
            enc = self._enc
            # may raise ValueError/TypeError for a bad argument: nothing was sent then
            head = self._heads.get(method)
            if head:
                data = _header_bytes(head, seq) + enc.value_message(arg_type, arg)
            else:
                data = enc.encode_many([(RPC_REQUEST, {"ServiceMethod": method, "Seq": seq}),
                                        (arg_type, arg)])
                _remember_template(self._heads, enc, RPC_REQUEST, method)
            with self._lock:
                # Checked again: the reader may have died while we encoded, and a call
                # registered after _fail() emptied the table would never be woken.
                if self._dead is not None:
                    raise RPCClosedError(f"rpc {method}: {self._dead}")
                self._seq = seq + 1
                c._seq = seq
                self._pending[seq] = c
            # Nothing queued and nobody sending (the usual case): send it ourselves, the
            # send lock taken before _wlock is let go so that no later call overtakes it.
            mine = not self._out and self._slock.acquire(False)
            if not mine:
                self._out.append(data)
        self._flush(data if mine else None)
        return c

    def _flush(self, first: Optional[bytes] = None) -> None:
        """Send what go() queued, unless another thread is sending: that one then sends it
        too before it lets go. A caller never sleeps behind someone else's send (a keystroke
        that comes while the reader thread sends the next Read would pay a thread wake-up).
        `first`: the caller already holds the send lock and these bytes go out first."""
        out = self._out
        # A go() that queued after the sender's last look found the lock still taken and
        # left its data behind: whoever let go looks again.
        while first is not None or (out and self._slock.acquire(False)):
            lost = None
            try:
                if first is not None:
                    data, first = first, None
                    try:
                        self._conn.sendall(data)
                    except (OSError, ProtocolError) as e:
                        lost = e
                while lost is None and out:
                    with self._wlock:
                        if not out:
                            break
                        data = out[0] if len(out) == 1 else b"".join(out)
                        out.clear()
                    try:
                        self._conn.sendall(data)
                    except (OSError, ProtocolError) as e:
                        lost = e
            finally:
                self._slock.release()
            if lost is not None:
                with self._wlock:
                    out.clear()
                # outside the locks: the callbacks _fail runs may call go() themselves
                self._fail(f"connection lost: {lost}")
                return

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            pending, self._pending = self._pending, {}
        for c in pending.values():
            c.error = RPCClosedError(f"rpc: {reason}")
            c._done()

    def _read_loop(self) -> None:
        dec = self._dec
        reason = "connection closed by peer"
        rsp_tid = -1   # the peer's Response type id, once its layout is known to be _RESPONSE_WIRE
        try:
            while True:
                tid, buf, pos = dec.next_value()
                got = _parse_header(buf, pos) if tid == rsp_tid else None
                if got is None:
                    hdr = dec.value(tid, buf, pos, RPC_RESPONSE)
                    if dec.struct_fields(tid) == _RESPONSE_WIRE:
                        rsp_tid = tid
                    seq, err = hdr["Seq"], hdr["Error"]
                else:
                    seq, err = got[1], ""
                with self._lock:
                    c = self._pending.pop(seq, None)
                if c is None or err:
                    dec.skip()   # late reply to a timed-out call, or struct{} with an error
                    if c is not None:
                        c.error = RPCError(err)
                        c._done()
                    continue
                try:
                    c.reply = dec.decode(c.reply_type)
                except ProtocolError as e:
                    if dec.broken:
                        c.error = e
                        c._done()
                        raise
                    c.error = ProtocolError(f"rpc: reading body {e}")
                c._done()
        except EOFError:
            pass
        except (ProtocolError, OSError) as e:
            reason = f"connection lost: {e}"
        except Exception as e:  # never die silently: pending callers must wake up
            log.exception("rpc client reader failed")
            reason = f"connection lost: {e}"
        finally:
            self._fail(reason)

    def close(self) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = "connection is shut down"
        _shutdown(self._conn)
        self._fail("connection is shut down")
