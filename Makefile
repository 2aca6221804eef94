# The two commands of README: `make serve` (the main job) and `make test` (the whole suite).
# `make image-test` builds and checks the CPU image with podman (root, Debian; about 6 minutes).
.PHONY: install test lint serve bench image-test

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

image-test:
	bash scripts/image_test.sh
