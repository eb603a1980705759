#!/usr/bin/env bash
# Makes (once) the Python virtualenv the torch engine builds and tests against: PyTorch 2.13.0
# (libtorch for `tch` 0.26) plus Hugging Face `transformers`, the reference implementation the
# parity tests and the tiny-model generator use. The venv lives outside the clone so that CI and
# later checkouts reuse it; prints its path on the last line.
set -euo pipefail
VENV="${PREBLE_TORCH_VENV:-$HOME/.cache/preble/torch-venv}"
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION="${PREBLE_TRANSFORMERS_VERSION:-4.57.6}"

if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
    sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv >&2
  fi
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
fi
have() { "$VENV/bin/python" -c "import $1, sys; sys.exit(0 if $1.__version__.split('+')[0] == '$2' else 1)" 2>/dev/null; }
if ! have torch "$TORCH_VERSION" || ! have transformers "$TRANSFORMERS_VERSION"; then
  echo "installing torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION into $VENV (several GB, a few minutes)" >&2
  "$VENV/bin/pip" install --quiet --progress-bar off "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" safetensors numpy >&2
fi
echo "$VENV"
