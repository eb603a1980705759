//! Summaries and raw records as JSON and CSV files.

use std::path::Path;

use super::{RunResult, Summary};

/// Why a report file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {message}")]
pub struct WriteError {
    /// The file.
    pub path: String,
    /// What failed.
    pub message: String,
}

fn error(path: &Path, e: impl std::fmt::Display) -> WriteError {
    WriteError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Writes `value` as pretty JSON.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), WriteError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| error(path, e))?;
    std::fs::write(path, text).map_err(|e| error(path, e))
}

/// Writes one CSV row per summary.
pub fn write_summaries_csv(path: &Path, summaries: &[Summary]) -> Result<(), WriteError> {
    let mut w = csv::Writer::from_path(path).map_err(|e| error(path, e))?;
    w.write_record([
        "mode",
        "workload",
        "policy",
        "rate",
        "requests",
        "completed",
        "errors",
        "refused",
        "timed_out",
        "latency_avg_ms",
        "latency_p50_ms",
        "latency_p99_ms",
        "ttft_avg_ms",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_avg_ms",
        "tpot_p99_ms",
        "throughput_rps",
        "output_tps",
        "goodput_rps",
        "slo_ms",
        "prefix_hit_ratio",
        "load_spread",
        "headroom_avg",
        "headroom_p99",
        "decisions",
    ])
    .map_err(|e| error(path, e))?;
    for s in summaries {
        let decisions = s
            .decisions
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        let numbers = [
            s.rate,
            s.requests as f64,
            s.completed as f64,
            s.errors as f64,
            s.refused as f64,
            s.timed_out as f64,
            s.latency_ms.mean,
            s.latency_ms.p50,
            s.latency_ms.p99,
            s.ttft_ms.mean,
            s.ttft_ms.p50,
            s.ttft_ms.p99,
            s.tpot_ms.mean,
            s.tpot_ms.p99,
            s.throughput_rps,
            s.output_tps,
            s.goodput_rps,
            s.slo_ms,
            s.prefix_hit_ratio,
            s.load_spread,
        ]
        .map(|v| format!("{v}"));
        let mut row = vec![s.mode.clone(), s.workload.clone(), s.policy.clone()];
        row.extend(numbers);
        // Empty where the run has no lower bound (live runs).
        row.push(
            s.headroom
                .map_or_else(String::new, |h| format!("{}", h.avg)),
        );
        row.push(
            s.headroom
                .map_or_else(String::new, |h| format!("{}", h.p99)),
        );
        row.push(decisions);
        w.write_record(&row).map_err(|e| error(path, e))?;
    }
    w.flush().map_err(|e| error(path, e))
}

/// Writes one CSV row per request of `run`.
pub fn write_records_csv(path: &Path, run: &RunResult) -> Result<(), WriteError> {
    let mut w = csv::Writer::from_path(path).map_err(|e| error(path, e))?;
    for r in &run.records {
        w.serialize(r).map_err(|e| error(path, e))?;
    }
    w.flush().map_err(|e| error(path, e))
}
