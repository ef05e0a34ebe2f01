"""Exec-stream subsystem (pty.md §4.6): one HTTP/1.1 exchange on a mux connection.

POST /exec with a JSON body; the output streams back with chunked encoding, either framed
(`[u8 tag][u32 BE len][payload]`, tag 0 keepalive, 1 stdout, 2 stderr) when Accept is the
exact media type, or as plain text. Exit status travels in HTTP trailers.
The one request is parsed by hand, every read bounded in size and time. Parsing is strict
where leniency lets two parsers disagree on where a body ends (request smuggling): both
Content-Length and Transfer-Encoding, conflicting lengths, or a chunk size that is not plain
hex are refused with 400. The JSON body's fields are type-checked as Go's decoder would.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
import time
from email.utils import formatdate
from typing import Dict, Optional, Tuple

from skypty import limits
from skypty.netutil import close_after_drain, close_conn
from skypty.services.exec import SpawnError, clamp_timeout_ms, describe_peer, pump, spawn
from skypty.services.frames import FRAME_HEAD, encode_frame, json_field, loads_strict

__all__ = ["EXEC_STREAM_URI", "MEDIA_TYPE", "TAG_KEEPALIVE", "TAG_STDOUT", "TAG_STDERR",
           "serve_exec_stream", "encode_frame"]

# PROVISIONAL: upstream's ExecStreamURI constant was not found (pty.md §13.1). This is the one
# place the string lives; change it here when the Go value is known.
EXEC_STREAM_URI = "dmsgpty/exec-stream"

MEDIA_TYPE = "application/vnd.skywire.exec-stream.v1"
TAG_KEEPALIVE, TAG_STDOUT, TAG_STDERR = 0, 1, 2
_TRAILERS = ("X-Exec-Exit-Code", "X-Exec-Timed-Out", "X-Exec-Duration-Ms", "X-Exec-Error")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Request Entity Too Large", 431: "Request Header Fields Too Large"}

log = logging.getLogger("skypty.execstream")

_DIGITS = re.compile(rb"[0-9]{1,19}\Z")         # a Content-Length (ASCII digits only)
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}\Z")      # a chunk size (no 0x, sign or underscore)


class _HTTPError(Exception):
    def __init__(self, status: int, msg: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(msg)
        self.status = status
        self.headers = headers or {}



class _Reader:
    """Bounded reads from the connection against one overall deadline."""

    def __init__(self, conn, deadline: float):
        self.conn = conn
        self.deadline = deadline
        self.buf = bytearray()

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.conn.settimeout(left)
        data = self.conn.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def headers(self, cap: int) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                if end > cap:
                    raise _HTTPError(431, "exec-stream: request header too large")
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > cap:
                raise _HTTPError(431, "exec-stream: request header too large")
            self._fill()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def line(self, cap: int) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                out = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return out
            if len(self.buf) > cap:
                raise _HTTPError(400, "exec-stream: read body: malformed chunked encoding")
            self._fill()


def _parse_head(head: bytes) -> Tuple[str, str, Dict[str, str]]:
    try:
        text = head.decode("latin-1")
    except UnicodeError:  # pragma: no cover - latin-1 decodes everything
        raise _HTTPError(400, "exec-stream: malformed request")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HTTPError(400, "exec-stream: malformed request line")
    method, target = parts[0], parts[1]
    hdrs: Dict[str, str] = {}
    for ln in lines[1:]:
        if not ln:
            continue
        name, sep, value = ln.partition(":")
        # a bare CR, LF or NUL would end the line for some other parser: refuse, don't guess
        bad_char = "\r" in ln or "\n" in ln or "\0" in ln
        if bad_char or not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise _HTTPError(400, "exec-stream: malformed header line")
        key = name.lower()
        value = value.strip()
        if key == "content-length" and key in hdrs and hdrs[key] != value:
            raise _HTTPError(400, "exec-stream: conflicting Content-Length headers")
        hdrs[key] = hdrs[key] + ", " + value if key in hdrs and key != "content-length" else value
    if "transfer-encoding" in hdrs and "content-length" in hdrs:
        raise _HTTPError(400, "exec-stream: both Transfer-Encoding and Content-Length")
    if target.startswith("http://") or target.startswith("https://"):
        rest = target.split("://", 1)[1]
        target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    path = target.split("?", 1)[0]
    return method, path, hdrs


def _read_body(rd: _Reader, hdrs: Dict[str, str]) -> bytes:
    cap = limits.EXECSTREAM_BODY_MAX
    te = hdrs.get("transfer-encoding", "").lower()
    if te:
        if te != "chunked":
            raise _HTTPError(400, f"exec-stream: read body: unsupported transfer encoding {te}")
        body = bytearray()
        while True:
            size_line = rd.line(1024).split(b";", 1)[0].strip()
            if not _HEX.match(size_line):
                raise _HTTPError(400, "exec-stream: read body: malformed chunked encoding")
            size = int(size_line, 16)
            if len(body) + size > cap:
                raise _HTTPError(400, "exec-stream: read body: http: request body too large")
            if size == 0:
                trailer_bytes = 0
                while True:  # request trailers: read (bounded) and ignored
                    ln = rd.line(limits.EXECSTREAM_TRAILER_MAX)
                    trailer_bytes += len(ln) + 2
                    if trailer_bytes > limits.EXECSTREAM_TRAILER_MAX:
                        raise _HTTPError(431, "exec-stream: request trailers too large")
                    if not ln:
                        return bytes(body)
            body += rd.exact(size)
            if rd.exact(2) != b"\r\n":
                raise _HTTPError(400, "exec-stream: read body: malformed chunked encoding")
    cl = hdrs.get("content-length")
    if cl is None:
        return b""
    if not _DIGITS.match(cl.encode("latin-1")):
        raise _HTTPError(400, f"exec-stream: bad Content-Length {cl!r}")
    n = int(cl)
    if n > cap:
        raise _HTTPError(400, "exec-stream: read body: http: request body too large")
    return rd.exact(n)


def _parse_request(body: bytes) -> dict:
    try:
        obj = loads_strict(body)
    except ValueError as e:
        raise _HTTPError(400, f"exec-stream: bad json: {e}")
    if not isinstance(obj, dict):
        raise _HTTPError(400, "exec-stream: bad json: not an object")
    try:
        name = json_field(obj, "name", str, "a string", "")
        args = json_field(obj, "arg", list, "a list of strings", [], items=str)
        env = json_field(obj, "env", list, "a list of strings", [], items=str)
        stdin_b64 = json_field(obj, "stdin", str, "base64", "")
        timeout_ms = json_field(obj, "timeout_ms", int, "an integer", 0)
    except ValueError as e:
        raise _HTTPError(400, f"exec-stream: bad json: {e}")
    if not name:
        raise _HTTPError(400, "exec-stream: empty command name")
    try:
        stdin = base64.b64decode(stdin_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _HTTPError(400, f"exec-stream: bad json: stdin: {e}")
    if len(stdin) > limits.EXEC_STDIN_MAX:
        raise _HTTPError(413, f"exec-stream: stdin {len(stdin)} > max {limits.EXEC_STDIN_MAX}")
    return {"name": name, "arg": args, "env": env, "stdin": stdin,
            "timeout_ms": clamp_timeout_ms(timeout_ms, limits.EXECSTREAM_DEFAULT_TIMEOUT_MS,
                                           limits.EXECSTREAM_MAX_TIMEOUT_MS)}


def _date() -> str:
    return formatdate(usegmt=True)


def _send_error(conn, err: _HTTPError) -> None:
    body = (str(err) + "\n").encode("utf-8", "replace")
    head = [f"HTTP/1.1 {err.status} {_REASONS.get(err.status, 'Error')}"]
    for k, v in err.headers.items():
        head.append(f"{k}: {v}")
    head += ["Content-Type: text/plain; charset=utf-8", "X-Content-Type-Options: nosniff",
             f"Date: {_date()}", f"Content-Length: {len(body)}", "Connection: close", "", ""]
    conn.sendall("\r\n".join(head).encode("latin-1") + body)


class _ChunkedWriter:
    """Writes HTTP chunks; a failed write marks the client gone and fires the cancel pipe."""

    def __init__(self, conn, cancel_w: int):
        self.conn = conn
        self.cancel_w = cancel_w
        self.dead = False
        self._lock = threading.Lock()
        self._finished = False

    def chunk(self, data: bytes, head: bytes = b"") -> None:
        """One HTTP chunk of head + data, put together in one copy (a download's every byte
        passes here)."""
        size = len(head) + len(data)
        if self.dead or not size:
            return
        try:
            self.conn.sendall(b"".join((b"%x\r\n" % size, head, data, b"\r\n")))
        except Exception:  # noqa: B902 - any transport failure means the client is gone
            self.gone()

    def gone(self) -> None:
        with self._lock:
            if self.dead or self._finished:
                return
            self.dead = True
            try:
                os.write(self.cancel_w, b"x")
            except OSError:
                pass

    def finish(self) -> None:
        # after this the cancel pipe may close: a late watcher must not write to a reused fd
        with self._lock:
            self._finished = True


def serve_exec_stream(conn, query=None, peer=None) -> None:
    """Serve one exec-stream exchange on `conn` (after the mux's 0x00), then close it."""
    try:
        _serve(conn, peer)
    except Exception as e:  # noqa: B902 - one bad request must never hurt the host
        log.debug("exec-stream: %s", e)
    finally:
        close_conn(conn)   # also wakes our watcher thread blocked in recv()


def _serve(conn, peer) -> None:
    start = time.monotonic()
    rd = _Reader(conn, start + limits.EXECSTREAM_HEADER_TIMEOUT)
    try:
        head = rd.headers(limits.EXECSTREAM_HEADER_MAX)
        method, path, hdrs = _parse_head(head)
        if method != "POST":
            raise _HTTPError(405, "exec-stream: POST /exec only", {"Allow": "POST"})
        if path != "/exec":
            raise _HTTPError(404, f"exec-stream: unknown path {path}")
        if hdrs.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        rd.deadline = start + limits.EXECSTREAM_READ_TIMEOUT
        req = _parse_request(_read_body(rd, hdrs))
    except _HTTPError as e:
        log.info("exec-stream: %d for %s: %s", e.status, describe_peer(peer), e)
        _send_error(conn, e)
        # the answer must reach the client: closing on unread input would reset it away
        close_after_drain(conn, limits.EXECSTREAM_DRAIN_MAX, limits.CLOSE_DRAIN_TIMEOUT)
        return
    except (TimeoutError, EOFError, OSError):
        return  # nobody to answer, or too slow: drop the connection like a Go server
    conn.settimeout(None)
    framed = hdrs.get("accept", "") == MEDIA_TYPE
    _run(conn, req, framed, peer)


def _run(conn, req: dict, framed: bool, peer) -> None:
    cancel_r, cancel_w = os.pipe()
    out = _ChunkedWriter(conn, cancel_w)
    head = ["HTTP/1.1 200 OK",
            "Content-Type: " + (MEDIA_TYPE if framed else "text/plain; charset=utf-8"),
            "Trailer: " + ", ".join(_TRAILERS), "Transfer-Encoding: chunked",
            f"Date: {_date()}", "Connection: close", "", ""]
    watcher = None
    try:
        try:
            conn.sendall("\r\n".join(head).encode("latin-1"))
        except OSError:
            return
        if framed:
            def emit(tag: int):
                def cb(data: bytes) -> None:
                    for i in range(0, len(data), limits.EXECSTREAM_MAX_FRAME_PAYLOAD):
                        piece = data[i:i + limits.EXECSTREAM_MAX_FRAME_PAYLOAD]   # all of it: no copy
                        out.chunk(piece, head=FRAME_HEAD.pack(tag, len(piece)))
                return cb
            on_out, on_err = emit(TAG_STDOUT), emit(TAG_STDERR)
        else:
            on_out = on_err = out.chunk
        t0 = time.monotonic()
        error = ""
        try:
            proc = spawn(req["name"], req["arg"], req["env"], stdin=bool(req["stdin"]))
        except SpawnError as e:
            code, timed_out, error = -1, False, str(e)
        else:
            log.info("exec-stream: %s (pid %d) for %s", req["name"], proc.pid, describe_peer(peer))
            # a client that goes away cancels the command, as Go's request context does
            watcher = threading.Thread(target=_watch_client, args=(conn, out), daemon=True,
                                       name="execstream-watch")
            watcher.start()
            timed_out = pump(proc, req["stdin"], t0 + req["timeout_ms"] / 1000.0, on_out, on_err,
                             cancel_fd=cancel_r,
                             tick=(lambda: out.chunk(encode_frame(TAG_KEEPALIVE, b""))) if framed else None,
                             tick_interval=limits.EXECSTREAM_KEEPALIVE if framed else None)
            if out.dead:
                return
            code = proc.returncode if proc.returncode is not None and proc.returncode >= 0 else -1
            if timed_out:
                code = -1
        trailers = [f"X-Exec-Exit-Code: {code}", f"X-Exec-Timed-Out: {'true' if timed_out else 'false'}",
                    f"X-Exec-Duration-Ms: {int((time.monotonic() - t0) * 1000)}"]
        if error:
            trailers.append("X-Exec-Error: " + error.replace("\r", " ").replace("\n", " "))
        try:
            conn.sendall(("0\r\n" + "\r\n".join(trailers) + "\r\n\r\n").encode("utf-8", "replace"))
        except OSError:
            pass
    finally:
        out.finish()
        os.close(cancel_r)
        os.close(cancel_w)


def _watch_client(conn, out: _ChunkedWriter) -> None:
    """Read (and ignore) anything more from the client; EOF or an error means it left."""
    try:
        while not out.dead:
            if not conn.recv(4096):
                break
    except Exception:  # noqa: B902 - the connection closing under us is the normal end
        pass
    out.gone()

