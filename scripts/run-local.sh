#!/usr/bin/env bash
# Runs the whole stack as plain processes on loopback: a NATS server of its own (127.0.0.1:4223)
# with one user per service, each allowed only its own subjects (preble-nats-auth writes the
# configuration and the credentials to .preble/run/nats/), the scheduler, $WORKERS simulated
# GPUs and the gateway on 127.0.0.1:8000. NATS_NO_AUTH=1 uses the NATS on 127.0.0.1:4222
# without authentication instead. ENGINE=torch runs the workers on the torch engine (needs the
# binaries built with the feature `torch`; `make run-real` builds them and the real model).
# Ctrl-C stops everything (each service drains first).
set -euo pipefail
WORKERS=${WORKERS:-4}
MODEL_DIR=${MODEL_DIR:-models/preble-sim}
ENGINE=${ENGINE:-sim}
NATS_PORT=${NATS_PORT:-4223}
AUTH_DIR=${NATS_AUTH_DIR:-.preble/run/nats}
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

workers=$(seq -s, -f 'gpu-%g' 0 $((WORKERS - 1)))
if [ "${NATS_NO_AUTH:-0}" = 1 ]; then
  echo "warning: NATS without authentication (NATS_NO_AUTH=1): any client can act as any service"
  export PREBLE_NATS_URL=nats://127.0.0.1:4222 PREBLE_NATS_NO_AUTH=true
  with_identity() { shift; "$@"; }
else
  "$BIN/preble-nats-auth" --out "$AUTH_DIR" --listen "127.0.0.1:$NATS_PORT" --workers "$workers"
  nats=$(command -v nats-server || echo /usr/sbin/nats-server)
  "$nats" -c "$AUTH_DIR/nats.conf" >"$AUTH_DIR/nats-server.log" 2>&1 & pids+=($!)
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break
    sleep 0.1
  done
  export PREBLE_NATS_URL="nats://127.0.0.1:$NATS_PORT"
  # Runs a service with the credentials of its identity (file $1 in $AUTH_DIR).
  with_identity() { local creds=$1; shift; (set -a; . "$AUTH_DIR/$creds"; exec "$@"); }
fi

with_identity scheduler.env "$BIN/preble-scheduler" --http-addr 127.0.0.1:9000 & pids+=($!)
for i in $(seq 0 $((WORKERS - 1))); do
  with_identity "worker-gpu-$i.env" "$BIN/preble-worker" --worker-id "gpu-$i" --model-dir "$MODEL_DIR" \
    --engine "$ENGINE" --http-addr "127.0.0.1:$((9100 + i))" & pids+=($!)
done
with_identity gateway.env "$BIN/preble-gateway" --model-dir "$MODEL_DIR" --http-addr 127.0.0.1:8000 & pids+=($!)

for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break
  sleep 0.1
done
model=$(basename "$MODEL_DIR")
cat <<MSG

preble is up: OpenAI-compatible endpoint http://127.0.0.1:8000/v1 ($WORKERS $ENGINE workers)
try:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'
metrics: gateway :8000/metrics, scheduler :9000/metrics, workers :9100.. /metrics
NATS: $PREBLE_NATS_URL (API clients: credentials in $AUTH_DIR/client.env)
Ctrl-C stops everything.
MSG
wait
