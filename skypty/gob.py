"""Go encoding/gob, the subset the Skywire protocols use, written from the gob wire format.

Type descriptors say what a value is; the encoder assigns type ids and sends each type's
definition once per Encoder (one Encoder per stream direction, as Go does); the decoder
reads the peer's definitions and maps wire fields onto the expected type by NAME.

Values: structs are dicts (missing keys = zero value; decode fills every declared field),
slices lists, []byte / BinaryMarshaler bytes, arrays lists of ints (bytes for UINT8 arrays;
both accepted on encode), maps dicts, Ptr = value or None, strings str.

Nothing read from the peer is trusted for its size: a message is at most
limits.GOB_MAX_MESSAGE bytes, nesting at most limits.GOB_MAX_DEPTH, a slice at most
limits.GOB_MAX_SLICE elements and never more elements than bytes left in the message.
Garbage raises errors.ProtocolError.
"""
from __future__ import annotations

import struct as _struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import limits
from .errors import ProtocolError

__all__ = [
    "GobType", "Basic", "Struct", "Slice", "Array", "Map", "Ptr", "BinaryMarshaler",
    "BOOL", "INT", "INT8", "INT16", "INT32", "INT64", "UINT", "UINT8", "UINT16", "UINT32",
    "UINT64", "FLOAT", "STRING", "BYTES", "EMPTY",
    "Encoder", "Decoder", "BufferedReader", "dumps", "loads", "zero_value", "enc_uint", "rd_uint",
    "FIRST_USER_ID", "DEFAULT_FIRST_ID",
]

# Go's built-in type ids (fixed by the gob format).
_ID_BOOL, _ID_INT, _ID_UINT, _ID_FLOAT, _ID_BYTES, _ID_STRING, _ID_COMPLEX, _ID_INTERFACE = range(1, 9)
FIRST_USER_ID = 64          # Go rejects user type ids below this
DEFAULT_FIRST_ID = 64       # any id >= 64 interoperates; a fresh go1.27 process starts at 64

_U64_MAX = (1 << 64) - 1


# ----------------------------------------------------------------------------- descriptors

class GobType:
    """Base of every type descriptor. Descriptors compare and hash by structure."""

    kind = ""
    name = ""
    __slots__ = ("_hash",)

    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is type(self) and other._key() == self._key())

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            self._hash = hash((type(self).__name__,) + self._key())
            return self._hash


class Basic(GobType):
    """A Go basic type; several Go widths share one wire id (range-checked both ways)."""

    __slots__ = ("kind", "name", "wire_id", "lo", "hi")

    def __init__(self, kind: str, name: str, wire_id: int,
                 lo: Optional[int] = None, hi: Optional[int] = None):
        self.kind, self.name, self.wire_id, self.lo, self.hi = kind, name, wire_id, lo, hi

    def _key(self) -> tuple:
        return (self.kind, self.name, self.wire_id, self.lo, self.hi)

    def __repr__(self) -> str:
        return self.name.upper()


