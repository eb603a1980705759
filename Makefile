# preble: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
MODEL_DIR ?= models/preble-sim
WORKERS ?= 4

.PHONY: run test bench lint fmt model build services loadtest up

build:
	$(CARGO) build --workspace --bins

model: build
	@test -f $(MODEL_DIR)/tokenizer.json || ./target/debug/preble-modelgen --out $(MODEL_DIR)

## run: NATS + Redis on loopback (started or installed if missing), gateway, scheduler, 4 sim workers
run: model
	./scripts/ensure-services.sh
	WORKERS=$(WORKERS) MODEL_DIR=$(MODEL_DIR) ./scripts/run-local.sh

## test: every unit, property and end-to-end test (needs NATS and Redis; started if missing)
test: build
	./scripts/ensure-services.sh
	./scripts/ensure-test-tools.sh
	$(CARGO) test --workspace

bench: build
	./scripts/ensure-services.sh
	$(CARGO) build --release --workspace --bins
	CARGO_TARGET_DIR=target $(CARGO) run --release -p preble-loadtest -- path-bench

## loadtest: simulate all five policies on the tool-use workload over a sweep of rates (4xA6000)
loadtest:
	$(CARGO) build --release -p preble-loadtest
	./target/release/preble-loadtest compare --workloads toolbench --requests 6000 \
		--rates 10,20,30,40 --out loadtest-report

## up: the whole stack in containers (NATS, Redis, Jaeger, Prometheus, gateway, scheduler, 4 sim workers)
up:
	docker compose up --build

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
