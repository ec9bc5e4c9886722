# The two commands of the README: `make demo` and `make test`.
# torch==2.13.0 is installed before the project so that pip never resolves
# `torch>=2.11` to a CUDA build with several GB of extra packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,serve,ui]'
	touch $@

.PHONY: demo test lint install
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/parallm train configs/demo.toml

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q
