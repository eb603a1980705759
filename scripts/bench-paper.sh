#!/usr/bin/env bash
# The paper's own experiments (BENCHMARKS.md, "The paper's own experiments, replayed"):
# every `preble-loadtest paper` experiment on the A6000 cluster of 4 GPUs, the ablation over
# three seeds, of preble's E2 and of the paper's rules. Writes one report per experiment
# under $OUT (default loadtest-report/paper) with a log beside it, and copies the plots to
# loadtest/benchmarks/paper/.
# Usage: scripts/bench-paper.sh [EXPERIMENT...]   (default: all; `preble-loadtest paper list`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-loadtest-report/paper}
BIN=./target/release/preble-loadtest
cargo build --release -q -p preble-loadtest
mkdir -p "$OUT" loadtest/benchmarks/paper

EXPERIMENTS=(fig3-toolbench fig3-alfworld fig3-apps fig3-videoqa fig3-loogle fig4-mixed fig5-ablation)
wanted=("$@")
for name in "${EXPERIMENTS[@]}"; do
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " ${name} " ]]; then
    continue
  fi
  seeds=(1)
  variants=(e2)
  if [ "$name" = fig5-ablation ]; then
    seeds=(1 2 3)
    variants=(e2 e2-paper)
  fi
  for variant in "${variants[@]}"; do
    for seed in "${seeds[@]}"; do
      dir="$OUT/$name"
      [ "$variant" != e2 ] && dir="$dir-$variant"
      [ "${#seeds[@]}" -gt 1 ] && dir="$dir-seed$seed"
      echo "== $(basename "$dir")" >&2
      "$BIN" paper "$name" --ablate "$variant" --seed "$seed" --arrival-seed $((seed + 6)) \
        --out "$dir" >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
      grep -v '^wrote' "$dir.log" >&2
      for f in "$dir"/latency-vs-rate-fig3-*.svg "$dir"/ablation.svg "$dir"/latency-cdf-*.svg; do
        [ -f "$f" ] && cp "$f" "loadtest/benchmarks/paper/$(basename "$dir")-$(basename "$f")"
      done
    done
  done
done
