# The two entry points a newcomer needs: `make serve` and `make test`. Both set up .venv first: serving
# installs the runtime dependencies only; testing adds the test extra on top (only the difference).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_HASH := $(shell cksum pyproject.toml | cut -d' ' -f1)
SERVE_STAMP := $(VENV)/.installed-serve-$(DEPS_HASH)
TEST_STAMP := $(VENV)/.installed-test-$(DEPS_HASH)

.PHONY: setup setup-test serve test lint bench-offline bench-serve demo-model bench-vllm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip prints its own progress (no --quiet): the first install downloads torch, Ray and friends, minutes.
$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	@echo "k2ray: installing the runtime dependencies into $(VENV) (the first time takes a few minutes)"
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	rm -f $(VENV)/.installed-serve-* && touch $@

$(TEST_STAMP): $(SERVE_STAMP)
	@echo "k2ray: adding the test extra to $(VENV)"
	$(BIN)/pip install -e ".[test]"
	rm -f $(VENV)/.installed-test-* && touch $@

setup: $(SERVE_STAMP)

setup-test: $(TEST_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/k2ray serve --config deploy/serve/local.yaml --host 127.0.0.1 --port 8000

test: $(TEST_STAMP)
	$(BIN)/ruff check k2ray kernels tests load_tests
	$(BIN)/python -m pytest -q tests

lint: $(TEST_STAMP)
	$(BIN)/ruff check k2ray kernels tests load_tests

bench-offline: $(TEST_STAMP)
	$(BIN)/python load_tests/offline_throughput.py

bench-serve: $(TEST_STAMP)
	$(BIN)/python load_tests/serve_bench.py

# k2ray against vLLM's CPU build (installed on first use into a venv of its own, ~/.cache/k2ray): offline and served.
bench-vllm: $(TEST_STAMP)
	$(BIN)/python load_tests/vllm_compare.py

# Retrains the embedded demo model into k2ray/assets/k2-demo (CPU, deterministic; about 20 minutes on 2 cores).
demo-model: $(TEST_STAMP)
	PYTHONSAFEPATH=1 $(BIN)/python -m k2ray.demo.train --out k2ray/assets/k2-demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
