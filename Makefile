# moefuse developer entry points. `make test` sets everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.moefuse-installed

.PHONY: setup test test-fast demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned first so that the test extra resolves to the CPU build rather than a CUDA one.
$(STAMP): $(BIN)/python pyproject.toml CMakeLists.txt $(wildcard custom_ops/*)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" || $(BIN)/python -m pip install --quiet "torch>=2.6"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(STAMP)

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# Convert the bundled tiny model, run original and converted, print node counts, error, speed.
demo: setup
	$(BIN)/python examples/demo.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
