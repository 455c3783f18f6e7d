# medloop — two commands set everything up on a fresh machine:
#   make demo   creates .venv if missing, installs the pinned stack, runs the loop on the built-in data
#   make test   the same install, then the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKSPACE ?= workspace/demo
NIGHTS ?= 4
PIP_VERSION := 26.3

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test test-fast bench clean-demo

# The stamp is rebuilt whenever the pins or the project metadata change.
$(BIN)/.medloop-installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $@

install: $(BIN)/.medloop-installed

demo: install
	$(BIN)/medloop demo --workspace $(WORKSPACE) --nights $(NIGHTS)

test: install
	$(BIN)/python -m pytest -q --durations=30

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/data_stages.py

clean-demo:
	rm -rf workspace
