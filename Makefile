# The two entry points a newcomer needs: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup serve test lint bench-offline bench-serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/k2ray serve --config deploy/serve/local.yaml --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/ruff check k2ray kernels tests load_tests
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check k2ray kernels tests load_tests

bench-offline: $(STAMP)
	$(BIN)/python load_tests/offline_throughput.py

bench-serve: $(STAMP)
	$(BIN)/python load_tests/serve_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
