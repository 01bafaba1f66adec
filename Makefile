# All targets use the project venv; `make install` creates it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install test lint typecheck run demo bench bench-full clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check epp tests bench
	$(BIN)/mypy epp

run: install
	$(BIN)/python -m epp --pool-name demo-pool --manifests deploy/examples/no-cluster.yaml --secure-serving=false

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
