"""The secure channel: dmsg's Noise XK / KK handshakes and its framed transport.

Why a small hand-written handshake instead of `noiseprotocol`: we need exactly two patterns
(XK, KK) with one non-standard DH (33-byte output), a non-standard split direction, the
ML-KEM payload exchange, access to h/ck after every message (the vectors pin them), fixed
ephemerals without library warnings, and explicit-nonce transport records that bypass
the library's CipherStates anyway. The Noise symmetric state is ~40 lines of the spec's own
pseudo-code (MixHash / MixKey / EncryptAndHash / Split); that is smaller to audit than a
backend plug-in plus the patches around it.

Wire facts (crypto-dmsg.md §2, §4; pty.md §1.2-§1.3):
- `Noise_XK_Secp256k1_ChaChaPoly_SHA256` / `Noise_KK_…`, empty prologue, empty payloads
  (except the optional ML-KEM-768 hybrid), DH = SHA256(compressed(sk·PK)) ‖ 00.
- Split: whoever WRITES the last handshake message sends with k2 (XK: the initiator,
  reversed from the Noise spec; KK: the responder, as the spec).
- Frame: [u16 BE len][body], len ≤ 4094 on read. Transport body: [u64 BE n][AEAD(k,
  0^32 ‖ LE64(n), ad=b"", pt)], n from 1 per direction, strictly increasing on receive,
  ≤ 4070 plaintext bytes per record, zero-length records skipped by the reader.
"""
from __future__ import annotations

import _socket   # not socket: see netutil
import hashlib
import hmac
import struct
import threading
import time
from typing import Any, Callable, Optional, Tuple

from cryptography.exceptions import InvalidTag

from . import limits
from .errors import HandshakeError, KeyFormatError, ProtocolError
from .keys import PubKey, SecKey, generate_keypair, noise_dh
from .logs import get_logger

_MLKEM = None   # (generate, from_public_bytes) once loaded; False where this cryptography lacks it


def _mlkem_ops():
    """ML-KEM-768 from `cryptography`, loaded by the first handshake that wants it rather than at
    import (the exec path's cold start is a budget). None when unavailable: classical then."""
    global _MLKEM
    if _MLKEM is None:
        _MLKEM = _mlkem_direct() or _mlkem_public() or False
    return _MLKEM or None


def _mlkem_direct():
    """The Rust functions behind cryptography's public ML-KEM classmethods, called as those do.

    The classmethods import cryptography's whole OpenSSL backend module (rsa, ec, padding,
    random, …) only to read three build flags: ~15 ms, a fifth of a one-shot `cli pty exec`.
    Here the same flags are read and the same functions called; if a release moves any of
    them this returns None and the public API is used (tests/test_noise.py pins both).
    The flags are what the public API trusts too, so no round trip is run here (it was three
    ML-KEM operations, ~1 ms of every cold start); a key that fails to generate all the same
    makes that handshake classical (Handshake._pq_write_payload)."""
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust

        if not (rust.CRYPTOGRAPHY_IS_AWSLC or rust.CRYPTOGRAPHY_IS_BORINGSSL
                or rust.CRYPTOGRAPHY_OPENSSL_350_OR_GREATER):
            return None
        return (rust.mlkem.generate_mlkem768_key, rust.mlkem.from_mlkem768_public_bytes)
    except Exception:  # pragma: no cover - depends on the installed cryptography
        return None


def _mlkem_public():
    try:
        from cryptography.hazmat.primitives.asymmetric import mlkem

        ops = (mlkem.MLKEM768PrivateKey.generate, mlkem.MLKEM768PublicKey.from_public_bytes)
        _mlkem_check(ops)   # present in the API is not enough: the backend must have it
        return ops
    except Exception:  # pragma: no cover - depends on the installed cryptography
        return None


def _mlkem_check(ops) -> None:
    """One round trip through (generate, from_public_bytes); raises if anything is off."""
    sk = ops[0]()
    ek = sk.public_key().public_bytes_raw()
    ss, ct = ops[1](ek).encapsulate()
    if len(ek) != MLKEM768_EK_LEN or len(ct) != MLKEM768_CT_LEN or sk.decapsulate(ct) != ss:
        raise ValueError("ML-KEM-768 round trip failed")


def _aead_class():
    """cryptography's ChaCha20-Poly1305 class.

    Since cryptography 42 the public name is the Rust class itself, but importing it by that
    name first loads the cipher package (base, modes, algorithms): ~2.5 ms of a one-shot
    `cli pty exec`. The class is taken from the binding instead when a known answer says it
    is the cipher we mean; anything else (an older or rearranged release) gets the public one
    (tests/test_noise.py pins both)."""
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust

        cls = rust.aead.ChaCha20Poly1305
        if _aead_ok(cls):
            return cls
    except Exception:  # pragma: no cover - depends on the installed cryptography
        pass
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305


