//! Summaries as a terminal table.

use std::fmt::Write;

use super::Summary;

/// One row per summary: latency, TTFT, TPOT, throughput, goodput, hit ratio, spread, errors,
/// refusals, timeouts, headroom over the lower bound (average / p99, simulator only).
pub fn render(summaries: &[Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<12} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>6} {:>5} {:>5} {:>5} {:>11}  decisions",
        "workload",
        "policy",
        "rate",
        "avg s",
        "p50 s",
        "p99 s",
        "ttft avg",
        "ttft p99",
        "tpot ms",
        "req/s",
        "good/s",
        "hit %",
        "spread",
        "err",
        "refus",
        "t/o",
        "headroom",
    );
    for s in summaries {
        let decisions = s
            .decisions
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            out,
            "{:<10} {:<12} {:>7.2} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8.1} {:>8.2} {:>8.2} {:>6.1} {:>6.2} {:>5} {:>5} {:>5} {:>11}  {}",
            s.workload,
            s.policy,
            s.rate,
            s.latency_ms.mean / 1e3,
            s.latency_ms.p50 / 1e3,
            s.latency_ms.p99 / 1e3,
            s.ttft_ms.mean / 1e3,
            s.ttft_ms.p99 / 1e3,
            s.tpot_ms.mean,
            s.throughput_rps,
            s.goodput_rps,
            s.prefix_hit_ratio * 100.0,
            s.load_spread,
            s.errors,
            s.refused,
            s.timed_out,
            s.headroom
                .map_or_else(|| "-".to_string(), |h| format!("{:.2}/{:.2}", h.avg, h.p99)),
            decisions,
        );
    }
    out
}
