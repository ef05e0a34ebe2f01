"""dmsg byte-for-byte against the Go vectors: discovery entries, yamux, session frames, KK, SignedObjects."""
from __future__ import annotations

import hashlib
import json
import socket

import pytest

from conftest import sign_hash_fixed_nonce
from skypty import keys, noise
from skypty.keys import PubKey, SecKey
from skypty.transport.dmsg import disc

DISC = "discovery.json"
STREAM = "dmsg_stream.json"


def _fixed_sign(sk: SecKey, payload: bytes, k_hex: str) -> bytes:
    return sign_hash_fixed_nonce(sk, hashlib.sha256(payload).digest(), bytes.fromhex(k_hex))


# ---------------------------------------------------------------- discovery entries

def _entry_from_fields(f):
    e = dict(f)
    e["signature"] = ""
    return e


@pytest.mark.parametrize("idx", range(5))
def test_entry_signed_bytes_and_posted_json(vectors, idx):
    v = vectors(DISC)["entries"][idx]
    e = _entry_from_fields(v["fields"])
    signed = disc.canonical_json(e, with_sig=False)
    assert signed.decode() == v["signed_bytes_text"]
    assert signed.hex() == v["signed_bytes_hex"]
    assert hashlib.sha256(signed).hexdigest() == v["signed_hash_sha256"]
    sig = _fixed_sign(_sk_for(vectors, e["static"]), signed, v["fixed_nonce_k"])
    assert sig.hex() == v["signature"]
    e["signature"] = sig.hex()
    assert disc.canonical_json(e).decode() == v["posted_json_text"]
    # parse → re-encode is the identity on Go's output, and both signatures verify
    parsed = disc.parse_entry(json.loads(v["posted_json_text"]))
    assert disc.canonical_json(parsed).decode() == v["posted_json_text"]
    disc.verify_entry(parsed)
    parsed["signature"] = v["example_signature_from_real_Entry.Sign (random nonce, also verifies)"]
    disc.verify_entry(parsed)


def _sk_for(vectors, pk_hex):
    for c in vectors("keys.json")["cases"]:
        if c["pk"] == pk_hex:
            return SecKey.from_hex(c["sk"])
    raise KeyError(pk_hex)


def test_entry_sign_roundtrip_and_tamper(vectors):
    v = vectors(DISC)["entries"][0]
    e = _entry_from_fields(v["fields"])
    sk = _sk_for(vectors, e["static"])
    disc.sign_entry(e, sk)
    disc.verify_entry(e)
    e["sequence"] += 1
    with pytest.raises(keys.SignatureError):
        disc.verify_entry(e)


def test_unknown_keys_dropped_and_empty_client(vectors):
    v = vectors(DISC)["entries"][0]
    obj = json.loads(v["posted_json_text"])
    obj["protocol"] = "smux"
    assert disc.canonical_json(disc.parse_entry(obj)).decode() == v["posted_json_text"]
    obj["client"] = {}
    assert b'"client":{"delegated_servers":null}' in disc.canonical_json(disc.parse_entry(obj))


def test_go_json_escaping():
    e = {"version": "0.0.1", "sequence": 0, "timestamp": 1, "static": "0" * 66, "client": None,
         "server": {"address": "<&>é\u2028\x01\t\"\\/", "availableSessions": 1}}
    assert disc.canonical_json(e) == (
        '{"version":"0.0.1","sequence":0,"timestamp":1,"static":"' + "0" * 66 +
        '","server":{"address":"<&>é\u2028\\u0001\\t\\"\\\\/","availableSessions":1}}').encode()


def test_exchange_request_bodies(vectors):
    """The POST bodies our client sends are the Go client's bytes."""
    for ex in vectors(DISC)["http_api"]["exchanges"]:
        if ex["method"] != "POST":
            continue
        body = ex["request_wire_text"].split("\r\n\r\n", 1)[1]
        assert disc.canonical_json(disc.parse_entry(json.loads(body))).decode() == body


# ---------------------------------------------------------------- session + stream crypto

def _k(vectors, name):
    d = vectors(STREAM)["keys"]
    for e in d["ephemerals"]:
        if e["name"] == name:
            return SecKey.from_hex(e["sk"])
    return SecKey.from_hex(d[name]["sk"])


