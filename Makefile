# `make test` works from a fresh clone with nothing installed: it builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint format clean demo

setup: $(STAMP)

# CPU torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -m "not gpu" -q

# The README's main command: sample data + tiny checkpoint + the full Ray job on this machine.
demo: setup
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/visualprm-ray demo --workdir visualprm-demo

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache visualprm-demo