def _aead_ok(cls) -> bool:
    try:
        return cls(_KAT_KEY).encrypt(_KAT_NONCE, _KAT_PT, _KAT_AD)[-16:] == _KAT_TAG
    except Exception:
        return False


# RFC 8439 section 2.8.2 (the AEAD example): its tag is what _aead_class checks a class by
_KAT_KEY = bytes(range(0x80, 0xA0))
_KAT_NONCE = bytes.fromhex("070000004041424344454647")
_KAT_AD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
_KAT_PT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
           b"the future, sunscreen would be it.")
_KAT_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")
ChaCha20Poly1305 = _aead_class()


def pq_available() -> bool:
    """Whether this process can do the ML-KEM-768 hybrid (cryptography >= 46 with a backend that has it)."""
    return _mlkem_ops() is not None


__all__ = [
    "Handshake", "SendCipher", "RecvCipher", "SecureConn", "client_handshake", "server_handshake",
    "read_frame", "write_frame", "pq_available", "PROTOCOL_XK", "PROTOCOL_KK",
    "MLKEM768_EK_LEN", "MLKEM768_CT_LEN", "PQ_HKDF_INFO",
]

log = get_logger(__name__)

PROTOCOL_XK = b"Noise_XK_Secp256k1_ChaChaPoly_SHA256"
PROTOCOL_KK = b"Noise_KK_Secp256k1_ChaChaPoly_SHA256"
MLKEM768_EK_LEN = 1184
MLKEM768_CT_LEN = 1088
PQ_HKDF_INFO = b"skywire-pq-hybrid-v1"

_DHLEN = 33          # compressed point, and the DH output length
_TAG = 16
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_HDR = struct.Struct(">HQ")  # frame length + record nonce, written (and read) together
_MAX_NONCE = (1 << 64) - 1
_MAX_OBJECT_PLAINTEXT = 0xFFFF - 8 - 16   # a u16 frame body holds the nonce and the tag too

# (pre-message keys, message token lists); "rs" = responder static, "is" = initiator static
_PATTERNS = {
    "XK": (PROTOCOL_XK, ("rs",), (("e", "es"), ("e", "ee"), ("s", "se"))),
    "KK": (PROTOCOL_KK, ("is", "rs"), (("e", "es", "ss"), ("e", "ee", "se"))),
}


# The ChaCha20-Poly1305 nonce of counter n: 4 zero bytes, then n as u64 little-endian.
_aead_nonce = struct.Struct("<4xQ").pack


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def _noise_hkdf(ck: bytes, ikm: bytes) -> Tuple[bytes, bytes]:
    temp = _hmac(ck, ikm)
    o1 = _hmac(temp, b"\x01")
    return o1, _hmac(temp, o1 + b"\x02")


class _Symmetric:
    """The Noise SymmetricState (spec §5.2) with ChaChaPoly/SHA256."""

    def __init__(self, name: bytes) -> None:
        self.h = name.ljust(32, b"\x00") if len(name) <= 32 else hashlib.sha256(name).digest()
        self.ck = self.h
        self._aead: Optional[ChaCha20Poly1305] = None
        self._n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, k = _noise_hkdf(self.ck, ikm)
        self._aead = ChaCha20Poly1305(k)
        self._n = 0

    def encrypt_and_hash(self, pt: bytes) -> bytes:
        if self._aead is None:
            ct = pt
        else:
            ct = self._aead.encrypt(_aead_nonce(self._n), pt, self.h)
            self._n += 1
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ct: bytes) -> bytes:
        if self._aead is None:
            pt = ct
        else:
            try:
                pt = self._aead.decrypt(_aead_nonce(self._n), ct, self.h)
            except InvalidTag:
                raise HandshakeError("message authentication failed") from None
            self._n += 1
        self.mix_hash(ct)
        return pt

    def split(self) -> Tuple[bytes, bytes]:
        return _noise_hkdf(self.ck, b"")


