# recovery-assets: the two-command quick start is `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export DAGSTER_HOME ?= $(CURDIR)/dagster_home

.PHONY: setup test lint bench demo ui instance clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) bench/probe_speed.py

# The instance, created and migrated once (under a lock) before any run.
instance: setup
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/recovery instance

# The whole default study (studies/demo.yaml, or $$RECOVERY_STUDY) into the persistent instance.
demo: setup instance
	$(VENV)/bin/recovery study

# The Dagster UI on the same instance: http://127.0.0.1:3000
ui: setup instance
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

clean:
	rm -rf $(VENV) build dagster_home data
