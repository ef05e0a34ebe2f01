"""gob against the Go vectors (gob_rpc.json, dmsg_stream.json), plus garbage and round trips.

Byte-for-byte: the vectors come from fresh Go processes, whose first user type id is 64 and
whose ids follow Go's allocation order; our Encoder(first_id=64) allocates in the same order,
so it must reproduce every stream exactly. With other ids (our default 65) the bytes differ
only in ids; those are checked by decoding back.
"""
from __future__ import annotations

import io
import tracemalloc
import random

import pytest

from conftest import load_vector
from skypty import gob, limits
from skypty import gobtypes as T
from skypty.errors import ProtocolError

GOB = load_vector("gob_rpc.json")
DMSG = load_vector("dmsg_stream.json")

SCENARIOS = [s for s in GOB["scenarios"] if s["calls"]] + GOB["skywire_exec"]["scenarios"]
SKYWIRE = {s["scenario"] for s in GOB["skywire_exec"]["scenarios"]}


def method_types(scenario: str, method: str):
    """(arg type, reply type) of a pty/whitelist method as the scenario's Go code declared it."""
    start = T.CommandReq if scenario in SKYWIRE else T.CommandReqLegacy
    return {
        "pty.Start": (start, T.EMPTY),
        "pty.SetPtySize": (T.WinSize, T.EMPTY),
        "pty.Write": (T.WRITE_ARG, T.WRITE_REPLY),
        "pty.Read": (T.READ_ARG, T.READ_REPLY),
        "pty.Stop": (T.EMPTY, T.EMPTY),
        "pty.Exec": (T.CommandExecReq, T.CommandExecResult),
        "whitelist.Whitelist": (T.EMPTY, T.PubKeyList),
        "whitelist.WhitelistAdd": (T.PubKeyList, T.EMPTY),
        "whitelist.WhitelistRemove": (T.PubKeyList, T.EMPTY),
    }[method]


def _hexval(v):
    if isinstance(v, dict) and "hex" in v:
        return bytes.fromhex(v["hex"]) if v["hex"] is not None else b""
    return v


def py_value(doc, t):
    """The documented JSON value converted to what our decoder returns for type t."""
    if doc == "struct{}{}" or t == T.EMPTY:
        return {}
    if isinstance(doc, dict) and "value" in doc and t.kind != "struct" or (
            isinstance(doc, dict) and set(doc) == {"type", "value"}):
        doc = doc["value"]
    if t == T.PubKeyList:
        return [bytes.fromhex(h) for h in doc]
    if isinstance(t, gob.Struct):
        out = gob.zero_value(t)
        for name, ft in t.fields:
            if name not in doc:
                continue
            v = _hexval(doc[name])
            if v is None:
                v = gob.zero_value(ft)
            elif isinstance(ft, gob.Ptr):
                v = py_value(v, ft.elem)
            out[name] = v
        return out
    return _hexval(doc)


def stream_after_preamble(sc, direction):
    data = bytes.fromhex(sc[direction + "_stream_hex"])
    pre = bytes.fromhex(sc["preamble"][direction + "_hex"])
    assert data.startswith(pre)
    return data[len(pre):]


