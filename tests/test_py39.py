"""Python 3.9 stays supported (users run skypty on minimal Debian ARM boards).

`ast.parse(feature_version=(3, 9))` refuses the 3.10+ grammar (match, except*, type params…) whatever
interpreter runs the tests. It still lets a few newer forms through (`a[*b]`, PEP 701 f-strings on
3.12+), so a real 3.9 interpreter, when one can be found, also compiles every file.
"""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(
    glob.glob(os.path.join(ROOT, "skypty", "**", "*.py"), recursive=True)
    + [os.path.join(ROOT, "skypty.py")]
    + glob.glob(os.path.join(ROOT, "tests", "*.py"))
)


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_parses_as_python39(path):
    with open(path, encoding="utf-8") as f:
        src = f.read()
    try:
        tree = ast.parse(src, filename=path, feature_version=(3, 9))
    except SyntaxError as e:
        pytest.fail(f"{_rel(path)}:{e.lineno}: not Python 3.9 syntax: {e.msg}")
    # feature_version lets star-unpacking in subscripts (3.11) through
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            sl = node.slice
            parts = sl.elts if isinstance(sl, ast.Tuple) else [sl]
            assert not any(isinstance(p, ast.Starred) for p in parts), \
                f"{_rel(path)}:{node.lineno}: a[*b] needs Python 3.11"
    # the house rule that keeps `X | None` annotations from being evaluated on 3.9
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if body:
        first = body[0]
        assert isinstance(first, ast.ImportFrom) and first.module == "__future__" \
            and any(a.name == "annotations" for a in first.names), \
            f"{_rel(path)}: `from __future__ import annotations` must be the first statement"


def _python39() -> str | None:
    cand = [os.environ.get("SKYPTY_PY39", ""), shutil.which("python3.9") or ""]
    cand += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for c in cand:
        if not (c and os.access(c, os.X_OK)):
            continue
        # a pyenv shim exists on PATH even when it would refuse to run 3.9: ask the interpreter
        try:
            r = subprocess.run([c, "-I", "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0 and r.stdout.strip() == "True":
            return c
    return None


def test_compiles_under_real_python39():
    if sys.version_info[:2] == (3, 9):
        py = sys.executable
    else:
        py = _python39()
    if py is None:
        pytest.skip("no Python 3.9 interpreter found (set SKYPTY_PY39)")
    # compile() only, in memory: no .pyc is written into the shared tree
    code = (
        "import sys\n"
        "bad = []\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        compile(open(p, encoding='utf-8').read(), p, 'exec', dont_inherit=True)\n"
        "    except SyntaxError as e:\n"
        "        bad.append('%s:%s: %s' % (p, e.lineno, e.msg))\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([py, "-I", "-c", code] + FILES, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"not Python 3.9 syntax under {py}:\n{r.stdout}{r.stderr}"
