#!/usr/bin/env bash
# The headline policy sweeps of BENCHMARKS.md ("Scheduling policies in simulation"): every
# policy `compare` runs by default (E2, the paper's E2, the peers' own routers `dynamo` and
# `sglang`, our imitations of them, least-load, round-robin) on the same requests, on both
# clusters, plus Zipf-skewed and mixed workloads. Writes one report per sweep under
# $OUT (default loadtest-report/peers) and the latency-vs-rate plots under
# loadtest/benchmarks/; `scripts/peers_table.py $OUT` prints the headline table.
# Usage: scripts/bench-peers.sh [SWEEP...]   (default: every sweep; names as below)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-loadtest-report/peers}
BIN=./target/release/preble-loadtest
cargo build --release -q -p preble-loadtest

# name | cluster | workload | requests | rates | extra flags
SWEEPS=(
  "toolbench-4xa6000|4xA6000-mistral7b|toolbench|20000|10,15,20,25|"
  "alfworld-4xa6000|4xA6000-mistral7b|alfworld|20000|10,20,30,40|"
  "apps-4xa6000|4xA6000-mistral7b|apps|10000|4,8,12|"
  "videoqa-4xa6000|4xA6000-mistral7b|videoqa|5000|1,2,3|"
  "loogle-4xa6000|4xA6000-mistral7b|loogle|3000|0.25,0.5,0.75,1|"
  "toolbench-8xh100|8xH100-llama3-70b|toolbench|20000|20,40,80|"
  "alfworld-8xh100|8xH100-llama3-70b|alfworld|20000|40,80,160|"
  "apps-8xh100|8xH100-llama3-70b|apps|10000|8,16,32|"
  "videoqa-8xh100|8xH100-llama3-70b|videoqa|5000|2,4,8|"
  "loogle-8xh100|8xH100-llama3-70b|loogle|3000|2,4,6|"
  "toolbench-zipf-4xa6000|4xA6000-mistral7b|toolbench|20000|10,20,30,40|--popularity zipf:1.1"
  "mixed-4xa6000|4xA6000-mistral7b|mixed|10000|1,2,3|"
)

# Public traces at their own arrival times (one `sim` per policy, merged into one summary):
# name | cluster | workload | arrivals | time scale | requests
TRACES=(
  "mooncake-16xa100|16xa100-mistral-7b|mooncake:../shared/traces/mooncake_conversation_trace.jsonl||1|20000"
  "mooncake-32xa100|32xa100-mistral-7b|mooncake:../shared/traces/mooncake_conversation_trace.jsonl||1|20000"
  "toolbench-azure-code-4xa6000|4xA6000-mistral7b|toolbench|azure:../shared/traces/AzureLLMInferenceTrace_code_2023.csv|0.15|8819"
  "videoqa-azure-conv-4xa6000|4xA6000-mistral7b|videoqa|azure:../shared/traces/AzureLLMInferenceTrace_conv_2023.csv|2|3000"
)
POLICIES=(e2 e2-paper dynamo sglang round-robin least-load cache-aware kv-cost)

wanted=("$@")
for sweep in "${SWEEPS[@]}"; do
  IFS='|' read -r name cluster workload requests rates extra <<<"$sweep"
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " ${name} " ]]; then
    continue
  fi
  echo "== $name: $workload on $cluster at $rates req/s" >&2
  # shellcheck disable=SC2086
  "$BIN" compare --workloads "$workload" --requests "$requests" --rates "$rates" \
    --cluster "$cluster" $extra --out "$OUT/$name" >"$OUT-$name.log" 2>&1 ||
    { tail -20 "$OUT-$name.log" >&2; exit 1; }
  tail -n +1 "$OUT-$name.log" | grep -E "^workload +rate|^[a-z]+ +[0-9.]+ [a-z-]+ +[0-9.]+ +[0-9.]+" >&2 || true
  for f in "$OUT/$name"/latency-vs-rate-*.svg; do
    [ -f "$f" ] && cp "$f" "loadtest/benchmarks/latency-vs-rate-$name.svg"
  done
done

for trace in "${TRACES[@]}"; do
  IFS='|' read -r name cluster workload arrivals scale requests <<<"$trace"
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " ${name} " ]]; then
    continue
  fi
  echo "== $name: $workload on $cluster${arrivals:+ at the arrivals of $arrivals x $scale}" >&2
  for policy in "${POLICIES[@]}"; do
    flags=(--workload "$workload" --requests "$requests" --cluster "$cluster" --policy "$policy"
      --out "$OUT/$name/$policy")
    [ -n "$arrivals" ] && flags+=(--arrivals "$arrivals" --time-scale "$scale")
    "$BIN" sim "${flags[@]}" 2>&1 | grep -E "^[a-z_]+ +[a-z0-9-]+ +[0-9.]+ " >&2
  done
  python3 -c 'import json,sys; print(json.dumps({"summaries": [json.load(open(f"{sys.argv[1]}/{p}/summary.json")) for p in sys.argv[2:]]}))' \
    "$OUT/$name" "${POLICIES[@]}" >"$OUT/$name/summary.json"
done