# ------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s["scenario"])
def test_decode_go_streams(sc):
    """Every call and reply in Go's byte streams decodes to the documented values."""
    c2s = gob.Decoder(io.BytesIO(stream_after_preamble(sc, "c2s")).read)
    s2c = gob.Decoder(io.BytesIO(stream_after_preamble(sc, "s2c")).read)
    for call in sc["calls"]:
        at, rt = method_types(sc["scenario"], call["method"])
        req = c2s.decode(T.RPC_REQUEST)
        assert req == {"ServiceMethod": call["method"], "Seq": call["seq"]}
        assert c2s.decode(at) == py_value(call["args"], at)
        resp = s2c.decode(T.RPC_RESPONSE)
        assert resp == {"ServiceMethod": call["method"], "Seq": call["seq"], "Error": call["error"] or ""}
        if call["error"]:
            assert s2c.decode(T.EMPTY) == {}       # error replies carry struct{}
        else:
            assert s2c.decode(rt) == py_value(call["reply"], rt)
    for d in (c2s, s2c):
        with pytest.raises(EOFError):
            d.decode(None)


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s["scenario"])
def test_encode_reproduces_go_streams(sc):
    """With Go's first id (64) our encoder emits Go's bytes exactly, call by call."""
    c2s, s2c = gob.Encoder(None, 64), gob.Encoder(None, 64)
    all_c2s, all_s2c = [bytes.fromhex(sc["preamble"]["c2s_hex"])], [bytes.fromhex(sc["preamble"]["s2c_hex"])]
    for call in sc["calls"]:
        at, rt = method_types(sc["scenario"], call["method"])
        got = c2s.encode_many([(T.RPC_REQUEST, {"ServiceMethod": call["method"], "Seq": call["seq"]}),
                               (at, py_value(call["args"], at))])
        assert got.hex() == call["c2s_hex"]
        hdr = {"ServiceMethod": call["method"], "Seq": call["seq"], "Error": call["error"] or ""}
        body = (T.EMPTY, {}) if call["error"] else (rt, py_value(call["reply"], rt))
        got = s2c.encode_many([(T.RPC_RESPONSE, hdr), body])
        assert got.hex() == call["s2c_hex"]
        all_c2s.append(bytes.fromhex(call["c2s_hex"]))
        all_s2c.append(bytes.fromhex(call["s2c_hex"]))
    assert b"".join(all_c2s).hex() == sc["c2s_stream_hex"]
    assert b"".join(all_s2c).hex() == sc["s2c_stream_hex"]


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s["scenario"])
def test_default_ids_round_trip(sc):
    """Our default ids (65…) differ from Go's bytes only in ids: decoding gives the same values."""
    enc = gob.Encoder(None)
    items = []
    for call in sc["calls"]:
        at, _ = method_types(sc["scenario"], call["method"])
        items.append((T.RPC_REQUEST, {"ServiceMethod": call["method"], "Seq": call["seq"]}))
        items.append((at, py_value(call["args"], at)))
    data = b"".join(enc.encode_bytes(t, v) for t, v in items)
    dec = gob.Decoder(io.BytesIO(data).read)
    for t, v in items:
        assert dec.decode(t) == v


def test_message_split_matches_vector_annotations():
    """Our framing agrees with the vector's per-message split (length, type id)."""
    call = GOB["scenarios"][0]["calls"][0]
    data = bytes.fromhex(call["c2s_hex"])
    pos = 0
    for m in call["c2s_gob_messages"]:
        n, p = gob._rd_uint(data, pos)
        assert n == m["length"]
        tid, _ = gob._rd_int(data, p)
        assert tid == m["type_id"]
        assert data[pos:p + n].hex() == m["hex"]
        pos = p + n
    assert pos == len(data)


def test_old_plain_bytes_commandreq_decodes_into_newer_and_back():
    """Fields match by name: dmsg's CommandReq (no Env) → skywire's (Env = []) and vice versa."""
    legacy = {"Name": "/bin/bash", "Arg": ["-l"], "Size": {"X": 0, "Y": 0, "Rows": 5, "Cols": 7}}
    data = gob.dumps(T.CommandReqLegacy, legacy)
    assert gob.loads(T.CommandReq, data) == dict(legacy, Env=[])
    newer = dict(legacy, Env=["A=1"])
    assert gob.loads(T.CommandReqLegacy, gob.dumps(T.CommandReq, newer)) == legacy


def test_fields_reordered_and_unknown_wire_fields():
    other = gob.Struct("WinSize", [("Cols", gob.UINT16), ("Extra", gob.STRING), ("Rows", gob.UINT16)])
    v = gob.loads(T.WinSize, gob.dumps(other, {"Cols": 80, "Extra": "x", "Rows": 24}))
    assert v == {"X": 0, "Y": 0, "Rows": 24, "Cols": 80}


