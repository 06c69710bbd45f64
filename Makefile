# minigpt developer entry points. Every target that runs Python depends on the
# setup stamp, so `make test` only re-runs scripts/setup.sh when pyproject.toml
# or the script changed (or the venv is missing); otherwise it costs nothing.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Nothing we run should phone home.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.minigpt-setup
PYTEST_ARGS ?=

.PHONY: help setup test test-fast run bench clean distclean

help:
	@echo "make setup      create .venv, install torch (CPU) + minigpt[dev], cache the tokenizer"
	@echo "make test       full test suite (PYTEST_ARGS='...' to pass options)"
	@echo "make test-fast  tests not marked slow"
	@echo "make run        run the pipeline (for now: sample from a fresh tiny model)"
	@echo "make bench      run the benchmarks"
	@echo "make clean      remove caches and build leftovers (keeps .venv, data, runs)"
	@echo "make distclean  clean + remove .venv"

# The stamp is (re)written by setup.sh; its content is a hash of these inputs.
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

# Explicit `make setup` always runs the script (it is a no-op when up to date,
# and it also re-checks the tokenizer cache).
setup:
	bash scripts/setup.sh

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

run: $(STAMP)
	$(PY) -m minigpt.demo

bench: $(STAMP)
	$(PY) -m minigpt.bench

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache build src/*.egg-info

distclean: clean
	rm -rf $(VENV)
