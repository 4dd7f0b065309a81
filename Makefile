# One place for the commands the README and .ci/run use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?=
# Stage commands (`cifarflow ...`) run from dvc.yaml: the venv's tools must be on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help setup setup-gpu pipeline test verify-repro lock clean leaderboard predict mutation image image-gpu image-check diagram
.DEFAULT_GOAL := help

help: ## list the targets (this)
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24

# A virtual environment with the exact versions of requirements.lock.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

setup: $(BIN)/.installed ## create .venv with requirements.lock's exact versions

# On a GPU node: the same, plus TensorFlow's CUDA wheels at requirements-gpu.lock's versions.
$(BIN)/.installed-gpu: $(BIN)/.installed requirements-gpu.lock
	$(BIN)/pip install --quiet -c requirements.lock -c requirements-gpu.lock -e '.[dev,gpu]'
	$(BIN)/python -c 'import tensorflow as tf; gpus = tf.config.list_physical_devices("GPU"); print("TensorFlow sees", len(gpus), "GPU(s):", [g.name for g in gpus])'
	touch $@

setup-gpu: $(BIN)/.installed-gpu ## setup, plus the CUDA wheels (requirements-gpu.lock); says which GPUs TensorFlow sees

# The whole DAG, as params.yaml says (the check prints the profile, its archs and the folder it
# runs in). PROFILE=smoke runs that profile offline on generated data in its own copy of the
# project, runs/smoke/, so the project's params.yaml and data/ stay as they are; the smoke outputs
# are in runs/smoke/data/. (`cifarflow workspace` checks the project's params.yaml first.)
pipeline: setup ## run the pipeline (dvc repro); PROFILE=smoke: offline, in runs/smoke/
ifeq ($(PROFILE),)
	$(BIN)/cifarflow params --check
	$(BIN)/dvc repro
else
	$(BIN)/cifarflow workspace $(PROFILE) >/dev/null
	cd runs/$(PROFILE) && PYTHONPATH=$$PWD $(abspath $(BIN))/cifarflow params --check \
		&& PYTHONPATH=$$PWD $(abspath $(BIN))/dvc repro
	@echo "profile $(PROFILE): outputs in runs/$(PROFILE)/data/ (leaderboard: runs/$(PROFILE)/data/reports/leaderboard.md)"
endif

# What users do next (outputs of `make pipeline`, or of `make pipeline PROFILE=smoke` in runs/smoke/).
RUN_DIR := $(if $(PROFILE),runs/$(PROFILE),.)

leaderboard: ## print the last run's leaderboard [PROFILE=smoke]
	@test -f $(RUN_DIR)/data/reports/leaderboard.md || { echo "no leaderboard in $(RUN_DIR)/data/reports/: run \`make pipeline$(if $(PROFILE), PROFILE=$(PROFILE))\` first (profiles: in params.yaml)" >&2; exit 2; }
	@cat $(RUN_DIR)/data/reports/leaderboard.md

# make predict IMAGES="photos/ cat.png" [PROFILE=smoke]: classify with that run's export.
predict: setup ## classify images: IMAGES="photos/ cat.png" [PROFILE=smoke]
	@test -n "$(IMAGES)" || { echo 'usage: make predict IMAGES="photos/ cat.png" [PROFILE=smoke]' >&2; exit 2; }
	@test -d $(RUN_DIR)/data/export || { echo "no export in $(RUN_DIR)/data/export/: run \`make pipeline$(if $(PROFILE), PROFILE=$(PROFILE))\` first (profiles: in params.yaml)" >&2; exit 2; }
	cd $(RUN_DIR) && $(abspath $(BIN))/cifarflow predict $(abspath $(IMAGES)) --model data/export

test: setup ## format and lint checks, then the tests (what CI runs)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check cifarflow tests bench tools
	$(BIN)/zizmor --offline .github/workflows/
	$(BIN)/pytest

# Two clean clones run the smoke pipeline; every deterministic output must be identical.
# CIFARFLOW_VERIFY_KEEP=<dir> keeps the clones (CI uses clone-1 for its metrics summary).
verify-repro: setup ## two clean clones run the smoke pipeline; outputs must be identical
	$(BIN)/cifarflow verify-repro $(if $(CIFARFLOW_VERIFY_KEEP),--keep $(CIFARFLOW_VERIFY_KEEP)) $(VERIFY_ARGS)

# Refresh the lock after changing dependencies in pyproject.toml.
lock: ## refresh requirements.lock (and requirements-gpu.lock) after changing dependencies in pyproject.toml
	rm -rf /tmp/cifarflow-lock && $(PYTHON) -m venv /tmp/cifarflow-lock
	/tmp/cifarflow-lock/bin/pip install --quiet '.[dev]' 'fastapi>=0.139,<0.151'
	/tmp/cifarflow-lock/bin/pip freeze --exclude cifarflow > requirements.lock
	/tmp/cifarflow-lock/bin/python tools/lock_gpu.py

clean: ## delete .venv
	rm -rf $(VENV)

# Mutation testing (mutmut 3) of the TensorFlow-free modules; mutation/REPORT.md has the numbers.
# Installs the `mutation` extra into the venv (pinned by requirements.lock) when mutmut is missing.
mutation: setup ## mutation testing of the TensorFlow-free modules (mutation/REPORT.md)
	@test -x $(BIN)/mutmut || $(BIN)/pip install --quiet -c requirements.lock -e '.[dev,mutation]'
	BIN=$(BIN) ./mutation/run.sh

# The nodes' container image (README, "The container image"): podman and buildah, as root; offline
# the base comes from debootstrap (container/make-base.sh). BASE=docker.io/library/python:3.11-slim-bookworm
# where a registry is reachable.
image: ## build the container image cifarflow:cpu (podman)
	container/build.sh cpu

image-gpu: ## build cifarflow:gpu, with the CUDA wheels of requirements-gpu.lock
	container/build.sh gpu

image-check: setup image ## the smoke pipeline inside cifarflow:cpu; its export must equal this host's
	BIN=$(abspath $(BIN)) container/check.sh

diagram: docs/cluster.png ## render docs/cluster.png from docs/cluster.dot (Graphviz)

docs/cluster.png: docs/cluster.dot
	dot -Tpng -Gdpi=110 $< -o $@
