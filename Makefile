# Developer entry points. Every Python-running target gets the cached virtualenv from
# scripts/venv.sh (outside the clone, keyed by a hash of pyproject.toml) and puts its bin/ first
# on PATH, so `twotower` and the tools resolve to it.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

DURATION ?= 120
PYTEST_ARGS ?=
COMPOSE_FILE := deploy/docker-compose.yml
# Shell snippet: create/reuse the venv and activate it for the rest of the recipe line.
USE_VENV = venv="$$(scripts/venv.sh)"; export PATH="$$venv/bin:$$PATH"

.PHONY: help venv test demo lint bench compose-check

help:
	@echo "make venv           create/reuse the cached virtualenv and print its path"
	@echo "make test           run the test suite (starts its own Kafka broker and Redis)"
	@echo "make demo           run the end-to-end demo for DURATION seconds (default 120)"
	@echo "make lint           ruff check"
	@echo "make bench          benchmarks (placeholder: shows the bench command's help)"
	@echo "make compose-check  validate deploy/docker-compose.yml"

venv:
	@scripts/venv.sh

# pytest exit code 5 means "no tests collected": a broken selection or layout, so it fails.
test:
	@$(USE_VENV); rc=0; pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [[ $$rc -eq 5 ]]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

demo:
	@$(USE_VENV); twotower demo --duration $(DURATION)

lint:
	@$(USE_VENV); ruff check .

bench:
	@$(USE_VENV); twotower bench --help

compose-check:
	docker-compose -f $(COMPOSE_FILE) config -q
