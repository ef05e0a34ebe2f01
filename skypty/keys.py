"""secp256k1 identities: public/secret keys, the Noise DH, recoverable signatures.

Every operation that touches a secret scalar (public-key derivation, ECDH, signing) and
public-key recovery runs in libsecp256k1 through `coincurve`, which is constant time; no
curve arithmetic is done in Python.

Wire facts (crypto-dmsg.md §1-§3): a PubKey is the 33-byte compressed point; a SecKey is a
32-byte big-endian scalar in [1, n); a signature is r(32) ‖ s(32) ‖ recid(1) over
SHA256(payload), with s always low; Go verifies by recovering the key and comparing bytes.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Tuple, Union

import coincurve

from .errors import KeyFormatError, ProtocolError

__all__ = [
    "PubKey", "SecKey", "SignatureError", "generate_keypair", "ecdh", "noise_dh",
    "sign", "sign_hash", "verify", "recover", "is_hex", "PUBKEY_LEN", "SECKEY_LEN", "SIG_LEN",
]

PUBKEY_LEN = 33
SECKEY_LEN = 32
SIG_LEN = 65

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_NULL_PK = bytes(PUBKEY_LEN)


class SignatureError(ProtocolError):
    """A signature that is malformed or was not made by the expected key."""


def is_hex(s: str) -> bool:
    """Only hex digits: bytes.fromhex alone also takes spaces, which Go does not. (A set, not
    a regex: compiling one is ~0.3 ms of every client's cold start.)"""
    return _HEX_DIGITS.issuperset(s)


def _unhex(s: str, what: str, want: int) -> bytes:
    # Never echo the text: a secret key pasted where a public key belongs (or with a stray
    # "0x" or newline) would end up in logs and terminals.
    if not isinstance(s, str):
        raise KeyFormatError(f"invalid {what}: expected a hex string, got {type(s).__name__}")
    if not is_hex(s):
        raise KeyFormatError(f"invalid {what}: not a hex string")
    if len(s) != want * 2:
        raise KeyFormatError(f"invalid {what}: {len(s)} hex characters, want {want * 2}")
    return bytes.fromhex(s)


def _raw(b: object, what: str, want: int) -> bytes:
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise KeyFormatError(f"invalid {what}: expected bytes, got {type(b).__name__}")
    b = bytes(b)
    if len(b) != want:
        raise KeyFormatError(f"invalid {what}: length {len(b)}, want {want} bytes ({want * 2} hex characters)")
    return b


class PubKey:
    """A secp256k1 public key in its 33-byte compressed form (or the all-zero null key)."""

    __slots__ = ("_b",)

    def __init__(self, b: bytes) -> None:
        # The null key (Go's zero value, "absent") is representable: Go peers send it (gob,
        # discovery entries), so it must round-trip. It is rejected by every operation that
        # needs a real point (ecdh, verify, handshakes).
        b = _raw(b._b if isinstance(b, PubKey) else b, "public key", PUBKEY_LEN)
        if b != _NULL_PK:
            if b[0] not in (2, 3):
                raise KeyFormatError("invalid public key: not a compressed point (prefix must be 02 or 03)")
            try:
                coincurve.PublicKey(b)
            except Exception:
                raise KeyFormatError("invalid public key: not a point on secp256k1") from None
        object.__setattr__(self, "_b", b)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PubKey is immutable")

    def __reduce__(self):
        return (PubKey, (self._b,))

    @classmethod
    def from_hex(cls, s: str) -> "PubKey":
        """Parse 66 hex characters (any case). A string of only '0' (or "") is the null key."""
        if isinstance(s, str) and s.strip("0") == "":
            return cls.null()
        return cls(_unhex(s, "public key", PUBKEY_LEN))

    @classmethod
    def null(cls) -> "PubKey":
        return cls(_NULL_PK)

    def is_null(self) -> bool:
        return self._b == _NULL_PK

    def hex(self) -> str:
        return self._b.hex()

    def __bytes__(self) -> bytes:
        return self._b

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PubKey):
            return self._b == other._b
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    def __lt__(self, other: object) -> bool:
        if isinstance(other, PubKey):
            return self._b < other._b
        return NotImplemented

    def __hash__(self) -> int:
        return hash((PubKey, self._b))

    def __str__(self) -> str:
        return self._b.hex()

    def __repr__(self) -> str:
        return f"PubKey('{self._b.hex()}')"