def test_session_xk_and_object_frames(vectors):
    v = vectors(STREAM)
    a = noise.Handshake("XK", True, _k(vectors, "client_a"), PubKey.from_hex(v["keys"]["server_s"]["pk"]),
                        ephemeral_sk=_k(vectors, "client_a_session_ephemeral"), pq=False)
    s = noise.Handshake("XK", False, _k(vectors, "server_s"),
                        ephemeral_sk=_k(vectors, "server_session_ephemeral"), pq=False)
    sh = v["session_handshake"]
    m1 = a.write_message()
    assert (len(m1).to_bytes(2, "big") + m1).hex() == sh["a_to_s_frames_hex"][0]
    s.read_message(m1)
    m2 = s.write_message()
    assert (len(m2).to_bytes(2, "big") + m2).hex() == sh["s_to_a_frame_hex"]
    a.read_message(m2)
    m3 = a.write_message()
    assert (len(m3).to_bytes(2, "big") + m3).hex() == sh["a_to_s_frames_hex"][1]
    s.read_message(m3)
    assert a.handshake_hash.hex() == sh["handshake_hash"]
    from skypty.transport.dmsg import session as dsession
    a_send, a_recv = a.split()
    s_send, s_recv = s.split()
    a_obj = dsession.ObjectCipher(a_send, a_recv)
    s_obj = dsession.ObjectCipher(s_send, s_recv)
    req = v["stream_request"]
    frame = a_obj.seal_frame(bytes.fromhex(req["signed_object_hex"]))
    assert frame.hex() == req["session_frame"]["frame_hex"]
    assert s_obj.open_body(frame[2:]) == bytes.fromhex(req["signed_object_hex"])
    resp = v["stream_response"]
    frame = s_obj.seal_frame(bytes.fromhex(resp["signed_object_hex"]))
    assert frame.hex() == resp["session_frame (S->A)"]["frame_hex"]
    assert a_obj.open_body(frame[2:]) == bytes.fromhex(resp["signed_object_hex"])
    ip = v["ip_lookup"]
    frame = a_obj.seal_frame(bytes.fromhex(ip["request_signed_object_hex"]))
    assert frame.hex() == ip["request_session_frame"]["frame_hex"]
    frame = s_obj.seal_frame(bytes.fromhex(ip["response_signed_object_hex"]))
    assert frame.hex() == ip["response_session_frame"]["frame_hex"]
    # nonce-map semantics: order is free (Go never fills the map); a replay is still refused here
    body1 = a_obj.seal_frame(b"x" * 70)[2:]
    body2 = a_obj.seal_frame(b"y" * 70)[2:]
    assert s_obj.open_body(body2) == b"y" * 70
    assert s_obj.open_body(body1) == b"x" * 70
    with pytest.raises(Exception):
        s_obj.open_body(body1)


def test_session_objects_any_u16_length_over_a_socket(pair):
    """Objects larger than one transport record travel as one frame (Go frames any u16 length);
    a clean end is EOFError, a frame cut short a ProtocolError."""
    from skypty.errors import ProtocolError
    from skypty.keys import generate_keypair
    from skypty.transport.dmsg import session as dsession
    a_sk, s_sk = generate_keypair()[1], generate_keypair()[1]
    a = noise.Handshake("XK", True, a_sk, s_sk.pubkey(), pq=False)
    s = noise.Handshake("XK", False, s_sk, pq=False)
    s.read_message(a.write_message())
    a.read_message(s.write_message())
    s.read_message(a.write_message())
    a_obj, s_obj = dsession.ObjectCipher(*a.split()), dsession.ObjectCipher(*s.split())
    x, y = pair
    big = bytes(range(256)) * 200                      # 51200 bytes > 4070
    dsession.write_object(x, a_obj, big)
    assert dsession.read_object(y, s_obj) == big
    frame = a_obj.seal_frame(b"cut")
    x.sendall(frame[:-1])
    x.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError):
        dsession.read_object(y, s_obj)
    with pytest.raises(EOFError):
        dsession.read_object(y, s_obj)


# The KK stream handshake and its first data frames (dmsg_stream.json) are checked byte for
# byte in test_noise.py::test_kk_stream_transcript.


# ---------------------------------------------------------------- SignedObjects

def test_stream_request_signed_object(vectors):
    from skypty.transport.dmsg import stream as dstream
    v = vectors(STREAM)
    r = v["stream_request"]
    f = r["fields"]
    src = dstream.Addr(PubKey.from_hex(f["SrcAddr"]["PK"]), f["SrcAddr"]["Port"])
    dst = dstream.Addr(PubKey.from_hex(f["DstAddr"]["PK"]), f["DstAddr"]["Port"])
    obj = dstream.make_request(_k(vectors, "client_a"), src, dst, bytes.fromhex(f["NoiseMsg_hex"]),
                               timestamp=f["Timestamp"])
    assert obj[65:].hex() == r["gob_hex"]
    sig = _fixed_sign(_k(vectors, "client_a"), obj[65:], r["fixed_nonce_k"])
    assert sig.hex() == r["signature"]
    signed = sig + obj[65:]
    assert signed.hex() == r["signed_object_hex"]
    assert dstream.req_hash(signed).hex() == r["signed_object_sha256 (= StreamResponse.ReqHash)"]
    # server-side and listener-side checks accept it; a wrong session or a flipped byte does not
    fields, s, d = dstream.check_request(signed, session_pk=src.pk, local_pk=dst.pk)
    assert (s, d) == (src, dst) and fields["Timestamp"] == f["Timestamp"]
    with pytest.raises(dstream.DmsgError) as ei:
        dstream.check_request(signed, session_pk=dst.pk)
    assert ei.value.code == 302
    bad = bytearray(signed)
    bad[-3] ^= 1
    with pytest.raises(dstream.DmsgError) as ei:
        dstream.check_request(bytes(bad))
    assert ei.value.code == 300
    with pytest.raises(dstream.DmsgError) as ei:
        dstream.check_request(signed[:65])
    assert ei.value.code == 370


