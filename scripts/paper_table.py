#!/usr/bin/env python3
"""The tables of BENCHMARKS.md's "The paper's own experiments, replayed" section, from the
reports scripts/bench-paper.sh writes. Usage: scripts/paper_table.py [DIR]
(default loadtest-report/paper)."""
import json
import sys
from pathlib import Path


def load(path):
    data = json.loads(path.read_text())
    return data["summaries"] if isinstance(data, dict) else data


def saturated(s):
    return s["throughput_rps"] < 0.9 * s["rate"] if s["rate"] > 0 else False


def sweeps(root):
    print("| experiment | req/s | E2 avg s | E2 p99 s | E2 headroom | vs RR+LPM avg / p99 | vs dynamo | vs sglang |")
    print("|---|---|---|---|---|---|---|---|")
    for d in sorted(root.glob("fig3-*")):
        if not (d / "summary.json").exists():
            continue
        rows = load(d / "summary.json")
        for rate in sorted({s["rate"] for s in rows}):
            at = {s["policy"]: s for s in rows if s["rate"] == rate}
            e2 = at.get("e2")
            if e2 is None:
                continue

            def vs(name):
                o = at.get(name)
                if o is None:
                    return "-"
                mark = "*" if saturated(o) else ""
                return "%.2fx / %.2fx%s" % (
                    o["latency_ms"]["mean"] / e2["latency_ms"]["mean"],
                    o["latency_ms"]["p99"] / e2["latency_ms"]["p99"],
                    mark,
                )

            h = e2.get("headroom") or {}
            print(
                "| %s | %g | %.2f%s | %.2f | %.2f / %.2f | %s | %s | %s |"
                % (
                    d.name,
                    rate,
                    e2["latency_ms"]["mean"] / 1e3,
                    "*" if saturated(e2) else "",
                    e2["latency_ms"]["p99"] / 1e3,
                    h.get("avg", float("nan")),
                    h.get("p99", float("nan")),
                    vs("round-robin+lpm"),
                    vs("dynamo"),
                    vs("sglang"),
                )
            )


def ablations(root):
    for variant in ["fig5-ablation-seed", "fig5-ablation-e2-paper-seed"]:
        runs = sorted(root.glob(variant + "*"))
        runs = [r for r in runs if (r / "summary.json").exists()]
        if not runs:
            continue
        print()
        print("| step (%s) | %s |" % (variant.rstrip("-seed"), " | ".join(r.name[-5:] + " avg / p99 s, gain" for r in runs)))
        print("|---|" + "---|" * len(runs))
        tables = [load(r / "summary.json") for r in runs]
        for i, step in enumerate(tables[0]):
            cells = []
            for t in tables:
                s = t[i]
                cell = "%.2f / %.2f" % (s["latency_ms"]["mean"] / 1e3, s["latency_ms"]["p99"] / 1e3)
                if i > 0:
                    b = t[i - 1]
                    cell += " (%.2fx / %.2fx)" % (
                        b["latency_ms"]["mean"] / s["latency_ms"]["mean"],
                        b["latency_ms"]["p99"] / s["latency_ms"]["p99"],
                    )
                cells.append(cell)
            print("| %s | %s |" % (step["policy"], " | ".join(cells)))


def mixed(root):
    d = root / "fig4-mixed"
    if not (d / "summary.json").exists():
        return
    rows = load(d / "summary.json")
    print()
    print("| fig4-mixed | avg s | p99 s | TTFT avg s | TPOT avg ms | hit % | E2's gain avg / p99 / TTFT / TPOT |")
    print("|---|---|---|---|---|---|---|")
    e2 = next(s for s in rows if s["policy"] == "e2")
    for s in rows:
        gain = "-" if s is e2 else "%.2fx / %.2fx / %.2fx / %.2fx" % (
            s["latency_ms"]["mean"] / e2["latency_ms"]["mean"],
            s["latency_ms"]["p99"] / e2["latency_ms"]["p99"],
            s["ttft_ms"]["mean"] / e2["ttft_ms"]["mean"],
            s["tpot_ms"]["mean"] / e2["tpot_ms"]["mean"],
        )
        print(
            "| %s | %.1f | %.1f | %.1f | %.1f | %.0f | %s |"
            % (
                s["policy"],
                s["latency_ms"]["mean"] / 1e3,
                s["latency_ms"]["p99"] / 1e3,
                s["ttft_ms"]["mean"] / 1e3,
                s["tpot_ms"]["mean"],
                s["prefix_hit_ratio"] * 100,
                gain,
            )
        )


root = Path(sys.argv[1] if len(sys.argv) > 1 else "loadtest-report/paper")
sweeps(root)
mixed(root)
ablations(root)
