"""Whitelist stores: memory and config-file backed (re-read on change, atomic 0600 rewrites)."""
from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from conftest import load_vector
from skypty.config import HostConfig
from skypty.keys import PubKey, SecKey
from skypty.whitelist import ConfigWhitelist, MemoryWhitelist, WhitelistError, open_whitelist

KEYS = load_vector("keys.json")["cases"]
OWN = PubKey.from_hex(KEYS[0]["pk"])
A, B, C, D = (PubKey.from_hex(KEYS[i]["pk"]) for i in (1, 2, 3, 4))


def write_cfg(path, doc, mode=0o600) -> str:
    with open(path, "w") as f:
        json.dump(doc, f)
    os.chmod(path, mode)
    return str(path)


def ident(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def bump_mtime(path, delta_ns=10_000_000_000):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + delta_ns))


# ------------------------------------------------------------------ memory

def test_memory_whitelist_basics():
    wl = MemoryWhitelist(OWN, [A, B, A])
    assert wl.list() == [A, B]
    assert wl.allowed(OWN) and wl.allowed(A) and wl.allowed(bytes(B)) and not wl.allowed(C)
    assert not wl.allowed(PubKey.null()) and not wl.allowed(None) and not wl.allowed(b"junk")
    wl.add([C])
    assert wl.list() == [A, B, C] and wl.allowed(C)
    wl.remove([A])
    assert wl.list() == [B, C] and not wl.allowed(A)
    assert wl.allowed(OWN)   # the host's own key is always allowed, never listed
    assert OWN not in wl.list()


def test_memory_whitelist_existing_and_absent_are_messages():
    wl = MemoryWhitelist(OWN, [A])
    with pytest.raises(WhitelistError) as ei:
        wl.add([A, B])
    assert str(ei.value) == f"skipping append for {A.hex()}. Already exists"
    assert wl.list() == [A, B]   # the new key of the same call was still added
    with pytest.raises(WhitelistError, match=f"skipping removal for {C.hex()}. Not in whitelist"):
        wl.remove([C, B])
    assert wl.list() == [A]
    with pytest.raises(WhitelistError, match="null key"):
        wl.add([PubKey.null()])