def test_pubkey_as_plain_array_is_accepted():
    """pty.md §2.4's bytes (a [33]byte PubKey without MarshalBinary) decode as a PubKey list."""
    data = bytes.fromhex(
        "0dff93020102ff940001ff92000016ff91010101065075624b657901ff920001060142000026ff94000121"
        "020102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20")
    pk = bytes([2]) + bytes(range(1, 33))
    assert gob.loads(T.PubKeyList, data) == [pk]
    assert gob.loads(T.PubKeyFixedList, data) == [pk]
    # and our encoding of the array form reproduces those bytes with Go's ids (73, 74)
    assert gob.dumps(T.PubKeyFixedList, [pk], first_id=73) == data
    # high bytes take two bytes each (ff xx)
    hi = bytes([3]) + bytes(range(0x80, 0xA0))
    assert gob.loads(T.PubKeyList, gob.dumps(T.PubKeyFixedList, [hi])) == [hi]


def test_empty_struct_and_singletons():
    assert gob.dumps(T.EMPTY, {}, 69).hex() == "0aff89030102ff8a00000003ff8a00"   # pty.md §2.5
    assert gob.dumps(gob.INT, 32768).hex() == "060400fd010000"
    assert gob.dumps(gob.BYTES, b"").hex() == "030a0000"


def test_commandexecresult_pty_md_example():
    hexs = ("ff86ff8f03010111436f6d6d616e6445786563526573756c7401ff9000010701065374646f7574010a00"
            "0106537464657272010a00010f5374646f75745472756e6361746564010200010f5374646572725472756e"
            "6361746564010200010845786974436f6465010400010854696d65644f7574010200010a4475726174696f"
            "6e4d5301040000000aff90010368690a060600")
    val = gob.zero_value(T.CommandExecResult)
    val.update(Stdout=b"hi\n", DurationMS=3)
    assert gob.dumps(T.CommandExecResult, val, first_id=72).hex() == hexs
    assert gob.loads(T.CommandExecResult, bytes.fromhex(hexs)) == val
    neg = dict(val, ExitCode=-1)
    assert gob.loads(T.CommandExecResult, gob.dumps(T.CommandExecResult, neg)) == neg


# ------------------------------------------------------------------------------ dmsg objects

def _addr(d):
    return {"PK": bytes.fromhex(d["PK"]), "Port": d["Port"]}


def _stream_request(f):
    return {"Timestamp": f["Timestamp"], "SrcAddr": _addr(f["SrcAddr"]), "DstAddr": _addr(f["DstAddr"]),
            "IPinfo": f["IPinfo"], "NoiseMsg": bytes.fromhex(f["NoiseMsg_hex"])}


def _stream_response(f, ip=b""):
    return {"ReqHash": bytes.fromhex(f["ReqHash"]), "Accepted": f["Accepted"], "IP": ip,
            "ErrCode": f.get("ErrCode", 0), "NoiseMsg": bytes.fromhex(f["NoiseMsg_hex"])}


def test_dmsg_stream_request():
    sr = DMSG["stream_request"]
    v = _stream_request(sr["fields"])
    assert gob.dumps(T.StreamRequest, v, first_id=64).hex() == sr["gob_hex"]
    assert gob.loads(T.StreamRequest, bytes.fromhex(sr["gob_hex"])) == v
    assert sr["signed_object_hex"].endswith(sr["gob_hex"])


def test_dmsg_stream_response():
    r = DMSG["stream_response"]
    v = _stream_response(r["fields"])
    assert gob.dumps(T.StreamResponse, v, first_id=64).hex() == r["gob_hex"]
    assert gob.loads(T.StreamResponse, bytes.fromhex(r["gob_hex"])) == v


def test_dmsg_ip_lookup():
    ip = DMSG["ip_lookup"]
    req = _stream_request(ip["request_fields"])
    assert gob.dumps(T.StreamRequest, req, first_id=64).hex() == ip["request_gob_hex"]
    assert gob.loads(T.StreamRequest, bytes.fromhex(ip["request_gob_hex"])) == req
    mapped = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 7])    # Go's 16-byte net.IP
    resp = _stream_response(ip["response_fields"], mapped)
    assert gob.dumps(T.StreamResponse, resp, first_id=64).hex() == ip["response_gob_hex"]
    assert gob.loads(T.StreamResponse, bytes.fromhex(ip["response_gob_hex"])) == resp


