# The two set-up commands of the README: `make demo` (the main job on the embedded model)
# and `make test` (the test suite). Both create or reuse .venv idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench
setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) -m steerlab demo

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check src tests benchmarks

bench: setup
	for b in bench_capture bench_generate bench_steer bench_selfie bench_iti_slim bench_attribution; do $(PY) benchmarks/$$b.py || exit 1; done
