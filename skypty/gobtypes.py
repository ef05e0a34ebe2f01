"""The Go types that travel as gob, with their Go names and field names (pty.md §2,
crypto-dmsg.md §5.5). Field order is the gob field number; names are what peers match on.

Values are dicts (see skypty.gob). Byte-string types (BYTES, PubKey, SHA256) decode to bytes.
"""
from __future__ import annotations

from .gob import (BOOL, BYTES, EMPTY, INT, INT64, STRING, UINT16, UINT64, UINT8, Array,
                  BinaryMarshaler, Ptr, Slice, Struct)

__all__ = [
    "EMPTY", "STRINGS", "WinSize", "CommandReq", "CommandReqLegacy", "CommandExecReq", "CommandExecResult",
    "PubKey", "PubKeyArray", "PubKeyList", "PubKeyFixedArray", "PubKeyFixedList",
    "RPC_REQUEST", "RPC_RESPONSE", "SHA256", "Addr", "StreamRequest", "StreamResponse",
    "READ_ARG", "READ_REPLY", "WRITE_ARG", "WRITE_REPLY", "SESSION_ID",
]

# []string as Go names it when first met as a struct field
STRINGS = Slice(STRING, name="[]string")

# --- pty service (pkg/pty) ---------------------------------------------------------------
WinSize = Struct("WinSize", [("X", UINT16), ("Y", UINT16), ("Rows", UINT16), ("Cols", UINT16)])

# The newer skywire CommandReq (with Env). An older peer's CommandReq without Env decodes
# fine (fields match by name; Env stays []), and an older host ignores our Env field.
CommandReq = Struct("CommandReq", [
    ("Name", STRING), ("Arg", STRINGS), ("Size", Ptr(WinSize)), ("Env", STRINGS),
])

# dmsg's CommandReq (before skywire added Env); what the dmsgpty vectors were made with.
CommandReqLegacy = Struct("CommandReq", [("Name", STRING), ("Arg", STRINGS), ("Size", Ptr(WinSize))])

CommandExecReq = Struct("CommandExecReq", [
    ("Name", STRING), ("Arg", STRINGS), ("Env", STRINGS), ("Stdin", BYTES), ("TimeoutMS", INT64),
])

CommandExecResult = Struct("CommandExecResult", [
    ("Stdout", BYTES), ("Stderr", BYTES), ("StdoutTruncated", BOOL), ("StderrTruncated", BOOL),
    ("ExitCode", INT), ("TimedOut", BOOL), ("DurationMS", INT64),
])

# argument / reply types of the simple pty methods
READ_ARG = INT          # pty.Read(n int)
READ_REPLY = BYTES      # -> []byte
WRITE_ARG = BYTES       # pty.Write([]byte)
WRITE_REPLY = INT       # -> int
SESSION_ID = STRING     # pty.StartSession -> string; pty.Attach(string)

# --- cipher.PubKey -------------------------------------------------------------------------
# skywire-utilities' cipher.PubKey implements MarshalBinary, so gob declares it as a
# BinaryMarshaler type named "PubKey" whose value is a 33-byte string. This is what the real
# Go whitelist service and dmsg's Addr send (gob_rpc.json whitelist scenario, dmsg_stream.json).
PubKey = BinaryMarshaler("PubKey", 33)
PubKeyArray = PubKey            # the name docs/architecture.md uses for the whitelist's element
# []cipher.PubKey: named "" because Go first meets it as a top-level rpc argument/reply.
PubKeyList = Slice(PubKey, name="")

# A plain [33]byte PubKey (an old skycoin cipher without MarshalBinary). Only for talking to
# such a peer; the decoder accepts either form wherever a PubKey is expected.
PubKeyFixedArray = Array("PubKey", UINT8, 33)
PubKeyFixedList = Slice(PubKeyFixedArray, name="")

# --- net/rpc ---------------------------------------------------------------------------------
RPC_REQUEST = Struct("Request", [("ServiceMethod", STRING), ("Seq", UINT64)])
RPC_RESPONSE = Struct("Response", [("ServiceMethod", STRING), ("Seq", UINT64), ("Error", STRING)])

# --- dmsg stream objects (SignedObject payloads) ---------------------------------------------
SHA256 = Array("SHA256", UINT8, 32)
Addr = Struct("Addr", [("PK", PubKey), ("Port", UINT16)])
StreamRequest = Struct("StreamRequest", [
    ("Timestamp", INT64), ("SrcAddr", Addr), ("DstAddr", Addr), ("IPinfo", BOOL), ("NoiseMsg", BYTES),
])
StreamResponse = Struct("StreamResponse", [
    ("ReqHash", SHA256), ("Accepted", BOOL), ("IP", BYTES), ("ErrCode", UINT16), ("NoiseMsg", BYTES),
])