def _int(bits: int, name: str) -> Basic:
    return Basic("int", name, _ID_INT, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def _uint(bits: int, name: str) -> Basic:
    return Basic("uint", name, _ID_UINT, 0, (1 << bits) - 1)


BOOL = Basic("bool", "bool", _ID_BOOL)
INT = _int(64, "int")
INT8, INT16, INT32, INT64 = _int(8, "int8"), _int(16, "int16"), _int(32, "int32"), _int(64, "int64")
UINT = _uint(64, "uint")
UINT8, UINT16 = _uint(8, "uint8"), _uint(16, "uint16")
UINT32, UINT64 = _uint(32, "uint32"), _uint(64, "uint64")
FLOAT = Basic("float", "float64", _ID_FLOAT)
STRING = Basic("string", "string", _ID_STRING)
BYTES = Basic("bytes", "[]uint8", _ID_BYTES)


def _check_type(t: Any) -> GobType:
    if not isinstance(t, GobType):
        raise TypeError(f"not a gob type descriptor: {t!r}")
    return t


class Struct(GobType):
    """A Go struct: Struct("WinSize", [("X", UINT16), …]). Field order = gob field number."""

    kind = "struct"
    __slots__ = ("name", "fields")

    def __init__(self, name: str, fields: Sequence[Tuple[str, GobType]]):
        self.name = name
        self.fields = tuple((str(n), _check_type(t)) for n, t in fields)
        if len({n for n, _ in self.fields}) != len(self.fields):
            raise ValueError(f"duplicate field name in struct {name!r}")

    def _key(self) -> tuple:
        return (self.name, self.fields)

    def __repr__(self) -> str:
        return f"Struct({self.name!r})"


class Slice(GobType):
    """A Go slice []elem. `name` is what Go puts in the definition: "[]string" when the type
    is first met as a struct field, "" when it is first met as a top-level value."""

    kind = "slice"
    __slots__ = ("elem", "name")

    def __init__(self, elem: GobType, name: Optional[str] = None):
        self.elem = _check_type(elem)
        if isinstance(elem, Ptr):
            raise TypeError("gob cannot send nil elements: use the element type, not Ptr")
        if elem == UINT8:
            raise TypeError("[]uint8 is []byte in gob: use BYTES")
        self.name = "[]" + elem.name if name is None else name

    def _key(self) -> tuple:
        return (self.elem, self.name)

    def __repr__(self) -> str:
        return f"Slice({self.elem!r})"


class Array(GobType):
    """A Go fixed array [length]elem with a type name (e.g. Array("SHA256", UINT8, 32))."""

    kind = "array"
    __slots__ = ("name", "elem", "length")

    def __init__(self, name: str, elem: GobType, length: int):
        self.name, self.elem, self.length = name, _check_type(elem), int(length)
        if isinstance(elem, Ptr) or self.length < 0:
            raise TypeError("bad array type")

    def _key(self) -> tuple:
        return (self.name, self.elem, self.length)

    def __repr__(self) -> str:
        return f"Array({self.name!r}, {self.elem!r}, {self.length})"


class Map(GobType):
    """A Go map[key]elem; value is a dict (None = nil map, not sent inside a struct)."""

    kind = "map"
    __slots__ = ("key", "elem", "name")

    def __init__(self, key: GobType, elem: GobType, name: Optional[str] = None):
        self.key, self.elem = _check_type(key), _check_type(elem)
        self.name = f"map[{key.name}]{elem.name}" if name is None else name

    def _key(self) -> tuple:
        return (self.key, self.elem, self.name)


class Ptr(GobType):
    """*T: on the wire exactly T; the value is None (nil: omitted in a struct) or T's value."""

    kind = "ptr"
    __slots__ = ("elem",)

    def __init__(self, elem: GobType):
        self.elem = _check_type(elem)
        if isinstance(elem, Ptr):
            raise TypeError("pointer to pointer is not supported")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.elem.name

    def _key(self) -> tuple:
        return (self.elem,)

    def __repr__(self) -> str:
        return f"Ptr({self.elem!r})"


class BinaryMarshaler(GobType):
    """A Go type implementing encoding.BinaryMarshaler: the value travels as a byte string.
    `size`, when given, is the only length accepted (and the zero value is size zero bytes)."""

    kind = "bm"
    __slots__ = ("name", "size")

    def __init__(self, name: str, size: Optional[int] = None):
        self.name, self.size = name, size

    def _key(self) -> tuple:
        return (self.name, self.size)

    def __repr__(self) -> str:
        return f"BinaryMarshaler({self.name!r})"


EMPTY = Struct("", [])   # Go struct{}: a real (empty) struct value, one 0x00 byte


def _base(t: GobType) -> GobType:
    return t.elem if isinstance(t, Ptr) else t


def zero_value(t: GobType) -> Any:
    """The Python value a Go zero value of `t` decodes to."""
    k = t.kind
    if k == "bool":
        return False
    if k in ("int", "uint"):
        return 0
    if k == "float":
        return 0.0
    if k == "string":
        return ""
    if k == "bytes":
        return b""
    if k == "slice":
        return []
    if k == "map":
        return {}
    if k == "ptr":
        return None
    if k == "bm":
        return bytes(t.size or 0)  # type: ignore[attr-defined]
    if k == "array":
        if t.elem == UINT8:  # type: ignore[attr-defined]
            return bytes(t.length)  # type: ignore[attr-defined]
        return [zero_value(t.elem) for _ in range(t.length)]  # type: ignore[attr-defined]
    if k == "struct":
        return {n: zero_value(ft) for n, ft in t.fields}  # type: ignore[attr-defined]
    raise TypeError(f"no zero value for {t!r}")


# ----------------------------------------------------------------------------- primitives

_SMALL = [bytes((i,)) for i in range(256)]
# a top-level []byte / int value message after its length: type id (as a gob int), then the
# singleton's field delta 0
_BYTES_HEAD = bytes((_ID_BYTES << 1, 0))
_INT_HEAD = bytes((_ID_INT << 1, 0))
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_U8_ELEM = [bytes((i,)) if i < 0x80 else bytes((0xFF, i)) for i in range(256)]


def _enc_uint(v: int) -> bytes:
    if v < 0x80:
        if v < 0:
            raise ValueError(f"gob: negative unsigned value {v}")
        return _SMALL[v]
    if v > _U64_MAX:
        raise ValueError(f"gob: unsigned value {v} overflows uint64")
    n = (v.bit_length() + 7) >> 3
    return _SMALL[256 - n] + v.to_bytes(n, "big")


def _enc_int(v: int) -> bytes:
    return _enc_uint((v << 1) if v >= 0 else (((~v) << 1) | 1))


# for callers that frame or read a known layout themselves (rpc headers)
enc_uint = _enc_uint


def _rd_uint(buf: bytes, pos: int) -> Tuple[int, int]:
    try:
        b = buf[pos]
    except IndexError:
        raise ProtocolError("gob: truncated message") from None
    if b < 0x80:
        return b, pos + 1
    n = 256 - b
    if n > 8:
        raise ProtocolError("gob: encoded unsigned integer out of range")
    end = pos + 1 + n
    if end > len(buf):
        raise ProtocolError("gob: truncated message")
    return int.from_bytes(buf[pos + 1:end], "big"), end


rd_uint = _rd_uint   # (value, position after it); ProtocolError when cut short or over 64 bits


def _rd_int(buf: bytes, pos: int) -> Tuple[int, int]:
    u, pos = _rd_uint(buf, pos)
    return (~(u >> 1) if u & 1 else u >> 1), pos


def _rd_bytes(buf: bytes, pos: int) -> Tuple[bytes, int]:
    n = buf[pos] if pos < len(buf) else 0x80   # 0x80: let _rd_uint report the truncation
    if n < 0x80:
        pos += 1
    else:
        n, pos = _rd_uint(buf, pos)
    end = pos + n
    if end > len(buf):
        raise ProtocolError(f"gob: byte string of {n} bytes exceeds the message")
    return buf[pos:end], end


def _float_bits(v: float) -> int:
    # Go sends the float64 bits byte-reversed so that small exponents compress
    return int.from_bytes(_struct.pack("<d", v), "big")


def _bits_float(u: int) -> float:
    return _struct.unpack("<d", u.to_bytes(8, "big"))[0]


# ----------------------------------------------------------------------------- value encoders

_Enc = Callable[[Any, List[bytes]], None]
_ENC_CACHE: Dict[GobType, _Enc] = {}


def _ranged(t: Basic, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"gob: {t.name} needs an int, got {type(v).__name__}")
    if not (t.lo <= v <= t.hi):  # type: ignore[operator]
        raise ValueError(f"gob: {v} out of range for {t.name}")
    return v


def _value_encoder(t: GobType) -> _Enc:
    enc = _ENC_CACHE.get(t)
    if enc is None:
        enc = _build_encoder(t)
        _ENC_CACHE[t] = enc
    return enc


def _is_zero_fn(t: GobType) -> Optional[Callable[[Any], bool]]:
    """How a struct field of type t is recognised as zero (omitted); None = always sent."""
    k = t.kind
    if k in ("struct", "array"):
        return None
    if k == "bm":
        return lambda v: v is None or not any(v)
    if k in ("map", "ptr"):
        return lambda v: v is None
    return _FALSY   # bool, ints, float, string, bytes, slice


def _FALSY(v: Any) -> bool:   # the struct encoder tests `not v` inline when it sees this one
    return not v


def _build_encoder(t: GobType) -> _Enc:
    k = t.kind
    if k == "bool":
        def enc(v: Any, out: List[bytes]) -> None:
            out.append(b"\x01" if v else b"\x00")
    elif k == "int":
        lo, hi = t.lo, t.hi  # type: ignore[attr-defined]

        def enc(v: Any, out: List[bytes]) -> None:
            if type(v) is not int or not lo <= v <= hi:
                v = _ranged(t, v)  # type: ignore[arg-type]   # raises, or accepts an int subclass
            out.append(_enc_uint((v << 1) if v >= 0 else (((~v) << 1) | 1)))
    elif k == "uint":
        lo, hi = t.lo, t.hi  # type: ignore[attr-defined]

        def enc(v: Any, out: List[bytes]) -> None:
            if type(v) is not int or not lo <= v <= hi:
                v = _ranged(t, v)  # type: ignore[arg-type]
            out.append(_enc_uint(v))
    elif k == "float":
        def enc(v: Any, out: List[bytes]) -> None:
            out.append(_enc_uint(_float_bits(float(v))))
    elif k == "string":
        def enc(v: Any, out: List[bytes]) -> None:
            b = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)
            out.append(_enc_uint(len(b)))
            out.append(b)
    elif k in ("bytes", "bm"):
        size = getattr(t, "size", None)

        def enc(v: Any, out: List[bytes]) -> None:
            if v is None:
                v = b""
            elif not isinstance(v, (bytes, bytearray, memoryview)):
                v = bytes(v)   # e.g. keys.PubKey
            n = len(v) if not isinstance(v, memoryview) else v.nbytes
            if size is not None and n != size:
                raise ValueError(f"gob: {t.name} must be {size} bytes, got {n}")
            out.append(_enc_uint(n))
            out.append(v)
    elif k == "ptr":
        inner = _value_encoder(t.elem)  # type: ignore[attr-defined]

        def enc(v: Any, out: List[bytes]) -> None:
            if v is None:
                raise ValueError("gob: cannot encode nil pointer")
            inner(v, out)
    elif k == "slice":
        elem_t = t.elem  # type: ignore[attr-defined]
        inner = _value_encoder(elem_t)
        if elem_t == STRING:
            def enc(v: Any, out: List[bytes]) -> None:
                out.append(_enc_uint(len(v)))
                for s in v:
                    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
                    out.append(_enc_uint(len(b)))
                    out.append(b)
        else:
            def enc(v: Any, out: List[bytes]) -> None:
                out.append(_enc_uint(len(v)))
                for e in v:
                    inner(e, out)
    elif k == "array":
        n = t.length  # type: ignore[attr-defined]
        elem_t = t.elem  # type: ignore[attr-defined]
        inner = _value_encoder(elem_t)
        count = _enc_uint(n)

        def enc(v: Any, out: List[bytes]) -> None:
            if v is None:
                v = zero_value(t)
            if len(v) != n:
                raise ValueError(f"gob: {t.name} needs {n} elements, got {len(v)}")
            out.append(count)
            if elem_t == UINT8:
                b = bytes(v)
                out.append(b if max(b, default=0) < 0x80 else b"".join([_U8_ELEM[x] for x in b]))
            else:
                for e in v:
                    inner(e, out)
    elif k == "map":
        kenc = _value_encoder(t.key)  # type: ignore[attr-defined]
        venc = _value_encoder(t.elem)  # type: ignore[attr-defined]

        def enc(v: Any, out: List[bytes]) -> None:
            out.append(_enc_uint(len(v)))
            for mk, mv in v.items():
                kenc(mk, out)
                venc(mv, out)
    elif k == "struct":
        plan = []
        for i, (fname, ft) in enumerate(t.fields):  # type: ignore[attr-defined]
            plan.append((i, fname, _value_encoder(ft), _is_zero_fn(ft), ft))

        def enc(v: Any, out: List[bytes]) -> None:
            if v is None:
                v = {}
            get = v.get
            last = -1
            for i, fname, fenc, is_zero, ft in plan:
                fv = get(fname)
                if is_zero is _FALSY:
                    if not fv:
                        continue
                elif is_zero is not None:
                    if fv is None or is_zero(fv):
                        continue
                elif fv is None:
                    fv = zero_value(ft)
                out.append(_SMALL[i - last] if i - last < 0x80 else _enc_uint(i - last))
                last = i
                fenc(fv, out)
            out.append(b"\x00")
    else:
        raise TypeError(f"gob: cannot encode {t!r}")
    return enc


