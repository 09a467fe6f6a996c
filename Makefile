# Every target creates (once) its own virtualenv in .venv with the pinned CPU torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m zarrckpt.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check zarrckpt tests benchmarks
	$(PY) -m mypy zarrckpt

bench: install
	$(PY) -m benchmarks

bench-quick: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) bench-out
