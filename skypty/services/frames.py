"""What the two stream subsystems share on the wire: `[u8 tag][u32 BE length][payload]` frames
(exec-stream's framed body, both directions of pty-stream) and JSON read as strictly as Go's
decoder reads it. Light on purpose: the pty-stream client imports it."""
from __future__ import annotations

import json
import struct
from typing import Any

__all__ = ["FRAME_HEAD", "encode_frame", "loads_strict"]

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


def _reject_constant(token: str):
    raise ValueError(f"invalid JSON value {token}")
