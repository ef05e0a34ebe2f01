"""dmsg stream objects (crypto-dmsg.md §5.3-§5.5, §5.8) and the end-to-end stream.

A SignedObject is `sig(65) ‖ gob`, the gob part coming from a fresh encoder (so it always
carries its type definitions); the signature is SignPayload over the gob bytes, and it is
always verified over the bytes *received*, never over a re-encoding. ReqHash is SHA256 of the
whole request SignedObject. After the request/response exchange the stream carries Noise KK
transport records between the two clients (`DmsgStream`, a noise.SecureConn).
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Dict, NamedTuple, Optional, Tuple

from skypty import gob, keys, noise
from skypty.errors import ProtocolError, SkyptyError
from skypty.keys import PubKey, SecKey

__all__ = [
    "Addr", "DmsgError", "ERR_MESSAGES", "make_request", "make_response", "decode_request",
    "decode_response", "check_request", "check_response", "req_hash", "DmsgStream",
]

# errors.go: code → Go's text, plus what the user can do about it
ERR_MESSAGES = {
    100: "discovery has no entry for that public key (is the remote host online and using the same discovery?)",
    101: "discovery entry is not a dmsg server entry",
    102: "discovery entry is not a dmsg client entry",
    103: "the remote host has no delegated dmsg servers (it is not connected to dmsg)",
    200: "dmsg client closed",
    201: "dmsg session closed",
    202: "cannot connect to any of the remote host's dmsg servers",
    203: "extra bytes received during session handshake",
    300: "stream request has an invalid signature",
    301: "stream request has an invalid timestamp",
    302: "stream request has an invalid source public key",
    303: "stream request has an invalid destination public key",
    304: "stream request has an invalid source port",
    305: "stream request has an invalid destination port",
    306: "no listener on that dmsg port (is the remote host serving it?)",
    307: "the dmsg server has no session with the remote host (it may be offline)",
    350: "stream response has an invalid signature",
    351: "stream response answers another request",
    352: "stream rejected by the remote side",
    370: "invalid signed object",
    400: "dmsg port already in use",
    401: "listener accept queue full",
}


class DmsgError(SkyptyError):
    """A dmsg failure with Go's error code (crypto-dmsg.md §5.8)."""

    def __init__(self, code: int, detail: str = "") -> None:
        msg = f"dmsg error {code}: {ERR_MESSAGES.get(code, 'unknown error')}"
        super().__init__(msg + (f" ({detail})" if detail else ""))
        self.code = code


class Addr(NamedTuple):
    pk: PubKey
    port: int

    def __str__(self) -> str:
        return f"{self.pk.hex()}:{self.port if self.port else '~'}"

    def to_gob(self) -> Dict[str, Any]:
        return {"PK": bytes(self.pk), "Port": self.port}

    @classmethod
    def from_gob(cls, d: Dict[str, Any]) -> "Addr":
        b = d.get("PK") or b""
        if isinstance(b, list):
            b = bytes(b)
        if not b:
            b = bytes(33)
        try:
            pk = PubKey(bytes(b))
        except SkyptyError:
            raise DmsgError(370, "bad public key in address") from None
        return cls(pk, int(d.get("Port") or 0))


def _types():
    from skypty import gobtypes   # the wire module; imported late to keep this one light
    return gobtypes.StreamRequest, gobtypes.StreamResponse


def _sign_obj(sk: SecKey, gob_bytes: bytes) -> bytes:
    return keys.sign(sk, gob_bytes) + gob_bytes


def make_request(sk: SecKey, src: Addr, dst: Addr, noise_msg: bytes = b"", ip_info: bool = False,
                 timestamp: Optional[int] = None) -> bytes:
    req_t, _ = _types()
    value = {"Timestamp": time.time_ns() if timestamp is None else timestamp, "SrcAddr": src.to_gob(),
             "DstAddr": dst.to_gob(), "IPinfo": bool(ip_info), "NoiseMsg": bytes(noise_msg)}
    return _sign_obj(sk, gob.dumps(req_t, value, first_id=gob.FIRST_USER_ID))


