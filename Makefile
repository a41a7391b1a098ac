# `make demo` and `make test` bootstrap .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast test-cluster lint demo clean

install: $(STAMP)

# torch goes in first, on its own: a bare `torch` requirement with no torch present pulls GBs of CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,qlora]"
	touch $@

# Everything: unit, distributed-on-CPU (gloo) and end-to-end tests. GPU tests deselect themselves without a GPU.
test: $(STAMP)
	$(PY) -m pytest tests

# Unit tests only (no multi-process or cluster tests): the quick loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not distributed and not cluster"

# Only the 2-node SLURM cluster test (root; it installs slurm and munge with apt-get when missing).
test-cluster: $(STAMP)
	$(PY) -m pytest tests/cluster -m cluster -rP

lint: $(STAMP)
	$(VENV)/bin/ruff check longctx data_prep tests benchmarks
	$(VENV)/bin/ruff format --check longctx data_prep tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/longctx demo --out runs/demo

clean:
	rm -rf runs .pytest_cache .ruff_cache