class Handshake:
    """One Noise XK or KK handshake, driven message by message (no I/O here).

    `write_message()` / `read_message()` alternate as the pattern says; after the last one,
    `.complete` is true and `.split()` returns this side's (SendCipher, RecvCipher).
    With `pq=True` the initiator offers an ML-KEM-768 key in message 1 and both sides mix
    the KEM secret into the transport keys when the peer answers (crypto-dmsg.md §2.5);
    otherwise, or when the peer does not, the keys are classical. `require_pq=True` turns a
    classical outcome into a HandshakeError. Payloads are for the PQ exchange only: any
    other payload the peer sends is authenticated, then ignored.
    """

    def __init__(self, pattern: str, initiator: bool, local_sk: SecKey, remote_pk: Optional[PubKey] = None,
                 *, ephemeral_sk: Optional[SecKey] = None, pq: bool = True, require_pq: bool = False) -> None:
        if pattern not in _PATTERNS:
            raise ValueError(f"unsupported Noise pattern {pattern!r}")
        name, pre, self._msgs = _PATTERNS[pattern]
        self.pattern = pattern
        self.initiator = bool(initiator)
        self._s = local_sk
        self._spub = local_sk.pubkey()
        needs_rs = pattern == "KK" or initiator
        if needs_rs:
            if remote_pk is not None:
                remote_pk = PubKey(remote_pk)
            if remote_pk is None or remote_pk.is_null():
                raise KeyFormatError(f"noise {pattern}: the remote public key is required")
        self.remote_pk: Optional[PubKey] = remote_pk if needs_rs else None
        self._e = ephemeral_sk
        self._re: Optional[PubKey] = None
        pq_ok = pq_available() if (pq or require_pq) else False
        if require_pq and not pq_ok:
            raise HandshakeError("post-quantum key exchange required but ML-KEM-768 is unavailable"
                                 " (needs a newer python cryptography)")
        self._pq = pq_ok
        self._require_pq = require_pq
        self._kem_sk = None
        self._kem_ct = b""
        self._pq_secret: Optional[bytes] = None
        self._index = 0
        self._sym = _Symmetric(name)
        self._sym.mix_hash(b"")  # the empty prologue is still hashed
        for who in pre:
            pk = self._spub if (who == "is") == self.initiator else self.remote_pk
            self._sym.mix_hash(bytes(pk))

    # --- state -------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._index >= len(self._msgs)

    @property
    def handshake_hash(self) -> bytes:
        """h (final once complete): the channel binding both sides share."""
        return self._sym.h

    @property
    def chaining_key(self) -> bytes:
        """ck, exposed for known-answer tests."""
        return self._sym.ck

    @property
    def pq(self) -> bool:
        """True when the ML-KEM secret was mixed into the transport keys."""
        return self._pq_secret is not None

    def _my_turn(self) -> bool:
        return (self._index % 2 == 0) == self.initiator

    # --- tokens ------------------------------------------------------------------------
    def _dh(self, token: str) -> bytes:
        # For "es"/"se" the first letter is the initiator's key, the second the responder's.
        a, b = token[0], token[1]
        mine, theirs = (a, b) if self.initiator else (b, a)
        sk = self._e if mine == "e" else self._s
        pk = self._re if theirs == "e" else self.remote_pk
        try:
            return noise_dh(sk, pk)
        except KeyFormatError:
            raise HandshakeError("peer sent an invalid public key") from None

    def write_message(self, payload: bytes = b"") -> bytes:
        if self.complete or not self._my_turn():
            raise HandshakeError("noise handshake: write out of order")
        tokens = self._msgs[self._index]
        out = []
        for t in tokens:
            if t == "e":
                if self._e is None:
                    _, self._e = generate_keypair()
                epub = bytes(self._e.pubkey())
                out.append(epub)
                self._sym.mix_hash(epub)
            elif t == "s":
                out.append(self._sym.encrypt_and_hash(bytes(self._spub)))
            else:
                self._sym.mix_key(self._dh(t))
        pq_part = self._pq_write_payload()
        if pq_part and payload:
            raise ValueError("noise: this handshake payload carries the ML-KEM exchange; pass pq=False to send your own")
        payload = pq_part or bytes(payload)
        out.append(self._sym.encrypt_and_hash(payload))
        self._index += 1
        return b"".join(out)

    def read_message(self, msg: bytes) -> bytes:
        if self.complete or self._my_turn():
            raise HandshakeError("noise handshake: read out of order")
        msg = bytes(msg)
        tokens = self._msgs[self._index]
        pos = 0
        for t in tokens:
            if t == "e":
                if len(msg) - pos < _DHLEN:
                    raise HandshakeError(f"handshake message {self._index + 1} too short ({len(msg)} bytes)")
                raw = msg[pos:pos + _DHLEN]
                pos += _DHLEN
                try:
                    self._re = PubKey(raw)
                except KeyFormatError:
                    raise HandshakeError("peer sent an invalid ephemeral key") from None
                if self._re.is_null():
                    raise HandshakeError("peer sent an invalid ephemeral key")
                self._sym.mix_hash(raw)
            elif t == "s":
                n = _DHLEN + _TAG
                if len(msg) - pos < n:
                    raise HandshakeError(f"handshake message {self._index + 1} too short ({len(msg)} bytes)")
                raw = self._sym.decrypt_and_hash(msg[pos:pos + n])
                pos += n
                try:
                    rs = PubKey(raw)
                except KeyFormatError:
                    raise HandshakeError("peer sent an invalid static key") from None
                if rs.is_null():
                    raise HandshakeError("peer sent an invalid static key")
                self.remote_pk = rs
            else:
                self._sym.mix_key(self._dh(t))
        if len(msg) - pos < _TAG:
            raise HandshakeError(f"handshake message {self._index + 1} too short ({len(msg)} bytes)")
        payload = self._sym.decrypt_and_hash(msg[pos:])
        self._index += 1
        self._pq_read_payload(payload)
        return payload

    # --- ML-KEM-768 hybrid ---------------------------------------------------------------
    def _pq_write_payload(self) -> bytes:
        if not self._pq:
            return b""
        if self._index == 0 and self.initiator:
            try:
                self._kem_sk = _MLKEM[0]()
                ek = self._kem_sk.public_key().public_bytes_raw()
                if len(ek) != MLKEM768_EK_LEN:
                    raise ValueError(f"{len(ek)}-byte encapsulation key")
            except Exception as e:   # a backend that turned ML-KEM down after all: classical
                self._kem_sk = None
                if self._require_pq:
                    raise HandshakeError(f"post-quantum key exchange required but ML-KEM-768 failed: {e}") from None
                return b""
            return ek
        if self._index == 1 and not self.initiator:
            ct, self._kem_ct = self._kem_ct, b""
            return ct
        return b""

    def _pq_read_payload(self, payload: bytes) -> None:
        idx = self._index  # already advanced: 1 = we just read msg 1, 2 = msg 2
        if idx == 1 and not self.initiator:
            # Only an exactly sized key counts; anything else falls back to classical.
            if self._pq and len(payload) == MLKEM768_EK_LEN:
                try:
                    ek = _MLKEM[1](payload)
                    self._pq_secret, self._kem_ct = ek.encapsulate()
                except Exception:
                    self._pq_secret, self._kem_ct = None, b""
            if self._pq_secret is None and self._require_pq:
                raise HandshakeError("post-quantum key exchange required but the peer offered no ML-KEM key")
        elif idx == 2 and self.initiator:
            if self._kem_sk is not None and len(payload) == MLKEM768_CT_LEN:
                try:
                    self._pq_secret = self._kem_sk.decapsulate(payload)
                except Exception:
                    self._pq_secret = None
            self._kem_sk = None
            if self._pq_secret is None:
                if self._require_pq:
                    raise HandshakeError("post-quantum key exchange required but the peer answered classically")
                if self._pq:
                    log.debug("noise: peer did not answer the ML-KEM offer; classical keys")

    # --- split -------------------------------------------------------------------------
    def split(self) -> Tuple["SendCipher", "RecvCipher"]:
        if not self.complete:
            raise HandshakeError("noise handshake: split before completion")
        k1, k2 = self._sym.split()
        if self._pq_secret is not None:
            k1 = _pq_mix(k1, self._pq_secret, self._sym.h)
            k2 = _pq_mix(k2, self._pq_secret, self._sym.h)
        elif self._require_pq:
            raise HandshakeError("post-quantum key exchange required but the handshake was classical")
        # dmsg: the writer of the last message sends with k2 (crypto-dmsg.md §2.4).
        last_writer_is_initiator = len(self._msgs) % 2 == 1
        if last_writer_is_initiator == self.initiator:
            return SendCipher(k2), RecvCipher(k1)
        return SendCipher(k1), RecvCipher(k2)