# ----------------------------------------------------------------------------- encoder

def _pstruct(fields: Sequence[Optional[bytes]]) -> bytes:
    """A struct of already-encoded fields; None fields are omitted (zero)."""
    out, last = [], -1
    for i, f in enumerate(fields):
        if f is None:
            continue
        out.append(_enc_uint(i - last))
        out.append(f)
        last = i
    out.append(b"\x00")
    return b"".join(out)


def _gstr(s: str) -> Optional[bytes]:
    if not s:
        return None
    b = s.encode("utf-8")
    return _enc_uint(len(b)) + b


def _gint(v: int) -> Optional[bytes]:
    return _enc_int(v) if v else None


class Encoder:
    """One gob encoder for one stream direction. Not thread-safe: callers serialise.

    `first_id` is the first user type id handed out (Go accepts any id >= 64); ids are
    allocated in Go's order (a struct before its fields, a slice/array/map after its
    element types) so that a fresh Go process's bytes can be reproduced exactly."""

    def __init__(self, write: Optional[Callable[[bytes], Any]] = None, first_id: int = DEFAULT_FIRST_ID):
        if first_id < FIRST_USER_ID:
            raise ValueError(f"gob type ids start at {FIRST_USER_ID}")
        self._write = write
        self._next = first_id
        self._ids: Dict[GobType, int] = {}
        self._sent: set = set()
        self._new_ids: List[GobType] = []
        self._new_sent: List[GobType] = []
        # per type already defined on this stream: (value prefix, value encoder, is pointer)
        self._ready: Dict[int, Tuple[GobType, bytes, _Enc, bool]] = {}

    # id allocation -------------------------------------------------------------------
    def type_id(self, t: GobType) -> int:
        """The wire id of t (allocating ids for t and its parts if needed)."""
        t = _base(t)
        if isinstance(t, Basic):
            return t.wire_id
        tid = self._ids.get(t)
        if tid is not None:
            return tid
        if isinstance(t, Struct):
            tid = self._alloc(t)
            for _, ft in t.fields:
                self.type_id(ft)
            return tid
        if isinstance(t, (Slice, Array)):
            self.type_id(t.elem)
        elif isinstance(t, Map):
            self.type_id(t.key)
            self.type_id(t.elem)
        return self._alloc(t)

    def _alloc(self, t: GobType) -> int:
        tid = self._next
        self._next += 1
        self._ids[t] = tid
        self._new_ids.append(t)
        return tid

    # definitions ---------------------------------------------------------------------
    def _defs(self, t: GobType, out: List[bytes]) -> None:
        t = _base(t)
        if isinstance(t, Basic) or t in self._sent:
            return
        self._sent.add(t)
        self._new_sent.append(t)
        tid = self._ids[t]
        common = _pstruct([_gstr(t.name), _gint(tid)])
        if isinstance(t, Struct):
            flist = None
            if t.fields:
                flist = _enc_uint(len(t.fields)) + b"".join(
                    _pstruct([_gstr(n), _gint(self.type_id(ft))]) for n, ft in t.fields)
            wire = _pstruct([None, None, _pstruct([common, flist])])
        elif isinstance(t, Slice):
            wire = _pstruct([None, _pstruct([common, _gint(self.type_id(t.elem))])])
        elif isinstance(t, Array):
            wire = _pstruct([_pstruct([common, _gint(self.type_id(t.elem)), _gint(t.length)])])
        elif isinstance(t, Map):
            kid, eid = self.type_id(t.key), self.type_id(t.elem)
            wire = _pstruct([None, None, None, _pstruct([common, _gint(kid), _gint(eid)])])
        elif isinstance(t, BinaryMarshaler):
            wire = _pstruct([None, None, None, None, None, _pstruct([common])])
        else:  # pragma: no cover - descriptors are closed
            raise TypeError(f"gob: cannot define {t!r}")
        body = _enc_int(-tid) + wire
        out.append(_enc_uint(len(body)))
        out.append(body)
        if isinstance(t, Struct):
            for _, ft in t.fields:
                self._defs(ft, out)
        elif isinstance(t, (Slice, Array)):
            self._defs(t.elem, out)
        elif isinstance(t, Map):
            self._defs(t.key, out)
            self._defs(t.elem, out)

    # values --------------------------------------------------------------------------
    def encode_many(self, items: Sequence[Tuple[GobType, Any]]) -> bytes:
        """Encode several values (with any definitions they need) into one byte string.
        All or nothing: if a value cannot be encoded, the encoder's state is unchanged."""
        # Every rpc message after the first few uses types already on the wire: no ids to
        # allocate, no definitions, so the value's bytes are all there is to make.
        ready = self._ready
        out: List[bytes] = []
        for t, value in items:
            r = ready.get(id(t))
            if r is None or r[0] is not t:
                return self._encode_many(items)
            _, prefix, enc, is_ptr = r
            if is_ptr and value is None:
                raise ValueError("gob: cannot encode nil pointer at top level")
            body = [prefix]
            enc(value, body)
            data = b"".join(body)
            out.append(_enc_uint(len(data)))
            out.append(data)
        return b"".join(out)

    def _encode_many(self, items: Sequence[Tuple[GobType, Any]]) -> bytes:
        data = self._encode_defining(items)
        for t, _ in items:   # from now on these need no definitions
            if id(t) not in self._ready:
                b = _base(t)
                prefix = _enc_int(self._ids[b] if not isinstance(b, Basic) else b.wire_id)
                if not isinstance(b, Struct):
                    prefix += b"\x00"
                # keyed by id(t) (hashing a type is a Python call); the entry keeps t alive
                self._ready[id(t)] = (t, prefix, _value_encoder(b), isinstance(t, Ptr))
        return data

    def _encode_defining(self, items: Sequence[Tuple[GobType, Any]]) -> bytes:
        self._new_ids, self._new_sent = [], []
        next_before = self._next
        try:
            out: List[bytes] = []
            for t, value in items:
                tid = self.type_id(t)
                body: List[bytes] = [_enc_int(tid)]
                b = _base(t)
                if not isinstance(b, Struct):
                    body.append(b"\x00")   # singleton: field delta 0
                if isinstance(t, Ptr) and value is None:
                    raise ValueError("gob: cannot encode nil pointer at top level")
                _value_encoder(b)(value, body)
                self._defs(t, out)
                data = b"".join(body)
                out.append(_enc_uint(len(data)))
                out.append(data)
            return b"".join(out)
        except BaseException:
            for t in self._new_ids:
                self._ids.pop(t, None)
            for t in self._new_sent:
                self._sent.discard(t)
            self._next = next_before
            raise
        finally:
            self._new_ids, self._new_sent = [], []

    def value_message(self, t: GobType, value: Any) -> bytes:
        """What encode_many([(t, value)]) gives. A []byte or an int (a keystroke, its echo, a
        Read's size) is framed here directly: those types need no definitions, and the
        general path costs as much as the rest of a keystroke's encoding."""
        if t is BYTES and type(value) is bytes:
            n = len(value)
            if n < 0x7D:   # the whole message < 128 bytes: one-byte length prefix
                return b"".join((_SMALL[n + 3], _BYTES_HEAD, _SMALL[n], value))
        elif t is INT and type(value) is int and _I64_MIN <= value <= _I64_MAX:
            v = _enc_int(value)
            return b"".join((_SMALL[len(v) + 2], _INT_HEAD, v))
        return self.encode_many(((t, value),))

    def encode_bytes(self, t: GobType, value: Any) -> bytes:
        """The bytes encode() would write (definitions + value); the caller must send them."""
        return self.encode_many([(t, value)])

    def encode(self, t: GobType, value: Any) -> None:
        if self._write is None:
            raise RuntimeError("Encoder has no write function")
        self._write(self.encode_bytes(t, value))


