"""dmsg sessions: Noise XK on the TCP connection, then yamux on the *plain* connection
(crypto-dmsg.md §5.1). The XK keys only encrypt the session objects (StreamRequest /
StreamResponse) written at the start of each yamux stream:

    [u16 BE len][u64 BE nonce][ChaCha20-Poly1305(session key, SignedObject)]

Nonces count from 1 per direction, shared by every stream of the session. On receive Go
checks a nonce map it never fills (order free, no replay check); we accept any order too but
remember the nonces we saw (bounded) and refuse an exact replay, which no Go peer produces.
"""
from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from typing import Any, Callable, Deque, Optional, Set, Tuple

from skypty import limits, noise
from skypty.errors import HandshakeError, ProtocolError, SkyptyError
from skypty.keys import PubKey, SecKey
from skypty.transport.dmsg.yamux import Session as YamuxSession

__all__ = ["ObjectCipher", "DmsgSession", "client_session_handshake", "server_session_handshake",
           "write_object", "read_object"]

_U16 = struct.Struct(">H")
_SEEN_MAX = 65536


class ObjectCipher:
    """The session's object sealer/opener (thread-safe)."""

    def __init__(self, send: noise.SendCipher, recv: noise.RecvCipher) -> None:
        self._send = send
        self._recv = recv
        recv.strict = False
        self._rlock = threading.Lock()
        self._seen: Set[int] = set()
        self._seen_order: Deque[int] = collections.deque()

    def seal_frame(self, obj: bytes) -> bytes:
        # One record of any u16 length, as Go frames them: every object we read can be relayed.
        body = self._send.seal_object(obj)
        return _U16.pack(len(body)) + body

    def open_body(self, body: bytes) -> bytes:
        if len(body) < 8 + 16:
            raise ProtocolError("dmsg: session object frame too short")
        n = int.from_bytes(body[:8], "big")
        with self._rlock:
            if n in self._seen:
                raise ProtocolError(f"dmsg: replayed session object nonce {n}")
            pt = self._recv.open(body)
            self._seen.add(n)
            self._seen_order.append(n)
            if len(self._seen_order) > _SEEN_MAX:
                self._seen.discard(self._seen_order.popleft())
        return pt


def write_object(stream, cipher: ObjectCipher, obj: bytes) -> None:
    stream.sendall(cipher.seal_frame(obj))


def read_object(stream, cipher: ObjectCipher, deadline: Optional[float] = None) -> bytes:
    """One session object (the SignedObject bytes). Any u16 length is legal, as in Go.
    EOFError at a clean end, ProtocolError on a cut or bad frame."""
    return cipher.open_body(noise.read_frame(stream, deadline, max_len=limits.DMSG_MAX_OBJECT))


def _hs_io(sock: socket.socket, timeout: float, fn):
    old = sock.gettimeout()
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        return fn(deadline)
    except socket.timeout:
        raise HandshakeError("dmsg session handshake timed out") from None
    except EOFError:
        raise HandshakeError("dmsg session handshake: connection closed by peer") from None
    except ProtocolError as e:
        raise HandshakeError(f"dmsg session handshake failed: {e}") from None
    except OSError as e:
        raise HandshakeError(f"dmsg session handshake failed: {e.strerror or e}") from None
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass


def client_session_handshake(sock: socket.socket, sk: SecKey, server_pk: PubKey,
                             timeout: float = limits.DMSG_SESSION_HANDSHAKE_TIMEOUT) -> ObjectCipher:
    """XK initiator. Message 3 goes out as its own write; nothing else follows it here."""
    hs = noise.Handshake("XK", True, sk, server_pk, pq=False)

    def run(deadline: float) -> ObjectCipher:
        noise.write_frame(sock, hs.write_message())
        hs.read_message(noise.read_frame(sock, deadline))
        noise.write_frame(sock, hs.write_message())
        return ObjectCipher(*hs.split())

    return _hs_io(sock, timeout, run)


def server_session_handshake(sock: socket.socket, sk: SecKey,
                             timeout: float = limits.DMSG_SESSION_HANDSHAKE_TIMEOUT) -> Tuple[ObjectCipher, PubKey]:
    """XK responder: (object cipher, the client's PK from message 3)."""
    hs = noise.Handshake("XK", False, sk, pq=False)

    def run(deadline: float) -> Tuple[ObjectCipher, PubKey]:
        hs.read_message(noise.read_frame(sock, deadline))
        noise.write_frame(sock, hs.write_message())
        hs.read_message(noise.read_frame(sock, deadline))
        pk = hs.remote_pk
        if pk is None or pk.is_null():
            raise ProtocolError("no client key in message 3")
        return ObjectCipher(*hs.split()), pk

    return _hs_io(sock, timeout, run)


class DmsgSession:
    """An established session: yamux over the TCP socket plus the object cipher.

    `remote_pk` is the server's key on a client session and the client's on a server one.
    """

    # Go's server fails the session when yamux bytes share a read with XK message 3 (error
    # 203); we hold our first yamux write back this long after the handshake.
    FIRST_WRITE_DELAY = 0.02

    def __init__(self, sock: socket.socket, cipher: ObjectCipher, local_pk: PubKey, remote_pk: PubKey,
                 client: bool, addr: str = "") -> None:
        self.cipher = cipher
        self.local_pk = local_pk
        self.remote_pk = remote_pk
        self.addr = addr
        self.client = client
        self.established = time.monotonic()
        try:
            self.remote_ip = sock.getpeername()[0]
        except OSError:
            self.remote_ip = ""
        self.mux = YamuxSession(sock, client=client, name=f"{'c' if client else 's'}:{remote_pk.hex()[:8]}")

    @property
    def closed(self) -> bool:
        return self.mux.closed

    def open_stream(self):
        wait = self.established + self.FIRST_WRITE_DELAY - time.monotonic()
        if wait > 0 and self.client:
            time.sleep(wait)
        return self.mux.open_stream()

    def accept_stream(self, timeout: Optional[float] = None):
        return self.mux.accept_stream(timeout)

    def serve_streams(self, handler: Callable[["DmsgSession", Any], None], name: str,
                      stopped: Callable[[], bool] = lambda: False) -> None:
        """Run `handler(self, stream)` in a thread per stream the peer opens, until the
        session ends or `stopped()` (blocks: give it a thread of its own)."""
        while not self.closed and not stopped():
            try:
                ys = self.accept_stream()
            except (ConnectionError, socket.timeout, SkyptyError):
                return
            threading.Thread(target=handler, args=(self, ys), name=name, daemon=True).start()

    def read_request(self, ys) -> Tuple[bytes, float]:
        """The first object of a stream the peer opened, and the handshake deadline it started."""
        deadline = time.monotonic() + limits.DMSG_STREAM_HANDSHAKE_TIMEOUT
        ys.settimeout(limits.DMSG_STREAM_HANDSHAKE_TIMEOUT)
        return read_object(ys, self.cipher, deadline), deadline

    def close(self, why: Optional[str] = None) -> None:
        self.mux.close(why)