def test_stream_response_signed_object(vectors):
    from skypty.transport.dmsg import stream as dstream
    v = vectors(STREAM)
    r = v["stream_response"]
    f = r["fields"]
    b_sk = _k(vectors, "client_b")
    obj = dstream.make_response(b_sk, bytes.fromhex(f["ReqHash"]), True, bytes.fromhex(f["NoiseMsg_hex"]))
    assert obj[65:].hex() == r["gob_hex"]
    assert _fixed_sign(b_sk, obj[65:], r["fixed_nonce_k"]).hex() == r["signature"]
    req = bytes.fromhex(v["stream_request"]["signed_object_hex"])
    got = dstream.check_response(bytes.fromhex(r["signed_object_hex"]), req, b_sk.pubkey())
    assert got["NoiseMsg"].hex() == f["NoiseMsg_hex"] and got["Accepted"]
    with pytest.raises(dstream.DmsgError) as ei:
        dstream.check_response(bytes.fromhex(r["signed_object_hex"]), req + b"x", b_sk.pubkey())
    assert ei.value.code == 351
    with pytest.raises(dstream.DmsgError) as ei:
        dstream.check_response(bytes.fromhex(r["signed_object_hex"]), req, _k(vectors, "client_a").pubkey())
    assert ei.value.code == 350


def test_ip_lookup_objects(vectors):
    from skypty.transport.dmsg import stream as dstream
    v = vectors(STREAM)
    ip = v["ip_lookup"]
    f = ip["request_fields"]
    a_sk, s_sk = _k(vectors, "client_a"), _k(vectors, "server_s")
    obj = dstream.make_request(a_sk, dstream.Addr(PubKey.from_hex(f["SrcAddr"]["PK"]), f["SrcAddr"]["Port"]),
                               dstream.Addr(PubKey.from_hex(f["DstAddr"]["PK"]), f["DstAddr"]["Port"]),
                               ip_info=True, timestamp=f["Timestamp"])
    assert obj[65:].hex() == ip["request_gob_hex"]
    assert _fixed_sign(a_sk, obj[65:], ip["request_fixed_nonce_k"]).hex() == ip["request_signature"]
    import ipaddress
    packed = ipaddress.IPv6Address("::ffff:" + ip["response_fields"]["IP"]).packed
    resp = dstream.make_response(s_sk, bytes.fromhex(ip["response_fields"]["ReqHash"]), True, ip=packed)
    assert resp[65:].hex() == ip["response_gob_hex"]
    got = dstream.check_response(bytes.fromhex(ip["response_signed_object_hex"]),
                                 bytes.fromhex(ip["request_signed_object_hex"]), s_sk.pubkey())
    assert got["IP"] == packed


def test_reject_with_errcode():
    from skypty.keys import generate_keypair
    from skypty.transport.dmsg import stream as dstream
    pk, sk = generate_keypair()
    req = b"\x01" * 100
    resp = dstream.make_response(sk, dstream.req_hash(req), False, err_code=306)
    assert resp.endswith(bytes.fromhex("03fe013200"))
    with pytest.raises(dstream.DmsgError) as ei:
        dstream.check_response(resp, req, pk)
    assert ei.value.code == 306


def test_yamux_capture_payloads(vectors):
    """Every Data payload in the recorded A<->S capture is one of the objects/records above."""
    v = vectors(STREAM)
    yx = v["yamux"]
    stream_a = bytes.fromhex(yx["a_to_s_bytes_hex"])
    from skypty.transport.dmsg.yamux import decode_header
    pos, frames = 0, []
    while pos < len(stream_a):
        ver, t, fl, sid, ln = decode_header(stream_a[pos:pos + 12])
        pos += 12
        payload = b""
        if t == 0:
            payload = stream_a[pos:pos + ln]
            pos += ln
        frames.append((t, fl, sid, payload))
    assert [(t, fl, sid) for t, fl, sid, _ in frames] == [
        (1, 1, 1), (0, 0, 1), (0, 0, 1), (1, 4, 1), (1, 1, 3), (0, 0, 3), (1, 4, 3)]
    assert frames[1][3].hex() == v["stream_request"]["session_frame"]["frame_hex"]
    assert frames[2][3].hex() == v["stream_data"]["a_to_b"]["frame"]["frame_hex"]
