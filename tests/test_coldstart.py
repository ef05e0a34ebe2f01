"""The exec path must stay light: `cli pty exec` never imports FUSE, paramiko, yaml, logging or the web
server."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, SKYPTY, free_port

# locale: argparse's gettext lookups pull it in unless cli.py answers them itself;
# socket (and its selectors): the client path uses _socket (netutil.connect_tcp)
HEAVY = ("fuse", "paramiko", "yaml", "http.server", "logging", "locale", "socket", "selectors", "skypty.web",
         "skypty.fs", "skypty.websocket", "skypty.services.sftp")


def _imported(argv: list) -> set:
    r = subprocess.run([sys.executable, "-X", "importtime"] + argv, capture_output=True, text=True, timeout=60)
    mods = set()
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            mods.add(line.rsplit("|", 1)[1].strip())
    return mods


def test_exec_path_imports_nothing_heavy():
    port = free_port()  # nothing listens: the exec fails fast, after everything it needs is imported
    mods = _imported([os.path.join(ROOT, "skypty.py"), "cli", "pty", "exec",
                      f"tcp://0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798@127.0.0.1:{port}",
                      "-s", "11" * 32, "--", "true"])
    assert "skypty.cli" in mods
    # the handler module itself is loaded by importlib (not logged); what it imports is
    assert "skypty.noise" in mods, "the exec verb did not run far enough to mean anything"
    assert not [m for m in HEAVY if m in mods]
    # the AEAD class comes from cryptography's binding, without its cipher package (~2.5 ms)
    from cryptography.hazmat.bindings._rust import openssl

    if hasattr(getattr(openssl, "aead", None), "ChaCha20Poly1305"):
        assert "cryptography.hazmat.primitives.ciphers" not in mods


def test_python_dash_m_and_version():
    r = subprocess.run([sys.executable, "-m", "skypty", "--version"], capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("skypty ")
    r = subprocess.run(SKYPTY + ["--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "cli" in r.stdout and "app" in r.stdout
    assert "{cli,app,dmsg}" in r.stdout


def test_hidden_legacy_aliases_work_but_do_not_show():
    r = subprocess.run(SKYPTY + ["dmsg", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "{server,disc}" in r.stdout and " pty " not in r.stdout
    r = subprocess.run(SKYPTY + ["dmsg", "pty", "host", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--listen-fd" in r.stdout


def test_bad_flag_is_one_line_exit_2():
    r = subprocess.run(SKYPTY + ["cli", "pty", "exec", "--timeout", "soon", "x"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "invalid duration" in r.stderr


def test_a_client_loads_logging_only_to_log():
    """`logging` (with traceback, linecache, tokenize) stays unloaded on a client that has
    nothing to say; its first record still comes out as configured: warnings and worse."""
    code = ("import sys\n"
            "from skypty import logs\n"
            "logs.setup('warning', now=False)\n"
            "log = logs.get_logger('skypty.t')\n"
            "assert 'logging' not in sys.modules\n"
            "log.info('quiet')\n"
            "log.warning('said %s', 'once')\n"
            "assert 'logging' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "quiet" not in r.stderr and r.stderr.strip().endswith("WARNING skypty.t: said once")
