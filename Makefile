# Quick start: `make demo` runs the product, `make test` runs the test suite. Both set themselves up.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export NO_TORCH_COMPILE ?= 1
export HF_HUB_OFFLINE ?= 1

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: setup demo test lint bench
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moshi-ttt bench --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check moshi_ttt server scripts tests

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/moshi-ttt bench
