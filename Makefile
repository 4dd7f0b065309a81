# One place for the commands the README and .ci/run use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= full
# Stage commands (`cifarflow ...`) run from dvc.yaml: the venv's tools must be on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup pipeline test verify-repro lock clean

# A virtual environment with the exact versions of requirements.lock.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# The whole DAG. PROFILE=smoke runs it offline on generated data (as a DVC experiment,
# which sets `profile: smoke` in params.yaml).
pipeline: setup
ifeq ($(PROFILE),full)
	$(BIN)/dvc repro
else
	$(BIN)/dvc exp run -S profile=$(PROFILE)
endif

test: setup
	$(BIN)/ruff check cifarflow tests flows tasks bench
	$(BIN)/pytest

# Two clean clones run the smoke pipeline; every deterministic output must be identical.
# CIFARFLOW_VERIFY_KEEP=<dir> keeps the clones (CI uses clone-1 for its metrics summary).
verify-repro: setup
	$(BIN)/cifarflow verify-repro $(if $(CIFARFLOW_VERIFY_KEEP),--keep $(CIFARFLOW_VERIFY_KEEP)) $(VERIFY_ARGS)

# Refresh the lock after changing dependencies in pyproject.toml.
lock:
	rm -rf /tmp/cifarflow-lock && $(PYTHON) -m venv /tmp/cifarflow-lock
	/tmp/cifarflow-lock/bin/pip install --quiet '.[dev]' 'fastapi>=0.139,<0.151'
	/tmp/cifarflow-lock/bin/pip freeze --exclude cifarflow > requirements.lock

clean:
	rm -rf $(VENV)
