"""Mode 3 end to end: a real `python skypty.py cli pty host` (and `app pty tcp`) on loopback."""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import SKYPTY, free_port, run_skypty, stop_process, wait_port
from skypty import gob, gobtypes, mux, rpc
from skypty.errors import HandshakeError, ProtocolError, SkyptyError
from skypty.keys import generate_keypair
from skypty.services.execstream import EXEC_STREAM_URI, MEDIA_TYPE
from skypty.transport.tcp import dial_tcp, parse_listen_addr

pytestmark = pytest.mark.timeout(180)


def _procs_with(marker: str) -> list:
    """Live (non-zombie) processes whose command line contains `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if marker.encode() in cmd and stat[stat.rfind(b")") + 2:].split()[0] != b"Z":
            found.append(int(name))
    return found


def _wait_none(marker: str, bound: float = 10.0) -> list:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if not _procs_with(marker):
            return []
        time.sleep(0.05)
    return _procs_with(marker)


class HostProc:
    def __init__(self, tmp, *extra, listen=None, allow=True, port=None, probe_host="127.0.0.1"):
        self.pk, self.sk = generate_keypair()
        self.client_pk, self.client_sk = generate_keypair()
        self.conf = os.path.join(tmp, "host.json")
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"sk": self.sk.hex(), "pk": self.pk.hex(), "wl": [self.client_pk.hex()] if allow else None}, f)
        self.port = port or free_port()
        self.listen = listen or f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(tmp, "host.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(SKYPTY + ["cli", "pty", "host", "-l", self.listen, "-c", self.conf, *extra],
                                     stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL)
        try:
            self.printed_pk = self.proc.stdout.readline().decode().strip()
            wait_port(self.port, host=probe_host, timeout=20)
        except Exception:
            self.stop()
            raise

    def dial(self, sk=None, pk=None, host="127.0.0.1"):
        return dial_tcp(host, self.port, sk or self.client_sk, pk or self.pk, timeout=10)

    def pty(self):
        c = self.dial()
        mux.request(c, "dmsgpty/pty", timeout=10)
        return c, rpc.RPCClient(c)

    def logtext(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        stop_process(self.proc)
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def host(tmp_path):
    h = HostProc(str(tmp_path), "--max-unauth-per-source", "4", "--log-level", "debug")
    yield h
    h.stop()


def _exec(cl, name, *args, **kw):
    req = {"Name": name, "Arg": list(args), **kw}
    return cl.call("pty.Exec", gobtypes.CommandExecReq, req, gobtypes.CommandExecResult, timeout=60)


def test_prints_pk_and_client_command(host):
    assert host.printed_pk == host.pk.hex()
    deadline = time.monotonic() + 10
    want = f"skypty.py cli pty shell {host.pk.hex()}@127.0.0.1:{host.port}"
    while want not in host.logtext() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert want in host.logtext()


def test_whitelisted_client_exec_and_shell(host):
    c, cl = host.pty()
    try:
        r = _exec(cl, "sh", "-c", "echo out; echo err >&2; exit 4")
        assert (r["Stdout"], r["Stderr"], r["ExitCode"]) == (b"out\n", b"err\n", 4)
        cl.call("pty.Start", gobtypes.CommandReq, {"Name": "/bin/sh", "Env": ["PS1=$ "]}, gob.EMPTY, timeout=30)
        cl.call("pty.Write", gob.BYTES, b"echo a''bc; exit\n", gob.INT, timeout=30)
        out = b""
        with pytest.raises(rpc.RPCError) as ei:
            while True:
                out += cl.call("pty.Read", gob.INT, 32768, gob.BYTES, timeout=30)
        assert str(ei.value) == "read /dev/ptmx: input/output error"
        assert b"abc\r\n" in out
    finally:
        cl.close()


def test_unlisted_client_is_closed_without_a_byte(host):
    _, stranger = generate_keypair()
    c = host.dial(sk=stranger)   # the handshake itself completes (msg 3 is the client's)
    try:
        c.sendall(bytes([len(b"dmsgpty/pty")]) + b"dmsgpty/pty")
        c.settimeout(20)
        assert c.recv(1) == b""
    finally:
        c.close()
    # the shipped client's error text
    c = host.dial(sk=stranger)
    try:
        with pytest.raises(ProtocolError) as ei:
            mux.request(c, "dmsgpty/pty", timeout=20)
        assert str(ei.value) == "failed to read response: EOF"
    finally:
        c.close()
    deadline = time.monotonic() + 10
    while "not whitelisted" not in host.logtext() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"{stranger.pubkey().hex()}@127.0.0.1:" in host.logtext()


def test_wrong_pinned_pk_fails(host):
    other_pk, _ = generate_keypair()
    with pytest.raises(HandshakeError):
        host.dial(pk=other_pk)


def test_remote_mux_table(host):
    for uri in ("dmsgpty/whitelist", "dmsgpty/proxy?pk=00&port=22", "nope"):
        c = host.dial()
        try:
            with pytest.raises(Exception) as ei:
                mux.request(c, uri, timeout=20)
            assert "rejected" in str(ei.value) or "EOF" in str(ei.value)
        finally:
            c.close()


def test_exec_stream_over_tcp(host):
    c = host.dial()
    try:
        mux.request(c, EXEC_STREAM_URI, timeout=20)
        body = json.dumps({"name": "sh", "arg": ["-c", "echo streamed; exit 5"]}).encode()
        c.sendall(b"POST /exec HTTP/1.1\r\nHost: dmsgpty\r\nAccept: " + MEDIA_TYPE.encode()
                  + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        c.settimeout(30)
        while True:
            d = c.recv(65536)
            if not d:
                break
            data += d
    finally:
        c.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\x01\x00\x00\x00\x09streamed\n" in data
    assert b"X-Exec-Exit-Code: 5\r\n" in data


def test_garbage_and_oversize_frames_do_not_hurt(host):
    payloads = [os.urandom(3000), b"\xff\xff" + os.urandom(100), b"\x00\x31" + b"\x02" * 49, b"GET / HTTP/1.1\r\n\r\n"]
    for p in payloads:
        s = socket.create_connection(("127.0.0.1", host.port), timeout=10)
        try:
            s.sendall(p)
            s.settimeout(20)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        finally:
            s.close()
    # an oversize transport frame after a good handshake
    c = host.dial()
    c.stream.sendall(struct.pack(">H", 0xFFFF) + os.urandom(64))
    c.settimeout(20)
    got = b""
    try:
        while True:
            d = c.stream.recv(4096)
            if not d:
                break
            got += d
    except OSError:
        pass
    c.close()
    assert len(got) <= 2 + 8 + 1 + 16   # at most one reject frame (0x01), then the host hangs up
    assert host.proc.poll() is None
    c, cl = host.pty()
    try:
        assert _exec(cl, "echo", "still")["Stdout"] == b"still\n"
    finally:
        cl.close()


def test_preauth_cap_per_source(host):
    idle = []
    # the fixture's wait_port probe counts until the host has seen it go away
    deadline = time.monotonic() + 10
    while "handshake failed" not in host.logtext() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        for _ in range(4):   # --max-unauth-per-source 4: these sit in the handshake
            idle.append(socket.create_connection(("127.0.0.1", host.port), timeout=10))
        # wait until the host has counted them (its log says accept for each)
        deadline = time.monotonic() + 10
        while host.logtext().count("tcp: accept") < 4 + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # shed with a reset (the client's cue to retry, unlike a wrong key's EOF); the reset
        # may beat connect() itself
        try:
            extra = socket.create_connection(("127.0.0.1", host.port), timeout=10)
        except ConnectionResetError:
            extra = None
        if extra is not None:
            extra.settimeout(8)   # well under the 10 s handshake timeout of the idle ones
            try:
                with pytest.raises(ConnectionResetError):
                    extra.recv(10)
            except socket.timeout:
                raise AssertionError(host.logtext())
            finally:
                extra.close()
        assert "unauthenticated connections from 127.0.0.1 (max 4)" in host.logtext()
    finally:
        for s in idle:
            s.close()
    # once they are gone, clients get in again
    deadline = time.monotonic() + 20
    while True:
        try:
            c, cl = host.pty()
            break
        except (HandshakeError, ProtocolError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        assert _exec(cl, "true")["ExitCode"] == 0
    finally:
        cl.close()


def test_authenticated_sessions_do_not_count_against_the_cap(host):
    conns = []
    try:
        for _ in range(6):   # more than the per-source cap of 4
            conns.append(host.pty())
        for _, cl in conns:
            assert _exec(cl, "true")["ExitCode"] == 0
    finally:
        for _, cl in conns:
            cl.close()


def test_sigterm_leaves_nothing_running(tmp_path):
    h = HostProc(str(tmp_path))
    marker = f"98{os.getpid() % 10000:04d}1"
    try:
        c, cl = h.pty()
        cl.call("pty.Start", gobtypes.CommandReq, {"Name": "bash", "Arg": ["--norc", "-i"], "Env": ["PS1=$ "]},
                gob.EMPTY, timeout=30)
        cl.call("pty.Write", gob.BYTES, f"sleep {marker} & sleep {marker}\n".encode(), gob.INT, timeout=30)
        c2, cl2 = h.pty()
        t = threading.Thread(target=lambda: _safe(lambda: _exec(cl2, "sleep", marker, TimeoutMS=300000)),
                             daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while len(_procs_with(f"sleep {marker}")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_procs_with(f"sleep {marker}")) == 3
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(30) == 0
        assert _wait_none(f"sleep {marker}") == []
        cl.close()
        cl2.close()
    finally:
        h.stop()
    assert not _procs_with(f"sleep {marker}")


def _safe(fn):
    try:
        fn()
    except Exception:
        pass


def test_empty_whitelist_is_refused(tmp_path):
    port = free_port()
    r = run_skypty("cli", "pty", "host", "-l", f"127.0.0.1:{port}", timeout=60)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "empty whitelist" in err


def test_bad_listen_address(tmp_path):
    pk, _ = generate_keypair()
    r = run_skypty("cli", "pty", "host", "-l", "::1:2022", "--allow", pk.hex(), timeout=60)
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1


def test_parse_listen_addr():
    assert parse_listen_addr(":2022") == ("", 2022)
    assert parse_listen_addr("127.0.0.1:2022") == ("127.0.0.1", 2022)
    assert parse_listen_addr("[::1]:2022") == ("::1", 2022)
    assert parse_listen_addr("localhost:0") == ("localhost", 0)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_and_all_interfaces(tmp_path):
    for listen, dial_hosts in (("[::1]:{port}", ["::1"]), (":{port}", ["127.0.0.1", "::1"])):
        d = tmp_path / listen.replace(":", "_").replace("[", "").replace("]", "").replace("{port}", "p")
        d.mkdir()
        port = free_port()
        h = HostProc(str(d), listen=listen.format(port=port), port=port, probe_host=dial_hosts[0])
        try:
            for addr in dial_hosts:
                c = h.dial(host=addr)
                mux.request(c, "dmsgpty/pty", timeout=10)
                cl = rpc.RPCClient(c)
                try:
                    assert _exec(cl, "echo", addr)["Stdout"] == addr.encode() + b"\n"
                finally:
                    cl.close()
        finally:
            h.stop()


def test_listen_fd_serves_one_connection(tmp_path):
    pk, sk = generate_keypair()
    cpk, csk = generate_keypair()
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"sk": sk.hex(), "pk": pk.hex(), "wl": [cpk.hex()]}))
    os.chmod(conf, 0o600)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    cli_sock = socket.create_connection(lsock.getsockname(), timeout=10)
    srv_sock, _ = lsock.accept()
    lsock.close()
    p = subprocess.Popen(SKYPTY + ["app", "pty", "dmsg", "-c", str(conf), "--no-dmsg", "--listen-fd",
                                   str(srv_sock.fileno())],
                         pass_fds=(srv_sock.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    srv_sock.close()
    try:
        from skypty import noise
        c = noise.client_handshake(cli_sock, csk, pk, timeout=10)
        mux.request(c, "dmsgpty/pty", timeout=10)
        cl = rpc.RPCClient(c)
        assert _exec(cl, "echo", "fd")["Stdout"] == b"fd\n"
        cl.close()
        assert p.wait(30) == 0
    finally:
        stop_process(p)
        p.stderr.close()
        cli_sock.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_app_pty_tcp_control_socket_removed_on_signal(tmp_path, sig):
    pk, sk = generate_keypair()
    cpk, csk = generate_keypair()
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"sk": sk.hex(), "pk": pk.hex(), "wl": [cpk.hex()]}))
    os.chmod(conf, 0o600)
    sock_path = str(tmp_path / "pty.sock")
    port = free_port()
    p = subprocess.Popen(SKYPTY + ["app", "pty", "tcp", "-c", str(conf), "--addr", f"127.0.0.1:{port}",
                                   "--cliaddr", sock_path],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, timeout=20)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        # the control socket serves the local mux (pty included)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        mux.request(s, "dmsgpty/pty", timeout=10)
        cl = rpc.RPCClient(s)
        assert _exec(cl, "echo", "local")["Stdout"] == b"local\n"
        cl.close()
        c = dial_tcp("127.0.0.1", port, csk, pk, timeout=10)
        mux.request(c, "dmsgpty/pty", timeout=10)
        c.close()
        p.send_signal(sig)
        assert p.wait(30) == 0
        assert not os.path.exists(sock_path)
        err = p.stderr.read().decode()
        assert re.search(rf"skypty\.py cli pty shell {pk.hex()}@127\.0\.0\.1:{port} --visor-config ", err)
    finally:
        stop_process(p)
        p.stderr.close()


def test_listen_fd_refuses_a_listening_socket(tmp_path):
    pk, sk = generate_keypair()
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"sk": sk.hex(), "pk": pk.hex(), "wl": []}))
    os.chmod(conf, 0o600)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    try:
        r = subprocess.run(SKYPTY + ["app", "pty", "dmsg", "-c", str(conf), "--no-dmsg", "--listen-fd",
                                     str(lsock.fileno())], pass_fds=(lsock.fileno(),), capture_output=True,
                           timeout=60)
    finally:
        lsock.close()
    assert r.returncode == 2
    assert r.stderr.decode().strip().endswith("(systemd Accept=yes)")


# ------------------------------------------------------------------ the Host object in-process

def _inproc_host():
    from skypty.host import Host
    from skypty.whitelist import MemoryWhitelist
    pk, sk = generate_keypair()
    cpk, csk = generate_keypair()
    return Host(sk, MemoryWhitelist(pk, [cpk])), cpk, csk


def test_dmsg_stream_whitelist_and_mux():
    host, cpk, _ = _inproc_host()
    stranger, _ = generate_keypair()
    try:
        a, b = socket.socketpair()
        t = threading.Thread(target=host.serve_dmsg_stream, args=(b, stranger, "dmsg-addr"), daemon=True)
        t.start()
        a.settimeout(20)
        assert a.recv(10) == b"\x01"            # written before any request is read
        assert a.recv(10) == b""
        t.join(20)
        a.close()
        a, b = socket.socketpair()
        t = threading.Thread(target=host.serve_dmsg_stream, args=(b, cpk, "dmsg-addr"), daemon=True)
        t.start()
        mux.request(a, "dmsgpty/pty", timeout=20)
        cl = rpc.RPCClient(a)
        assert _exec(cl, "echo", "dmsg")["Stdout"] == b"dmsg\n"
        cl.close()
        t.join(20)
        # the host's own key is always allowed
        a, b = socket.socketpair()
        t = threading.Thread(target=host.serve_dmsg_stream, args=(b, host.pk, "self"), daemon=True)
        t.start()
        mux.request(a, "dmsgpty/pty", timeout=20)
        a.close()
        t.join(20)
    finally:
        host.close()


def test_control_conn_local_mux():
    host, cpk, _ = _inproc_host()
    try:
        # whitelist rpc is local-only and lists the configured keys
        a, b = socket.socketpair()
        t = threading.Thread(target=host.serve_control_conn, args=(b,), daemon=True)
        t.start()
        mux.request(a, "dmsgpty/whitelist", timeout=20)
        cl = rpc.RPCClient(a)
        keys = cl.call("whitelist.Whitelist", gob.EMPTY, {}, gobtypes.PubKeyList, timeout=20)
        assert [bytes(k) for k in keys] == [bytes(cpk)]
        cl.close()
        t.join(20)
        # no dmsg here: the proxy cannot dial, the host closes without a byte
        a, b = socket.socketpair()
        t = threading.Thread(target=host.serve_control_conn, args=(b,), daemon=True)
        t.start()
        with pytest.raises(ProtocolError) as ei:
            mux.request(a, f"dmsgpty/proxy?pk={cpk.hex()}&port=22", timeout=20)
        assert str(ei.value) == "failed to read response: EOF"
        a.close()
        t.join(20)
    finally:
        host.close()


def test_host_close_ends_sessions_and_children():
    host, cpk, _ = _inproc_host()
    a, b = socket.socketpair()
    t = threading.Thread(target=host.serve_dmsg_stream, args=(b, cpk, "x"), daemon=True)
    t.start()
    try:
        mux.request(a, "dmsgpty/pty", timeout=20)
        cl = rpc.RPCClient(a)
        cl.call("pty.Start", gobtypes.CommandReq, {"Name": "sh", "Arg": ["-c", "echo P=$$; exec sleep 600"]},
                gob.EMPTY, timeout=20)
        out = b""
        while not re.search(rb"P=\d+\r\n", out):
            out += cl.call("pty.Read", gob.INT, 1024, gob.BYTES, timeout=20)
        pid = int(re.search(rb"P=(\d+)", out).group(1))
    finally:
        host.close()
    t.join(20)
    assert not t.is_alive()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    a.close()


# ------------------------------------------------------------------ pre-auth accounting, keepalive

def _tcp_server(**caps):
    from skypty.transport.tcp import TCPServer
    host, cpk, csk = _inproc_host()
    return TCPServer("127.0.0.1:0", host, **caps).start(), host, csk


def _wait_for(pred, bound: float = 20.0) -> bool:
    deadline = time.monotonic() + bound
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_keepalive_is_set_on_both_ends():
    from skypty import limits
    server, host, csk = _tcp_server()
    try:
        c = dial_tcp("127.0.0.1", server.port, csk, host.pk, timeout=10)
        try:
            assert _wait_for(lambda: len(server._conns) == 1)
            (accepted,) = list(server._conns)
            for s in (c.stream, accepted):
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == limits.TCP_KEEPALIVE_IDLE
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == limits.TCP_KEEPALIVE_INTERVAL
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == limits.TCP_KEEPALIVE_COUNT
        finally:
            c.close()
        # the shipped client's dialer too
        from skypty.client import _connect_tcp
        s = _connect_tcp("127.0.0.1", server.port, 10)
        try:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == limits.TCP_KEEPALIVE_IDLE
        finally:
            s.close()
    finally:
        server.close()
        host.close()


_VANISH = r'''
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from skypty import gob, gobtypes, limits, mux, rpc
limits.TCP_KEEPALIVE_IDLE, limits.TCP_KEEPALIVE_INTERVAL, limits.TCP_KEEPALIVE_COUNT = 1, 1, 2
from skypty.host import Host
from skypty.keys import generate_keypair
from skypty.transport.tcp import TCPServer, dial_tcp
from skypty.whitelist import MemoryWhitelist
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
pk, sk = generate_keypair(); cpk, csk = generate_keypair()
host = Host(sk, MemoryWhitelist(pk, [cpk]))
server = TCPServer("127.0.0.1:0", host).start()
c = dial_tcp("127.0.0.1", server.port, csk, pk, timeout=10)
mux.request(c, "dmsgpty/pty", timeout=10)
cl = rpc.RPCClient(c)
cl.call("pty.Start", gobtypes.CommandReq, {"Name": "sh", "Arg": ["-c", "echo P=$$; exec sleep 600"]}, gob.EMPTY, timeout=10)
out = b""
while b"\n" not in out:
    out += cl.call("pty.Read", gob.INT, 1024, gob.BYTES, timeout=10)
pid = int(out.split(b"P=")[1].split()[0])
# keepalive covers an idle connection (data in flight is the retransmission limit's case):
# wait until nothing is unacknowledged, then the network goes away without a FIN or RST
def unacked():
    with open("/proc/net/tcp") as f:
        return any(int(ln.split()[4].split(":")[0], 16) for ln in f.read().splitlines()[1:])
settle = time.monotonic() + 10
while unacked() and time.monotonic() < settle:
    time.sleep(0.05)
subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
deadline = time.monotonic() + 60
while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
    time.sleep(0.1)
threads_left = None
while time.monotonic() < deadline:
    with server._lock:
        threads_left = len(server._threads)
    if not threads_left:
        break
    time.sleep(0.1)
print(json.dumps({"pty_gone": not os.path.exists(f"/proc/{pid}"), "threads_left": threads_left}))
sys.stdout.flush()
os._exit(0)
'''


def _can_unshare_net() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_silently_vanished_client_is_cleaned_up():
    # A private network namespace whose loopback is taken down mid-session: the client neither
    # closes nor resets, it just stops answering. Keepalive (shortened here) must end the
    # connection, which stops the pty and ends the connection's thread.
    if not _can_unshare_net():
        pytest.skip("needs unshare -n (root, network namespaces)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import sys
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", _VANISH, root], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert json.loads(r.stdout.decode().strip().splitlines()[-1]) == {"pty_gone": True, "threads_left": 0}


def test_preauth_slots_are_given_back_whatever_the_ending():
    from skypty.noise import write_frame
    server, host, csk = _tcp_server(max_unauth=3, per_source=2)
    _, stranger = generate_keypair()

    def idle():
        with server._lock:
            return server._unauth == 0 and not server._by_source

    try:
        # handshake garbage, a half handshake, a client the whitelist refuses, and a session
        g = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        write_frame(g, b"\x00" * 49)
        g.settimeout(20)
        assert g.recv(10) == b""
        g.close()
        # the client sees the close a moment before the listener thread gives the slot back
        assert _wait_for(idle)
        h = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        h.close()
        assert _wait_for(idle)
        c = dial_tcp("127.0.0.1", server.port, stranger, host.pk, timeout=10)
        c.settimeout(20)
        assert c.recv(1) == b""
        c.close()
        assert _wait_for(idle)
        # a whitelisted session no longer counts once accepted (the mux answer says it was);
        # over-cap attempts are shed
        c = dial_tcp("127.0.0.1", server.port, csk, host.pk, timeout=10)
        mux.request(c, "dmsgpty/pty", timeout=20)
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        assert _wait_for(lambda: server._unauth == 2)
        try:
            shed = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            shed.settimeout(20)
            with pytest.raises(ConnectionResetError):
                shed.recv(1)
            shed.close()
        except ConnectionResetError:
            pass
        for s in held:
            s.close()
        c.close()
        assert _wait_for(idle)
    finally:
        server.close()
        host.close()
    with server._lock:
        assert server._unauth == 0 and not server._by_source and not server._conns


def test_refused_client_holds_its_slot_until_the_host_is_done_with_it(monkeypatch):
    # the whitelist refusal is still pre-auth: the slot is released only once the host has
    # finished with the connection (its drain waits for our close, given a long enough bound)
    from skypty import limits
    monkeypatch.setattr(limits, "CLOSE_DRAIN_TIMEOUT", 60.0)
    server, host, _ = _tcp_server(max_unauth=5, per_source=5)
    _, stranger = generate_keypair()
    try:
        c = dial_tcp("127.0.0.1", server.port, stranger, host.pk, timeout=10)
        try:
            c.settimeout(20)
            assert c.recv(1) == b""              # the host's FIN: it now drains until we close
            with server._lock:
                assert server._unauth == 1
            c.close()
            assert _wait_for(lambda: server._unauth == 0)
        finally:
            c.close()
    finally:
        server.close()
        host.close()


def test_hosts_own_key_is_always_allowed_over_tcp(host):
    c = dial_tcp("127.0.0.1", host.port, host.sk, host.pk, timeout=10)
    try:
        mux.request(c, "dmsgpty/pty", timeout=20)
        cl = rpc.RPCClient(c)
        assert _exec(cl, "echo", "self")["Stdout"] == b"self\n"
        cl.close()
    finally:
        c.close()


def test_every_accept_and_reject_is_logged_with_pk_address_and_path(host):
    _, stranger = generate_keypair()
    c, cl = host.pty()
    cl.close()
    s = host.dial(sk=stranger)
    s.settimeout(20)
    assert s.recv(1) == b""
    s.close()
    want = [f"tcp: accept {host.client_pk.hex()}@127.0.0.1:", f"tcp: reject {stranger.pubkey().hex()}@127.0.0.1:",
            "(tcp): not whitelisted", "mux: accept"]
    assert _wait_for(lambda: all(w in host.logtext() for w in want)), host.logtext()


# ------------------------------------------------------------------ the client's retry rule

class _FakeHost:
    """A listener that ends every connection one way: 'eof' (what a host does on a wrong pinned
    key: read message 1, close) or 'reset' (what a host over its pre-auth cap does)."""

    def __init__(self, how: str):
        from skypty.netutil import reset_close
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.ls.settimeout(0.1)
        self.port = self.ls.getsockname()[1]
        self.count = 0
        self.stop = threading.Event()

        def loop():
            while not self.stop.is_set():
                try:
                    s, _ = self.ls.accept()
                except socket.timeout:
                    continue
                self.count += 1
                if how == "reset":
                    reset_close(s)
                    continue
                s.settimeout(10)
                try:
                    (n,) = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))
                    s.recv(n, socket.MSG_WAITALL)
                except (OSError, struct.error):
                    pass
                s.close()
        self.t = threading.Thread(target=loop, daemon=True)
        self.t.start()

    def close(self) -> int:
        self.stop.set()
        self.t.join(10)
        self.ls.setblocking(False)
        while True:   # a retry the loop had not accepted yet is still in the backlog
            try:
                s, _ = self.ls.accept()
            except BlockingIOError:
                break
            self.count += 1
            s.close()
        self.ls.close()
        return self.count


def test_client_does_not_retry_a_wrong_server_key():
    from skypty.client import _handshake
    fake = _FakeHost("eof")
    pk, _ = generate_keypair()
    _, csk = generate_keypair()
    try:
        with pytest.raises(HandshakeError) as ei:
            _handshake("127.0.0.1", fake.port, pk, csk, 10)
    finally:
        n = fake.close()
    assert "wrong server key" in str(ei.value)
    assert n == 1


def test_client_retries_a_shed_connection_a_few_times():
    from skypty import limits
    from skypty.client import _handshake
    fake = _FakeHost("reset")
    pk, _ = generate_keypair()
    _, csk = generate_keypair()
    try:
        with pytest.raises((HandshakeError, SkyptyError)) as ei:
            _handshake("127.0.0.1", fake.port, pk, csk, 10)
    finally:
        n = fake.close()
    assert "wrong server key" not in str(ei.value)
    assert n == 1 + len(limits.CLIENT_HANDSHAKE_RETRY_DELAYS)


def test_control_connections_are_logged(caplog):
    import logging
    caplog.set_level(logging.INFO, logger="skypty")
    host, _, _ = _inproc_host()
    try:
        a, b = socket.socketpair()
        t = threading.Thread(target=host.serve_control_conn, args=(b,), daemon=True)
        t.start()
        mux.request(a, "dmsgpty/whitelist", timeout=20)
        a.close()
        t.join(20)
    finally:
        host.close()
    assert "control: accept -@local (control)" in caplog.text


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="steady_allocator acts on glibc only")
def test_steady_allocator_keeps_bulk_buffers_on_the_heap():
    """glibc maps a fresh 512 KiB block (a bulk-transfer buffer) by default, so every one is
    faulted in anew; after steady_allocator() the heap serves it. Fresh interpreters: the
    setting is per process, and this one may already have made it."""
    from conftest import ROOT

    code = ("import ctypes, sys\n"
            "from skypty import netutil\n"
            "if sys.argv[1] == 'steady':\n"
            "    netutil.steady_allocator()\n"
            "    netutil.steady_allocator()\n"   # once per process: a second call is harmless
            "ba = bytearray(512 * 1024)\n"
            "addr = ctypes.addressof(ctypes.c_char.from_buffer(ba))\n"
            "heap = [l for l in open('/proc/self/maps') if l.rstrip().endswith('[heap]')][0]\n"
            "lo, hi = (int(x, 16) for x in heap.split()[0].split('-'))\n"
            "print('heap' if lo <= addr < hi else 'mapped')\n")
    got = {}
    for how in ("default", "steady"):
        r = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        got[how] = r.stdout.strip()
    assert got == {"default": "mapped", "steady": "heap"}


def test_connect_tcp_tries_each_address_and_keeps_the_timeout():
    """netutil.connect_tcp, every outgoing TCP connection: a name with several addresses
    connects to the first that answers, with TCP_NODELAY and keepalive; nothing answering is
    the last error."""
    from skypty.netutil import connect_tcp

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo("localhost", port, 0, socket.SOCK_STREAM)}
        assert "127.0.0.1" in addrs
        s = connect_tcp("localhost", port, 3.5)   # where localhost is ::1 too, that one is refused first
        try:
            assert s.getpeername()[:2] == ("127.0.0.1", port) and s.gettimeout() == 3.5
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            peer, _ = srv.accept()
            s.sendall(b"ok")
            assert peer.recv(2) == b"ok"
            peer.close()
        finally:
            s.close()
    finally:
        srv.close()
    with pytest.raises(ConnectionRefusedError):
        connect_tcp("127.0.0.1", port, 3.0)