def test_null_pubkey_is_omitted_and_decodes_to_zero_bytes():
    v = {"Timestamp": 1, "SrcAddr": {"PK": bytes(33), "Port": 0}, "DstAddr": {"PK": bytes(33), "Port": 0},
         "IPinfo": False, "NoiseMsg": b""}
    data = gob.dumps(T.StreamRequest, v)
    assert gob.loads(T.StreamRequest, data) == v
    with pytest.raises(ValueError):
        gob.dumps(T.Addr, {"PK": b"short", "Port": 1})


# ------------------------------------------------------------------------------ garbage

VALID = [bytes.fromhex(sc["s2c_stream_hex"])[1:] for sc in SCENARIOS] + \
        [bytes.fromhex(sc["c2s_stream_hex"]) for sc in SCENARIOS]


def drain(data: bytes, t=None, max_message=limits.GOB_MAX_MESSAGE):
    dec = gob.Decoder(io.BytesIO(data).read, max_message)
    n = 0
    while True:
        try:
            dec.decode(t)
        except EOFError:
            return n
        n += 1
        if n > 10000:
            raise AssertionError("decoder does not advance")


def test_truncations_fail_cleanly():
    for data in VALID[:6]:
        for cut in range(1, len(data)):
            try:
                drain(data[:cut])
            except ProtocolError:
                pass


def test_random_garbage_fails_cleanly():
    rnd = random.Random(1234)
    for i in range(3000):
        n = rnd.randrange(1, 200)
        data = bytes(rnd.randrange(256) for _ in range(n))
        if i % 3 == 0:   # plausible length prefix
            data = bytes([min(len(data) - 1, 127)]) + data[1:]
        try:
            drain(data)
        except ProtocolError:
            pass