def dumps(t: GobType, value: Any, first_id: int = DEFAULT_FIRST_ID) -> bytes:
    """A fresh encoder's bytes for one value (what Go's gob.NewEncoder(&buf).Encode gives)."""
    return Encoder(None, first_id).encode_bytes(t, value)


# ----------------------------------------------------------------------------- wire types

class _Wire:
    """A type definition received from the peer."""

    __slots__ = ("kind", "name", "elem", "key", "length", "fields")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name
        self.elem = self.key = self.length = 0
        self.fields: List[Tuple[str, int]] = []


_BUILTIN_KIND = {_ID_BOOL: "bool", _ID_INT: "int", _ID_UINT: "uint", _ID_FLOAT: "float",
                 _ID_BYTES: "bytes", _ID_STRING: "string", _ID_COMPLEX: "complex",
                 _ID_INTERFACE: "interface"}


def _p_struct(buf: bytes, pos: int, parsers: Sequence[Callable]) -> Tuple[list, int]:
    vals: list = [None] * len(parsers)
    field = -1
    while True:
        delta, pos = _rd_uint(buf, pos)
        if delta == 0:
            return vals, pos
        field += delta
        if field >= len(parsers):
            raise ProtocolError("gob: bad type definition (field number)")
        vals[field], pos = parsers[field](buf, pos)


