# The README's two commands, each from a fresh clone: `make demo` and `make test`. Each installs what it needs once
# (.venv/.installed is the stamp; it is redone when pyproject.toml changes) and fetches the data once.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install data demo test test-fast bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== installing into $(VENV): torch 2.13.0 (CPU build), then lightning_lowrank with its test extras"
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --progress-bar on torch==2.13.0
	$(PYTHON) -m pip install --progress-bar on -e '.[test]'
	@touch $(STAMP)

data:
	@bash scripts/fetch_data.sh data

demo: $(STAMP) data
	@echo "== training LeNet5 on MNIST with TuckerCallback (about a minute on 2 cores)"
	$(PYTHON) examples/lenet5_mnist.py

# The data-dependent tests skip (with the reason) where the data could not be fetched; the rest run.
test: $(STAMP)
	@bash scripts/fetch_data.sh data || echo "== data not fetched (reason above): the tests that need it will skip"
	$(PYTHON) -m pytest -q

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PYTHON) benchmarks/layer_speed.py