def test_mutated_vectors_fail_cleanly():
    rnd = random.Random(99)
    for i in range(3000):
        data = bytearray(rnd.choice(VALID))
        for _ in range(rnd.randrange(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        try:
            drain(bytes(data))
        except ProtocolError:
            pass


def test_oversize_message_length_is_refused_without_reading():
    reads = []

    def read_exact(n):
        reads.append(n)
        return bytes.fromhex("fb0100000000")[:n] if len(reads) == 1 else b"\x01\x00\x00\x00\x00"[:n]
    dec = gob.Decoder(read_exact)
    with pytest.raises(ProtocolError):
        dec.decode(None)
    assert max(reads) <= 8 and dec.broken
    with pytest.raises(ProtocolError):
        drain(b"\x80" + b"\x00" * 20)       # uint with a 128-byte count
    with pytest.raises(ProtocolError):
        drain(b"\x00")                      # zero-length message
    with pytest.raises(ProtocolError):
        drain(gob.dumps(gob.BYTES, b"x" * 300), max_message=100)


def msg(tid: int, body: bytes) -> bytes:
    b = gob._enc_int(tid) + body
    return gob._enc_uint(len(b)) + b


def test_huge_slice_count_fails_fast():
    full = gob.Encoder(None).encode_bytes(T.STRINGS, ["a"])
    tdef = full[:1 + full[0]]
    # a []string value claiming 2^60 elements in a 20-byte message
    with pytest.raises(ProtocolError):
        drain(tdef + msg(65, b"\x00" + gob._enc_uint(1 << 60) + b"\x00" * 8), T.STRINGS)
    with pytest.raises(ProtocolError):
        drain(tdef + msg(65, b"\x00" + gob._enc_uint(limits.GOB_MAX_SLICE + 1) + b"\x00" * 8))
    # a byte string longer than its message
    with pytest.raises(ProtocolError):
        gob.loads(gob.BYTES, bytes.fromhex("060a00fe1000aa"))


def test_deeply_nested_values_are_refused():
    """A recursive wire type T{Kids []T} (legal in Go): deep values fail, shallow ones pass."""
    P, S, I, U = gob._pstruct, gob._gstr, gob._gint, gob._enc_uint
    tdef = P([None, None, P([P([S("T"), I(64)]), U(1) + P([S("Kids"), I(65)])])])
    sdef = P([None, P([P([S("[]T"), I(65)]), I(64)])])
    defs = msg(-64, tdef) + msg(-65, sdef)

    def nested(n):
        return msg(64, b"\x01\x01" * n + b"\x00" * (n + 1))
    assert drain(defs + nested(3)) == 1
    with pytest.raises(ProtocolError):
        drain(defs + nested(limits.GOB_MAX_DEPTH + 1))
    with pytest.raises(ProtocolError):
        drain(defs + nested(5000))


def test_deep_expected_types_are_refused():
    t = gob.Struct("S0", [("A", gob.INT)])
    for i in range(1, 40):
        t = gob.Struct(f"S{i}", [("C", t)])
    v = gob.zero_value(t)
    data = gob.dumps(t, v)
    with pytest.raises(ProtocolError):
        gob.loads(t, data)
    with pytest.raises(ProtocolError):
        gob.loads(None, data)


def test_definition_errors():
    ok = gob.dumps(T.WinSize, {"Rows": 1}, first_id=64)
    # ids below 64, unknown ids, a non-zero singleton delta, trailing bytes
    low = bytearray(ok)
    assert low[1] == 0x7f
    low[1] = 0x7d   # -63
    with pytest.raises(ProtocolError):
        drain(bytes(low))
    with pytest.raises(ProtocolError):
        gob.loads(None, bytes.fromhex("03ff9000"))            # value of undefined type 72
    with pytest.raises(ProtocolError):
        gob.loads(gob.INT, bytes.fromhex("03040102"))         # singleton delta 1
    with pytest.raises(ProtocolError):
        gob.loads(gob.INT, bytes.fromhex("0404000200"))       # extra data
    with pytest.raises(ProtocolError):
        gob.loads(None, bytes.fromhex("03100000"))            # an interface value


def test_duplicate_type_definition():
    d = gob.dumps(T.WinSize, {"Rows": 1}, first_id=64)
    n = d[0]
    tdef = d[:1 + n]
    with pytest.raises(ProtocolError):
        drain(tdef + tdef)


def test_too_many_definitions():
    parts = []
    for i in range(limits.GOB_MAX_TYPES + 1):
        parts.append(gob.Encoder(None, 64 + i).encode_bytes(gob.Struct(f"T{i}", []), {})[:-4])
    data = b"".join(parts)
    with pytest.raises(ProtocolError):
        drain(data)


def test_type_mismatch_keeps_stream_in_sync():
    enc = gob.Encoder(None)
    data = enc.encode_bytes(gob.STRING, "x") + enc.encode_bytes(gob.INT, 5)
    dec = gob.Decoder(io.BytesIO(data).read)
    with pytest.raises(ProtocolError):
        dec.decode(gob.INT)
    assert not dec.broken
    assert dec.decode(gob.INT) == 5


def test_range_checks():
    with pytest.raises(ProtocolError):
        gob.loads(gob.UINT16, gob.dumps(gob.UINT, 70000))
    with pytest.raises(ProtocolError):
        gob.loads(gob.INT8, gob.dumps(gob.INT, -129))
    with pytest.raises(ValueError):
        gob.dumps(T.WinSize, {"Rows": 1 << 16})
    with pytest.raises(ValueError):
        gob.dumps(gob.UINT64, -1)
    with pytest.raises(TypeError):
        gob.dumps(gob.INT, "1")


def test_failed_encode_leaves_encoder_unchanged():
    enc = gob.Encoder(None, 64)
    with pytest.raises(ValueError):
        enc.encode_many([(T.RPC_REQUEST, {"ServiceMethod": "x", "Seq": 0}), (T.WinSize, {"X": -1})])
    first = enc.encode_bytes(T.RPC_REQUEST, {"ServiceMethod": "x", "Seq": 0})
    assert first.startswith(bytes.fromhex("2e7f"))   # definition still sent, id still 64


# ------------------------------------------------------------------------------ round trips

LEAF = [gob.BOOL, gob.INT, gob.INT8, gob.INT16, gob.INT32, gob.INT64, gob.UINT, gob.UINT8,
        gob.UINT16, gob.UINT32, gob.UINT64, gob.FLOAT, gob.STRING, gob.BYTES, T.PubKey]


def rand_type(rnd, depth=0, names=iter(range(10 ** 6))):
    r = rnd.random()
    if depth > 3 or r < 0.45:
        return rnd.choice(LEAF)
    if r < 0.6:
        elem = rand_type(rnd, depth + 1)
        return gob.BYTES if elem == gob.UINT8 else gob.Slice(elem)
    if r < 0.7:
        return gob.Array(f"A{next(names)}", rnd.choice([gob.UINT8, gob.INT, gob.STRING]), rnd.randrange(0, 5))
    if r < 0.78:
        elem = rand_type(rnd, depth + 1)
        return gob.Map(rnd.choice([gob.STRING, gob.INT]), elem)
    n = rnd.randrange(0, 5)
    fields = []
    for i in range(n):
        ft = rand_type(rnd, depth + 1)
        if rnd.random() < 0.2 and isinstance(ft, gob.Struct):
            ft = gob.Ptr(ft)
        fields.append((f"F{i}", ft))
    return gob.Struct(f"S{next(names)}", fields)


def rand_value(rnd, t):
    k = t.kind
    if k == "bool":
        return rnd.random() < 0.5
    if k in ("int", "uint"):
        return rnd.choice([t.lo, t.hi, 0, rnd.randint(t.lo, t.hi), 1, t.hi // 2])
    if k == "float":
        return rnd.choice([0.0, -1.5, 3.25e300, rnd.random()])
    if k == "string":
        return "".join(rnd.choice("aé€\U0001f600z ") for _ in range(rnd.randrange(0, 6)))
    if k == "bytes":
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 300)))
    if k == "bm":
        return bytes(rnd.randrange(256) for _ in range(t.size))
    if k == "slice":
        return [rand_value(rnd, t.elem) for _ in range(rnd.randrange(0, 4))]
    if k == "array":
        v = [rand_value(rnd, t.elem) for _ in range(t.length)]
        return bytes(v) if t.elem == gob.UINT8 else v
    if k == "map":
        return {rand_value(rnd, t.key): rand_value(rnd, t.elem) for _ in range(rnd.randrange(0, 3))}
    if k == "ptr":
        return None if rnd.random() < 0.3 else rand_value(rnd, t.elem)
    return {n: rand_value(rnd, ft) for n, ft in t.fields}


def test_random_round_trips():
    rnd = random.Random(2024)
    for _ in range(400):
        t = rand_type(rnd)
        vals = [rand_value(rnd, t) for _ in range(3)]
        enc = gob.Encoder(None, rnd.randrange(64, 5000))
        data = b"".join(enc.encode_bytes(t, v) for v in vals)
        dec = gob.Decoder(io.BytesIO(data).read)
        for v in vals:
            assert dec.decode(t) == v
        with pytest.raises(EOFError):
            dec.decode(t)


def test_large_bytes_round_trip():
    blob = bytes(range(256)) * 128           # 32 KiB Read reply
    assert gob.loads(T.READ_REPLY, gob.dumps(T.READ_REPLY, blob)) == blob
    res = dict(gob.zero_value(T.CommandExecResult), Stdout=b"o" * (1 << 20), Stderr=b"e", ExitCode=3)
    assert gob.loads(T.CommandExecResult, gob.dumps(T.CommandExecResult, res)) == res


def test_skipped_fields_cost_no_memory():
    """A peer padding a message with a huge field we do not know must not make us build it."""
    sent = gob.Struct("T", [("A", gob.INT), ("Junk", gob.Slice(gob.INT)), ("Arr", gob.Array("Big", gob.INT, 500_000))])
    data = gob.dumps(sent, {"A": 7, "Junk": [0] * 1_000_000, "Arr": [0] * 500_000})
    want = gob.Struct("T", [("A", gob.INT)])
    tracemalloc.start()
    try:
        assert gob.loads(want, data) == {"A": 7}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data)   # the message and its copies; a list per field would be 8 bytes/element


