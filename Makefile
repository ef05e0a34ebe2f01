# `make test` builds its own virtualenv from requirements-dev.txt: nothing installed by hand is used.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
CONF ?= config.json
LISTEN ?= 127.0.0.1:2022

.PHONY: test deps run bench dist dist-onedir dist-test clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

deps: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests

# Set up and run a host on this box: a fresh 0600 config with a new key (kept if it exists),
# noise-XK TCP on $(LISTEN) and the control socket; prints the PK and the client command.
run: $(STAMP)
	$(VPY) skypty.py app pty dmsg confgen $(CONF) 2>/dev/null || true
	$(VPY) skypty.py app pty tcp -c $(CONF) --addr $(LISTEN)

bench: $(STAMP)
	$(VPY) bench/run.py

# Stdlib parts skypty never uses; they only make the one-file binary bigger.
PYI_EXCLUDES := $(foreach m,tkinter unittest pydoc doctest asyncio lib2to3 xmlrpc sqlite3 curses ensurepip idlelib,--exclude-module $(m))

# One-file binary (PyInstaller) and zipapp (deps installed beside it, see contrib/build_zipapp.py).
dist: $(STAMP)
	$(VPY) -m pip install -q --disable-pip-version-check pyinstaller
	$(VPY) contrib/build_zipapp.py -o dist/skypty.pyz
	$(VPY) -m PyInstaller --noconfirm --log-level WARN --onefile --strip --name skypty \
	  --collect-submodules skypty --collect-binaries coincurve --hidden-import coincurve._cffi_backend $(PYI_EXCLUDES) --add-data $(CURDIR)/skypty/static:skypty/static \
	  --distpath dist --workpath build/pyinstaller --specpath build skypty.py
	ls -l dist/

# One-folder build: no unpacking at every start (see README: recommended on slow SD cards).
dist-onedir: $(STAMP)
	$(VPY) -m pip install -q --disable-pip-version-check pyinstaller
	$(VPY) -m PyInstaller --noconfirm --log-level WARN --onedir --strip --name skypty-dir \
	  --collect-submodules skypty --collect-binaries coincurve --hidden-import coincurve._cffi_backend $(PYI_EXCLUDES) \
	  --add-data $(CURDIR)/skypty/static:skypty/static \
	  --distpath dist --workpath build/pyinstaller-dir --specpath build skypty.py
	du -sh dist/skypty-dir

dist-test: dist
	SKYPTY_DIST=$(CURDIR)/dist $(VPY) -m pytest -q tests/test_dist.py

clean:
	rm -rf $(VENV) build dist .pytest_cache
