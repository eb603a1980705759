#!/usr/bin/env bash
# Makes sure python3 can create virtualenvs (the openai-client test pip-installs `openai` into
# one under target/): installs python3-venv with apt-get if it cannot.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v python3 >/dev/null || ! python3 -c "import ensurepip, venv" 2>/dev/null; then
  echo "installing python3-venv (for the openai client test)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3 python3-venv >/dev/null
fi
