"""dmsg end to end on 127.0.0.1: real `skypty dmsg disc` and `skypty dmsg server` processes,
dmsg clients and mode-2 hosts. Nothing is faked."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import threading
import time

import pytest

from conftest import SKYPTY, free_port, stop_process, wait_port
from skypty.keys import SecKey, generate_keypair
from skypty.transport.dmsg import disc as dmsgdisc
from skypty.transport.dmsg.client import DmsgClient
from skypty.transport.dmsg.stream import DmsgError

pytestmark = pytest.mark.timeout(180)


def _popen(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(SKYPTY + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kw)


def _wait(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def disc_proc():
    port = free_port()
    p = _popen("dmsg", "disc", "--addr", f"127.0.0.1:{port}")
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}", port
    finally:
        stop_process(p)


def _start_server(url, sk_hex, port):
    p = _popen("dmsg", "server", "--sk", sk_hex, "--listen", f"127.0.0.1:{port}", "--dmsgdisc", url)
    try:
        wait_port(port)
        pk = SecKey.from_hex(sk_hex).pubkey()
        dc = dmsgdisc.DiscClient(url)
        _wait(lambda: any(e["static"] == pk.hex() for e in dc.available_servers()), what="server entry")
    except BaseException:
        stop_process(p)
        raise
    return p


@pytest.fixture
def dmsg_net(disc_proc):
    url, _ = disc_proc
    _, ssk = generate_keypair()
    sport = free_port()
    state = {"proc": _start_server(url, ssk.hex(), sport), "sk": ssk, "port": sport, "url": url}
    try:
        yield state
    finally:
        stop_process(state["proc"])


def _http(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = c.getresponse()
        return r.status, r.getheader("Content-Type"), r.read().decode()
    finally:
        c.close()


# ---------------------------------------------------------------- discovery API

def test_disc_replays_go_exchanges(disc_proc, vectors):
    """The client-entry exchanges of discovery.json give Go's status codes and bodies."""
    _, port = disc_proc
    for ex in vectors("discovery.json")["http_api"]["exchanges"]:
        if ex["path"].endswith(("available_servers", "all_servers")):
            continue   # those replies depend on a server entry Go stored with a 2023 timestamp
        body = ex["request_wire_text"].split("\r\n\r\n", 1)[1] or None
        status, ctype, text = _http(port, ex["method"], ex["path"], body)
        assert (status, text) == (ex["response_status"], ex["response_body_text"]), ex["call"]
        assert ctype == ex["response_content_type"]


def test_disc_servers_delete_and_limits(disc_proc):
    url, port = disc_proc
    dc = dmsgdisc.DiscClient(url)
    assert dc.available_servers() == []
    status, _, text = _http(port, "GET", "/dmsg-discovery/available_servers")
    assert status == 404 and json.loads(text)["message"] == dmsgdisc.MSG_NO_SERVERS
    pk, sk = generate_keypair()
    e = dmsgdisc.sign_entry(dmsgdisc.new_server_entry(pk, "127.0.0.1:1", 5), sk)
    dc.post_entry(e)
    assert [x["static"] for x in dc.available_servers()] == [pk.hex()]
    e = dc.put_entry(e, sk)
    assert dc.entry(pk)["sequence"] == 1
    dc.delete_entry(e)
    with pytest.raises(dmsgdisc.EntryNotFoundError):
        dc.entry(pk)
    status, _, _ = _http(port, "POST", "/dmsg-discovery/entry/", b"{" + b" " * (70 * 1024) + b"}")
    assert status == 413
    status, _, text = _http(port, "POST", "/dmsg-discovery/entry/", b"not json")
    assert status == 400
    status, _, _ = _http(port, "GET", "/dmsg-discovery/entry/zz")
    assert status == 400


def test_disc_entry_expiry():
    srv = dmsgdisc.DiscServer(("127.0.0.1", 0), ttl=0.3)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        dc = dmsgdisc.DiscClient(f"http://127.0.0.1:{srv.server_address[1]}")
        pk, sk = generate_keypair()
        dc.post_entry(dmsgdisc.sign_entry(dmsgdisc.new_server_entry(pk, "127.0.0.1:1", 5), sk))
        cpk, csk = generate_keypair()
        dc.post_entry(dmsgdisc.sign_entry(dmsgdisc.new_client_entry(cpk, [pk]), csk))
        assert dc.entry(pk)
        _wait(lambda: not dc.available_servers(), 10, "server entry expiry")
        assert dc.entry(cpk)   # client entries do not expire (Go)
    finally:
        srv.shutdown()
        srv.server_close()


def test_dmsg_url_is_a_clear_gap():
    with pytest.raises(Exception) as ei:
        dmsgdisc.DiscClient("dmsg://" + "02" * 33 + ":80")
    assert "not supported" in str(ei.value)


# ---------------------------------------------------------------- clients through a real server

