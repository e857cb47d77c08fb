# recovery-assets: the two-command quick start is `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export DAGSTER_HOME ?= $(CURDIR)/dagster_home

.PHONY: setup test lint bench demo clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) bench/probe_speed.py

demo: setup
	$(VENV)/bin/recovery demo

clean:
	rm -rf $(VENV) build dagster_home data
