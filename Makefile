# Two commands on a fresh machine (see README):
#   make demo   set up and run the local demo
#   make test   set up and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[all]'

install-test: install
	$(BIN)/pip install -q -e '.[test]'
	bash scripts/install-test-deps.sh $(VENV)

demo: install
	$(BIN)/saber demo

test: install-test
	$(BIN)/python -m pytest

# ruff and mypy come with the test extra; strict typing for the policies and the operator's builders.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy cli/saber_cli emulator/saber_emulator sidecar/saber_sidecar operator/saber_operator bench/saber_bench

clean:
	rm -rf $(VENV) .pytest_cache out
