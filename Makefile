# procflow developer entry points.
#   make run    the whole stack on this machine (Temporal dev server, worker, API, mail sink)
#   make test   the test suite (PYTEST_ARGS="-k name -x" to narrow it)
#   make bench  benchmark against a raw-SDK baseline (QUICK=1: < 5 min; KEEP=1: keep the JSON
#               under bench/results/ to commit and quote; see bench/README.md)
#   make lint   ruff lint + format check + mypy (pydantic plugin)
# The virtualenv is created on first use and reinstalled only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv run test lint format bench

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m scripts.run_stack $(RUN_ARGS)

# two pytest workers (each with its own servers); a test file stays on one worker
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,) $(if $(KEEP),--keep,)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy core workflows activities api worker.py scripts

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
