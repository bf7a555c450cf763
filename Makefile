# Set-up is part of every target: a fresh clone needs only `make run` or
# `make test`. torch is installed first and pinned: the CPU wheel of
# torch 2.13.0 lies on this kind of machine, a looser range would pull
# several GB of CUDA packages.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup browser run test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# MovieLens-100k for the experiment: data only, never imported (its
	# terms forbid redistribution, so it is installed, not committed).
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium for the API-docs test (tests/publisher/test_api_docs.py),
# which renders /docs as a person sees it. Debian's package, installed when
# missing (as root, or through sudo); the test fails, not skips, without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

run: $(STAMP)
	$(VENV)/bin/freshtower run

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) browser
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) freshtower-data .pytest_cache