def _pq_mix(k: bytes, ss: bytes, h: bytes) -> bytes:
    # HKDF-SHA256 (RFC 5869), salt h, one 32-byte output block: extract, then T(1).
    # Two HMACs from hashlib, instead of importing cryptography's KDF stack for them.
    prk = _hmac(h, k + ss)
    return _hmac(prk, PQ_HKDF_INFO + b"\x01")


# --- transport records ---------------------------------------------------------------------

# _LOCKING: on the per-message paths (a keystroke, its echo, an rpc call) locks are taken with
# acquire() and try/finally rather than `with`: `with` looks up and binds __enter__ and
# __exit__ on every use, twice the cost of the two calls (measured: 216 vs 102 ns), and a
# keystroke passes four of these locks on each side.

class SendCipher:
    """Seals transport records: body = [u64 BE n][AEAD(k, 0^32 ‖ LE64(n), b"", pt)], n from 1.

    A lock hands out each nonce exactly once, even to careless concurrent callers: a nonce
    reused under ChaCha20-Poly1305 leaks the XOR of two plaintexts and the MAC key. Wire
    order is still the caller's job (a strict reader refuses a smaller nonce after a larger
    one): SecureConn seals and writes under one lock.
    """

    __slots__ = ("_aead", "_n", "_lock", "_into")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(bytes(key))
        self._n = 0
        self._lock = threading.Lock()
        # encrypt_into is cryptography >= 47; with an older one each record is copied once more
        self._into = getattr(self._aead, "encrypt_into", None)

    @property
    def nonce(self) -> int:
        """The nonce of the last sealed record (0 before the first)."""
        return self._n

    def seal(self, plaintext: bytes) -> bytes:
        """One stream record (≤ 4070 plaintext bytes)."""
        return self._seal(plaintext, limits.NOISE_MAX_PLAINTEXT)

    def seal_object(self, plaintext: bytes) -> bytes:
        """One record of up to 65511 plaintext bytes, for dmsg session objects: Go frames
        those with any u16 length, so a SignedObject larger than 4070 bytes is one record."""
        return self._seal(plaintext, _MAX_OBJECT_PLAINTEXT)

    def _seal(self, plaintext: bytes, cap: int) -> bytes:
        if len(plaintext) > cap:
            raise ValueError(f"record plaintext {len(plaintext)} > {cap} bytes")
        with self._lock:
            if self._n >= _MAX_NONCE:
                raise ProtocolError("noise: send nonce exhausted")
            self._n += 1
            n = self._n
            return n.to_bytes(8, "big") + self._aead.encrypt(_aead_nonce(n), plaintext, None)

    def seal_frame(self, data: bytes) -> bytes:
        """One framed record ([u16 len][nonce][ciphertext]) for data of 1..4070 bytes: the
        keystroke path, cheaper than seal_frames' buffer set-up for a few bytes."""
        lock = self._lock
        lock.acquire()   # not `with` on this path: see _LOCKING
        try:
            if self._n >= _MAX_NONCE:
                raise ProtocolError("noise: send nonce exhausted")
            self._n = n = self._n + 1
        finally:
            lock.release()
        return _HDR.pack(len(data) + 8 + _TAG, n) + self._aead.encrypt(_aead_nonce(n), data, None)

    def seal_frames(self, data) -> bytearray:
        """All framed records ([u16 len][body]…) for one write, split at 4070 bytes.

        Encrypts straight into one preallocated buffer: no per-record bytes objects, so a
        large write costs one AEAD call per record and nothing else in Python.
        """
        mv = memoryview(data).cast("B")
        total = len(mv)
        if total == 0:
            return bytearray()
        step = limits.NOISE_MAX_PLAINTEXT
        count = (total + step - 1) // step
        out = bytearray(total + count * (2 + 8 + _TAG))
        ov = memoryview(out)
        pack_into = _HDR.pack_into
        enc = self._into
        seal = self._aead.encrypt
        with self._lock:
            if self._n + count > _MAX_NONCE:
                raise ProtocolError("noise: send nonce exhausted")
            n = self._n
            self._n = n + count
        pos = 0
        for off in range(0, total, step):
            chunk = mv[off:off + step]
            clen = len(chunk)
            n += 1
            pack_into(out, pos, clen + 8 + _TAG, n)
            if enc is not None:
                enc(_aead_nonce(n), chunk, None, ov[pos + 10:pos + 10 + clen + _TAG])
            else:
                ov[pos + 10:pos + 10 + clen + _TAG] = seal(_aead_nonce(n), bytes(chunk), None)
            pos += 10 + clen + _TAG
        return out


