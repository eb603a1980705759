#!/usr/bin/env bash
# Makes sure NATS (with JetStream) listens on 127.0.0.1:4222 and Redis on 127.0.0.1:6379:
# starts them if installed, installs them with apt-get if not. (The tests use that NATS
# without authentication; `make run` and the authentication tests start their own.)
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}
wait_for() {
  for _ in $(seq 1 50); do listening "$1" && return 0; sleep 0.2; done
  echo "error: nothing listens on 127.0.0.1:$1 after starting $2" >&2
  exit 1
}

# nats-server itself is needed even when one listens: `make run` and the authentication
# tests start servers of their own.
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
if ! listening 4222; then
  bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  mkdir -p "${TMPDIR:-/tmp}/preble-nats"
  echo "starting nats-server (JetStream) on 127.0.0.1:4222"
  nohup "$bin" -a 127.0.0.1 -p 4222 -js -sd "${TMPDIR:-/tmp}/preble-nats" \
    >"${TMPDIR:-/tmp}/preble-nats.log" 2>&1 &
  wait_for 4222 nats-server
fi

if ! listening 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  echo "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "${TMPDIR:-/tmp}/preble-redis.log"
  wait_for 6379 redis-server
fi
