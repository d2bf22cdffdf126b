# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup-dev setup-demo bench lint docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup-demo: $(BIN)/python
	$(BIN)/pip install -q -e '.[node]'

setup-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	bash scripts/install-opa-oracle $(BIN)/python

demo: setup-demo
	$(BIN)/charter demo

test: setup-dev
	bash scripts/services-up
	$(BIN)/ruff check platform tests $(wildcard bench)
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: setup-dev
	bash scripts/services-up
	$(BIN)/python bench/report.py --out docs/performance-report.md

lint: setup-dev
	$(BIN)/ruff check platform tests $(wildcard bench)
	$(BIN)/lint-imports
	$(BIN)/mypy

docs: setup-dev
	$(BIN)/charter config docs > docs/configuration.md