def test_reader_that_raises_eof_mid_message_is_a_protocol_error():
    """A read_exact that raises EOFError (like SecureConn.recv_exact) instead of returning short:
    only an end between messages is a clean EOF; a cut message breaks the stream."""
    data = gob.dumps(T.WinSize, {"X": 1, "Rows": 2})

    def reader(src):
        buf = io.BytesIO(src)

        def read_exact(n):
            b = buf.read(n)
            if len(b) < n:
                raise EOFError("unexpected EOF")
            return b
        return read_exact
    with pytest.raises(EOFError):
        gob.Decoder(reader(b"")).decode(T.WinSize)
    for cut in (1, 2, len(data) - 1):
        dec = gob.Decoder(reader(data[:cut]))
        with pytest.raises(ProtocolError, match="unexpected EOF"):
            dec.decode(T.WinSize)
        assert dec.broken


def test_huge_type_definitions_are_refused():
    """Definitions are parsed into Python objects (~100x their size): their total is capped."""
    wide = gob.Struct("Wide", [(f"F{i:06d}", gob.INT) for i in range(30_000)])
    data = gob.dumps(wide, {})
    assert len(data) > limits.GOB_MAX_TYPE_BYTES
    with pytest.raises(ProtocolError, match="type definitions too large"):
        gob.loads(wide, data)
    ok = gob.Struct("Ok", [(f"F{i:06d}", gob.INT) for i in range(1_000)])
    assert gob.loads(ok, gob.dumps(ok, {"F000007": 7}))["F000007"] == 7