class SecKey:
    """A secp256k1 secret key: a 32-byte big-endian scalar k with 1 <= k < n."""

    __slots__ = ("_b", "_cc", "_pk")

    def __init__(self, b: bytes) -> None:
        b = _raw(b._b if isinstance(b, SecKey) else b, "secret key", SECKEY_LEN)
        try:
            cc = coincurve.PrivateKey(b)   # rejects 0 and >= n
        except Exception:
            raise KeyFormatError("invalid secret key: out of range (must be 1..n-1)") from None
        self._b = b
        self._cc = cc
        self._pk = None

    @classmethod
    def from_hex(cls, s: str) -> "SecKey":
        return cls(_unhex(s, "secret key", SECKEY_LEN))

    @classmethod
    def _of(cls, cc: "coincurve.PrivateKey") -> "SecKey":
        """Wrap a coincurve key that checked its own scalar: building a second one from the
        same bytes derives the public key twice more (~80 us of every handshake's keygen)."""
        self = cls.__new__(cls)
        self._b = cc.secret
        self._cc = cc
        self._pk = None
        return self

    def hex(self) -> str:
        return self._b.hex()

    def pubkey(self) -> PubKey:
        if self._pk is None:
            self._pk = PubKey(self._cc.public_key.format(compressed=True))
        return self._pk

    def __bytes__(self) -> bytes:
        return self._b

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecKey):
            return hmac.compare_digest(self._b, other._b)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    __hash__ = None  # type: ignore[assignment]  # secrets are not dict keys

    def __repr__(self) -> str:
        return f"SecKey(<secret for {self.pubkey().hex()}>)"

    __str__ = __repr__


def generate_keypair() -> Tuple[PubKey, SecKey]:
    """A fresh random key pair (OS RNG, retried by coincurve until the scalar is valid)."""
    sk = SecKey._of(coincurve.PrivateKey())
    return sk.pubkey(), sk


def _as_pk(pk: Union[PubKey, bytes]) -> PubKey:
    return pk if isinstance(pk, PubKey) else PubKey(pk)


def ecdh(sk: SecKey, pk: Union[PubKey, bytes]) -> bytes:
    """SHA256(compressed(sk·PK)), 32 bytes (skycoin cipher.ECDH).

    libsecp256k1's default ECDH hash is exactly SHA256(0x02|parity(y) ‖ x), i.e. SHA256 of
    the compressed shared point, so no point ever leaves the library.
    """
    pk = _as_pk(pk)
    if pk.is_null():
        raise KeyFormatError("the null public key cannot be used here")
    return sk._cc.ecdh(bytes(pk))


def noise_dh(sk: SecKey, pk: Union[PubKey, bytes]) -> bytes:
    """The Noise DH of dmsg's `Secp256k1` suite: ecdh(sk, pk) ‖ 0x00 (DHLEN 33)."""
    return ecdh(sk, pk) + b"\x00"


def sign_hash(sk: SecKey, digest: bytes) -> bytes:
    """Sign a 32-byte digest: r ‖ s ‖ recid, low-S, recid matching the final (r, s)."""
    digest = bytes(digest)
    if len(digest) != 32:
        raise ValueError("sign_hash: digest must be 32 bytes")
    if digest == bytes(32):
        raise ValueError("sign_hash: refusing to sign the all-zero hash")
    # libsecp256k1 always emits low-S and adjusts the recovery id accordingly; its nonce is
    # RFC 6979 (deterministic), which Go's verifier accepts like any other nonce.
    return sk._cc.sign_recoverable(digest, hasher=None)


def sign(sk: SecKey, payload: bytes) -> bytes:
    """SignPayload: sign SHA256(payload)."""
    return sign_hash(sk, hashlib.sha256(payload).digest())


def recover(digest: bytes, sig: bytes) -> PubKey:
    """Recover the signer's public key from a 65-byte r ‖ s ‖ recid signature."""
    digest = bytes(digest)
    sig = bytes(sig)
    if len(digest) != 32:
        raise SignatureError("invalid hash length")
    if len(sig) != SIG_LEN:
        raise SignatureError("Invalid signature length")
    if sig[64] >= 4:
        raise SignatureError("Failed to recover pubkey from signature")
    try:
        pt = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
    except Exception:
        raise SignatureError("Failed to recover pubkey from signature") from None
    return PubKey(pt.format(compressed=True))


def verify(pk: Union[PubKey, bytes], payload: bytes, sig: bytes) -> None:
    """Go's VerifyPubKeySignedPayload: raise SignatureError unless `sig` is pk's over SHA256(payload).

    Checks, as Go does: length 65, top bit of s clear (Go's malleability check), recid < 4,
    then recover the key from (r, s, recid, hash) and compare it byte-for-byte. A correct
    (r, s) with the wrong recid is therefore rejected.
    """
    pk = _as_pk(pk)
    sig = bytes(sig)
    if len(sig) != SIG_LEN:
        raise SignatureError("Invalid signature length")
    if sig[32] >> 7 or sig[64] >= 4:
        raise SignatureError("VerifySignatureRecoverPubKey, VerifySignatureValidity failed")
    if pk.is_null():
        raise SignatureError("Invalid public key")
    got = recover(hashlib.sha256(payload).digest(), sig)
    if not hmac.compare_digest(bytes(got), bytes(pk)):
        raise SignatureError("Recovered pubkey does not match pubkey")
