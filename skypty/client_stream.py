"""The exec-stream and node-RPC clients of `cli pty exec` (`--stream`, `--rpc`).

Split from client.py, which re-exports these names: the common path (a buffered exec or a
shell over TCP) then has less Python to compile on every cold start.
"""
from __future__ import annotations

import errno
import socket
import sys
import time
from typing import Dict, Optional, Sequence

from . import limits
from .client import _result_defaults, _write_all, dial_optional_uri_tcp
from .dest import Dest
from .errors import ProtocolError, SkyptyError, UsageError
from .keys import SecKey

__all__ = ["exec_stream_tcp", "node_exec"]


# ---------------------------------------------------------------------------------- exec-stream

class _HTTPReader:
    """Bounded line/chunk reader over a stream with `recv` (one HTTP/1.1 response)."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self._buf = bytearray()

    def _fill(self, n: int = 65536) -> bool:
        data = self._conn.recv(n)
        if not data:
            return False
        self._buf += data
        return True

    def readline(self, limit: int = 8192) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                return line.rstrip(b"\r\n")
            if len(self._buf) > limit:
                raise ProtocolError("exec-stream: HTTP line too long")
            # a line at a time: what follows a chunk-size line is that chunk, which read_some
            # then takes from the connection itself, not copied through this buffer
            if not self._fill(256):
                raise ProtocolError("exec-stream: connection closed mid-response")

    def read_some(self, n: int) -> bytes:
        if not self._buf:
            return self._conn.recv(n)   # nothing buffered: the read as it came, not copied twice
        with memoryview(self._buf) as m:
            out = bytes(m[:n])
        del self._buf[:n]
        return out

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            part = self.read_some(n - len(out))
            if not part:
                raise ProtocolError("exec-stream: connection closed mid-response")
            out += part
        return bytes(out)


def _read_headers(r: _HTTPReader, cap: int = 100) -> Dict[str, str]:
    headers: Dict[str, str] = {}
    for _ in range(cap):
        line = r.readline()
        if not line:
            return headers
        k, sep, v = line.decode("latin-1").partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    raise ProtocolError("exec-stream: too many header lines")


def _body_chunks(r: _HTTPReader, headers: Dict[str, str]):
    """Yield the body's bytes as they arrive (chunked, Content-Length or close-delimited)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = r.readline().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise ProtocolError(f"exec-stream: bad chunk size {size_line[:20]!r}") from None
            if size == 0:
                headers.update(_read_headers(r))   # trailers
                return
            left = size
            while left:
                part = r.read_some(min(left, 65536))
                if not part:
                    raise ProtocolError("exec-stream: connection closed mid-chunk")
                left -= len(part)
                yield part
            r.read_exact(2)
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            part = r.read_some(min(left, 65536))
            if not part:
                raise ProtocolError("exec-stream: connection closed mid-body")
            left -= len(part)
            yield part
    else:
        while True:
            part = r.read_some(65536)
            if not part:
                return
            yield part