def make_response(sk: SecKey, request_hash: bytes, accepted: bool = True, noise_msg: bytes = b"",
                  ip: bytes = b"", err_code: int = 0) -> bytes:
    _, resp_t = _types()
    value = {"ReqHash": bytes(request_hash), "Accepted": bool(accepted), "IP": bytes(ip),
             "ErrCode": err_code, "NoiseMsg": bytes(noise_msg)}
    return _sign_obj(sk, gob.dumps(resp_t, value, first_id=gob.FIRST_USER_ID))


def req_hash(signed_obj: bytes) -> bytes:
    return hashlib.sha256(signed_obj).digest()


def _split(obj: bytes) -> Tuple[bytes, bytes]:
    if len(obj) <= keys.SIG_LEN:
        raise DmsgError(370, "too short")
    return obj[:keys.SIG_LEN], obj[keys.SIG_LEN:]


def _decode(obj: bytes, t) -> Dict[str, Any]:
    """The gob value of a SignedObject; signature NOT checked yet."""
    _, g = _split(obj)
    try:
        return gob.loads(t, g)
    except (ProtocolError, ValueError) as e:
        raise DmsgError(370, f"bad gob: {e}") from None


def decode_request(obj: bytes) -> Tuple[Dict[str, Any], Addr, Addr]:
    """(fields, src, dst) of a request SignedObject; signature NOT checked yet."""
    v = _decode(obj, _types()[0])
    return v, Addr.from_gob(v["SrcAddr"]), Addr.from_gob(v["DstAddr"])


def decode_response(obj: bytes) -> Dict[str, Any]:
    v = _decode(obj, _types()[1])
    rh = v.get("ReqHash")
    v["ReqHash"] = bytes(rh) if rh is not None else bytes(32)
    v["IP"] = bytes(v.get("IP") or b"")
    v["NoiseMsg"] = bytes(v.get("NoiseMsg") or b"")
    return v


def check_request(obj: bytes, session_pk: Optional[PubKey] = None,
                  local_pk: Optional[PubKey] = None) -> Tuple[Dict[str, Any], Addr, Addr]:
    """Decode and verify a request as the server (session_pk) or the listener (local_pk) does."""
    v, src, dst = decode_request(obj)
    if src.pk.is_null():
        raise DmsgError(302)
    if dst.pk.is_null():
        raise DmsgError(303)
    if src.port == 0:
        raise DmsgError(304)
    if dst.port == 0:
        raise DmsgError(305)
    if int(v.get("Timestamp") or 0) <= 0:
        raise DmsgError(301)
    sig, g = _split(obj)
    try:
        keys.verify(src.pk, g, sig)
    except SkyptyError:
        raise DmsgError(300) from None
    if session_pk is not None and src.pk != session_pk:
        raise DmsgError(302, "source is not the session's client")
    if local_pk is not None and dst.pk != local_pk:
        raise DmsgError(303, "request is not for us")
    return v, src, dst


def check_response(obj: bytes, request_obj: bytes, signer: PubKey) -> Dict[str, Any]:
    v = decode_response(obj)
    sig, g = _split(obj)
    try:
        keys.verify(signer, g, sig)
    except SkyptyError:
        raise DmsgError(350) from None
    if not _eq(v["ReqHash"], req_hash(request_obj)):
        raise DmsgError(351)
    if not v.get("Accepted"):
        code = int(v.get("ErrCode") or 0)
        raise DmsgError(code if code in ERR_MESSAGES else 352)
    return v


def _eq(a: bytes, b: bytes) -> bool:
    import hmac
    return hmac.compare_digest(bytes(a), bytes(b))


class DmsgStream(noise.SecureConn):
    """An established dmsg stream: KK records over a yamux stream, with dmsg addresses."""

    def __init__(self, ystream, send: noise.SendCipher, recv: noise.RecvCipher,
                 local: Addr, remote: Addr, on_close=None) -> None:
        super().__init__(ystream, send, recv, remote.pk, local.pk)
        self.local_addr = local
        self.remote_addr = remote
        self._on_close = on_close

    def close(self) -> None:
        try:
            super().close()
        finally:
            cb, self._on_close = self._on_close, None
            if cb is not None:
                cb()

    def __repr__(self) -> str:
        return f"<DmsgStream {self.local_addr} -> {self.remote_addr}>"
