# `make demo` and `make test` work on a fresh machine with Python 3.11 and the package registries.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FIX := tests/fixtures/mgm_reference/llama_vicuna

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[torch,test]'
	touch $@

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/mgjax predict $(FIX)/MGM-7B-tiny --image $(FIX)/input.jpg --question "What is unusual about this image?"

clean:
	rm -rf $(VENV) .pytest_cache
