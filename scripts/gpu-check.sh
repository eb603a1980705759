#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the torch engine's parity tests and its benchmark on CUDA,
# with the output written to a results file (default gpu-check-results.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check-results.txt}"
{
  echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  make torch-env tiny-model bench-model
  PREBLE_TEST_DEVICE=cuda make test-torch
  PREBLE_BENCH_DEVICE=cuda make bench-torch
} 2>&1 | tee "$OUT"
echo "results in $OUT"
