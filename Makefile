# Two commands do everything on a fresh machine: `make run` and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
# CPU-only torch wheel unless a GPU is present (GPU users: install the CUDA torch first).
TORCH   := torch==2.13.0
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: run r1 test test-all bench lint format clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 || $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch"; $(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch; \
	else $(PIP) install -q $(TORCH); fi
	$(PIP) install -q -e ".[dev,serve]"
	touch $@

run: .venv/.installed
	$(PY) -m nanoseek.quickstart

# SFT then GRPO on arithmetic, from nothing to a reasoning model: ~28 minutes on 2 cores
r1: .venv/.installed
	$(PY) -m nanoseek.r1

# One torch thread per test process: the tests are small, and the server and DDP tests run
# torch in several threads or processes at once, where a second thread only spin-waits.
test: .venv/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x --durations=10

test-all: .venv/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "slow or not slow" --durations=15

bench: .venv/.installed
	$(PY) -m benchmarks.forward
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.decode
	$(PY) -m benchmarks.speculation
	$(PY) -m benchmarks.moe_vs_dense
	$(PY) -m benchmarks.serve_load

lint: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: .venv/.installed
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

clean:
	rm -rf .venv runs/quickstart .pytest_cache
