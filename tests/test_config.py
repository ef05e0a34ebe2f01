"""Host config: shapes, precedence, validation, confgen, --sk-from-visor, atomic rewrites."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import SKYPTY, load_vector, run_skypty
from skypty import config
from skypty.config import HostConfig, load_host_config, read_visor_sk, rewrite_config
from skypty.errors import UsageError
from skypty.keys import PubKey, SecKey

KEYS = load_vector("keys.json")["cases"]
SK0, PK0 = KEYS[0]["sk"], KEYS[0]["pk"]
PK1, PK2, PK3 = KEYS[1]["pk"], KEYS[2]["pk"], KEYS[3]["pk"]
ENV_NAMES = ["DMSGPTY_" + k.upper() for k in config.ENV_KEYS] + ["XPTY_" + k.upper() for k in config.ENV_KEYS]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def host_args(**kw) -> argparse.Namespace:
    """The flags of `app pty dmsg` as argparse leaves them when not given."""
    base = dict(confpath="./config.json", wl=[], dmsgdisc=None, dmsgsessions=None, dmsgport=None, clinet=None,
                cliaddr=None, tcplisten=None, no_dmsg=False, sk_from_visor=None, listen_fd=-1,
                envprefix="DMSGPTY", confstdin=False, unsafe=False, _verb="pty host")
    base.update(kw)
    return argparse.Namespace(**base)


def write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def digest(path) -> tuple:
    st = os.stat(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode)


# ------------------------------------------------------------------ shapes

def test_json_config_go_keys(tmp_path):
    p = write(tmp_path / "c.json", json.dumps({
        "dmsgdisc": "http://127.0.0.1:9090", "dmsgsessions": 2, "dmsgport": 23, "clinet": "unix",
        "cliaddr": str(tmp_path / "s.sock"), "sk": SK0, "pk": PK0, "wl": [PK1, PK2, PK1], "ssh_listen": ":2022"}))
    cfg = load_host_config(host_args(confpath=p))
    assert cfg.sk == SecKey.from_hex(SK0) and cfg.pk == PubKey.from_hex(PK0)
    assert (cfg.dmsgdisc, cfg.dmsgsessions, cfg.dmsgport) == ("http://127.0.0.1:9090", 2, 23)
    assert cfg.cliaddr == str(tmp_path / "s.sock") and cfg.ssh_listen == ":2022"
    assert cfg.wl == [PubKey.from_hex(PK1), PubKey.from_hex(PK2)]   # de-duplicated, order kept
    assert cfg.path == p and cfg.sources["dmsgport"] == "file"


def test_yaml_config_and_absent_keys_keep_defaults(tmp_path):
    p = write(tmp_path / "c.yaml", f"# a comment\nsk: '{SK0}'\nwl:\n  - {PK1}\ntcplisten: 127.0.0.1:2022\n")
    cfg = load_host_config(host_args(confpath=p))
    assert cfg.pk == PubKey.from_hex(PK0)          # derived from sk
    assert cfg.wl == [PubKey.from_hex(PK1)]
    assert cfg.ssh_listen == "127.0.0.1:2022"      # the older key name
    # absent keys keep their defaults (upstream zeroes them)
    assert cfg.dmsgsessions == 1 and cfg.dmsgport == 22 and cfg.clinet == "unix"
    assert cfg.dmsgdisc == config.DEFAULT_DMSGDISC
    from skypty.cli import default_cliaddr
    assert cfg.cliaddr == default_cliaddr() and cfg.sources["cliaddr"] == "default"


def test_empty_and_null_values(tmp_path):
    p = write(tmp_path / "c.yaml", "sk: ''\npk: ''\nwl: null\n")
    cfg = load_host_config(host_args(confpath=p))
    assert cfg.sk is None and cfg.pk is None and cfg.wl == []


def test_default_confpath_may_be_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_host_config(host_args())
    assert cfg.path is None and cfg.sk is None and cfg.dmsgport == 22


def test_explicit_missing_confpath_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_host_config(host_args(confpath=str(tmp_path / "nope.json")))


def test_confstdin(monkeypatch):
    text = json.dumps({"sk": SK0, "dmsgport": 2222})
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    cfg = load_host_config(host_args(confstdin=True, confpath="/nonexistent/x.json"))
    assert cfg.dmsgport == 2222 and cfg.pk == PubKey.from_hex(PK0) and cfg.path is None


def test_cli_pty_host_args_conf_and_allow(tmp_path):
    p = write(tmp_path / "c.json", json.dumps({"sk": SK0, "wl": [PK1]}))
    args = argparse.Namespace(listen=":2022", allow=[f"{PK2},{PK3}"], conf=p, sk_from_visor=None, _verb="pty host")
    cfg = load_host_config(args)
    assert cfg.wl == [PubKey.from_hex(x) for x in (PK1, PK2, PK3)]
    assert cfg.wl_extra == [PubKey.from_hex(PK2), PubKey.from_hex(PK3)]


# ------------------------------------------------------------------ precedence

def test_precedence_flags_env_file_defaults(tmp_path, monkeypatch):
    p = write(tmp_path / "c.json", json.dumps({"dmsgport": 30, "dmsgsessions": 3, "cliaddr": "/file.sock",
                                               "dmsgdisc": "http://file"}))
    monkeypatch.setenv("DMSGPTY_DMSGPORT", "40")
    monkeypatch.setenv("DMSGPTY_CLIADDR", "/env.sock")
    monkeypatch.setenv("DMSGPTY_CLINET", "tcp")
    cfg = load_host_config(host_args(confpath=p, cliaddr="/flag.sock"))
    assert cfg.cliaddr == "/flag.sock" and cfg.sources["cliaddr"] == "flag"      # flag > env > file
    assert cfg.dmsgport == 40 and cfg.sources["dmsgport"] == "env"               # env > file
    assert cfg.clinet == "tcp" and cfg.sources["clinet"] == "env"                # env > default
    assert cfg.dmsgsessions == 3 and cfg.sources["dmsgsessions"] == "file"       # file > default
    assert cfg.dmsgdisc == "http://file"


def test_envprefix(tmp_path, monkeypatch):
    monkeypatch.setenv("DMSGPTY_DMSGSESSIONS", "5")
    monkeypatch.setenv("XPTY_DMSGSESSIONS", "7")
    monkeypatch.setenv("XPTY_DMSGDISC", "http://x")
    monkeypatch.chdir(tmp_path)   # the default ./config.json is absent here
    cfg = load_host_config(host_args(envprefix="XPTY"))
    assert cfg.dmsgsessions == 7 and cfg.dmsgdisc == "http://x"


def test_bad_env_value_is_usage_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMSGPTY_DMSGPORT", "http")
    with pytest.raises(UsageError, match="DMSGPTY_DMSGPORT"):
        load_host_config(host_args())


def test_flag_wl_merges_with_file(tmp_path):
    p = write(tmp_path / "c.json", json.dumps({"sk": SK0, "wl": [PK1]}))
    cfg = load_host_config(host_args(confpath=p, wl=[PK2, f"{PK1},{PK3}"]))
    assert cfg.wl == [PubKey.from_hex(x) for x in (PK1, PK2, PK3)]
    assert cfg.sources["wl"] == "file+flag"


# ------------------------------------------------------------------ bad configs

BAD = [
    ("unknown.json", json.dumps({"sk": SK0, "colour": "red"}), "unknown key 'colour'"),
    ("malformed.yaml", "sk: [unclosed\n", "malformed YAML"),
    ("badhex.json", json.dumps({"sk": "zz" * 32}), "sk: invalid secret key"),
    ("shortsk.json", json.dumps({"sk": SK0[:-2]}), "62 hex characters"),
    ("shortpk.json", json.dumps({"pk": PK0[:-2]}), "pk: invalid public key"),
    ("mismatch.json", json.dumps({"sk": SK0, "pk": PK1}), "pk does not match sk"),
    ("badwl.json", json.dumps({"wl": [PK1, "abc"]}), "wl[1]"),
    ("wlnotlist.json", json.dumps({"wl": PK1}), "expected a list"),
    ("port.json", json.dumps({"dmsgport": 70000}), "out of range"),
    ("porttype.json", json.dumps({"dmsgport": True}), "expected an integer"),
    ("clinet.json", json.dumps({"clinet": "udp"}), "unknown network"),
    ("list.yaml", "- a\n- b\n", "expected a mapping"),
    ("skint.yaml", "sk: 1234\n", "quote it in YAML"),
]


@pytest.mark.parametrize("name,text,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_usage_error(tmp_path, name, text, needle):
    p = write(tmp_path / name, text)
    os.chmod(p, 0o640)
    before = digest(p)
    with pytest.raises(UsageError) as ei:
        load_host_config(host_args(confpath=p))
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg and p in msg
    assert SK0 not in msg   # a secret is never echoed
    assert digest(p) == before


def test_bad_config_through_cli_exits_2_one_line(tmp_path):
    # The control-socket client reads clinet/cliaddr from -p: a malformed file is exit 2, one line.
    p = write(tmp_path / "bad.yaml", "cliaddr: [oops\n")
    before = digest(p)
    r = run_skypty("app", "pty", "exec", "whitelist", "-p", p)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and "malformed YAML" in err and "Traceback" not in err
    assert digest(p) == before


def test_huge_config_refused(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * (config.CONFIG_MAX_BYTES + 10))
    with pytest.raises(UsageError, match="larger than"):
        load_host_config(host_args(confpath=str(p)))


# ------------------------------------------------------------------ --sk-from-visor

def test_sk_from_visor(tmp_path):
    v = write(tmp_path / "skywire-config.json", json.dumps({"version": "v1", "sk": SK0, "pk": PK0, "dmsg": {}}))
    c = write(tmp_path / "c.json", json.dumps({"sk": KEYS[1]["sk"], "wl": [PK2]}))
    cfg = load_host_config(host_args(confpath=c, sk_from_visor=v, no_dmsg=True))
    assert cfg.sk == SecKey.from_hex(SK0) and cfg.pk == PubKey.from_hex(PK0) and cfg.sources["sk"] == "visor"
    assert cfg.wl == [PubKey.from_hex(PK2)]


def test_sk_from_visor_needs_no_dmsg(tmp_path):
    v = write(tmp_path / "v.json", json.dumps({"sk": SK0}))
    with pytest.raises(UsageError, match="--no-dmsg"):
        load_host_config(host_args(sk_from_visor=v, confpath=str(tmp_path / "x.json")))
    # `app pty tcp` never joins dmsg and `cli pty host` has no dmsg at all
    cfg = load_host_config(host_args(sk_from_visor=v, confpath=None, _verb="pty tcp"))
    assert cfg.pk == PubKey.from_hex(PK0)
    cfg = load_host_config(argparse.Namespace(conf=None, allow=[], sk_from_visor=v, _verb="pty host"))
    assert cfg.pk == PubKey.from_hex(PK0)


@pytest.mark.parametrize("doc,needle", [
    ({"pk": PK0}, 'no top-level "sk"'),
    ({"sk": ""}, 'no top-level "sk"'),
    ({"sk": 5}, "not a string"),
    ({"sk": "00" * 32}, "out of range"),
    ({"sk": SK0[:10]}, "10 hex characters"),
])
def test_read_visor_sk_errors(tmp_path, doc, needle):
    v = write(tmp_path / "v.json", json.dumps(doc))
    with pytest.raises(UsageError, match=needle):
        read_visor_sk(v)


def test_read_visor_sk_not_json(tmp_path):
    v = write(tmp_path / "v.json", "sk: abc\n")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_visor_sk(v)


# ------------------------------------------------------------------ confgen

def _umask0():
    os.umask(0)


def test_confgen_0600_prints_pk_and_refuses_overwrite(tmp_path):
    p = str(tmp_path / "config.json")
    r = subprocess.run(SKYPTY + ["app", "pty", "dmsg", "confgen", p], capture_output=True, preexec_fn=_umask0,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600          # even with umask 0
    doc = json.load(open(p))
    assert list(doc) == ["dmsgdisc", "dmsgsessions", "dmsgport", "clinet", "cliaddr", "sk", "pk", "wl"]
    assert doc["wl"] is None and doc["dmsgport"] == 22 and doc["dmsgsessions"] == 1
    assert SecKey.from_hex(doc["sk"]).pubkey().hex() == doc["pk"] == r.stdout.decode().strip()
    assert open(p).read().startswith('{\n    "dmsgdisc"')       # Go's 4-space indentation
    cfg = load_host_config(host_args(confpath=p))              # and it loads
    assert cfg.pk.hex() == doc["pk"]

    before = digest(p)
    r2 = run_skypty("app", "pty", "dmsg", "confgen", p)
    assert r2.returncode == 2 and b"--unsafe" in r2.stderr and r2.stderr.count(b"\n") == 1
    assert digest(p) == before

    r3 = subprocess.run(SKYPTY + ["dmsg", "pty", "host", "confgen", "--unsafe", p], capture_output=True,
                        preexec_fn=_umask0, timeout=60)
    assert r3.returncode == 0, r3.stderr
    doc3 = json.load(open(p))
    assert doc3["pk"] != doc["pk"] and doc3["pk"] == r3.stdout.decode().strip()
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["config.json"]     # no temp file left behind


def test_confgen_never_follows_a_symlink_without_unsafe(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep me")
    link = tmp_path / "config.json"
    os.symlink(target, link)
    r = run_skypty("app", "pty", "dmsg", "confgen", str(link))
    assert r.returncode == 2 and target.read_text() == "keep me"


def test_confgen_missing_dir(tmp_path):
    r = run_skypty("app", "pty", "dmsg", "confgen", str(tmp_path / "no" / "such" / "c.json"))
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"cannot write" in r.stderr


# ------------------------------------------------------------------ rewrites

def test_rewrite_json_preserves_other_keys_and_is_0600(tmp_path):
    p = write(tmp_path / "c.json", json.dumps({"sk": SK0, "custom_order": 1, "wl": None, "cliaddr": "/x"}))
    os.chmod(p, 0o644)
    ino = os.stat(p).st_ino

    def mutate(doc):
        doc["wl"] = [PK1]
    rewrite_config(p, mutate)
    doc = json.load(open(p))
    assert list(doc) == ["sk", "custom_order", "wl", "cliaddr"] and doc["wl"] == [PK1] and doc["sk"] == SK0
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_ino != ino   # replaced by rename, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["c.json"]


def test_rewrite_yaml_stays_yaml(tmp_path):
    p = write(tmp_path / "c.yaml", f"sk: '{SK0}'\ndmsgport: 23\n")
    rewrite_config(p, lambda d: d.update(wl=[PK1]))
    text = open(p).read()
    assert not text.lstrip().startswith("{")
    cfg = load_host_config(host_args(confpath=p))
    assert cfg.dmsgport == 23 and cfg.wl == [PubKey.from_hex(PK1)] and cfg.sk == SecKey.from_hex(SK0)


def test_rewrite_follows_symlink(tmp_path):
    real = write(tmp_path / "real.json", json.dumps({"sk": SK0}))
    link = tmp_path / "link.json"
    os.symlink(real, link)
    rewrite_config(str(link), lambda d: d.update(wl=[PK2]))
    assert os.path.islink(link) and json.load(open(real))["wl"] == [PK2]


def test_rewrite_of_bad_file_does_not_touch_it(tmp_path):
    p = write(tmp_path / "c.yaml", "sk: [oops\n")
    before = digest(p)
    with pytest.raises(UsageError):
        rewrite_config(p, lambda d: d.update(wl=[]))
    assert digest(p) == before


def test_hostconfig_defaults():
    c = HostConfig()
    assert c.sk is None and c.wl == [] and c.dmsgport == 22 and c.clinet == "unix"


def test_example_config_documents_every_key_and_loads():
    from conftest import ROOT
    p = os.path.join(ROOT, "config.example.yaml")
    doc, fmt = config.read_document(p)
    assert fmt == "yaml" and set(doc) == set(config.CONFIG_KEYS)
    cfg = load_host_config(host_args(confpath=p))
    assert cfg.sk is None and cfg.wl == [] and cfg.dmsgport == 22 and cfg.cliaddr == "/tmp/pty.sock"


def test_sk_from_visor_with_dmsg_through_cli_is_exit_2(tmp_path):
    v = write(tmp_path / "v.json", json.dumps({"sk": SK0}))
    r = run_skypty("app", "pty", "dmsg", "-c", str(tmp_path / "none.json"), "--sk-from-visor", v)
    assert r.returncode == 2 and b"--no-dmsg" in r.stderr and r.stderr.count(b"\n") == 1


def _unit_exec_lines(name):
    from conftest import ROOT
    with open(os.path.join(ROOT, "contrib", "systemd", name)) as f:
        return [ln.split("=", 1)[1] for ln in f if ln.startswith(("ExecStart=", "ExecStartPre="))]


@pytest.mark.parametrize("unit", ["skypty-host.service", "skypty-tcp@.service"])
def test_systemd_units_use_real_flags(unit):
    import shlex
    from skypty.cli import build_parser
    lines = _unit_exec_lines(unit)
    assert lines
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "/bin/sh":        # ExecStartPre wrapper: check the command after `exec`
            argv = shlex.split(argv[2].split("exec ", 1)[1])
        assert argv[0].endswith("/skypty")
        ns = build_parser().parse_args(argv[1:])          # exits 2 on an unknown flag
        assert ns._target.startswith(("skypty.host:", "skypty.config:"))
    if unit == "skypty-tcp@.service":
        assert ns.listen_fd == 3 and ns.no_dmsg


def test_systemd_units_verify(tmp_path):
    import shutil
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    from conftest import ROOT
    src = os.path.join(ROOT, "contrib", "systemd")
    for name in ("skypty-host.service", "skypty-tcp.socket", "skypty-tcp@.service"):
        text = open(os.path.join(src, name)).read().replace("/usr/local/bin/skypty", "/bin/true")
        (tmp_path / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "skypty-host.service"),
                        str(tmp_path / "skypty-tcp.socket")], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "skypty" not in r.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0 and "skypty" not in r.stderr, r.stderr
