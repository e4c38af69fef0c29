# Two commands run everything on a fresh machine: `make test` and `make demo`.
# Both bootstrap what they need (a .venv, the npm packages) and redo it only when its inputs change.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# App instances of the local stack (devstack/stack.py): N per queue function, or http=N,queue=N,<function>=N.
# `make dev INSTANCES=3`; for `make test` it sets the chaos test's layout (CHAOS_INSTANCES).
INSTANCES ?=
INSTANCE_ARGS := $(if $(INSTANCES),--instances $(INSTANCES))

.PHONY: help deps test lint demo dev bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(PY_STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

deps: $(PY_STAMP) $(NODE_STAMP) ## create .venv and install Python and npm packages (only when changed)

lint: $(PY_STAMP) ## ruff, and mypy over the product code (pyproject.toml [tool.mypy])
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: deps lint ## ruff, mypy and the whole pytest suite (Azurite and the stand-ins start on their own)
	$(if $(INSTANCES),CHAOS_INSTANCES=$(INSTANCES)) $(VENV)/bin/pytest $(PYTEST_ARGS)

demo: deps ## the main job end to end on the local stack, then a summary
	$(PY) -m devstack.demo $(INSTANCE_ARGS) $(DEMO_ARGS)

dev: deps ## start the local stack and leave it running (Ctrl-C stops it); INSTANCES=N for N per queue function
	$(PY) -m devstack.demo --keep-running $(INSTANCE_ARGS) $(DEMO_ARGS)

bench: deps ## benchmark scripts; figures go to stdout
	$(PY) -m bench.run $(INSTANCE_ARGS) $(BENCH_ARGS)

clean: ## remove the venv, npm packages and local state
	rm -rf $(VENV) node_modules .devstack .pytest_cache .ruff_cache test-output
