#!/usr/bin/env python3
"""Headline tables of scripts/bench-peers.sh: for each sweep, the highest rate where
round-robin still keeps up (throughput >= 0.9x offered), E2's average / p99 latency and TTFT,
every other policy's over E2's (above 1: E2 is faster), and E2's latency over the lower bound
(its headroom; runs made before the bound existed show -). `--all` prints every rate, E2
against dynamo and sglang, flagging the rows where E2 is not ahead.

Usage: scripts/peers_table.py [--all] REPORT_DIR (default loadtest-report/peers)"""
import json
import sys
from pathlib import Path

OTHERS = ["dynamo", "sglang", "round-robin", "cache-aware", "kv-cost", "e2-paper"]


def load(report: Path):
    for sweep in sorted(p for p in report.iterdir() if (p / "summary.json").exists()):
        summaries = json.loads((sweep / "summary.json").read_text())["summaries"]
        by_rate = {}
        for s in summaries:
            by_rate.setdefault(s["rate"], {})[s["policy"]] = s
        yield sweep.name, by_rate


def keeps_up(s):
    return s["throughput_rps"] >= 0.9 * s["rate"]


def ratio(other, e2, field):
    a, b = other[field]["mean"], e2[field]["mean"]
    pa, pb = other[field].get("p99"), e2[field].get("p99")
    return a / b if b else float("nan"), (pa / pb if pb else float("nan"))


def headline(report: Path):
    cols = " | ".join(f"vs {o}" for o in OTHERS)
    print(f"| sweep | rate | E2 avg / p99 (s) | E2 TTFT avg (s) | {cols} | TTFT vs dynamo / sglang | E2 headroom |")
    print("|" + "---|" * (6 + len(OTHERS)))
    for name, by_rate in load(report):
        rates = [r for r, p in sorted(by_rate.items()) if "round-robin" in p and keeps_up(p["round-robin"])]
        if not rates:
            rates = [min(by_rate)]
        rate = rates[-1]
        pols = by_rate[rate]
        e2 = pols["e2"]
        cells = []
        for o in OTHERS:
            if o not in pols:
                cells.append("-")
                continue
            avg, p99 = ratio(pols[o], e2, "latency_ms")
            sat = "" if keeps_up(pols[o]) else " (sat.)"
            cells.append(f"{avg:.2f}x / {p99:.2f}x{sat}")
        ttft = " / ".join(
            f"{ratio(pols[o], e2, 'ttft_ms')[0]:.2f}x" if o in pols else "-" for o in ("dynamo", "sglang")
        )
        room = e2.get("headroom")
        room = f"{room['avg']:.2f}x / {room['p99']:.2f}x" if room else "-"
        print(
            f"| {name} | {rate:g} | {e2['latency_ms']['mean']/1e3:.2f} / {e2['latency_ms']['p99']/1e3:.2f} "
            f"| {e2['ttft_ms']['mean']/1e3:.2f} | " + " | ".join(cells) + f" | {ttft} | {room} |"
        )


def every_rate(report: Path):
    print("| sweep | rate | E2 avg / p99 (s) | dynamo avg / p99 | sglang avg / p99 | E2 behind |")
    print("|---|---|---|---|---|---|")
    for name, by_rate in load(report):
        for rate, pols in sorted(by_rate.items()):
            e2 = pols["e2"]
            behind = []
            cells = []
            for o in ("dynamo", "sglang"):
                avg, p99 = ratio(pols[o], e2, "latency_ms")
                cells.append(f"{avg:.2f}x / {p99:.2f}x")
                if avg < 1.0:
                    behind.append(f"{o} avg")
                if p99 < 1.0:
                    behind.append(f"{o} p99")
            print(
                f"| {name} | {rate:g} | {e2['latency_ms']['mean']/1e3:.2f} / {e2['latency_ms']['p99']/1e3:.2f} | "
                + " | ".join(cells) + f" | {', '.join(behind) or '-'} |"
            )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--all"]
    report = Path(args[0] if args else "loadtest-report/peers")
    (every_rate if "--all" in sys.argv else headline)(report)
