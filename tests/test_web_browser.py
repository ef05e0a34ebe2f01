"""The browser terminal end to end: a real host (`app pty tcp`), a real bridge (`app pty http`)
and headless Chromium driving the page (Debian's /usr/bin/chromium + /usr/bin/chromedriver;
selenium is never allowed to download anything). The HTTP-level tests run without a browser.
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import ROOT, SKYPTY, free_port, run_skypty, stop_process, wait_port

from skypty import websocket as W

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")


def wait_for(fn, timeout=20.0, what="condition"):
    """Poll until fn() is truthy; the deadline only bounds a hang, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _descendants(pid: int) -> dict:
    """{pid: comm} of every live descendant of pid (from /proc)."""
    parent = {}
    comm = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        parent[int(d)] = int(fields[1])
        comm[int(d)] = name
    out = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out[c] = comm[c]
                frontier.append(c)
    return out


def _shells(host_pid: int) -> set:
    return {p for p, name in _descendants(host_pid).items() if name == "bash"}


# ------------------------------------------------------------------ processes

@pytest.fixture(scope="module")
def host():
    tmp = tempfile.mkdtemp(prefix="skypty-web-")
    cfg = os.path.join(tmp, "config.json")
    sock = os.path.join(tmp, "pty.sock")
    r = run_skypty("app", "pty", "dmsg", "confgen", cfg)
    assert r.returncode == 0, r.stderr
    port = free_port()
    env = dict(os.environ, HOME=tmp)
    p = subprocess.Popen(SKYPTY + ["app", "pty", "tcp", "-c", cfg, "--addr", f"127.0.0.1:{port}",
                                   "--cliaddr", sock], cwd=tmp, env=env,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "host.log"), "wb"))
    try:
        wait_for(lambda: os.path.exists(sock) or p.poll() is not None, 20, "the host's control socket")
        assert p.poll() is None, open(os.path.join(tmp, "host.log")).read()
        yield {"proc": p, "sock": sock, "tmp": tmp}
    finally:
        stop_process(p)
        shutil.rmtree(tmp, ignore_errors=True)


def _start_bridge(host, *extra):
    port = free_port()
    log = open(os.path.join(host["tmp"], f"http-{port}.log"), "wb")
    p = subprocess.Popen(SKYPTY + ["app", "pty", "http", "--hnet", "unix", "--haddr", host["sock"],
                                   "--addr", f"127.0.0.1:{port}", *extra],
                         stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port)
    except BaseException:
        stop_process(p)
        raise
    return p, port


@pytest.fixture(scope="module")
def bridge(host):
    p, port = _start_bridge(host)
    try:
        yield {"proc": p, "port": port, "base": f"http://127.0.0.1:{port}"}
    finally:
        stop_process(p)


