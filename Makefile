PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-all bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: $(VENV)/.installed  ## fast test suite (what CI runs)
	$(PY) -m pytest -q

test-all: $(VENV)/.installed  ## including tests marked slow
	$(PY) -m pytest -q -m ""

bench: $(VENV)/.installed  ## selective-scan, forward-pass and data-loader benchmarks
	$(PY) benchmarks/bench_scan.py
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_loader.py

clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