class _Chunks:
    """A conn whose recv hands out the stream in the given piece sizes (cycled)."""

    def __init__(self, data: bytes, sizes):
        self.data, self.sizes, self.pos, self.i = data, list(sizes), 0, 0

    def recv(self, n):
        k = min(n, self.sizes[self.i % len(self.sizes)])
        self.i += 1
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s["scenario"])
def test_decoder_over_a_buffered_reader_any_split(sc):
    """Given the BufferedReader itself, the Decoder takes messages already buffered whole with
    one slice: the Go streams decode the same however the reads split them (one byte at a
    time, odd sizes, all at once), and a cut stream still fails as a broken one."""
    data = stream_after_preamble(sc, "s2c")
    want = []
    plain = gob.Decoder(io.BytesIO(data).read)
    for call in sc["calls"]:
        want.append(plain.decode(T.RPC_RESPONSE))
        rt = method_types(sc["scenario"], call["method"])[1]
        want.append(plain.decode(T.EMPTY if call["error"] else rt))
    for sizes in ([1], [3, 1, 7], [64], [len(data)]):
        dec = gob.Decoder(gob.BufferedReader(_Chunks(data, sizes)))
        got = []
        for call in sc["calls"]:
            got.append(dec.decode(T.RPC_RESPONSE))
            rt = method_types(sc["scenario"], call["method"])[1]
            got.append(dec.decode(T.EMPTY if call["error"] else rt))
        assert got == want
        with pytest.raises(EOFError):
            dec.decode(None)
    dec = gob.Decoder(gob.BufferedReader(_Chunks(data[:-1], [len(data)])))
    with pytest.raises(ProtocolError):
        while True:
            dec.decode(None)
    assert dec.broken


def test_decoder_fast_path_lengths_and_limits():
    """Over a BufferedReader, a message with a multi-byte length prefix (beyond the one-slice
    path) still decodes, and a length over the cap or a malformed prefix is refused."""
    big = gob.dumps(T.BYTES, b"x" * 300)            # a two-byte length prefix (0xFE ..)
    small = gob.dumps(T.BYTES, b"y")
    dec = gob.Decoder(gob.BufferedReader(_Chunks(big + small, [len(big) + len(small)])))
    assert dec.decode(T.BYTES) == b"x" * 300 and dec.decode(T.BYTES) == b"y"
    capped = gob.Decoder(gob.BufferedReader(_Chunks(big, [len(big)])), max_message=100)
    with pytest.raises(ProtocolError, match="out of range"):
        capped.decode(T.BYTES)
    bad = gob.Decoder(gob.BufferedReader(_Chunks(b"\xf0" + b"\x00" * 20, [21])))
    with pytest.raises(ProtocolError, match="bad message length"):
        bad.decode(T.BYTES)


