# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (every test).
# Both create .venv with pip when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU-only, reproducible notebook and test runs (see notebooks/README.md)
NBENV  := FLOWLIB_MODE=quick TQDM_DISABLE=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 MKL_NUM_THREADS=2

.PHONY: demo test unit notebooks-test lint clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,notebooks,dev]"
	touch $(STAMP)

## The main job: executes every notebook in quick mode on the built-in data (refreshing their outputs
## and figures/) and writes the results tables (results/, README table).
demo: $(STAMP)
	$(NBENV) $(PY) -m flowlib.main_job

## Every test: unit tests, then every notebook under nbval.
test: $(STAMP)
	$(NBENV) $(PY) -m pytest -q tests
	$(NBENV) $(PY) -m pytest -q -p no:python --nbval --nbval-current-env \
	    --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout 600 notebooks

unit: $(STAMP)
	$(NBENV) $(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check flowlib tests

clean-venv:
	rm -rf $(VENV)

## Speed benchmark, kept out of `make test`: every method's speed, memory and FLOPs, side by side with
## anomalib's FastFlow and CS-Flow (installed into their own venv on first use). Writes
## benchmarks/results/bench_<device>.{json,md}; about an hour on 2 CPU cores (one thread per measurement:
## BENCH_ARGS="--threads 1"; --skip-paper-throughput saves about 28 min). Options: BENCH_ARGS=...
BENCH_VENV := benchmarks/.venv-anomalib
.PHONY: bench
$(BENCH_VENV)/bin/python:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet anomalib==2.7.0

bench: $(STAMP) $(BENCH_VENV)/bin/python
	$(PY) benchmarks/run.py $(BENCH_ARGS)
