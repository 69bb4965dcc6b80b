# agentplane: `make run` starts the service, `make test` runs the tests. `make help` lists all.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# What ruff formats and checks (mypy: the packages and the scripts written in Python).
LINT_PATHS := client server tests migrations scripts setup.py
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := help
.PHONY: help setup proto check-proto lint-proto run test test-fast bench lint deps smoke migrate clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# The first install takes a minute or two: each step says what it does, pip names each
# package as it fetches it.
$(STAMP): pyproject.toml
	@echo "[1/3] creating the virtualenv $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@echo "[2/3] upgrading pip"
	@$(PY) -m pip install -q --upgrade pip
	@echo "[3/3] installing agentplane and its dependencies (the first time: about 2 minutes)"
	@set -o pipefail; $(PY) -m pip install --progress-bar off -e '.[dev]' | grep --line-buffered -E '^(Collecting|Successfully installed)' | cut -c1-100
	@touch $(STAMP)
	@echo "installed into $(VENV)"

setup: $(STAMP) ## create .venv, install agentplane with its extras, the sandbox's tools (bwrap, socat) and, for the tests, pgbouncer
	@scripts/install_sandbox_tools.sh
	@scripts/install_pgbouncer.sh

proto: $(STAMP) ## regenerate the Python stubs in client/v1 from protos/
	scripts/gen_protos.sh

check-proto: $(STAMP) ## fail if the committed stubs differ from what protos/ generates; buf lint
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	scripts/gen_protos.sh "$$tmp" && diff -r -x __pycache__ client/v1 "$$tmp" \
	  && echo "stubs match protos/" \
	  || { echo "client/v1 is stale: run 'make proto' and commit" >&2; exit 1; }
	$(VENV)/bin/buf lint

lint-proto: $(STAMP) ## buf lint (STANDARD; exceptions documented in buf.yaml)
	$(VENV)/bin/buf lint

run: setup ## migrate and start the server (sandbox model beside it when ANTHROPIC_API_KEY is unset)
	$(PY) -m agentplane.server dev

migrate: $(STAMP) ## apply database migrations to AGENTPLANE_DATABASE_URL
	$(PY) -m agentplane.server migrate

# Test processes (pytest-xdist, a module per process): the suite waits on agents, servers
# and databases far more than it computes, so three keep two cores busy.
TEST_WORKERS ?= 3
test: setup ## run the whole test suite in TEST_WORKERS processes (PostgreSQL too when AGENTPLANE_TEST_DATABASE_URL is set)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP) ## ruff format --check (fails on a diff), ruff check, mypy, then `make deps`
	$(VENV)/bin/ruff format --check $(LINT_PATHS) \
	  || { echo "not formatted: run '$(VENV)/bin/ruff format $(LINT_PATHS)'" >&2; exit 1; }
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy client server scripts/smoke_wheel.py setup.py
	@$(MAKE) --no-print-directory deps

deps: $(STAMP) ## deptry: every import declared for its install, every declared dependency imported
	@echo "deps: client/, server/, migrations/ against the base dependencies and the server extra"
	$(VENV)/bin/deptry client server migrations
	@echo "deps: client/ alone against the base dependencies (a server-extra import is DEP004)"
	$(VENV)/bin/deptry client --optional-dependencies-dev-groups dev,server

smoke: $(STAMP) ## build the sdist and wheel, install the wheel in a fresh venv, serve, run a session
	$(PY) scripts/smoke_wheel.py

bench: $(STAMP) ## agentplane vs the direct SDK, as ratios; writes BENCHMARKS.md (BENCH_ARGS=--quick: one run)
	$(PY) tests/bench/run.py $(BENCH_ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
