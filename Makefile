# One local virtualenv (.venv) for everything. torch is pinned to 2.13.0: on this project's
# CI machines a CPU build of it installs from local disk; elsewhere the same pin gives the
# standard PyPI build. GPU users: see README "CUDA".
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# dt = 0.1 ns: the interim bundled model ignores Δt and moves ~0.55 Å per frame, closest to MD's
# per-frame motion at short Δt (see openmm_starmd/data/MODEL_CARD.md)
# OMP_NUM_THREADS=1: with another process on a 2-core box, 2 torch threads ran ~30x slower (threads spin)
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python examples/run_protein.py --steps 200 --dt-ns 0.1 --report-every 10 --out demo_out

# one BLAS thread per process: on 2 shared cores OpenBLAS threads oversubscribe badly
test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out