def _echo_listener(client, port):
    lis = client.listen(port)

    def serve():
        while True:
            try:
                c = lis.accept()
            except Exception:
                return

            def echo(c=c):
                try:
                    while True:
                        b = c.recv(65536)
                        if not b:
                            break
                        c.sendall(b)
                except (OSError, EOFError):
                    pass   # the session died under us (the restart test)
                finally:
                    c.close()
            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return lis


@contextlib.contextmanager
def _echo_pair(url):
    """Two ready clients (a, b) with b echoing on port 22; both closed after the block."""
    a = DmsgClient(generate_keypair()[1], url).start()
    b = DmsgClient(generate_keypair()[1], url).start()
    try:
        assert a.wait_ready(20) and b.wait_ready(20)
        _echo_listener(b, 22)
        yield a, b
    finally:
        a.close()
        b.close()


def test_clients_dial_echo_iplookup_and_errors(dmsg_net):
    with _echo_pair(dmsg_net["url"]) as (a, b):
        with pytest.raises(DmsgError) as ei:
            b.listen(22)
        assert ei.value.code == 400
        c = a.dial(b.pk, 22)
        assert c.local_addr.port == 49153 and c.remote_addr == (b.pk, 22)
        payload = os.urandom(300_000)
        threading.Thread(target=lambda: (c.sendall(payload), c.shutdown_write()), daemon=True).start()
        got = bytearray()
        while True:
            x = c.recv(65536)
            if not x:
                break
            got += x
        assert bytes(got) == payload
        c.close()
        assert a.lookup_ip() == "127.0.0.1"
        with pytest.raises(DmsgError) as ei:
            a.dial(b.pk, 23)
        assert ei.value.code == 352 and "no listener" in str(ei.value)
        with pytest.raises(DmsgError) as ei:
            a.dial(generate_keypair()[0], 22)
        assert ei.value.code == 100


def test_standalone_ephemeral_client_dials(dmsg_net):
    url = dmsg_net["url"]
    b = DmsgClient(generate_keypair()[1], url).start()
    eph = DmsgClient(generate_keypair()[1], url, sessions=0, maintain=False)
    try:
        assert b.wait_ready(20)
        _echo_listener(b, 22)
        c = eph.dial(b.pk, 22)
        c.sendall(b"one-shot")
        assert c.recv_exact(8) == b"one-shot"
        c.close()
    finally:
        eph.close()
        b.close()


def test_server_restart_is_survived(dmsg_net):
    url = dmsg_net["url"]
    with _echo_pair(url) as (a, b):
        c = a.dial(b.pk, 22)
        c.sendall(b"before")
        assert c.recv_exact(6) == b"before"
        stop_process(dmsg_net["proc"])
        dmsg_net["proc"] = _start_server(url, dmsg_net["sk"].hex(), dmsg_net["port"])
        deadline = time.monotonic() + 10
        while True:
            try:
                c = a.dial(b.pk, 22, timeout=5)
                break
            except DmsgError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        c.sendall(b"after")
        assert c.recv_exact(5) == b"after"
        c.close()


def test_two_servers_sessions_and_cross_dial(dmsg_net):
    """--dmsgsessions 2 keeps a session with each server; a dialer on either one reaches it."""
    from skypty.transport.dmsg.server import DmsgServer
    url = dmsg_net["url"]
    _, s2sk = generate_keypair()
    s2 = DmsgServer(s2sk, ("127.0.0.1", 0), "", url)
    s2.public_address = f"127.0.0.1:{s2.address[1]}"
    threading.Thread(target=s2.serve_forever, daemon=True).start()
    b = DmsgClient(generate_keypair()[1], url, sessions=2).start()
    a = DmsgClient(generate_keypair()[1], url, sessions=1).start()
    try:
        dc = dmsgdisc.DiscClient(url)
        _wait(lambda: len(dc.available_servers()) == 2, what="second server entry")

        def b_has_two() -> bool:
            try:
                return len(b.sessions()) == 2 and len(dc.entry(b.pk)["client"]["delegated_servers"]) == 2
            except dmsgdisc.EntryNotFoundError:
                return False   # B's first entry is not posted yet
        _wait(b_has_two, what="two sessions in B's entry")
        assert a.wait_ready(20)
        _echo_listener(b, 22)
        c = a.dial(b.pk, 22)
        c.sendall(b"via any server")
        assert c.recv_exact(14) == b"via any server"
        c.close()
    finally:
        a.close()
        b.close()
        s2.close()


# ---------------------------------------------------------------- mode-2 hosts (subprocesses)

def _host_cfg(tmp_path, name, url, wl):
    pk, sk = generate_keypair()
    sock = str(tmp_path / f"{name}.sock")
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps({"sk": sk.hex(), "pk": pk.hex(), "dmsgdisc": url, "dmsgsessions": 1,
                               "dmsgport": 22, "clinet": "unix", "cliaddr": sock,
                               "wl": [p.hex() for p in wl]}))
    os.chmod(cfg, 0o600)
    return pk, sk, str(cfg), sock


