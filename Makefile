# medloop — two commands set everything up on a fresh machine:
#   make demo   creates .venv if missing, installs the pinned stack, runs the loop on the built-in data
#   make test   the same install, the browser for the page tests and compose for the infra check, then the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKSPACE ?= workspace/demo
NIGHTS ?= 4
PIP_VERSION := 26.3
# The browser tests (tests/test_pages.py) drive Debian's chromium through its chromedriver; the two
# packages come from one source build, so their versions always match. Debian keeps only the newest
# security build in its archive, so the pin below is tried first and the archive's current build
# is taken (with a note) when that one is gone.
CHROMIUM_VERSION ?= 156.0.8078.114-1~deb12u1
# tests/test_infra.py checks infra/compose.yaml with `docker compose config`; where the docker
# client has no compose plugin, Debian's docker-compose (v1) does the same check.
DOCKER_COMPOSE_VERSION ?= 1.29.2-3
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install gpu browsers compose demo test test-fast bench clean-demo

# The stamp is rebuilt whenever the pins or the project metadata change.
$(BIN)/.medloop-installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $@

install: $(BIN)/.medloop-installed

# On a GPU machine: the CUDA build of the pinned TensorFlow in place of tensorflow-cpu, at the version
# constraints.txt pins for tensorflow-cpu (read from there, so the two never differ). Both builds are
# removed first (they install the same `tensorflow` package), so this can be run again after
# `make install` has reinstalled tensorflow-cpu (which it does whenever the pins change).
TENSORFLOW_VERSION = $(shell sed -n 's/^tensorflow[-_]cpu==//p' constraints.txt)
gpu: install
	@test -n "$(TENSORFLOW_VERSION)" || { echo "constraints.txt pins no tensorflow-cpu version"; exit 1; }
	$(BIN)/python -m pip uninstall --quiet --disable-pip-version-check -y tensorflow-cpu tensorflow
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "tensorflow[and-cuda]==$(TENSORFLOW_VERSION)"
	$(BIN)/python -c "import tensorflow as tf; print('TensorFlow', tf.__version__, 'GPUs:', tf.config.list_physical_devices('GPU'))"
	@echo "next: $(BIN)/python benchmarks/gpu_check.py (mixed precision against float32 on these GPUs)"

# chromium and chromium-driver for the browser tests, when /usr/bin/chromedriver is missing (Debian/Ubuntu).
browsers:
	@test -x /usr/bin/chromedriver || { \
	  $(SUDO) apt-get update -qq && \
	  { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium=$(CHROMIUM_VERSION) chromium-driver=$(CHROMIUM_VERSION) || \
	    { echo "chromium $(CHROMIUM_VERSION) is no longer in the archive: installing its current build"; \
	      $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }; }; }
	@/usr/bin/chromedriver --version

# docker-compose for the compose check, when neither `docker compose` nor docker-compose is there.
compose:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      docker-compose=$(DOCKER_COMPOSE_VERSION); }

demo: install
	$(BIN)/medloop demo --workspace $(WORKSPACE) --nights $(NIGHTS)

# Two test processes (pytest-xdist), a module at a time: the suite waits on servers and subprocesses
# about half of the time, so two processes on two cores take about 60% of one's wall time.
# --no-loadscope-reorder keeps tests/conftest.py's order (the longest modules first); xdist's
# default sends the modules with the most tests first, which left the production module alone at the end.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test: install browsers compose
	$(BIN)/python -m pytest -q $(XDIST) --durations=30

test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

bench: install
	$(BIN)/python benchmarks/data_stages.py

clean-demo:
	rm -rf workspace
