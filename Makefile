# The two commands of the README. Both set up .venv first (idempotent).
VENV ?= .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: setup quickstart test lint clean

setup:
	./scripts/setup.sh

## quickstart: set up, then run the main job on the embedded default (local Ray, local MLflow
## store, generated data, tiny models). Outputs under runs/quickstart.
quickstart: setup
	$(BIN)/ttm-ray quickstart

## test: set up, lint, then the whole test suite (slow tests included). Two pytest-xdist
## workers (tests/conftest.py assigns the groups: the Ray Train tests and the it-learns quick
## run in one, the pipeline, job-submit and rehearsal tests in the other); README "Tests" has
## the time measured from a fresh clone on 2 cores.
test: setup lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25

## lint: ruff, then hadolint on the image's Dockerfile (ignored rules, with their reasons, in
## cluster/docker/.hadolint.yaml).
lint:
	$(BIN)/ruff check .
	$(BIN)/hadolint --config cluster/docker/.hadolint.yaml cluster/docker/Dockerfile

clean:
	rm -rf runs .pytest_cache .ruff_cache
