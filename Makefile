# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit soak bench clean config-docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Start the whole pipeline locally with embedded defaults and send demo events.
run: $(STAMP)
	$(BIN)/eventpipe up --demo

## Lint, type-check and run every test (integration tests need PostgreSQL and Redis).
test: lint
	$(BIN)/python -m pytest --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

## Only the pure unit tests: no services needed.
unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

## The fault soak: ten minutes of hostile traffic under a seeded schedule of faults (SOAK_ARGS
## to change it, e.g. SOAK_ARGS="--seconds 3600 --seed 7"). Needs PostgreSQL.
soak: $(STAMP)
	$(BIN)/python -m tests.support.soak $(SOAK_ARGS)

## Rewrite .env.example and docs/configuration.md from eventpipe/settings.py.
config-docs: $(STAMP)
	$(BIN)/python -m eventpipe.settings

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
