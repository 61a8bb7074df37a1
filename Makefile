# kubeforge developer targets (DESIGN §6). `make test` is what CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: venv test unit integration e2e e2e-kind e2e-repeat images images-test kind-node-image crds k8s-bin cluster-up cluster-down lint bench bench-deps bench-tools bench-smoke clean

# The install builds the router's native relay (relay/, Rust) with cargo: edits there rebuild it.
$(VENV)/.installed: pyproject.toml kubeforge/contract.toml relay/Cargo.toml relay/Cargo.lock $(wildcard relay/src/*.rs)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: lint unit integration e2e bench-smoke images-test e2e-kind

# The relay's own tests (Rust) link against libpython instead of being loaded by it.
unit: venv
	$(PYTEST) tests/unit
	cargo test --quiet --manifest-path relay/Cargo.toml --no-default-features

# Twice: with the native relay (the default) and with the Python call path it falls back to.
integration: venv
	$(PYTEST) tests/integration
	KUBEFORGE_RELAY=python $(PYTEST) tests/integration -k "not native_relay"

# The e2e tier: a real control plane built from its Go modules (versions in k8s/versions.env),
# cached outside the repo; `make k8s-bin` is a no-op when the cache is warm.
k8s-bin:
	k8s/build-bin.sh

e2e: venv k8s-bin
	$(PYTEST) tests/e2e -m "not real_node"

# The same tier on a real kubelet: a one-node kind cluster from an offline node image, the
# images loaded, the chart installed (tests/e2e/kind/lane.sh). Starts the Docker engine when none
# runs and stops it again; leaves no container, network or route behind.
e2e-kind: venv
	tests/e2e/kind/lane.sh

# Each e2e tier 5 times in a row from a clean clone of HEAD, with a table of the runs
# (tests/repeat.sh: RUNS=n, LOAD=1 to keep one core busy meanwhile).
e2e-repeat:
	tests/repeat.sh

# kind's node image for the pinned Kubernetes, built without a registry (cached by content).
kind-node-image:
	images/kind-node/build.sh >/dev/null

# The images users run: kubeforge:<version>, kubeforge-replica:<version> and an actor image
# built FROM it (images/build.sh). Starts a Docker engine when none runs (installing Debian's
# docker.io if need be); public bases when they can be pulled, else bases made from Debian's
# packages. `images-test` checks them and stops the engine again if it started one (an engine
# that was running before is left running).
images: venv
	images/build.sh >/dev/null

images-test: venv
	images/engine.sh running && own= || own=1; trap '[ -z "$$own" ] || images/engine.sh stop' EXIT; \
	images/build.sh >/dev/null && $(PYTEST) tests/images

cluster-up: venv k8s-bin
	$(PY) -m devcluster up

cluster-down: venv
	$(PY) -m devcluster down

# crds/, the chart's CRD and RBAC, and deploy/ are generated from the Python sources; a unit
# test fails when any of them is stale.
crds: venv
	$(PY) -m kubeforge.generate

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	cargo fmt --manifest-path relay/Cargo.toml --check
	cargo clippy --quiet --manifest-path relay/Cargo.toml --release -- -D warnings
	cargo clippy --quiet --manifest-path relay/Cargo.toml --tests --no-default-features -- -D warnings

# Benchmarks need wrk, nginx and HAProxy (Debian) and vllm-router (PyPI): the peers they compare with.
bench-deps:
	command -v wrk >/dev/null && command -v nginx >/dev/null && command -v haproxy >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq wrk nginx-light haproxy >/dev/null)

bench-tools: venv bench-deps
	$(PY) -m pip install --quiet -e '.[bench]'

# Every benchmark script for a few seconds (tests/bench): none of them can rot.
bench-smoke: venv k8s-bin bench-deps
	$(PYTEST) tests/bench

# The full run (about 45 min): figures under bench/results/ (JSON), then the plots and the
# headline table (bench/plots.py) that README shows.
RESULTS := bench/results
bench: bench-tools k8s-bin
	$(PY) bench/router_overhead.py --connections 4,16,64 --json $(RESULTS)/router_overhead.json
	$(PY) bench/router_overhead.py --pin --rounds 3 --json $(RESULTS)/router_overhead_pinned.json
	$(PY) bench/router_overhead.py --tls --connections 16,64 --rounds 3 --json $(RESULTS)/router_overhead_tls.json
	$(PY) bench/service_calls.py --json $(RESULTS)/service_calls.json
	$(PY) bench/scale.py --json $(RESULTS)/scale.json
	$(PY) bench/spmd_calls.py --json $(RESULTS)/spmd_calls.json
	$(PY) bench/payloads.py --json $(RESULTS)/payloads.json
	$(PY) bench/streams.py --json $(RESULTS)/streams.json
	$(PY) bench/operator_memory.py --json $(RESULTS)/operator_memory.json
	$(PY) bench/operator_scale.py --json $(RESULTS)/operator_scale.json
	$(PY) bench/plots.py --results $(RESULTS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info relay/target kubeforge/_relay*.so