def _http(port, method, path, headers=None, host_header=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.putrequest(method, path, skip_host=host_header is not None, skip_accept_encoding=True)
        if host_header is not None:
            c.putheader("Host", host_header)
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


# ------------------------------------------------------------------ HTTP, no browser

def test_page_and_gzip_assets(bridge):
    status, headers, body = _http(bridge["port"], "GET", "/")
    assert status == 200 and b"?asset=xterm.js" in body
    assert headers["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    stored = open(os.path.join(ROOT, "skypty", "static", "xterm.js.gz"), "rb").read()
    status, headers, body = _http(bridge["port"], "GET", "/?asset=xterm.js", {"Accept-Encoding": "gzip, br"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip" and body == stored
    status, headers, body = _http(bridge["port"], "GET", "/pty/?asset=xterm.js", {"Accept-Encoding": "identity"})
    assert status == 200 and "Content-Encoding" not in headers
    assert body == gzip.decompress(stored) and b"Terminal" in body
    status, _, _ = _http(bridge["port"], "GET", "/?asset=../../etc/passwd")
    assert status == 404


def test_non_get_is_405_json(bridge):
    status, headers, body = _http(bridge["port"], "POST", "/pty/x?y=1")
    assert status == 405 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error_code": 405, "error_msg": "http method POST is invalid for path /pty/x"}
    status, _, body = _http(bridge["port"], "DELETE", "/")
    assert status == 405


def test_dns_rebinding_host_refused(bridge):
    status, _, body = _http(bridge["port"], "GET", "/", host_header=f"evil.example:{bridge['port']}")
    assert status == 403 and b"DNS-rebinding" in body
    status, _, _ = _http(bridge["port"], "GET", "/", host_header=f"localhost:{bridge['port']}")
    assert status == 200


def test_cross_origin_upgrade_refused(bridge, host):
    before = _shells(host["proc"].pid)
    with socket.create_connection(("127.0.0.1", bridge["port"]), timeout=10) as s:
        with pytest.raises(W.HandshakeRefused) as ei:
            W.client_handshake(s, f"127.0.0.1:{bridge['port']}", "/", origin="http://evil.example")
    assert ei.value.status == 403
    assert _shells(host["proc"].pid) == before


def _ws(port, path="/"):
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    return W.client_handshake(s, f"127.0.0.1:{port}", path, origin=f"http://127.0.0.1:{port}")


def _read_until(ws, needle: bytes, out=b""):
    while needle not in out:
        op, data = ws.recv()
        out += data
    return out


def test_websocket_bridge_without_browser(bridge, host):
    """The wire contract of §8.3 with our own client: banner, resize frame, input, session end."""
    ws = _ws(bridge["port"])
    try:
        ws.send_text(json.dumps({"type": "resize", "cols": 111, "rows": 33}))
        ws.send_text("stty size; echo $((6*7))\r")
        out = _read_until(ws, b"\r\n42\r\n")
        assert b"[skypty-ui] Status: Dialing..." in out and b"PTY-HOST unix:" in out
        assert b"33 111" in out
        ws.send_text("exit\r")
        with pytest.raises(W.ConnectionClosed) as ei:
            _read_until(ws, b"never", out)
        assert ei.value.code == W.CLOSE_NORMAL
    finally:
        ws.shutdown()


def test_websocket_close_stops_remote_shell(bridge, host):
    before = _shells(host["proc"].pid)
    ws = _ws(bridge["port"])
    try:
        ws.send_text("echo up$((1+1))\r")
        _read_until(ws, b"up2")
        mine = _shells(host["proc"].pid) - before
        assert len(mine) == 1
    finally:
        ws.shutdown()                       # no close frame: the tab just vanished
    wait_for(lambda: not (_shells(host["proc"].pid) & mine), 20, "the remote shell to be stopped")


def test_non_loopback_addr_warns(host):
    port = free_port()
    p = subprocess.Popen(SKYPTY + ["app", "pty", "http", "--haddr", host["sock"], "--addr", f"0.0.0.0:{port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = p.stderr.readline().decode()
        assert "warning" in line and "no public-key gate" in line
    finally:
        stop_process(p)
        p.stderr.close()


# ------------------------------------------------------------------ the browser

@pytest.fixture(scope="module")
def driver():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"headless browser tests need {CHROMIUM} and {CHROMEDRIVER} (apt install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (requirements-dev.txt)")
    profile = tempfile.mkdtemp(prefix="skypty-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1000,700"):
        opts.add_argument(flag)
    # an explicit driver path: selenium-manager never runs, nothing is downloaded
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


_BUFFER_JS = """
var t = window.skypty && window.skypty.term;
if (!t) return null;
var b = t.buffer.active, out = [];
for (var i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
return out.join('\\n');
"""


def _screen(d):
    return d.execute_script(_BUFFER_JS) or ""


def _type(d, text):
    d.find_element("css selector", ".xterm-helper-textarea").send_keys(text)


def _open_page(d, url):
    d.get(url)
    wait_for(lambda: d.execute_script("return !!(window.skypty && window.skypty.ws.readyState === 1)"),
             20, "the page's websocket")
    wait_for(lambda: "$ " in _screen(d) or "# " in _screen(d), 20, "a shell prompt")


def test_browser_echo_resize_and_screenshot(driver, bridge):
    d = driver
    _open_page(d, bridge["base"] + "/")
    assert "skypty" in d.title
    _type(d, "echo $((6*7))\n")
    wait_for(lambda: "\n42\n" in _screen(d) + "\n", 20, "42 in the terminal")

    # the window drives the pty size: fit add-on -> resize text frame -> SetPtySize
    d.set_window_size(760, 520)
    wait_for(lambda: d.execute_script("return window.skypty.term.cols") < 90, 20, "xterm to refit")
    cols, rows = d.execute_script("return [window.skypty.term.cols, window.skypty.term.rows]")
    _type(d, "stty size\n")
    wait_for(lambda: f"{rows} {cols}" in _screen(d), 20, f"stty size to say {rows} {cols}")
    d.set_window_size(1000, 700)
    wait_for(lambda: d.execute_script("return window.skypty.term.cols") > cols, 20, "xterm to grow")
    cols2, rows2 = d.execute_script("return [window.skypty.term.cols, window.skypty.term.rows]")
    assert (rows2, cols2) != (rows, cols)
    _type(d, "stty size; ls -d /tm*\n")
    wait_for(lambda: f"{rows2} {cols2}" in _screen(d) and "/tmp" in _screen(d), 20, "the new size")

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "web-terminal.png")
    assert d.save_screenshot(shot) and os.path.getsize(shot) > 1000


def test_browser_session_end_is_visible(driver, bridge):
    d = driver
    _open_page(d, bridge["base"] + "/")
    _type(d, "exit\n")
    wait_for(lambda: d.execute_script("return window.skypty.closed"), 20, "the websocket to close")
    screen = _screen(d)
    assert "session closed" in screen and "reload the page to reconnect" in screen
    assert d.execute_script("return window.skypty.closeCode") == 1000


def test_browser_closing_the_tab_stops_the_shell(driver, bridge, host):
    d = driver
    main = d.current_window_handle
    before = _shells(host["proc"].pid)
    d.switch_to.new_window("tab")
    try:
        _open_page(d, bridge["base"] + "/")
        mine = wait_for(lambda: _shells(host["proc"].pid) - before, 20, "the tab's shell")
        assert len(mine) == 1
    finally:
        d.close()
        d.switch_to.window(main)
    wait_for(lambda: not (_shells(host["proc"].pid) & mine), 20, "the shell to be stopped after the tab closed")


def test_browser_cross_origin_websocket_refused(driver, bridge, host):
    """A page on another origin (localhost:P vs 127.0.0.1:P) cannot open the bridge's WebSocket."""
    d = driver
    d.get(f"http://localhost:{bridge['port']}/?asset=term.js")      # any page of the other origin
    before = _shells(host["proc"].pid)
    d.set_script_timeout(20)
    result = d.execute_async_script("""
        var done = arguments[arguments.length - 1];
        var ws = new WebSocket(arguments[0]);
        ws.onopen = function () { done("open"); };
        ws.onclose = function (e) { done("closed " + e.code); };
    """, f"ws://127.0.0.1:{bridge['port']}/")
    assert result == "closed 1006"           # the browser's code for a refused handshake
    assert _shells(host["proc"].pid) == before


# ------------------------------------------------------------------ helpers of skypty/web.py

def test_resize_frame_parsing():
    from skypty.web import _parse_resize
    assert _parse_resize(b'{"type":"resize","cols":120,"rows":40}') == (40, 120)
    assert _parse_resize(b'{"type":"resize","cols":65535,"rows":1}') == (1, 65535)
    for bad in (b'{"type":"resize","cols":0,"rows":40}', b'{"type":"resize","cols":65536,"rows":4}',
                b'{"type":"resize","cols":"80","rows":24}', b'{"type":"resize","cols":true,"rows":24}',
                b'{"type":"other","cols":80,"rows":24}', b"{", b"[1,2]", b'{"cols":80,"rows":24}'):
        assert _parse_resize(bad) is None, bad


def test_listen_and_host_checks():
    from skypty.errors import UsageError
    from skypty.web import _accepts_gzip, is_loopback_host, loopback_host_header, parse_listen
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen(":8080") == ("", 8080)
    assert parse_listen("[::1]:9") == ("::1", 9)
    with pytest.raises(UsageError):
        parse_listen("8080")
    assert is_loopback_host("localhost") and is_loopback_host("127.8.0.1") and is_loopback_host("::1")
    assert not is_loopback_host("") and not is_loopback_host("0.0.0.0") and not is_loopback_host("10.0.0.1")
    for ok in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:8080", "app.localhost:3"):
        assert loopback_host_header(ok), ok
    for bad in ("evil.example:8080", "127.0.0.1.nip.io:80", "", "[::2]:80", "10.1.1.1"):
        assert not loopback_host_header(bad), bad
    assert _accepts_gzip("gzip, deflate, br") and _accepts_gzip("br;q=1.0, gzip;q=0.8") and _accepts_gzip("*")
    assert not _accepts_gzip("identity") and not _accepts_gzip("gzip;q=0") and not _accepts_gzip(None)


# ------------------------------------------------------------------ persistent sessions and the gate
# Our hosts have no persistent sessions (pty.md §5: only a visor enables them), so this part runs
# the bridge in-process against a small session-keeping `pty` service built here from the real
# rpc layer, real ptys and real processes: StartSession/Attach with a per-follower replay cursor.

class _Session:
    def __init__(self, name, args):
        import pty
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([name, *args], stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.buf = bytearray()
        self.ended = False
        self.cv = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        while True:
            try:
                d = os.read(self.master, 65536)
            except OSError:
                d = b""
            with self.cv:
                if not d:
                    self.ended = True
                    self.cv.notify_all()
                    os.close(self.master)
                    return
                self.buf += d
                self.cv.notify_all()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _SessionHost:
    def __init__(self, path):
        self.sessions = {}
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(path)
        self.lsock.listen(16)
        self.path = path
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, conn):
        from skypty import gob, gobtypes, rpc
        n = conn.recv(1)[0]
        uri = b""
        while len(uri) < n:
            uri += conn.recv(n - len(uri))
        conn.sendall(b"\x00")
        me = {"s": None, "cur": 0, "closed": False}

        def start_session(req):
            s = _Session(req["Name"], req["Arg"])
            sid = os.urandom(8).hex()
            self.sessions[sid] = s
            me.update(s=s, cur=0)
            return sid

        def attach(sid):
            s = self.sessions.get(sid)
            if s is None:
                raise Exception("dmsgpty: session not found")
            me.update(s=s, cur=0)          # replay everything (the ring is unbounded here)
            return {}

        def read(n):
            s = me["s"]
            with s.cv:
                while len(s.buf) <= me["cur"] and not s.ended and not me["closed"]:
                    s.cv.wait()
                if len(s.buf) > me["cur"]:
                    data = bytes(s.buf[me["cur"]:me["cur"] + n])
                    me["cur"] += len(data)
                    return data
            raise Exception("EOF")

        def stop(_):
            s = me["s"]
            s.stop()
            for k, v in list(self.sessions.items()):
                if v is s:
                    del self.sessions[k]
            return {}

        def ended():                        # a follower hangs up: detach, keep the session
            me["closed"] = True
            if me["s"] is not None:
                with me["s"].cv:
                    me["s"].cv.notify_all()

        M = rpc.Method
        srv = rpc.RPCServer(conn)
        srv.register("pty", [
            M("StartSession", gobtypes.CommandReq, gob.STRING, start_session),
            M("Attach", gob.STRING, gob.EMPTY, attach),
            M("Read", gob.INT, gob.BYTES, read),
            M("Write", gob.BYTES, gob.INT, lambda b: os.write(me["s"].master, b)),
            M("SetPtySize", gobtypes.WinSize, gob.EMPTY, lambda w: {}),
            M("Stop", gob.EMPTY, gob.EMPTY, stop),
            M("Ping", gob.EMPTY, gob.EMPTY, lambda _: {}),
        ])
        srv.on_close(ended)
        srv.serve()

    def close(self):
        self.lsock.close()
        for s in list(self.sessions.values()):
            s.stop()


@pytest.fixture
def inproc(tmp_path):
    """make_handler + make_server in this process; yields a factory taking make_handler kwargs."""
    from skypty.client import open_pty_control
    from skypty.web import make_handler, make_server

    host = _SessionHost(str(tmp_path / "s.sock"))
    servers = []

    def start(**kw):
        kw.setdefault("cmd", "/bin/cat")
        handler = make_handler(lambda: open_pty_control("unix", host.path), **kw)
        srv = make_server("127.0.0.1", 0, handler)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(srv)
        return srv.server_address[1]

    try:
        yield host, start
    finally:
        for srv in servers:
            srv.shutdown()
            srv.RequestHandlerClass.options.shutdown()
            srv.server_close()
        host.close()


def _read_session(ws):
    """Read until the session text frame; return (sid, binary output so far)."""
    out = b""
    while True:
        op, data = ws.recv()
        if op == W.OP_TEXT:
            msg = json.loads(data)
            assert msg["type"] == "session"
            return msg["id"], out
        out += data


def test_session_reload_reattaches_and_closed_tab_stops_it(inproc):
    host, start = inproc
    port = start(reattach_grace=0.5)
    ws1 = _ws(port)
    sid, out = _read_session(ws1)
    assert len(sid) == 16 and b"PTY-HOST" in out
    ws1.send_text("first-line\r")
    _read_until(ws1, b"first-line\r\nfirst-line")            # tty echo, then cat
    proc = host.sessions[sid].proc
    ws1.shutdown()                                            # a reload: the old socket just drops

    ws2 = _ws(port, f"/?sid={sid}")
    out = _read_until(ws2, b"first-line\r\nfirst-line")       # replayed by Attach
    assert b"PTY-HOST" not in out                             # no banner on a re-attach
    ws2.send_text("second\r")
    _read_until(ws2, b"second\r\nsecond", out)
    time.sleep(1.5)            # longer than the grace: the re-attach must have cancelled the stop
    assert proc.poll() is None and sid in host.sessions

    ws2.shutdown()                                            # the tab is closed for good
    wait_for(lambda: proc.poll() is not None, 20, "the session to be stopped after the grace")
    assert sid not in host.sessions


def test_unknown_sid_starts_fresh(inproc):
    host, start = inproc
    port = start()
    ws = _ws(port, "/?sid=00000000deadbeef")
    try:
        sid, out = _read_session(ws)
        assert sid != "00000000deadbeef" and b"PTY-HOST" in out
    finally:
        ws.shutdown()


@pytest.mark.parametrize("allow", [False, True])
def test_url_commands_need_the_flag(inproc, allow):
    host, start = inproc
    port = start(allow_url_commands=allow)
    ws = _ws(port, "/?commands=echo%20one,echo%20two")
    try:
        _read_session(ws)
        ws.send_text("marker\r")
        # the pty's echo of "marker" and cat's copy of it; the command line (if any) may come
        # between them or not, depending on whether both inputs reached the pty in one go
        out = b""
        while out.count(b"marker\r\n") < 2:
            out += ws.recv()[1]
        assert (b"echo one && echo two" in out) is allow
    finally:
        ws.shutdown()


def test_authorize_gate(inproc):
    host, start = inproc
    seen = []

    def deny(peer):
        seen.append(peer)
        return False

    port = start(authorize=deny)
    status, _, body = _http(port, "GET", "/")
    assert status == 403 and json.loads(body)["error_code"] == 403
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with pytest.raises(W.HandshakeRefused) as ei:
            W.client_handshake(s, f"127.0.0.1:{port}", "/", origin=f"http://127.0.0.1:{port}")
    assert ei.value.status == 403 and not host.sessions
    assert seen and seen[0][0] == "127.0.0.1"

    def broken(peer):
        raise RuntimeError("gate down")

    assert _http(start(authorize=broken), "GET", "/")[0] == 403     # fails closed
