# Two commands on a fresh Linux machine with Python 3.11:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## the main job: float vs. compressed on the embedded digits data, a table, demo.json and demo.onnx
demo: $(STAMP)
	$(PY) -m lightning_sgsc.demo --json demo.json --onnx demo.onnx

## the whole test suite (slow-marked tests included; a few minutes on 2 CPU cores)
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

## everything but the slow-marked tests
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff mypy
	$(PY) -m ruff check lightning_sgsc tests experiments && $(PY) -m ruff format --check lightning_sgsc tests experiments
	$(PY) -m mypy

clean:
	rm -rf $(VENV) demo.json demo.onnx .pytest_cache
