# Two entry points for a fresh machine: `make demo` (the whole loop locally, no Azure) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all bench lint

$(BIN)/lorastack: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $@

setup: $(BIN)/lorastack

demo: setup
	$(BIN)/lorastack demo

# The fast suite (default markers), then the slow, browser and benchmark-marked tests.
test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m 'slow or browser or benchmark'

bench: setup
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_serve.py

lint: setup
	$(BIN)/ruff check src provisioning policy tests benchmarks