class _Sink:
    """Where streamed output goes: live to our stdout/stderr, or kept (capped) for --json."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.bufs = {1: bytearray(), 2: bytearray()}
        self.truncated = {1: False, 2: False}

    def write(self, tag: int, data: bytes) -> None:
        if tag == 0:
            return      # keepalive (its payload, if any, means nothing)
        if self.keep:
            buf = self.bufs[tag]
            room = limits.EXEC_OUTPUT_CAP - len(buf)
            if len(data) > room:
                self.truncated[tag] = True
                data = data[:max(room, 0)]
            buf += data
        else:
            try:
                _write_all(sys.stdout.buffer if tag == 1 else sys.stderr.buffer, data)
            except BrokenPipeError:
                raise _OutputClosed() from None


class _OutputClosed(Exception):
    """Our stdout/stderr reader went away (`… | head`): not a failure of the connection."""


def exec_stream_tcp(dest: Dest, sk: SecKey, name: str, argv: Sequence[str], env: Sequence[str],
                    timeout_ms: int, keep: bool = False) -> Optional[dict]:
    """Run one command over the exec-stream subsystem, output delivered as it is produced.

    Returns a CommandExecResult-shaped dict (Stdout/Stderr filled only when `keep`), or None when
    the host has no exec-stream subsystem (it answered the mux request with 0x01).
    """
    import json

    from .netutil import steady_allocator
    from .services.execstream import EXEC_STREAM_URI, MEDIA_TYPE as media

    steady_allocator()   # a download: see netutil

    conn = dial_optional_uri_tcp(dest.host, dest.port, dest.pk, sk, EXEC_STREAM_URI)
    if conn is None:
        return None
    started = time.monotonic()
    sink = _Sink(keep)
    try:
        body = {"name": name}
        if argv:
            body["arg"] = list(argv)
        if env:
            body["env"] = list(env)
        body["timeout_ms"] = int(timeout_ms)
        payload = json.dumps(body).encode()
        head = (f"POST /exec HTTP/1.1\r\nHost: dmsgpty\r\nUser-Agent: skypty\r\nContent-Length: {len(payload)}\r\n"
                f"Accept: {media}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n").encode()
        conn.sendall(head + payload)
        # The host bounds the command; this only catches a host that vanished without a FIN.
        conn.settimeout(timeout_ms / 1000.0 + 2 * limits.EXECSTREAM_KEEPALIVE)
        r = _HTTPReader(conn)
        status = r.readline().decode("latin-1")
        parts = status.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ProtocolError(f"exec-stream: bad status line {status[:60]!r}")
        headers = _read_headers(r)
        if parts[1] != "200":
            text = b"".join(_capped(_body_chunks(r, headers), 4096)).decode("utf-8", "replace").strip()
            raise SkyptyError(f"exec-stream: HTTP {parts[1]}: {text.splitlines()[0] if text else status}")
        framed = headers.get("content-type", "").split(";")[0].strip() == media
        if framed:
            _read_frames(_body_chunks(r, headers), sink)
        else:
            for part in _body_chunks(r, headers):
                sink.write(1, part)
    except socket.timeout:
        raise SkyptyError("exec-stream: the host stopped answering") from None
    except _OutputClosed:
        # closing the connection below ends the remote command; main() exits quietly on this
        raise BrokenPipeError(errno.EPIPE, "output closed") from None
    except OSError as e:
        raise SkyptyError(f"exec-stream: connection lost: {e.strerror or e}") from None
    finally:
        conn.close()
    code = headers.get("x-exec-exit-code")
    if code is None:
        raise SkyptyError("exec-stream: stream ended before the command reported an exit code")
    if headers.get("x-exec-error"):
        sink.write(2, (headers["x-exec-error"] + "\n").encode())
    try:
        dur = int(headers.get("x-exec-duration-ms") or 0)
        exit_code = int(code)
    except ValueError:
        raise ProtocolError(f"exec-stream: bad exit-code trailer {code[:20]!r}") from None
    return {"Stdout": bytes(sink.bufs[1]), "Stderr": bytes(sink.bufs[2]),
            "StdoutTruncated": sink.truncated[1], "StderrTruncated": sink.truncated[2],
            "ExitCode": exit_code, "TimedOut": headers.get("x-exec-timed-out", "").lower() == "true",
            "DurationMS": dur or int((time.monotonic() - started) * 1000)}


def _capped(chunks, cap: int):
    got = 0
    for c in chunks:
        if got >= cap:
            continue    # drain so trailers are read, keep nothing
        got += len(c)
        yield c


def _read_frames(chunks, sink: _Sink) -> None:
    """[u8 tag][u32 BE len][payload] frames; they may straddle HTTP chunks. A payload goes on
    as a view of the chunk it came in: a bulk download's bytes are not copied here at all."""
    hdr = b""          # a frame header cut short by the end of a chunk
    tag = left = 0     # the frame being read and how many of its payload bytes are to come
    for part in chunks:
        pos, n = 0, len(part)
        view = None
        while pos < n:
            if not left:
                take = min(5 - len(hdr), n - pos)
                hdr += part[pos:pos + take]
                pos += take
                if len(hdr) < 5:
                    break
                tag, left = hdr[0], int.from_bytes(hdr[1:5], "big")
                hdr = b""
                if tag > 2:
                    raise ProtocolError(f"exec-stream: unknown frame tag {tag}")
                if left > limits.EXECSTREAM_MAX_FRAME_PAYLOAD:
                    raise ProtocolError(f"exec-stream: frame of {left} bytes > max")
                continue
            take = min(left, n - pos)
            if take == n:
                sink.write(tag, part)
            else:
                if view is None:
                    view = memoryview(part)
                sink.write(tag, view[pos:pos + take])   # deliver partial frames live
            pos += take
            left -= take
    if hdr or left:
        raise ProtocolError("exec-stream: body ended inside a frame")


# ---------------------------------------------------------------------------------- node RPC

def node_exec(rpc_addr: str, dest: Dest, scheme: str, name: str, argv: Sequence[str], env: Sequence[str],
              timeout_ms: int) -> dict:
    """`app-visor.DmsgPtyExec` on the local node (pty.md §11)."""
    from . import gob
    from .gobtypes import CommandExecReq, CommandExecResult, PubKey as PubKeyT
    from .rpc import RPCClient

    host, _, port_s = rpc_addr.rpartition(":")
    host = host.strip("[]") or "localhost"
    try:
        port = int(port_s)
    except ValueError:
        raise UsageError(f"--rpc wants host:port, got {rpc_addr!r}") from None
    try:
        sock = socket.create_connection((host, port), timeout=limits.NODE_RPC_DIAL_TIMEOUT)
    except OSError:
        raise SkyptyError(f"no local node RPC at {rpc_addr} (is the node running? or reach the host"
                          " directly with tcp://<pk>@host:port or --via)") from None
    sock.settimeout(None)
    args_t = gob.Struct("DmsgPtyExecArgs", [("RemotePK", PubKeyT), ("RemotePort", gob.UINT16),
                                            ("Req", CommandExecReq), ("Scheme", gob.STRING)])
    req = {"Name": name, "Arg": list(argv), "Env": list(env), "Stdin": b"", "TimeoutMS": int(timeout_ms)}
    arg = {"RemotePK": bytes(dest.pk), "RemotePort": dest.port, "Req": req, "Scheme": scheme}
    client = RPCClient(sock)
    try:
        res = client.call("app-visor.DmsgPtyExec", args_t, arg, CommandExecResult,
                          timeout=timeout_ms / 1000.0 + limits.NODE_RPC_BUDGET + limits.EXEC_CALL_SLACK)
    finally:
        client.close()
        sock.close()
    return _result_defaults(res)
