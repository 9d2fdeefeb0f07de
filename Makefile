# Quick start: `make demo` runs the product, `make test` runs the test suite. Both set themselves up.
# `make test-fast` is the development loop: no Chromium, HAProxy, wheel, multi-process or slow tests (pytest
# markers, pyproject.toml); `make test` (CI) runs them all. Their sizes and times: the README, from
# docs/test_suite*.json, which `make test SUITE_RECORD=docs/test_suite.json` (test-fast: docs/test_suite_fast.json)
# rewrites; `make docs` then updates the README.
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

# System tools the tests use: espeak-ng/sox make real speech WAVs, chromium runs the web-client test,
# haproxy the scale-out test (Debian puts it in /usr/sbin).
SYSDEPS := espeak-ng sox chromium haproxy
.PHONY: setup sysdeps demo scaleout-demo test test-fast lint bench docs experiment experiment-symbols gpu-check
setup: $(STAMP)

sysdeps:
	@missing=""; for t in $(SYSDEPS); do command -v $$t >/dev/null || test -x /usr/sbin/$$t || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt-get"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The embedded demo: the tiny echo TTT-Moshi + reduced Mimi with their shipped trained weights (docs/demo.md), fully
# offline. Open http://localhost:8998
demo: $(STAMP)
	$(VENV)/bin/moshi-ttt serve --demo

# Scale-out on loopback: two demo instances (127.0.0.1:8998 and :8999, 4 conversations each) behind HAProxy
# with deploy/haproxy.cfg, both on one conversation-memory folder (MEMORY_STORE): a conversation remembered on
# one instance resumes on either. Open http://localhost:8990 (HAProxy stats: http://localhost:8991). Ctrl-C stops all.
MEMORY_STORE ?= $(or $(MOSHI_TTT_CACHE),$(HOME)/.cache/moshi_ttt)/memories-scaleout
scaleout-demo: $(STAMP) sysdeps
	@haproxy=$$(command -v haproxy || echo /usr/sbin/haproxy); \
	$(VENV)/bin/moshi-ttt serve --demo --host 127.0.0.1 --port 8998 \
	  --max-conversations 4 --trusted-proxies 127.0.0.1 --agent-port 9998 --memory-store $(MEMORY_STORE) & a=$$!; \
	$(VENV)/bin/moshi-ttt serve --demo --host 127.0.0.1 --port 8999 \
	  --max-conversations 4 --trusted-proxies 127.0.0.1 --agent-port 9999 --memory-store $(MEMORY_STORE) & b=$$!; \
	trap 'kill $$a $$b 2>/dev/null; wait' EXIT INT TERM; \
	$$haproxy -f deploy/haproxy.cfg -db

# ruff, then the import layers (pyproject.toml's [tool.importlinter]; docs/design.md, Package layout).
lint: $(STAMP)
	$(VENV)/bin/ruff check moshi_ttt server scripts tests
	$(VENV)/bin/lint-imports

SUITE_RECORD ?=
PYTEST := MOSHI_TTT_SUITE_RECORD=$(SUITE_RECORD) $(VENV)/bin/python -m pytest -p moshi_ttt.testing.suite_record
test: $(STAMP) sysdeps lint
	$(PYTEST) -q tests

FAST := not browser and not haproxy and not wheel and not multiprocess and not slow
test-fast: $(STAMP)
	@$(MAKE) --no-print-directory sysdeps SYSDEPS="espeak-ng sox"
	$(PYTEST) -q tests -m "$(FAST)"

# The cost figures (docs/cost.md), written to the files the docs are generated from; on a quiet machine, then
# `make docs`. BENCH_REPEATS runs of each section: the docs give the median and the min-max.
BENCH_REPEATS ?= 3
bench: $(STAMP) sysdeps
	$(VENV)/bin/moshi-ttt bench --quick --repeats $(BENCH_REPEATS) --out docs/bench_quick.json
	$(VENV)/bin/moshi-ttt bench --sections moshi7b --repeats $(BENCH_REPEATS) --out docs/bench_full_moshi7b.json
	$(VENV)/bin/moshi-ttt bench --quick --sections server --profile --out docs/bench_profile.json
	$(VENV)/bin/moshi-ttt bench --sections capacity --out docs/capacity.json

# Every generated block and figure of README.md and docs/ (moshi_ttt/docs_gen.py) from the JSON files above
# and the experiments' results, after the spoken-memory report has regenerated its own from its run records.
# `python -m moshi_ttt.docs_gen --check` changes nothing and lists what is stale or names a dead path.
docs: $(STAMP)
	$(VENV)/bin/python -m moshi_ttt.experiments.spoken.report --out docs/spoken_memory --doc docs/spoken-memory.md \
	  --readme README.md
	$(VENV)/bin/python -m moshi_ttt.docs_gen

# On a fresh GPU machine: the check under CUDA graphs + the GPU bench at Moshi 7B shapes -> docs/bench_gpu.json
# (docs/gpu.md). Installs what is missing itself; GPU_CHECK_ARGS=--full for the full sweep, --dry-run to see the steps.
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Does Moshi remember? The spoken-memory experiment (moshi_ttt/experiments/spoken/experiment.py, docs/spoken-memory.md):
# data and checkpoints in $MOSHI_TTT_CACHE/spoken_memory (resumable), run records in docs/spoken_memory/runs/, then
# results.json, the plot and the tables of docs/spoken-memory.md and the README, regenerated from the records.
experiment: $(STAMP) sysdeps
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m moshi_ttt.experiments.spoken.experiment --out docs/spoken_memory \
	  --doc docs/spoken-memory.md --readme README.md

# The symbolic memory experiment (moshi_ttt/experiments/memory_experiment.py; resumable: finished runs are cached
# in docs/memory_experiment/runs/): results.json, the plot, and the table in docs/memory-experiment.md.
experiment-symbols: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m moshi_ttt.experiments.memory_experiment --out docs/memory_experiment --jobs 2
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m moshi_ttt.experiments.memory_cross --out docs/memory_experiment
