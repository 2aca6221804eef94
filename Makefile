# The two commands of README: `make serve` (the main job) and `make test` (the whole suite).
.PHONY: install test lint serve bench

VENV := .venv
INSTALLED := $(VENV)/.installed
DEMO_ADAPTER ?= examples/demo-adapter

$(INSTALLED): pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(INSTALLED)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

test: $(INSTALLED) lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

serve: $(INSTALLED)
	$(VENV)/bin/remix-serve --adapter $(DEMO_ADAPTER) --host 127.0.0.1 --port 8000
