"""Build dist/skypty.pyz: the skypty package plus a __main__, nothing else.

The compiled dependencies (cryptography, coincurve, …) are not inside: install them beside it
(`pip install -r requirements.txt`) or vendor them for the target platform with --vendor DIR.
"""
from __future__ import annotations

import argparse
import compileall
import os
import shutil
import subprocess
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(out: str, vendor: str | None = None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        stage = os.path.join(tmp, "stage")
        shutil.copytree(os.path.join(ROOT, "skypty"), os.path.join(stage, "skypty"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with open(os.path.join(stage, "__main__.py"), "w") as f:
            f.write("import sys\nfrom skypty.cli import run\nsys.exit(run())\n")
        # zipimport cannot cache bytecode: ship it (beside each .py, the layout zipimport
        # reads). A Python of another version sees a foreign magic number and uses the source.
        compileall.compile_dir(os.path.join(stage, "skypty"), legacy=True, quiet=1)
        if vendor:
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--target", stage,
                                   "-r", os.path.join(ROOT, "requirements.txt")])
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        zipapp.create_archive(stage, out, interpreter="/usr/bin/env python3", compressed=True)
    os.chmod(out, 0o755)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default=os.path.join(ROOT, "dist", "skypty.pyz"))
    ap.add_argument("--vendor", action="store_true", help="also pip-install the runtime deps into the archive "
                    "(only usable on the same platform and Python version)")
    a = ap.parse_args()
    print(build(a.out, a.vendor))