def test_memory_whitelist_threads():
    wl = MemoryWhitelist(OWN)
    keys = [SecKey(bytes([0] * 31 + [i])).pubkey() for i in range(1, 41)]

    def worker(chunk):
        for pk in chunk:
            wl.add([pk])
    ts = [threading.Thread(target=worker, args=(keys[i::4],)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(wl.list()) == sorted(keys)


# ------------------------------------------------------------------ config file

def test_config_whitelist_reads_wl(tmp_path):
    p = write_cfg(tmp_path / "c.json", {"sk": KEYS[0]["sk"], "wl": [A.hex(), B.hex()]})
    wl = ConfigWhitelist(OWN, p)
    assert wl.list() == [A, B] and wl.allowed(A) and wl.allowed(OWN) and not wl.allowed(C)


def test_config_whitelist_rereads_on_change(tmp_path):
    p = write_cfg(tmp_path / "c.json", {"wl": [A.hex()]})
    wl = ConfigWhitelist(OWN, p)
    assert wl.allowed(A) and not wl.allowed(B)
    # an in-place edit by hand (same inode): seen through size/mtime
    with open(p, "w") as f:
        json.dump({"wl": [B.hex()]}, f)
    bump_mtime(p)
    assert wl.allowed(B) and not wl.allowed(A)
    # a same-size in-place edit: seen through mtime
    with open(p, "w") as f:
        json.dump({"wl": [C.hex()]}, f)
    bump_mtime(p, 20_000_000_000)
    assert wl.list() == [C]
    # an editor that writes a new file and renames it: seen through the inode
    tmp = tmp_path / "new.json"
    write_cfg(tmp, {"wl": [D.hex()]})
    os.replace(tmp, p)
    assert wl.list() == [D]


def test_config_whitelist_fails_closed(tmp_path):
    p = write_cfg(tmp_path / "c.json", {"wl": [A.hex()]})
    wl = ConfigWhitelist(OWN, p)
    assert wl.allowed(A)
    with open(p, "w") as f:
        f.write('{"wl": ["02zz"')   # half-written by an editor
    bump_mtime(p)
    assert not wl.allowed(A) and wl.allowed(OWN) and wl.list() == []
    write_cfg(p, {"wl": [A.hex()]})
    bump_mtime(p, 30_000_000_000)
    assert wl.allowed(A)
    os.unlink(p)
    assert not wl.allowed(A) and wl.allowed(OWN)


def test_config_whitelist_add_remove_rewrite_atomically(tmp_path):
    doc = {"dmsgdisc": "http://127.0.0.1:1", "sk": KEYS[0]["sk"], "pk": OWN.hex(), "wl": None, "cliaddr": "/x"}
    p = write_cfg(tmp_path / "c.json", doc, mode=0o644)
    wl = ConfigWhitelist(OWN, p)
    ino = os.stat(p).st_ino
    wl.add([A, B])
    out = json.load(open(p))
    assert out["wl"] == [A.hex(), B.hex()]
    assert {k: v for k, v in out.items() if k != "wl"} == {k: v for k, v in doc.items() if k != "wl"}
    assert list(out) == list(doc)                           # key order preserved too
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_ino != ino
    assert sorted(os.listdir(tmp_path)) == ["c.json"]       # no temp files left
    assert wl.allowed(A) and wl.allowed(B)
    wl.remove([A])
    assert json.load(open(p))["wl"] == [B.hex()] and not wl.allowed(A)
    # a second store on the same file (another host process) sees the change
    assert ConfigWhitelist(OWN, p).list() == [B]


def test_config_whitelist_noop_changes_do_not_rewrite(tmp_path):
    p = write_cfg(tmp_path / "c.json", {"wl": [A.hex()]})
    wl = ConfigWhitelist(OWN, p)
    before = ident(p)
    with pytest.raises(WhitelistError, match="Already exists"):
        wl.add([A])
    with pytest.raises(WhitelistError, match="Not in whitelist"):
        wl.remove([B])
    assert ident(p) == before
    with pytest.raises(WhitelistError, match="Already exists"):
        wl.add([A, C])                                      # partial: C added, A reported
    assert json.load(open(p))["wl"] == [A.hex(), C.hex()]


def test_config_whitelist_bad_file_is_never_rewritten(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("wl: [oops\n")
    before = ident(p)
    wl = ConfigWhitelist(OWN, str(p))
    with pytest.raises(WhitelistError, match="cannot update the whitelist"):
        wl.add([A])
    assert ident(p) == before and p.read_text() == "wl: [oops\n"


def test_config_whitelist_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"sk: '{KEYS[0]['sk']}'\nwl:\n  - {A.hex()}\n")
    wl = ConfigWhitelist(OWN, str(p))
    wl.add([B])
    text = p.read_text()
    assert not text.lstrip().startswith("{") and B.hex() in text
    assert ConfigWhitelist(OWN, str(p)).list() == [A, B]


def test_config_whitelist_extra_keys(tmp_path):
    p = write_cfg(tmp_path / "c.json", {"wl": [A.hex()]})
    wl = ConfigWhitelist(OWN, p, extra=[B])
    assert wl.allowed(B) and wl.list() == [A, B]
    with pytest.raises(WhitelistError, match="--wl"):
        wl.remove([B])
    assert json.load(open(p))["wl"] == [A.hex()]


def test_config_whitelist_concurrent_adds(tmp_path):
    p = write_cfg(tmp_path / "c.json", {"wl": []})
    wl = ConfigWhitelist(OWN, p)
    keys = [SecKey(bytes([0] * 31 + [i])).pubkey() for i in range(1, 21)]
    ts = [threading.Thread(target=wl.add, args=([k],)) for k in keys]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(PubKey.from_hex(h) for h in json.load(open(p))["wl"]) == sorted(keys)


def test_open_whitelist_picks_store(tmp_path):
    p = write_cfg(tmp_path / "c.json", {"wl": [A.hex()]})
    sk = SecKey.from_hex(KEYS[0]["sk"])
    cfg = HostConfig(sk=sk, pk=OWN, wl=[A, B], path=p, wl_extra=[B])
    wl = open_whitelist(cfg)
    assert isinstance(wl, ConfigWhitelist) and wl.allowed(OWN) and wl.allowed(B)
    cfg2 = HostConfig(sk=sk, pk=OWN, wl=[A])
    wl2 = open_whitelist(cfg2)
    assert isinstance(wl2, MemoryWhitelist) and wl2.list() == [A] and wl2.allowed(OWN)
