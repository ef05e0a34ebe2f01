"""Smoke test of the two single-file artefacts (`make dist-test` builds them first).

Each artefact runs `--version`, makes a config, hosts (`cli pty host`) and connects to itself
(`cli pty shell … -- true`), all as real processes on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, stop_process, wait_port

DIST = os.environ.get("SKYPTY_DIST") or os.path.join(ROOT, "dist")
ARTEFACTS = {
    "zipapp": [sys.executable, os.path.join(DIST, "skypty.pyz")],
    "onefile": [os.path.join(DIST, "skypty")],
}


@pytest.mark.parametrize("kind", sorted(ARTEFACTS))
def test_artefact_hosts_and_connects(kind, tmp_path):
    argv = ARTEFACTS[kind]
    if not os.path.exists(argv[-1]):
        pytest.skip(f"{argv[-1]} not built (run `make dist-test`)")
    r = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("skypty "), r.stderr

    host_cfg, client_cfg = tmp_path / "host.json", tmp_path / "client.json"
    for cfg in (host_cfg, client_cfg):
        r = subprocess.run(argv + ["app", "pty", "dmsg", "confgen", str(cfg)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
    host, client = json.loads(host_cfg.read_text()), json.loads(client_cfg.read_text())

    port = free_port()
    p = subprocess.Popen(argv + ["cli", "pty", "host", "-l", f"127.0.0.1:{port}", "-c", str(host_cfg),
                                 "--allow", client["pk"]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, timeout=30)
        r = subprocess.run(argv + ["cli", "pty", "shell", f"{host['pk']}@127.0.0.1:{port}", "-s", client["sk"],
                                   "--", "sh", "-c", "echo hi; exit 3"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout == "hi\n", r.stderr
        assert r.returncode == 3
    finally:
        stop_process(p)
        p.stderr.close()


def test_vendored_zipapp_runs_without_installed_dependencies(tmp_path):
    """`build_zipapp.py --vendor-installed`: the dependencies ride inside the archive and are
    unpacked once into the user's cache (Python cannot import an extension from a zip). Run
    with `-S`, so nothing from this environment's site-packages can stand in for them."""
    pyz = tmp_path / "skypty.pyz"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "contrib", "build_zipapp.py"), "--vendor-installed",
                        "-o", str(pyz)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    argv = [sys.executable, "-S", str(pyz)]

    host_cfg, client_cfg = tmp_path / "host.json", tmp_path / "client.json"
    for cfg in (host_cfg, client_cfg):
        r = subprocess.run(argv + ["app", "pty", "dmsg", "confgen", str(cfg)], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr
    host, client = json.loads(host_cfg.read_text()), json.loads(client_cfg.read_text())
    unpacked = list((cache / "skypty").iterdir())
    assert len(unpacked) == 1 and unpacked[0].name.startswith("vendor-")
    assert (unpacked[0].stat().st_mode & 0o077) == 0

    port = free_port()
    p = subprocess.Popen(argv + ["cli", "pty", "host", "-l", f"127.0.0.1:{port}", "-c", str(host_cfg),
                                 "--allow", client["pk"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_port(port, timeout=30)
        r = subprocess.run(argv + ["cli", "pty", "shell", f"{host['pk']}@127.0.0.1:{port}", "-s", client["sk"],
                                   "--", "sh", "-c", "echo hi; exit 3"], capture_output=True, text=True, timeout=60,
                           env=env)
        assert (r.stdout, r.returncode) == ("hi\n", 3), r.stderr
    finally:
        stop_process(p)
        p.stderr.close()

    # a cache another user could write into is never imported from
    os.chmod(cache / "skypty", 0o775)   # group-writable is enough to be refused
    r = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and "not private" in r.stderr