def _p_str(buf: bytes, pos: int) -> Tuple[str, int]:
    b, pos = _rd_bytes(buf, pos)
    return b.decode("utf-8", "replace"), pos


def _p_common(buf: bytes, pos: int) -> Tuple[list, int]:
    return _p_struct(buf, pos, (_p_str, _rd_int))


def _p_field(buf: bytes, pos: int) -> Tuple[list, int]:
    return _p_struct(buf, pos, (_p_str, _rd_int))


def _p_fields(buf: bytes, pos: int) -> Tuple[list, int]:
    n, pos = _rd_uint(buf, pos)
    if n > len(buf) - pos or n > limits.GOB_MAX_SLICE:
        raise ProtocolError("gob: bad type definition (field count)")
    out = []
    for _ in range(n):
        f, pos = _p_field(buf, pos)
        out.append(f)
    return out, pos


def _p_array(b: bytes, p: int) -> Tuple[list, int]:
    return _p_struct(b, p, (_p_common, _rd_int, _rd_int))


def _p_slice(b: bytes, p: int) -> Tuple[list, int]:
    return _p_struct(b, p, (_p_common, _rd_int))


def _p_structt(b: bytes, p: int) -> Tuple[list, int]:
    return _p_struct(b, p, (_p_common, _p_fields))


def _p_map(b: bytes, p: int) -> Tuple[list, int]:
    return _p_struct(b, p, (_p_common, _rd_int, _rd_int))


def _p_genc(b: bytes, p: int) -> Tuple[list, int]:
    return _p_struct(b, p, (_p_common,))


_WIRE_PARSERS = (_p_array, _p_slice, _p_structt, _p_map, _p_genc, _p_genc, _p_genc)
_WIRE_KINDS = ("array", "slice", "struct", "map", "gobenc", "bm", "textm")


def _parse_wiretype(buf: bytes, pos: int) -> _Wire:
    vals, pos = _p_struct(buf, pos, _WIRE_PARSERS)
    present = [i for i, v in enumerate(vals) if v is not None]
    if len(present) != 1:
        raise ProtocolError("gob: bad type definition")
    if pos != len(buf):
        raise ProtocolError("gob: extra data in type definition")
    i = present[0]
    v = vals[i]
    common = v[0] or [None, None]
    w = _Wire(_WIRE_KINDS[i], common[0] or "")
    if i == 0:
        w.elem, w.length = v[1] or 0, v[2] or 0
        if not 0 <= w.length <= limits.GOB_MAX_SLICE:
            raise ProtocolError("gob: bad array length")
    elif i == 1:
        w.elem = v[1] or 0
    elif i == 2:
        w.fields = [((f[0] or ""), (f[1] or 0)) for f in (v[1] or [])]
    elif i == 3:
        w.key, w.elem = v[1] or 0, v[2] or 0
    return w


# ----------------------------------------------------------------------------- decoder

