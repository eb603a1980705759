#!/usr/bin/env bash
# Makes sure the tools that some tests drive are present, installing them with apt-get if not:
# python3 with venv (the openai-client test pip-installs `openai` into target/openai-venv) and
# docker-compose (the compose test runs `docker-compose config`; no container engine needed).
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()

if ! command -v python3 >/dev/null || ! python3 -c "import ensurepip, venv" 2>/dev/null; then
  missing+=(python3 python3-venv)
fi
command -v docker-compose >/dev/null || missing+=(docker-compose)
# The Redis TLS test makes its certificates with openssl.
command -v openssl >/dev/null || missing+=(openssl)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (for the tests)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
