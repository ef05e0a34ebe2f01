"""What the two stream subsystems share on the wire: `[u8 tag][u32 BE length][payload]` frames
(exec-stream's framed body, both directions of pty-stream) and JSON read as strictly as Go's
decoder reads it. Light on purpose: the pty-stream client imports it."""
from __future__ import annotations

import json
import struct
from typing import Any

__all__ = ["FRAME_HEAD", "encode_frame", "loads_strict", "json_field"]

FRAME_HEAD = struct.Struct(">BI")   # [u8 tag][u32 BE payload length]


def encode_frame(tag: int, payload: bytes = b"") -> bytes:
    return FRAME_HEAD.pack(tag, len(payload)) + payload


def loads_strict(body: bytes) -> Any:
    """The JSON value in body; ValueError (with the reason) for anything Go would refuse too:
    bad UTF-8, bad JSON, NaN/Infinity (Python accepts them), nesting deeper than the parser."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:   # 1 MiB of "[" nests deeper than the parser's stack
        raise ValueError("nested too deeply") from None


def json_field(obj: dict, key: str, kind: type, what: str, zero, items: type = None):
    """obj[key] as Go's decoder fills a struct field: keys match case-insensitively (an exact
    match first), null or absent is the zero value, and any other type is a ValueError ("key
    must be <what>"), never a default; a bool is not an int; `items`: every element's type."""
    value = obj.get(key)
    if value is None and key not in obj:
        folded = key.lower()
        value = next((v for k, v in obj.items() if k.lower() == folded), None)
    if value is None:
        return zero
    if (not isinstance(value, kind) or isinstance(value, bool)
            or (items is not None and not all(isinstance(v, items) for v in value))):
        raise ValueError(f"{key} must be {what}")
    return value


def _reject_constant(token: str):
    raise ValueError(f"invalid JSON value {token}")