_BYTES_LENGTHS = [0, 1, 5, 123, 124, 125, 126, 127, 128, 300, 70000]
_INTS = [0, 1, -1, 63, -64, 64, -65, 127, 128, -129, 32768, (1 << 63) - 1, -(1 << 63)]


def test_value_message_matches_the_general_encoder():
    """The []byte / int short cut gives exactly the general encoder's bytes (Go's, for these
    built-in types), and anything else goes the general way with its errors."""
    enc = gob.Encoder()
    for n in _BYTES_LENGTHS:
        v = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        assert enc.value_message(T.BYTES, v) == gob.dumps(T.BYTES, v), n
        assert enc.value_message(T.BYTES, bytearray(v)) == gob.dumps(T.BYTES, v), n
        assert enc.value_message(T.BYTES, memoryview(v)) == gob.dumps(T.BYTES, v), n
    for v in _INTS:
        assert enc.value_message(T.INT, v) == gob.dumps(T.INT, v), v
    for bad in (1 << 63, -(1 << 63) - 1):
        with pytest.raises(ValueError):
            enc.value_message(T.INT, bad)
    with pytest.raises(TypeError):
        enc.value_message(T.INT, True)
    assert enc.value_message(T.WinSize, {"Rows": 2}) == gob.dumps(T.WinSize, {"Rows": 2})


def test_value_short_cuts_agree_with_the_general_decoder():
    """[]byte and int values of every length decode as before, and a short-cut-shaped
    message that is malformed still fails the general way."""
    msgs = [gob.dumps(T.BYTES, b"k" * n) for n in _BYTES_LENGTHS] + [gob.dumps(T.INT, v) for v in _INTS]
    dec = gob.Decoder(gob.BufferedReader(_Chunks(b"".join(msgs), [sum(map(len, msgs))])))
    assert [dec.decode(T.BYTES) for _ in _BYTES_LENGTHS] == [b"k" * n for n in _BYTES_LENGTHS]
    assert [dec.decode(T.INT) for _ in _INTS] == _INTS
    for body, why in [(b"\x0a\x01\x01k", "non-zero delta"), (b"\x0a\x00\x02k", "exceeds the message"),
                      (b"\x0a\x00\x01kk", "extra data"), (b"\x04\x01\x02", "non-zero delta"),
                      (b"\x04\x00\x02\x00", "extra data"), (b"\x0a\x00", "truncated"),
                      (b"\x04\x00\xfe\x01", "truncated"), (b"\x04\x00\xfe\x01\x02\x03", "extra data"),
                      (b"\x04\x00\xf0" + b"\x01" * 16, "out of range"), (b"\x04\x00", "truncated")]:
        with pytest.raises(ProtocolError, match=why):
            gob.loads(T.BYTES if body[0] == 0x0a else T.INT, bytes((len(body),)) + body)
    assert gob.loads(T.BYTES, b"\x03\x0a\x00\x00") == b""


def test_next_value_and_struct_fields():
    """next_value() reads definitions and stops at the value; struct_fields tells its layout."""
    data = gob.dumps(T.RPC_REQUEST, {"ServiceMethod": "pty.Read", "Seq": 7}) + gob.dumps(T.INT, 5)
    dec = gob.Decoder(gob.BufferedReader(_Chunks(data, [len(data)])))
    tid, buf, pos = dec.next_value()
    assert tid == gob.DEFAULT_FIRST_ID
    assert dec.struct_fields(tid) == (("ServiceMethod", gob.STRING.wire_id), ("Seq", gob.UINT.wire_id))
    assert dec.value(tid, buf, pos, T.RPC_REQUEST) == {"ServiceMethod": "pty.Read", "Seq": 7}
    tid, buf, pos = dec.next_value()
    assert dec.struct_fields(tid) is None and dec.struct_fields(99) is None
    assert dec.value(tid, buf, pos, T.INT) == 5
    with pytest.raises(EOFError):
        dec.next_value()
