# All targets use the project venv; `make install` creates it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck run demo demo-rr bench bench-full bench-peers bench-precise generate check-generated clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# reinstall only when the dependency list changes
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@# xds-protos ships an old copy of opentelemetry/proto (same file paths); whichever installs last wins.
	@# The OTLP exporter needs opentelemetry-proto's own files, and Envoy's ext_proc types use none of them.
	$(BIN)/pip install -q --no-deps --force-reinstall "$$($(BIN)/pip show opentelemetry-proto | sed -n 's/^Version: /opentelemetry-proto==/p')"
	touch $(STAMP)

install: $(STAMP)
	@# generated protobuf modules (setup.py) missing or older than their .proto: rebuild them
	@test epp/_gen/vllm_engine_pb2.py -nt protos/vllm_engine.proto || $(BIN)/pip install -q --no-deps -e .

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check epp tests bench deploy
	$(BIN)/mypy epp

typecheck: install
	$(BIN)/mypy epp

# the picker alone on the embedded no-cluster example (plaintext ext_proc on :9002)
run: install
	$(BIN)/python -m epp --pool-name demo-pool --manifests deploy/examples/no-cluster.yaml --secure-serving=false

# 4 simulated model servers + the picker + a real Envoy, ~30 s of mixed traffic, then a report;
# `make demo DEMO_ARGS="--policy round-robin"` (or `make demo-rr`) for Envoy round-robin without the picker
DEMO_ARGS ?=
demo: install
	$(BIN)/python -m epp.demo --seconds 30 $(DEMO_ARGS)

demo-rr: install
	$(BIN)/python -m epp.demo --seconds 30 --policy round-robin $(DEMO_ARGS)

bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/routing_quality.py --quick
	$(BIN)/python bench/extproc_cost.py 3

bench-full: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/routing_quality.py
	$(BIN)/python bench/routing_doc.py
	$(BIN)/python bench/extproc_cost.py 6 --repeat 3
	$(BIN)/python bench/extproc_cost.py 3 --matrix
	$(BIN)/python bench/picker_latency.py --profile duplex --requests 1000000
	$(BIN)/python bench/sched_decision.py
	$(BIN)/python bench/metrics_parse.py
	$(BIN)/python bench/kube_latency.py

# precise prefix routing from engine KV events: DES routing quality (~15 min; PRECISE_ARGS=--quick for
# a few minutes) and the cost figures (ingest, lookup, tokenizer, RSS)
PRECISE_ARGS ?=
bench-precise: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/precise_prefix.py $(PRECISE_ARGS)
	$(BIN)/python bench/precise_prefix_cost.py $(PRECISE_ARGS)

# live: our picker behind Envoy vs SGLang's and vLLM's Rust routers on the same 4 simulators (~45 min;
# `make bench-peers PEERS_ARGS=--quick` for < 3 min)
PEERS_ARGS ?=
bench-peers: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/peers.py $(PEERS_ARGS)

# regenerate committed artefacts (CRDs, the standalone chart's Envoy configs); check = verify only
generate: install
	$(BIN)/python deploy/crds/generate.py
	$(BIN)/python deploy/charts/standalone/generate.py

check-generated: install
	$(BIN)/python deploy/crds/generate.py --check
	$(BIN)/python deploy/charts/standalone/generate.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
