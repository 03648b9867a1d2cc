# The two commands of the README: `make demo` runs the product end to end on embedded
# defaults, `make test` runs the test suite. Both build .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first (local wheel); the project's range then installs nothing more.
	$(PY) -m pip install --quiet torch==2.13.0
	# FBGEMM's table-batched embedding, the CPU build paired with torch 2.13.
	$(PY) -m pip install --quiet fbgemm-gpu-cpu==1.8.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	for b in jobs/benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR)
