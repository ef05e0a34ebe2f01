"""services/execstream: one HTTP/1.1 exchange per connection, with real processes (pty.md §4.6)."""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time

import pytest

from skypty import limits
from skypty.services import execstream
from skypty.services.execstream import MEDIA_TYPE, serve_exec_stream

pytestmark = pytest.mark.timeout(120)


class Response:
    def __init__(self, status, headers, body, trailers):
        self.status, self.headers, self.body, self.trailers = status, headers, body, trailers

    def frames(self):
        out, b = [], self.body
        while b:
            tag, n = struct.unpack(">BI", b[:5])
            out.append((tag, b[5:5 + n]))
            b = b[5 + n:]
        return out


class _Stream:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _more(self):
        d = self.sock.recv(65536)
        if not d:
            raise EOFError
        self.buf += d

    def until(self, sep):
        while sep not in self.buf:
            self._more()
        i = self.buf.index(sep)
        out, self.buf = self.buf[:i], self.buf[i + len(sep):]
        return out

    def exact(self, n):
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def parse_response(sock, on_chunk=None) -> Response:
    st = _Stream(sock)
    head = st.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = {}
    for ln in head[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    body, trailers = b"", {}
    if headers.get("transfer-encoding") == "chunked":
        while True:
            n = int(st.until(b"\r\n"), 16)
            if n == 0:
                while True:
                    ln = st.until(b"\r\n").decode()
                    if not ln:
                        break
                    k, _, v = ln.partition(":")
                    trailers[k.strip()] = v.strip()
                break
            chunk = st.exact(n)
            assert st.exact(2) == b"\r\n"
            body += chunk
            if on_chunk:
                on_chunk(chunk)
    else:
        body = st.exact(int(headers.get("content-length", "0")))
    return Response(status, headers, body, trailers)


def request_bytes(obj=None, *, method="POST", path="/exec", accept=MEDIA_TYPE, raw_body=None, extra=""):
    body = raw_body if raw_body is not None else (json.dumps(obj).encode() if obj is not None else b"")
    head = f"{method} {path} HTTP/1.1\r\nHost: dmsgpty\r\nUser-Agent: Go-http-client/1.1\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    head += f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n{extra}\r\n"
    return head.encode() + body


class Served:
    """serve_exec_stream on one end of a socketpair, in a thread."""

    def __init__(self):
        self.client, server = socket.socketpair()
        self.t = threading.Thread(target=serve_exec_stream, args=(server, {}, None), daemon=True)
        self.t.start()

    def exchange(self, data: bytes, on_chunk=None) -> Response:
        # send from a thread: the server may answer (and stop reading) before the body is in
        def send():
            try:
                self.client.sendall(data)
            except OSError:
                pass
        t = threading.Thread(target=send, daemon=True)
        t.start()
        r = parse_response(self.client, on_chunk)
        t.join(30)
        return r

    def close(self):
        self.client.close()
        self.t.join(30)
        assert not self.t.is_alive()


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def test_framed_stdout_stderr_and_trailers(served):
    r = served.exchange(request_bytes({"name": "sh", "arg": ["-c", "echo out; echo err >&2; exit 7"]}))
    assert r.status == 200
    assert r.headers["content-type"] == MEDIA_TYPE
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.headers["trailer"] == "X-Exec-Exit-Code, X-Exec-Timed-Out, X-Exec-Duration-Ms, X-Exec-Error"
    frames = r.frames()
    assert b"".join(p for t, p in frames if t == 1) == b"out\n"
    assert b"".join(p for t, p in frames if t == 2) == b"err\n"
    assert r.trailers["X-Exec-Exit-Code"] == "7"
    assert r.trailers["X-Exec-Timed-Out"] == "false"
    assert int(r.trailers["X-Exec-Duration-Ms"]) >= 0
    assert "X-Exec-Error" not in r.trailers


def test_plain_mode_when_accept_differs(served):
    r = served.exchange(request_bytes({"name": "printf", "arg": ["abc"]}, accept=MEDIA_TYPE + ", */*"))
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.body == b"abc"
    assert r.trailers["X-Exec-Exit-Code"] == "0"


def test_stdin_env_and_large_output(served):
    data = os.urandom(700 * 1024)   # base64 of 1 MiB would not fit the 1 MiB + 64 KiB body limit
    r = served.exchange(request_bytes({"name": "sh", "arg": ["-c", 'cat; printf "$XV"'], "env": ["XV=tail"],
                                       "stdin": base64.b64encode(data).decode()}))
    out = b"".join(p for t, p in r.frames() if t == 1)
    assert out == data + b"tail"
    assert all(len(p) <= limits.EXECSTREAM_MAX_FRAME_PAYLOAD for _, p in r.frames())
    # not capped at 16 MiB like Exec: 20 MiB streams through
    s2 = Served()
    try:
        n = 20 * 1024 * 1024
        got = [0]
        r2 = s2.exchange(request_bytes({"name": "head", "arg": ["-c", str(n), "/dev/zero"]}, accept=""),
                         on_chunk=lambda c: got.__setitem__(0, got[0] + len(c)))
        assert got[0] == n and r2.trailers["X-Exec-Exit-Code"] == "0"
    finally:
        s2.close()


def test_timeout(served):
    r = served.exchange(request_bytes({"name": "sh", "arg": ["-c", "echo started; sleep 600"], "timeout_ms": 300}))
    assert r.trailers["X-Exec-Exit-Code"] == "-1"
    assert r.trailers["X-Exec-Timed-Out"] == "true"
    assert b"started" in r.body


def test_spawn_failure(served):
    r = served.exchange(request_bytes({"name": "skypty-no-such-command"}))
    assert r.status == 200
    assert r.trailers["X-Exec-Exit-Code"] == "-1"
    assert r.trailers["X-Exec-Timed-Out"] == "false"
    assert r.trailers["X-Exec-Error"] == 'exec: "skypty-no-such-command": executable file not found in $PATH'


@pytest.mark.parametrize("data,status,text", [
    (request_bytes({"name": "x"}, method="GET"), 405, "exec-stream: POST /exec only\n"),
    (request_bytes({"name": "x"}, path="/other"), 404, "exec-stream: unknown path /other\n"),
    (request_bytes(raw_body=b"{not json"), 400, None),
    (request_bytes({"arg": ["x"]}), 400, "exec-stream: empty command name\n"),
    (request_bytes(raw_body=b" " * (limits.EXECSTREAM_BODY_MAX + 1)), 400, None),
    (b"garbage\r\n\r\n", 400, None),
])
def test_error_statuses(served, data, status, text):
    r = served.exchange(data)
    assert r.status == status
    assert r.headers["connection"] == "close"
    if status == 405:
        assert r.headers["allow"] == "POST"
    if text is not None:
        assert r.body.decode() == text
    else:
        assert r.body.startswith(b"exec-stream: ")


def test_stdin_over_the_cap_is_413(served, monkeypatch):
    monkeypatch.setattr(limits, "EXEC_STDIN_MAX", 10)
    r = served.exchange(request_bytes({"name": "cat", "stdin": base64.b64encode(b"x" * 11).decode()}))
    assert (r.status, r.body) == (413, b"exec-stream: stdin 11 > max 10\n")


def test_oversize_header_is_refused(served):
    served.client.sendall(b"POST /exec HTTP/1.1\r\nX: " + b"a" * (limits.EXECSTREAM_HEADER_MAX + 10))
    r = parse_response(served.client)
    assert r.status == 431


def test_header_deadline(monkeypatch):
    monkeypatch.setattr(limits, "EXECSTREAM_HEADER_TIMEOUT", 0.3)
    s = Served()
    try:
        s.client.sendall(b"POST /exec HTTP/1.1\r\n")   # and never the rest
        s.client.settimeout(30)
        assert s.client.recv(100) == b""                # dropped, nothing written
    finally:
        s.close()


def test_keepalive_frames(monkeypatch):
    monkeypatch.setattr(limits, "EXECSTREAM_KEEPALIVE", 0.05)
    s = Served()
    try:
        r = s.exchange(request_bytes({"name": "sleep", "arg": ["1"]}))
        kinds = [t for t, p in r.frames()]
        assert kinds and set(kinds) == {0}
        assert all(p == b"" for _, p in r.frames())
        assert r.trailers["X-Exec-Exit-Code"] == "0"
    finally:
        s.close()


def test_client_disconnect_kills_the_command():
    s = Served()
    try:
        s.client.sendall(request_bytes({"name": "sh", "arg": ["-c", "echo $$; exec sleep 600"]}, accept=""))
        st = _Stream(s.client)
        st.until(b"\r\n\r\n")
        st.until(b"\r\n")                 # chunk size
        pid = int(st.until(b"\n"))
        assert os.path.exists(f"/proc/{pid}")
    finally:
        s.close()                         # joins the server thread: it returned
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_uri_is_defined_once():
    assert execstream.EXEC_STREAM_URI == "dmsgpty/exec-stream"


def _raw(headers, body=b""):
    head = "POST /exec HTTP/1.1\r\nHost: dmsgpty\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    return head.encode("latin-1") + body


_BODY16 = b'{"name":"true"} '     # 16 bytes: "10" in hex, "1_0" to a lenient int(…, 16)


def _chunked(size_token: bytes, body: bytes = _BODY16, trailers: bytes = b"") -> bytes:
    return size_token + b"\r\n" + body + b"\r\n0\r\n" + trailers + b"\r\n"


@pytest.mark.parametrize("data,status", [
    # two framings, or two lengths: a proxy in front could pick the other one (smuggling)
    (_raw([f"Content-Length: {len(_BODY16)}", "Transfer-Encoding: chunked"], _chunked(b"10")), 400),
    (_raw(["Transfer-Encoding: chunked", f"Content-Length: {len(_BODY16)}"], _chunked(b"10")), 400),
    (_raw([f"Content-Length: {len(_BODY16)}", "Content-Length: 3"], _BODY16), 400),
    (_raw([f"Content-Length: {len(_BODY16)}", "X: a\nTransfer-Encoding: chunked"], _BODY16), 400),
    # chunk sizes Python's int(…, 16) would take but HTTP does not
    (_raw(["Transfer-Encoding: chunked"], _chunked(b"0x10")), 400),
    (_raw(["Transfer-Encoding: chunked"], _chunked(b"+10")), 400),
    (_raw(["Transfer-Encoding: chunked"], _chunked(b"1_0")), 400),
    (_raw(["Transfer-Encoding: chunked"], _chunked(b"-0")), 400),
    # a Content-Length that str.isdigit() accepts but is no number
    (_raw(["Content-Length: \u00b2"], b"xx"), 400),
    # request trailers are read, but not without end
    (_raw(["Transfer-Encoding: chunked"], _chunked(b"10", trailers=b"X-A: bbbbbbbbbb\r\n" * 1000)), 431),
])
def test_ambiguous_or_lenient_framing_is_refused(served, data, status):
    r = served.exchange(data)
    assert r.status == status, r.body
    assert r.body.startswith(b"exec-stream: ")


def test_strict_framing_still_accepts_what_go_sends(served):
    r = served.exchange(_raw(["Transfer-Encoding: chunked", "Accept: " + MEDIA_TYPE],
                             _chunked(b"10", trailers=b"X-A: b\r\n")))
    assert (r.status, r.trailers["X-Exec-Exit-Code"]) == (200, "0")


@pytest.mark.parametrize("obj,field", [
    ({"name": "true", "arg": False}, "arg"),
    ({"name": "true", "arg": [1]}, "arg"),
    ({"name": "true", "env": 0}, "env"),
    ({"name": "true", "env": "A=1"}, "env"),
    ({"name": "true", "stdin": False}, "stdin"),
    ({"name": "true", "stdin": 0}, "stdin"),
    ({"name": "true", "timeout_ms": False}, "timeout_ms"),
    ({"name": "true", "timeout_ms": 0.0}, "timeout_ms"),
    ({"name": "true", "timeout_ms": "5"}, "timeout_ms"),
    ({"name": 0}, "name"),
    ({"name": ["true"]}, "name"),
])
def test_json_fields_are_type_checked(served, obj, field):
    # a falsy value of the wrong type is an error, as in Go, not silently the default
    r = served.exchange(request_bytes(obj))
    assert r.status == 400
    assert r.body.startswith(b"exec-stream: bad json: " + field.encode())


@pytest.mark.parametrize("raw", [b'{"name": "true", "timeout_ms": NaN}', b"[" * 200000])
def test_json_python_extensions_and_deep_nesting_are_400(served, raw):
    r = served.exchange(request_bytes(raw_body=raw))
    assert r.status == 400
    assert r.body.startswith(b"exec-stream: bad json")


def test_json_null_fields_are_zero_values(served):
    r = served.exchange(request_bytes({"name": "true", "arg": None, "env": None, "stdin": None,
                                       "timeout_ms": None}))
    assert (r.status, r.trailers["X-Exec-Exit-Code"]) == (200, "0")