class BufferedReader:
    """A Decoder's source over a socket-like conn: read_exact(n) over conn.recv with a
    read-ahead buffer (few recv calls per message). Returns fewer than n bytes only at end
    of stream.

    The buffer is immutable bytes plus an offset: a Decoder given the reader itself (not
    just its read_exact) takes a message that is already buffered whole with one slice, the
    common case for rpc traffic."""

    def __init__(self, conn: Any, bufsize: int = 65536):
        self._conn = conn
        self._buf = b""
        self._pos = 0
        self._bufsize = bufsize
        self._eof = False

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _fill(self) -> None:
        """With nothing buffered, one read (the one read_exact would make next)."""
        if self._pos >= len(self._buf) and not self._eof:
            chunk = self._conn.recv(self._bufsize)
            if chunk:
                self._buf, self._pos = bytes(chunk), 0
            else:
                self._eof = True

    def small_message(self, limit: int) -> Optional[bytes]:
        """The next gob message if its length is one byte (< 128, at most `limit`) and it is
        buffered whole, or can be after one read: taken with one slice (rpc calls and replies).
        None, consuming nothing, otherwise: the Decoder then reads it the general way."""
        if self._pos >= len(self._buf):
            self._fill()
        buf, pos = self._buf, self._pos
        n = buf[pos] if pos < len(buf) else 0
        end = pos + 1 + n
        if 0 < n < 0x80 and n <= limit and end <= len(buf):
            self._pos = end
            return buf[pos + 1:end]
        return None

    def read_exact(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        end = pos + n
        if end <= len(buf):
            self._pos = end
            return buf[pos:end]
        parts = [buf[pos:]]
        got = len(buf) - pos
        self._buf, self._pos = b"", 0
        while got < n and not self._eof:
            # large messages are read in big chunks, but never more than the message needs + a bit
            chunk = self._conn.recv(max(self._bufsize, min(n - got, 4 << 20)))
            if not chunk:
                self._eof = True
                break
            need = n - got
            if len(chunk) > need:   # keep the rest for the next message
                parts.append(chunk[:need])
                self._buf, self._pos = bytes(chunk), need
                got = n
            else:
                parts.append(chunk)
                got += len(chunk)
        return b"".join(parts)


_Dec = Callable[[bytes, int, int], Tuple[Any, int]]


class Decoder:
    """One gob decoder for one stream direction. Not thread-safe: one reader.

    `read_exact(n)` returns n bytes, or fewer at end of stream. decode() raises EOFError
    when the stream ends cleanly between messages and errors.ProtocolError on garbage;
    after a framing error `broken` is True and the stream cannot be resynchronised."""

    def __init__(self, read_exact: "Callable[[int], bytes] | BufferedReader",
                 max_message: int = limits.GOB_MAX_MESSAGE):
        self._src = read_exact if isinstance(read_exact, BufferedReader) else None
        self._read = read_exact.read_exact if self._src is not None else read_exact
        self._max = max_message
        self._wire: Dict[int, _Wire] = {}
        self._def_bytes = 0
        self._plans: Dict[Tuple[int, Optional[GobType]], _Dec] = {}
        # (wire id, expected type) -> (singleton?, plan), once a value decoded that way
        self._fast: Dict[Tuple[int, int], Tuple[Optional[GobType], bool, _Dec]] = {}
        self.broken = False

    # framing --------------------------------------------------------------------------
    def _read_message(self) -> bytes:
        first = self._read(1)   # failing here, before a byte of the message, leaves the stream in sync
        if not first:
            raise EOFError("end of gob stream")
        try:
            b = first[0]
            if b < 0x80:
                n = b
            else:
                k = 256 - b
                if k > 8:
                    raise ProtocolError("gob: bad message length")
                raw = self._read(k)
                if len(raw) != k:
                    raise ProtocolError("gob: unexpected EOF")
                n = int.from_bytes(raw, "big")
            if n == 0 or n > self._max:
                raise ProtocolError(f"gob: message length {n} out of range")
            body = self._read(n)
            if len(body) != n:
                raise ProtocolError("gob: unexpected EOF")
            return bytes(body)
        except EOFError:   # a reader that raises instead of returning short: cut mid-message
            self.broken = True
            raise ProtocolError("gob: unexpected EOF") from None
        except BaseException:
            self.broken = True
            raise

    def decode(self, t: Optional[GobType]) -> Any:
        """Read definitions, then one value decoded as t (t=None: read and discard)."""
        tid, buf, pos = self.next_value()
        return self.value(tid, buf, pos, t)

    def next_value(self) -> Tuple[int, bytes, int]:
        """Read definitions up to the next value message: (its type id, the message, where
        the value starts). value() decodes it; a caller that knows the layout of a type may
        read the bytes itself (see struct_fields)."""
        if self.broken:
            raise ProtocolError("gob: stream is broken")
        src = self._src
        while True:
            # an rpc call or reply is two small messages, usually brought by one read
            buf = src.small_message(self._max) if src is not None else None
            if buf is None:
                buf = self._read_message()
            b = buf[0]
            if b < 0x80:   # type ids of one or two bytes (ids < 128), inline
                pos = 1
            elif b == 0xFF and len(buf) > 1:
                b, pos = buf[1], 2
            else:
                b, pos = _rd_uint(buf, 0)
            tid = ~(b >> 1) if b & 1 else b >> 1
            if tid < 0:
                self._define(-tid, buf, pos)
                continue
            return tid, buf, pos

    def struct_fields(self, tid: int) -> Optional[Tuple[Tuple[str, int], ...]]:
        """The peer's fields (name, wire type id) of struct type tid in wire order, or None
        if tid is not a struct the peer defined."""
        w = self._wire.get(tid)
        if w is None or w.kind != "struct":
            return None
        return tuple(w.fields)

    def skip(self) -> None:
        self.decode(None)

    def _define(self, tid: int, buf: bytes, pos: int) -> None:
        if tid < FIRST_USER_ID:
            raise ProtocolError(f"gob: type id {tid} below {FIRST_USER_ID}")
        if tid in self._wire:
            raise ProtocolError("gob: duplicate type received")
        if len(self._wire) >= limits.GOB_MAX_TYPES:
            raise ProtocolError("gob: too many type definitions")
        self._def_bytes += len(buf)
        if self._def_bytes > limits.GOB_MAX_TYPE_BYTES:
            raise ProtocolError("gob: type definitions too large")
        self._wire[tid] = _parse_wiretype(buf, pos)

    def value(self, tid: int, buf: bytes, pos: int, t: Optional[GobType]) -> Any:
        """The value of a message next_value() returned, decoded as t."""
        if tid == _ID_BYTES and t is BYTES:   # a keystroke or an echo: [0x00][len < 128][data]
            n = len(buf) - pos - 2
            if 0 <= n < 0x80 and buf[pos] == 0 and buf[pos + 1] == n:
                return buf[pos + 2:]
        elif tid == _ID_INT and t is INT and buf[pos:pos + 1] == b"\x00":   # [0x00][int]
            try:
                v, end = _rd_int(buf, pos + 1)
            except ProtocolError:
                v, end = 0, -1   # the general path below reports it
            if end == len(buf):
                return v
        # keyed by id(t): hashing a type descriptor is a Python-level call; the entry keeps
        # t alive, so the id cannot be reused while it is cached
        fast = self._fast.get((tid, id(t)))
        if fast is not None and fast[0] is t:   # seen before: every check below passed once
            _, singleton, fn = fast
            if singleton:
                if buf[pos:pos + 1] != b"\x00":
                    raise ProtocolError("gob: corrupted data: non-zero delta for singleton")
                pos += 1
            try:
                val, pos = fn(buf, pos, 0)
            except RecursionError:
                raise ProtocolError("gob: value nested too deeply") from None
            if pos != len(buf):
                raise ProtocolError("gob: extra data after value")
            return val
        try:
            if tid not in _BUILTIN_KIND and tid not in self._wire:
                raise ProtocolError(f"gob: unknown type id {tid}")
            w = self._wire.get(tid)
            if w is None or w.kind != "struct":
                delta, pos = _rd_uint(buf, pos)
                if delta != 0:
                    raise ProtocolError("gob: corrupted data: non-zero delta for singleton")
            fn = self._plan(tid, None if t is None else _base(t), 0)
            val, pos = fn(buf, pos, 0)
        except RecursionError:
            raise ProtocolError("gob: value nested too deeply") from None
        if pos != len(buf):
            raise ProtocolError("gob: extra data after value")
        self._fast[(tid, id(t))] = (t, w is None or w.kind != "struct", fn)
        return val

    # plans: (wire id, expected type) -> decode function ---------------------------------
    def _plan(self, wid: int, exp: Optional[GobType], cdepth: int) -> _Dec:
        key = (wid, exp)
        fn = self._plans.get(key)
        if fn is not None:
            return fn
        if cdepth > limits.GOB_MAX_DEPTH:
            raise ProtocolError("gob: types nested too deeply")
        if cdepth > 0:
            fn = self._compile(wid, exp, cdepth)
            self._plans[key] = fn
            return fn
        # top level: a failed compile must not leave half-built plans behind
        before = set(self._plans)
        try:
            fn = self._compile(wid, exp, cdepth)
        except BaseException:
            for k in set(self._plans) - before:
                del self._plans[k]
            raise
        self._plans[key] = fn
        return fn

    def _mismatch(self, wid: int, exp: GobType) -> ProtocolError:
        w = self._wire.get(wid)
        wname = _BUILTIN_KIND.get(wid) or (w.kind + " " + repr(w.name) if w else str(wid))
        return ProtocolError(f"gob: type mismatch: wire {wname} for {exp!r}")

    def _compile(self, wid: int, exp: Optional[GobType], cdepth: int) -> _Dec:
        if wid in _BUILTIN_KIND:
            return self._compile_builtin(wid, exp)
        w = self._wire.get(wid)
        if w is None:
            raise ProtocolError(f"gob: unknown type id {wid}")
        if w.kind == "struct":
            return self._compile_struct(wid, w, exp, cdepth)
        if w.kind == "slice":
            return self._compile_slice(w, exp, cdepth, wid)
        if w.kind == "array":
            return self._compile_array(w, exp, cdepth, wid)
        if w.kind == "map":
            return self._compile_map(w, exp, cdepth, wid)
        # BinaryMarshaler / GobEncoder / TextMarshaler: a byte string
        if exp is None or exp.kind in ("bm", "bytes") or (
                exp.kind == "array" and exp.elem == UINT8):  # type: ignore[attr-defined]
            return _bytes_dec(exp)
        raise self._mismatch(wid, exp)

    def _compile_builtin(self, wid: int, exp: Optional[GobType]) -> _Dec:
        if exp is None:
            if wid in (_ID_BYTES, _ID_STRING):
                return _skip_bytes
            if wid == _ID_COMPLEX:
                return _skip_complex
            if wid == _ID_INTERFACE:
                return _interface
            return _skip_uint
        k = exp.kind
        if wid == _ID_BOOL and k == "bool":
            return _dec_bool
        if wid == _ID_INT and k == "int":
            return _ranged_dec(_rd_int, exp)  # type: ignore[arg-type]
        if wid == _ID_UINT and k == "uint":
            return _ranged_dec(_rd_uint, exp)  # type: ignore[arg-type]
        if wid == _ID_FLOAT and k == "float":
            return _dec_float
        if wid == _ID_STRING and k == "string":
            return _dec_string
        if wid == _ID_BYTES and k in ("bytes", "bm"):
            return _bytes_dec(exp)
        if wid == _ID_INTERFACE:
            return _interface
        raise self._mismatch(wid, exp)

    def _compile_struct(self, wid: int, w: _Wire, exp: Optional[GobType], cdepth: int) -> _Dec:
        if exp is not None and not isinstance(exp, Struct):
            raise self._mismatch(wid, exp)
        table: List[Tuple[Optional[str], _Dec]] = []
        nwire = len(w.fields)
        maxd = limits.GOB_MAX_DEPTH
        # Skipping (exp None) builds nothing: every table entry is then (None, skipper).
        immutable: Optional[Dict[str, Any]] = None
        mutable: List[Tuple[str, GobType]] = []
        if exp is not None:
            immutable = {}
            for fname, ft in exp.fields:
                z = zero_value(ft)
                if isinstance(z, (list, dict)):
                    mutable.append((fname, ft))
                else:
                    immutable[fname] = z

        def dec(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
            if depth > maxd:
                raise ProtocolError("gob: value nested too deeply")
            d = None
            if immutable is not None:
                d = dict(immutable)
                for fname, ft in mutable:
                    d[fname] = zero_value(ft)
            field = -1
            while True:
                delta = buf[pos] if pos < len(buf) else 0x80
                if delta < 0x80:   # the one-byte case, inline
                    pos += 1
                else:
                    delta, pos = _rd_uint(buf, pos)
                if delta == 0:
                    return d, pos
                field += delta
                if field >= nwire:
                    raise ProtocolError("gob: field number out of range")
                fname, fdec = table[field]
                val, pos = fdec(buf, pos, depth + 1)
                if fname is not None:
                    d[fname] = val  # type: ignore[index]
        # registered before the fields are compiled so that recursive wire types terminate
        self._plans[(wid, exp)] = dec
        exp_fields = dict(exp.fields) if exp is not None else {}
        for fname, fid in w.fields:
            ft = exp_fields.get(fname)
            if ft is None:
                table.append((None, self._plan(fid, None, cdepth + 1)))
            else:
                table.append((fname, self._plan(fid, _base(ft), cdepth + 1)))
        return dec

    def _compile_slice(self, w: _Wire, exp: Optional[GobType], cdepth: int, wid: int) -> _Dec:
        if exp is not None and not isinstance(exp, Slice):
            raise self._mismatch(wid, exp)
        cell: List[_Dec] = []
        keep = exp is not None

        def dec(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
            n, pos = _rd_uint(buf, pos)
            if n > limits.GOB_MAX_SLICE or n > len(buf) - pos:
                raise ProtocolError(f"gob: slice of {n} elements exceeds the limits")
            return _elements(cell[0], n, buf, pos, depth, keep)
        self._plans[(wid, exp)] = dec
        eexp = None if exp is None else exp.elem  # type: ignore[attr-defined]
        cell.append(self._plan(w.elem, eexp, cdepth + 1))
        return dec

    def _compile_array(self, w: _Wire, exp: Optional[GobType], cdepth: int, wid: int) -> _Dec:
        as_bytes = False
        if exp is not None:
            if exp.kind == "array" and exp.length == w.length:  # type: ignore[attr-defined]
                as_bytes = exp.elem == UINT8  # type: ignore[attr-defined]
                eexp: Optional[GobType] = exp.elem  # type: ignore[attr-defined]
            elif exp.kind in ("bm", "bytes") and w.elem == _ID_UINT and (
                    getattr(exp, "size", None) in (None, w.length)):
                as_bytes, eexp = True, UINT8   # tolerate [N]byte where a marshaler is expected
            else:
                raise self._mismatch(wid, exp)
        else:
            eexp = None
        length = w.length
        cell: List[_Dec] = []
        keep = exp is not None

        def dec(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
            n, pos = _rd_uint(buf, pos)
            if n != length:
                raise ProtocolError("gob: length mismatch in array")
            if n > len(buf) - pos:
                raise ProtocolError("gob: array exceeds the message")
            out, pos = _elements(cell[0], n, buf, pos, depth, keep)
            return (bytes(out) if as_bytes else out), pos
        self._plans[(wid, exp)] = dec
        cell.append(self._plan(w.elem, eexp, cdepth + 1))
        return dec

    def _compile_map(self, w: _Wire, exp: Optional[GobType], cdepth: int, wid: int) -> _Dec:
        if exp is not None and not isinstance(exp, Map):
            raise self._mismatch(wid, exp)
        cell: List[_Dec] = []
        maxd = limits.GOB_MAX_DEPTH

        def dec(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
            if depth > maxd:
                raise ProtocolError("gob: value nested too deeply")
            n, pos = _rd_uint(buf, pos)
            if n > limits.GOB_MAX_SLICE or 2 * n > len(buf) - pos:
                raise ProtocolError(f"gob: map of {n} entries exceeds the limits")
            kdec, vdec = cell
            out = {}
            for _ in range(n):
                k, pos = kdec(buf, pos, depth + 1)
                v, pos = vdec(buf, pos, depth + 1)
                if exp is not None:
                    try:
                        out[k] = v
                    except TypeError:
                        raise ProtocolError("gob: unhashable map key") from None
            return (None if exp is None else out), pos
        self._plans[(wid, exp)] = dec
        kexp = None if exp is None else exp.key  # type: ignore[attr-defined]
        eexp = None if exp is None else exp.elem  # type: ignore[attr-defined]
        cell.append(self._plan(w.key, kexp, cdepth + 1))
        cell.append(self._plan(w.elem, eexp, cdepth + 1))
        return dec


def _elements(edec: _Dec, n: int, buf: bytes, pos: int, depth: int, keep: bool) -> Tuple[Any, int]:
    """n values of a slice or array; when skipping (keep=False) nothing is kept, so an
    unwanted field costs no memory however many elements it has."""
    if depth > limits.GOB_MAX_DEPTH:
        raise ProtocolError("gob: value nested too deeply")
    if not keep:
        for _ in range(n):
            pos = edec(buf, pos, depth + 1)[1]
        return None, pos
    out = []
    for _ in range(n):
        v, pos = edec(buf, pos, depth + 1)
        out.append(v)
    return out, pos


def _skip_uint(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    return None, _rd_uint(buf, pos)[1]


def _skip_complex(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    pos = _rd_uint(buf, pos)[1]
    return None, _rd_uint(buf, pos)[1]


def _skip_bytes(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    return None, _rd_bytes(buf, pos)[1]


def _interface(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    raise ProtocolError("gob: interface values are not supported")


def _dec_bool(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    u, pos = _rd_uint(buf, pos)
    return u != 0, pos


def _dec_float(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    u, pos = _rd_uint(buf, pos)
    return _bits_float(u), pos


def _dec_string(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    b, pos = _rd_bytes(buf, pos)
    return str(b, "utf-8", "surrogateescape"), pos


def _dec_bytes(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
    return _rd_bytes(buf, pos)


def _ranged_dec(rd: Callable[[bytes, int], Tuple[int, int]], t: Basic) -> _Dec:
    lo, hi = t.lo, t.hi

    unsigned = rd is _rd_uint

    def dec(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
        if pos < len(buf) and buf[pos] < 0x80:   # the one-byte case, inline
            v = buf[pos]
            if not unsigned:
                v = ~(v >> 1) if v & 1 else v >> 1
            pos += 1
        else:
            v, pos = rd(buf, pos)
        if not lo <= v <= hi:  # type: ignore[operator]
            raise ProtocolError(f"gob: value {v} out of range for {t.name}")
        return v, pos
    return dec


def _bytes_dec(exp: Optional[GobType]) -> _Dec:
    if exp is None:
        return _skip_bytes
    size = getattr(exp, "size", None)
    if exp.kind == "array":
        size = exp.length  # type: ignore[attr-defined]
    if size is None:
        return _dec_bytes

    def dec(buf: bytes, pos: int, depth: int) -> Tuple[Any, int]:
        b, pos = _rd_bytes(buf, pos)
        if len(b) != size:
            raise ProtocolError(f"gob: {exp.name} must be {size} bytes, got {len(b)}")
        return b, pos
    return dec


def loads(t: Optional[GobType], data: bytes) -> Any:
    """Decode one value (with its definitions) from a complete byte string; the whole
    string must be consumed (e.g. the gob part of a dmsg SignedObject)."""
    view = memoryview(bytes(data))
    pos = 0

    def read_exact(n: int) -> bytes:
        nonlocal pos
        chunk = view[pos:pos + n]
        pos += len(chunk)
        return chunk.tobytes()

    val = Decoder(read_exact).decode(t)
    if pos != len(view):
        raise ProtocolError("gob: trailing data after value")
    return val