class RecvCipher:
    """Opens transport records; with `strict` each nonce must exceed the last accepted one."""

    __slots__ = ("_aead", "_last", "_lock", "strict")

    def __init__(self, key: bytes, strict: bool = True) -> None:
        self._aead = ChaCha20Poly1305(bytes(key))
        self._last = 0
        self._lock = threading.Lock()  # check-and-advance of _last is one step: no replay slips between
        self.strict = strict

    @property
    def nonce(self) -> int:
        """The nonce of the last accepted record (0 before the first)."""
        return self._last

    # The rules of a record, for open() (one record: the keystroke path) and open_frames()
    # (every record of a read: bulk), which inline them rather than call per record.
    @staticmethod
    def _too_short(length: int) -> ProtocolError:
        return ProtocolError(f"noise: transport record too short ({length} bytes)")

    @staticmethod
    def _replayed(n: int, last: int) -> ProtocolError:
        return ProtocolError(f"noise: received nonce {n} is not larger than the previous one ({last})")

    _FORGED = "noise: transport record failed authentication"

    def open(self, body) -> bytes:
        if len(body) < 8 + _TAG:
            raise self._too_short(len(body))
        (n,) = _U64.unpack_from(body)
        lock = self._lock
        lock.acquire()   # not `with` on this path: see _LOCKING
        try:
            if self.strict and n <= self._last:
                raise self._replayed(n, self._last)
            try:
                pt = self._aead.decrypt(_aead_nonce(n), body[8:], None)
            except InvalidTag:
                raise ProtocolError(self._FORGED) from None
            if n > self._last:
                self._last = n
        finally:
            lock.release()
        return pt

    def open_frames(self, buf, pos: int, out: bytearray) -> int:
        """Open every whole [u16 length][record] frame of `buf` from `pos` on, appending the
        plaintexts to `out`; the position after the last one. SecureConn's bulk path: one lock
        and no call per record (a 256 MiB download is 66k records). Raises ProtocolError as
        open() does, the records before the bad one already in `out` and counted in nonce."""
        n = len(buf)
        aead = self._aead
        strict = self.strict
        with self._lock, memoryview(buf) as mv:
            last = self._last
            try:
                while n - pos >= 2:
                    if n - pos >= 10:
                        length, nonce = _HDR.unpack_from(buf, pos)
                    else:   # too few bytes for a record: only its length can be judged yet
                        length, nonce = (buf[pos] << 8) | buf[pos + 1], 0
                    if length > limits.NOISE_MAX_BODY:
                        raise ProtocolError(f"noise: frame length {length} exceeds the maximum {limits.NOISE_MAX_BODY}")
                    if n - pos - 2 < length:
                        break
                    if length < 8 + _TAG:
                        raise self._too_short(length)
                    if strict and nonce <= last:
                        raise self._replayed(nonce, last)
                    try:
                        out += aead.decrypt(_aead_nonce(nonce), mv[pos + 10:pos + 2 + length], None)
                    except InvalidTag:
                        raise ProtocolError(self._FORGED) from None
                    if nonce > last:
                        last = nonce
                    pos += 2 + length
            finally:
                self._last = last
        return pos


