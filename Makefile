# The README's commands. `make install` once, then `make demo` or `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install data demo test test-fast bench

install:
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

data:
	bash scripts/fetch_data.sh data

demo: data
	$(PYTHON) examples/lenet5_mnist.py

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	$(PYTHON) benchmarks/layer_speed.py
