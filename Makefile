# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
# Any Python 3.11 or newer: the first of these names that is one (or PYTHON=...).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  2>/dev/null && { echo $$p; break; }; done)
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8080
# Test processes: three on two cores (the tests spend much of their time waiting on the
# processes they start); TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 3

.PHONY: demo test setup-dev setup-demo bench lint docs

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Charter needs Python 3.11 or newer, and found none" \
	  "(python3 is $$(python3 --version 2>&1 || echo missing)); give one with PYTHON=..."; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# Installed again only when pyproject.toml changes (a stamp in the venv).
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	@echo "Installing Charter with the dev node's PyTorch (CPU) into $(VENV):" \
	  "a few minutes and about 1.3 GB the first time."
	$(BIN)/pip install --progress-bar on -e '.[node]'
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	@echo "Installing Charter with the test extras into $(VENV): several minutes and" \
	  "about 2.7 GB the first time (llama.cpp's server is compiled from source)."
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	bash scripts/install-opa-oracle $(BIN)/python
	@touch $@ $(VENV)/.demo-installed

setup-demo: $(VENV)/.demo-installed

setup-dev: $(VENV)/.dev-installed

demo: setup-demo
	$(BIN)/charter demo --port $(PORT)

test: setup-dev
	bash scripts/services-up
	$(BIN)/ruff check platform tests $(wildcard bench)
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist load

bench: setup-dev
	bash scripts/services-up
	bash scripts/bench-tools
	PATH="$(CURDIR)/.venv/bin:$$PATH" CHARTER_BENCH_LITELLM="$(CURDIR)/.bench/litellm/bin/litellm" \
	  $(BIN)/python bench/report.py --out docs/performance-report.md

lint: setup-dev
	$(BIN)/ruff check platform tests $(wildcard bench)
	$(BIN)/lint-imports
	$(BIN)/mypy

docs: setup-dev
	$(BIN)/charter config docs > docs/configuration.md
