# `make demo` and `make test` work on a fresh machine with Python 3.11 and the package registries.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup browser test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[torch,test]'
	touch $@

# The chat page's test drives a real headless Chromium: Debian's package where the machine lets us install it.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "make: could not install chromium (apt-get); tests/test_serve.py's page test needs it"

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Stage 1 then stage 2 of the tiny demo MGM on synthetic shapes (CPU, a few minutes), then its held-out accuracy.
demo: setup
	$(BIN)/mgjax train configs/demo/stage1.yaml
	$(BIN)/mgjax train configs/demo/stage2.yaml
	$(BIN)/mgjax eval shapes --ckpt runs/demo/stage2

# Every benchmark (bench/train.py, bench/generate.py) and one summary table: 2-core CPU about 35 minutes.
bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache
