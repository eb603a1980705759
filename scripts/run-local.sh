#!/usr/bin/env bash
# Runs the whole stack as plain processes on loopback: scheduler, $WORKERS simulated GPUs and
# the gateway on 127.0.0.1:8000. Ctrl-C stops everything (each service drains first).
set -euo pipefail
WORKERS=${WORKERS:-4}
MODEL_DIR=${MODEL_DIR:-models/preble-sim}
BIN=./target/debug
pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
  echo "stopped."
}
trap stop INT TERM EXIT

"$BIN/preble-scheduler" --http-addr 127.0.0.1:9000 & pids+=($!)
for i in $(seq 0 $((WORKERS - 1))); do
  "$BIN/preble-worker" --worker-id "gpu-$i" --model-dir "$MODEL_DIR" \
    --http-addr "127.0.0.1:$((9100 + i))" & pids+=($!)
done
"$BIN/preble-gateway" --model-dir "$MODEL_DIR" --http-addr 127.0.0.1:8000 & pids+=($!)

for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break
  sleep 0.1
done
model=$(basename "$MODEL_DIR")
cat <<MSG

preble is up: OpenAI-compatible endpoint http://127.0.0.1:8000/v1 ($WORKERS simulated GPUs)
try:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'
metrics: gateway :8000/metrics, scheduler :9000/metrics, workers :9100.. /metrics
Ctrl-C stops everything.
MSG
wait