def _missing(raw) -> int:
    """Bytes the frame at the start of `raw` still lacks (to its length field, if that is cut);
    0 once it is whole, or when its length is over the cap (open_frames refuses it then)."""
    if len(raw) < 2:
        return 2 - len(raw)
    length = (raw[0] << 8) | raw[1]
    return 0 if length > limits.NOISE_MAX_BODY else max(0, 2 + length - len(raw))


# --- frames ---------------------------------------------------------------------------------

def _read_exact(stream, n: int, deadline: Optional[float] = None) -> bytes:
    """n bytes or EOFError (nothing read) / ProtocolError (cut short); honours a deadline."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _socket.timeout("timed out")
            stream.settimeout(left)
        chunk = stream.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError(f"noise: unexpected EOF inside a frame ({len(buf)} of {n} bytes)")
            raise EOFError("EOF")
        buf += chunk
    return bytes(buf)


def read_frame(stream, deadline: Optional[float] = None, max_len: int = limits.NOISE_MAX_BODY) -> bytes:
    """Read one [u16 BE len][body] frame. EOFError at a clean end, ProtocolError on a bad or cut
    frame; _socket.timeout once `deadline` (time.monotonic()) passes. dmsg session objects pass
    max_len=65535 (any u16 is legal there)."""
    (length,) = _U16.unpack(_read_exact(stream, 2, deadline))
    if length > max_len:
        raise ProtocolError(f"noise: frame length {length} exceeds the maximum {max_len}")
    try:
        return _read_exact(stream, length, deadline) if length else b""
    except EOFError:
        raise ProtocolError(f"noise: unexpected EOF inside a frame (0 of {length} bytes)") from None


def write_frame(stream, body: bytes) -> None:
    """Write one frame. Handshake messages may exceed the read limit only up to 65535 (Go does too)."""
    if len(body) > 0xFFFF:
        raise ValueError(f"noise frame body {len(body)} > 65535 bytes")
    stream.sendall(_U16.pack(len(body)) + bytes(body))


# --- the connection ---------------------------------------------------------------------------

_RECV_CHUNK = 256 * 1024       # one stream.recv; bounds the plaintext buffered ahead
_RECV_SMALL = 16 * 1024        # recv_into buffer for small traffic (see _recv_chunk)
_SEND_BATCH = 64 * limits.NOISE_MAX_PLAINTEXT  # ~256 KiB of plaintext per stream.sendall


class SecureConn:
    """A socket-like byte stream over Noise transport records.

    `sendall` is thread-safe and writes each batch of records with one `stream.sendall`;
    `recv` reads large chunks from the stream and decrypts every complete record in them,
    so a bulk transfer costs one syscall per ~256 KiB. One reader at a time is expected
    (a lock keeps concurrent readers safe, not fair). After a protocol error (bad tag,
    replayed nonce, oversize or truncated frame) every later `recv` raises it again.
    """

    def __init__(self, stream, send: SendCipher, recv: RecvCipher, remote_pk: Optional[PubKey],
                 local_pk: Optional[PubKey], *, initial: bytes = b"", pq: bool = False) -> None:
        self.stream = stream
        self.pq = pq  # whether the ML-KEM hybrid keyed this connection
        self._send = send
        self._recv = recv
        self.remote_pk = remote_pk
        self.local_pk = local_pk
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._raw = bytearray(initial)   # ciphertext not yet parsed into records
        self._rbuf: Any = None           # recv_into target, made by prefer_small_reads()
        self._no_small = True            # every read a bulk one, until prefer_small_reads()
        self._bulk = True
        self._plain = bytearray()        # decrypted, not yet returned
        self._ppos = 0
        self._eof = False
        self._err: Optional[BaseException] = None
        self._closed = False

    # --- writing ---
    def sendall(self, data) -> None:
        if type(data) is bytes and 0 < len(data) <= limits.NOISE_MAX_PLAINTEXT:
            lock = self._wlock
            lock.acquire()   # seal under the lock: nonces go out in order (not `with`: _LOCKING)
            try:
                self.stream.sendall(self._send.seal_frame(data))
            finally:
                lock.release()
            return
        mv = memoryview(data).cast("B")
        if not len(mv):
            return  # Go writes nothing for an empty write
        with self._wlock:
            for off in range(0, len(mv), _SEND_BATCH):
                self.stream.sendall(self._send.seal_frames(mv[off:off + _SEND_BATCH]))

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    # --- reading ---
    def pending(self) -> int:
        """Plaintext bytes already decrypted and waiting (select() on fileno() cannot see them)."""
        return len(self._plain) - self._ppos

    def _fill(self) -> None:
        """Decrypt at least one non-empty record into the plaintext buffer, or set EOF.

        A read is opened where it landed: only a frame cut by its end is copied into _raw
        (the whole read was, before: one more pass over every byte of a bulk transfer)."""
        raw = self._raw
        plain = self._plain
        rc = self._recv
        chunk: Any = b""
        while True:
            had = len(plain)
            # On a protocol error the buffers are left as they are: the error is sticky.
            # Records before a bad one are still delivered; the error surfaces after them.
            try:
                if raw:
                    # raw holds at most the start of one frame once its whole ones are out:
                    # complete it from the read (its length first, if even that was cut)
                    pos = rc.open_frames(raw, 0, plain)
                    if pos:
                        del raw[:pos]
                    need = _missing(raw)
                    while need and chunk:
                        raw += chunk[:need]
                        chunk = chunk[need:]
                        need = _missing(raw)
                    if raw and not need:
                        del raw[:rc.open_frames(raw, 0, plain)]
                if chunk and not raw:
                    pos = rc.open_frames(chunk, 0, plain)
                    raw += chunk[pos:]
                chunk = b""
            except ProtocolError as e:
                if len(plain) == had:
                    raise
                self._err = e
                return
            if len(plain) > had:
                return
            got = self._recv_chunk()
            if not got:
                if raw:
                    raise ProtocolError(f"noise: connection closed inside a frame ({len(raw)} bytes left over)")
                self._eof = True
                return
            chunk = memoryview(got)

    def prefer_small_reads(self) -> None:
        """For request/response traffic (rpc): see _recv_chunk. No-op on a stream without
        recv_into."""
        if hasattr(self.stream, "recv_into"):
            self._no_small = False
            self._bulk = False
            if self._rbuf is None:
                self._rbuf = memoryview(bytearray(_RECV_SMALL))

    def _recv_chunk(self):
        """Up to _RECV_CHUNK bytes of ciphertext.

        A stream.recv(256 KiB) that returns a few bytes costs an mmap+munmap (~13 us, a
        keystroke's whole budget). After prefer_small_reads() small traffic is read with
        recv_into a reused 16 KiB buffer; once that comes back full the stream is in bulk
        and stream.recv(256 KiB) is used until a read is tiny again. Streams not marked stay
        with the big reads: measured here, making every read cheap cost bulk transfers
        (256 MiB download 640 -> 440 MiB/s, fs writes 550 -> 320 MiB/s: the reader then
        wakes for ever smaller pieces)."""
        if self._bulk:
            chunk = self.stream.recv(_RECV_CHUNK)
            # only keystroke-sized traffic ends bulk mode; a stream without recv_into stays in it
            self._bulk = len(chunk) >= 1024 or self._no_small
            return chunk
        buf = self._rbuf
        k = self.stream.recv_into(buf)
        self._bulk = k == _RECV_SMALL
        return buf[:k]

    def recv(self, n: int = 65536) -> bytes:
        """Up to n plaintext bytes; b"" at a clean EOF."""
        if n <= 0:
            return b""
        lock = self._rlock
        lock.acquire()   # not `with`: _LOCKING
        try:
            if self._ppos >= len(self._plain):
                if self._err is not None:
                    raise self._err
                if self._eof:
                    return b""
                if self._plain:
                    self._plain.clear()
                    self._ppos = 0
                try:
                    if self._bulk or self._raw:
                        self._fill()
                    else:
                        # Small traffic: a read that brings exactly one whole record (a
                        # keystroke, an rpc reply) is opened where it landed, skipping both
                        # buffers. Anything else goes through _fill, as a bulk read would.
                        buf = self._rbuf
                        k = self.stream.recv_into(buf)
                        self._bulk = k == _RECV_SMALL
                        if k > 2 and k - 2 == ((buf[0] << 8) | buf[1]) <= limits.NOISE_MAX_BODY:
                            pt = self._recv.open(buf[2:k])
                            if pt and len(pt) <= n:
                                return pt
                            if pt:
                                self._plain += pt
                            else:   # an empty record: read on
                                self._fill()
                        elif k:
                            self._raw += buf[:k]
                            self._fill()
                        else:
                            self._eof = True
                except ProtocolError as e:
                    self._err = e
                    raise
                if self._eof and not self._plain:
                    return b""
            p = self._ppos
            with memoryview(self._plain) as m:
                out = bytes(m[p:p + n])
            self._ppos = p + len(out)
            return out
        finally:
            lock.release()

    def recv_exact(self, n: int) -> bytes:
        """Exactly n bytes; EOFError if the stream ends first."""
        parts = []
        got = 0
        while got < n:
            b = self.recv(n - got)
            if not b:
                raise EOFError(f"unexpected EOF ({got} of {n} bytes)")
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    # --- plumbing ---
    def settimeout(self, t: Optional[float]) -> None:
        self.stream.settimeout(t)

    def gettimeout(self) -> Optional[float]:
        return self.stream.gettimeout()

    def fileno(self) -> int:
        return self.stream.fileno()

    def shutdown_write(self) -> None:
        s = self.stream
        try:
            if hasattr(s, "shutdown_write"):
                s.shutdown_write()
            else:
                s.shutdown(_socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        s = self.stream
        # shutdown() wakes a thread blocked in recv(); close() alone does not on Linux.
        if hasattr(s, "shutdown"):
            try:
                s.shutdown(_socket.SHUT_RDWR)
            except (OSError, TypeError):
                pass
        try:
            s.close()
        except OSError:
            pass

    def __enter__(self) -> "SecureConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        r = self.remote_pk.hex() if self.remote_pk is not None else None
        return f"<SecureConn remote_pk={r}>"


# --- handshakes over a stream ------------------------------------------------------------

def _describe(e: BaseException) -> str:
    if isinstance(e, EOFError):
        return "EOF"
    if isinstance(e, _socket.timeout):
        return "timed out"
    if isinstance(e, (HandshakeError, ProtocolError)):
        return str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


def _run(sock, hs: Handshake, timeout: Optional[float], context: str,
         while_waiting: Optional[Callable[[], Any]] = None) -> SecureConn:
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if timeout is not None:
            sock.settimeout(timeout)
        while not hs.complete:
            if hs._my_turn():
                write_frame(sock, hs.write_message())
            else:
                if while_waiting is not None:
                    _call_quietly(while_waiting)
                    while_waiting = None
                hs.read_message(read_frame(sock, deadline))
        send, recv = hs.split()
        sock.settimeout(None)
    except (HandshakeError, ProtocolError, EOFError, OSError, ValueError) as e:
        try:
            sock.close()
        except OSError:
            pass
        suffix = f" after {timeout:g}s" if isinstance(e, _socket.timeout) and timeout is not None else ""
        raise HandshakeError(f"noise handshake failed ({context}): {_describe(e)}{suffix}") from None
    return SecureConn(sock, send, recv, hs.remote_pk, hs._spub, pq=hs.pq)


def _call_quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:   # only a head start: whatever failed fails again where it is needed
        pass


def client_handshake(sock, local_sk: SecKey, remote_pk: PubKey, timeout: Optional[float] = limits.HANDSHAKE_TIMEOUT,
                     pq: bool = True, require_pq: bool = False, *,
                     ephemeral_sk: Optional[SecKey] = None,
                     while_waiting: Optional[Callable[[], Any]] = None) -> SecureConn:
    """XK initiator over a stream, pinning the server's key. Closes `sock` on failure.

    `while_waiting()`, if given, runs once while the responder works on message 2 (a
    one-shot client loads what it needs next there: that time is otherwise idle)."""
    hs = Handshake("XK", True, local_sk, remote_pk, ephemeral_sk=ephemeral_sk, pq=pq, require_pq=require_pq)
    return _run(sock, hs, timeout, f"server key pinned to {hs.remote_pk.hex()}", while_waiting)


def server_handshake(sock, local_sk: SecKey, timeout: Optional[float] = limits.HANDSHAKE_TIMEOUT,
                     pq: bool = True, require_pq: bool = False, *,
                     ephemeral_sk: Optional[SecKey] = None) -> SecureConn:
    """XK responder over a stream; the client's key is `.remote_pk`. Closes `sock` on failure."""
    hs = Handshake("XK", False, local_sk, None, ephemeral_sk=ephemeral_sk, pq=pq, require_pq=require_pq)
    try:
        peer = sock.getpeername()
        context = f"from {peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "responder"
    except (OSError, AttributeError):
        context = "responder"
    return _run(sock, hs, timeout, context)