def _start_host(cfg, url, sock):
    p = _popen("app", "pty", "dmsg", "-c", cfg, "--dmsgdisc", url, "--cliaddr", sock)
    return p


def _wait_host(url, pk, p, timeout=30):
    dc = dmsgdisc.DiscClient(url)

    def up():
        if p.poll() is not None:
            raise AssertionError(f"host exited: {p.stdout.read().decode(errors='replace')}")
        try:
            return bool(dc.entry(pk)["client"]["delegated_servers"])
        except dmsgdisc.DiscoveryError:
            return False
    _wait(up, timeout, "host's dmsg entry")


@pytest.fixture
def two_hosts(dmsg_net, tmp_path):
    pytest.importorskip("skypty.host")
    url = dmsg_net["url"]
    client_pk, client_sk = generate_keypair()
    a_pk, a_sk, a_cfg, a_sock = _host_cfg(tmp_path, "a", url, [])
    # B whitelists A and the standalone client, not the stranger
    b_pk, b_sk, b_cfg, b_sock = _host_cfg(tmp_path, "b", url, [a_pk, client_pk])
    procs = []
    try:
        procs.append(_start_host(a_cfg, url, a_sock))
        procs.append(_start_host(b_cfg, url, b_sock))
        _wait_host(url, a_pk, procs[0])
        _wait_host(url, b_pk, procs[1])
        yield {"url": url, "a_sock": a_sock, "b_pk": b_pk, "client_sk": client_sk, "net": dmsg_net}
    finally:
        for p in procs:
            stop_process(p)


def _proxy_exec(sock, b_pk, *cmd):
    return subprocess.run(SKYPTY + ["app", "pty", "exec", "exec", "-r", sock, "--addr", f"{b_pk.hex()}:22",
                                    "--"] + list(cmd), capture_output=True, timeout=60)


def test_mode2_exec_through_control_proxy(two_hosts):
    r = _proxy_exec(two_hosts["a_sock"], two_hosts["b_pk"], "sh", "-c", "echo over-dmsg; exit 3")
    assert r.stdout == b"over-dmsg\n", r.stderr
    assert r.returncode == 3


def test_mode2_interactive_shell_through_control_proxy(two_hosts):
    """An operator on host A opens a shell on host B over dmsg: `app pty exec --addr <B>:22`."""
    import pexpect

    child = pexpect.spawn(SKYPTY[0], SKYPTY[1:] + ["app", "pty", "exec", "-r", two_hosts["a_sock"],
                                                   "--addr", f"{two_hosts['b_pk'].hex()}:22", "-c", "/bin/sh"],
                          dimensions=(31, 97), env=dict(os.environ, PS1="dmsg$ ", TERM="xterm"), timeout=30)
    try:
        child.sendline("echo $((6*7)) on-b")
        child.expect("42 on-b")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_mode2_standalone_client_and_refusal(two_hosts):
    from skypty.client import PtyClient
    from skypty.errors import RejectedError
    from skypty.transport.dmsg.client import dial_standalone
    url, b_pk = two_hosts["url"], two_hosts["b_pk"]
    conn = dial_standalone(b_pk, 22, two_hosts["client_sk"], url, "dmsgpty/pty")
    try:
        res = PtyClient(conn).exec("echo", ["standalone"])
    finally:
        conn.close()
    assert res["Stdout"] == b"standalone\n"
    # a peer B does not whitelist: the host answers the request with 0x01
    with pytest.raises(RejectedError) as ei:
        dial_standalone(b_pk, 22, generate_keypair()[1], url, "dmsgpty/pty")
    assert "rejected" in str(ei.value)


def test_mode2_survives_server_restart(two_hosts):
    net = two_hosts["net"]
    stop_process(net["proc"])
    net["proc"] = _start_server(net["url"], net["sk"].hex(), net["port"])
    deadline = time.monotonic() + 10
    while True:
        r = _proxy_exec(two_hosts["a_sock"], two_hosts["b_pk"], "echo", "again")
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert (r.returncode, r.stdout) == (0, b"again\n"), r.stderr


def test_server_go_style_config(disc_proc, tmp_path):
    """`dmsg server -c file.json` reads Go's keys (secret_key, discovery, local/public address)."""
    url, _ = disc_proc
    pk, sk = generate_keypair()
    port = free_port()
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"public_key": pk.hex(), "secret_key": sk.hex(), "discovery": url,
                               "local_address": f"127.0.0.1:{port}", "public_address": f"localhost:{port}",
                               "max_sessions": 7, "update_interval": 0}))
    p = _popen("dmsg", "server", "-c", str(cfg))
    try:
        dc = dmsgdisc.DiscClient(url)
        _wait(lambda: bool(dc.available_servers()), what="server entry")
        e = dc.entry(pk)
        assert e["server"] == {"address": f"localhost:{port}", "availableSessions": 7, "serverType": ""}
        dmsgdisc.verify_entry(e)
    finally:
        stop_process(p)
