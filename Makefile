# `make demo` and `make test` are the two commands; both install first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints/cpu.txt
export HF_HUB_OFFLINE := 1
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

# Torch first, from the CPU build pinned in constraints/cpu.txt, so nothing later
# resolves a CUDA build; then the package with its test extras.
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0+cpu"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,parquet,foundation,dask,spatialdata,interactions,pathways,slides]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/histosr demo --out demo_out

test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --durations=30 tests

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf demo_out .pytest_cache
