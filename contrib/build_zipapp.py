"""Build dist/skypty.pyz: the skypty package plus a __main__.

Without --vendor the compiled dependencies (cryptography, coincurve, …) are not inside: install
them beside it (`pip install -r requirements.txt`). With --vendor they are pip-installed into
the archive (`_vendor.zip`, for the platform and Python this runs on); --vendor-installed copies
the ones installed in this Python's environment instead (no index needed). Python cannot import
an extension module from inside a zip, so a vendored archive unpacks its `_vendor.zip` once per
build into the user's cache (`$XDG_CACHE_HOME/skypty/vendor-<id>`, private to the user) and imports
from there.
"""
from __future__ import annotations

import argparse
import compileall
import hashlib
import importlib.metadata
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAIN = "import sys\nfrom skypty.cli import run\nsys.exit(run())\n"

# The vendored __main__: stdlib only, and on every start after the first nothing but os and sys.
MAIN_VENDORED = '''import os
import sys

VENDOR_ID = "%s"


def _vendor_path():
    base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "skypty")
    dest = os.path.join(base, "vendor-" + VENDOR_ID)
    if not os.path.isdir(dest):
        import shutil
        import tempfile
        import zipfile

        os.makedirs(base, mode=0o700, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".unpack-", dir=base)
        try:
            with zipfile.ZipFile(os.path.dirname(os.path.abspath(__file__))) as app:
                with app.open("_vendor.zip") as f, zipfile.ZipFile(f) as z:
                    z.extractall(tmp)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not os.path.isdir(dest):   # not a concurrent start that unpacked it first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for d in (base, dest):   # code is imported from here: nobody else may have written to it
        st = os.stat(d)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            sys.exit(f"skypty: {d} is not private to this user (owner or mode): refusing to import from it")
    return dest


sys.path.insert(0, _vendor_path())
from skypty.cli import run  # noqa: E402

sys.exit(run())
'''


def _requirements(path: str) -> list:
    names = []
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if m:
                names.append(m.group(1))
    return names


def _copy_installed(names: list, target: str) -> None:
    """Copy the installed distributions `names` and what they require (extras aside; any
    not installed here are skipped: their markers excluded them) into `target`."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))
        for f in dist.files or []:
            src = str(f.locate())
            rel = str(f)
            if rel.startswith("..") or os.path.isabs(rel) or "__pycache__" in rel or not os.path.isfile(src):
                continue
            dst = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)


def _tree_id(top: str) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(d, name)
            h.update(os.path.relpath(p, top).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:20]


def build(out: str, vendor: str = "", compress: bool = False) -> str:
    """vendor: "" (none), "pip" (install from the index) or "installed" (copy from this env)."""
    with tempfile.TemporaryDirectory() as tmp:
        stage = os.path.join(tmp, "stage")
        shutil.copytree(os.path.join(ROOT, "skypty"), os.path.join(stage, "skypty"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # zipimport cannot cache bytecode: ship it (beside each .py, the layout zipimport
        # reads). A Python of another version sees a foreign magic number and uses the source.
        compileall.compile_dir(os.path.join(stage, "skypty"), legacy=True, quiet=1)
        main = MAIN
        if vendor:
            target = os.path.join(stage, "_vendor")
            req = os.path.join(ROOT, "requirements.txt")
            if vendor == "pip":
                subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--target", target, "-r", req])
            else:
                _copy_installed(_requirements(req), target)
            # Unpacked files get new mtimes, which a timestamped .pyc would take for edits: these
            # are never checked against their source (the directory is one build's, never edited).
            compileall.compile_dir(target, quiet=1, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            main = MAIN_VENDORED % _tree_id(target)
            # One member, not thousands: zipimport reads the whole directory of the archive at
            # every start (in Python), which took ~100 ms with the dependencies' files in it.
            shutil.make_archive(os.path.join(stage, "_vendor"), "zip", target)
            shutil.rmtree(target)
        with open(os.path.join(stage, "__main__.py"), "w") as f:
            f.write(main)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        # Stored, not deflated: every start would inflate each module it imports (~7 ms of a
        # one-shot exec here, more on a small ARM board), for an archive ~2.3x smaller.
        zipapp.create_archive(stage, out, interpreter="/usr/bin/env python3", compressed=compress)
    os.chmod(out, 0o755)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default=os.path.join(ROOT, "dist", "skypty.pyz"))
    ap.add_argument("--vendor", action="store_true", help="pip-install the runtime deps into the archive "
                    "(usable on this platform and Python version only)")
    ap.add_argument("--vendor-installed", action="store_true",
                    help="like --vendor, copying the deps installed in this Python's environment (no index)")
    ap.add_argument("--compress", action="store_true", help="deflate the members: a smaller file, a slower start")
    a = ap.parse_args()
    print(build(a.out, "pip" if a.vendor else "installed" if a.vendor_installed else "", a.compress))
