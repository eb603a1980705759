//! What a run measured and how it is reported.
//!
//! Layout:
//! - this module: the raw results of one run ([`RunResult`]: one record per request, load
//!   samples per worker) and their summary ([`Summary`]);
//! - [`table`]: terminal tables; [`files`]: JSON and CSV; [`plot`]: PNG and SVG charts.

pub mod files;
pub mod plot;
pub mod table;

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// What happened to one request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The workload request's id.
    pub id: u64,
    /// When it was sent, milliseconds from the start of the run.
    pub sent_ms: f64,
    /// When its first token arrived.
    pub first_token_ms: Option<f64>,
    /// When it ended (finished or failed).
    pub end_ms: Option<f64>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from a cache.
    pub cached_tokens: u32,
    /// Tokens generated.
    pub output_tokens: u32,
    /// Index of the worker that served it (simulator only).
    pub worker: Option<u32>,
    /// Why that worker (simulator only): exploit, explore, rebalance, replicate, load.
    pub decision: Option<String>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The least latency any policy could have given it, milliseconds (simulator only; see
    /// `sim::bound`).
    #[serde(default)]
    pub lower_bound_ms: Option<f64>,
}

impl RequestRecord {
    /// End-to-end latency, milliseconds, when it finished without error.
    pub fn latency_ms(&self) -> Option<f64> {
        match (&self.error, self.end_ms) {
            (None, Some(end)) => Some(end - self.sent_ms),
            _ => None,
        }
    }

    /// Time to first token, milliseconds.
    pub fn ttft_ms(&self) -> Option<f64> {
        self.first_token_ms.map(|t| t - self.sent_ms)
    }

    /// Mean time per output token after the first, milliseconds.
    pub fn tpot_ms(&self) -> Option<f64> {
        match (self.first_token_ms, self.end_ms) {
            (Some(first), Some(end)) if self.output_tokens > 1 && self.error.is_none() => {
                Some((end - first) / f64::from(self.output_tokens - 1))
            }
            _ => None,
        }
    }
}

/// One worker's load at one moment (simulator only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    /// When, milliseconds from the start.
    pub t_ms: f64,
    /// The worker's index.
    pub worker: u32,
    /// Requests in its running batch.
    pub running: u32,
    /// Requests waiting.
    pub waiting: u32,
    /// Prompt tokens still to compute.
    pub prefill_tokens: u64,
    /// Share of its KV slots in use by requests or the cache.
    pub kv_used: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// `sim`, `live-http` or `live-nats`.
    pub mode: String,
    /// The workload's name.
    pub workload: String,
    /// The policy.
    pub policy: String,
    /// The offered request rate (requests per second; 0 for a trace's own timing).
    pub rate: f64,
    /// Worker ids, by index.
    pub workers: Vec<String>,
    /// One record per request, by workload order.
    pub records: Vec<RequestRecord>,
    /// Load over time per worker.
    pub load: Vec<LoadSample>,
    /// Seconds the run took on the wall clock.
    pub wall_s: f64,
}

/// Percentiles of one metric, milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Percentiles {
    /// Of `values` (milliseconds); zeros when empty.
    pub fn of(values: impl Iterator<Item = f64>) -> Self {
        // 1 us to 1,000 hours, three significant digits.
        let mut h = match Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3) {
            Ok(h) => h,
            Err(_) => return Self::default(),
        };
        let (mut sum, mut n) = (0.0, 0u64);
        for v in values {
            // Microseconds, so sub-millisecond values keep three digits.
            h.saturating_record((v.max(0.0) * 1e3) as u64);
            sum += v;
            n += 1;
        }
        if n == 0 {
            return Self::default();
        }
        Self {
            mean: sum / n as f64,
            p50: h.value_at_quantile(0.5) as f64 / 1e3,
            p99: h.value_at_quantile(0.99) as f64 / 1e3,
        }
    }
}

/// Whether a request's error is a refusal the server answered at once: HTTP 429 or 503, or
/// the NATS API's `overloaded` and `rate_limit_exceeded`.
pub fn is_refusal(error: &str) -> bool {
    [
        "HTTP 429",
        "HTTP 503",
        "overloaded:",
        "rate_limit_exceeded:",
    ]
    .iter()
    .any(|p| error.starts_with(p))
}

/// What a report shows of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The mode.
    pub mode: String,
    /// The workload.
    pub workload: String,
    /// The policy.
    pub policy: String,
    /// Offered rate, requests per second.
    pub rate: f64,
    /// Requests sent.
    pub requests: usize,
    /// Requests that finished.
    pub completed: usize,
    /// Requests that failed (neither refused nor timed out).
    pub errors: usize,
    /// Requests the server refused at once (overloaded, rate limited): a server near
    /// saturation that refuses keeps its latency down, so this is reported beside latency.
    #[serde(default)]
    pub refused: usize,
    /// Requests that finished after the timeout, were abandoned at it (an error starting with
    /// `timeout`), or never finished.
    pub timed_out: usize,
    /// End-to-end latency of completed requests.
    pub latency_ms: Percentiles,
    /// Time to first token.
    pub ttft_ms: Percentiles,
    /// Time per output token after the first.
    pub tpot_ms: Percentiles,
    /// Completed requests per second over the run.
    pub throughput_rps: f64,
    /// Output tokens per second over the run.
    pub output_tps: f64,
    /// Completed requests per second that met the latency SLO.
    pub goodput_rps: f64,
    /// The SLO used for goodput: end-to-end latency at most this, milliseconds.
    pub slo_ms: f64,
    /// Share of prompt tokens served from a cache.
    pub prefix_hit_ratio: f64,
    /// Requests per worker: (max - min) / mean (0 is perfectly even).
    pub load_spread: f64,
    /// Decisions by kind.
    pub decisions: BTreeMap<String, usize>,
    /// Headroom: average latency over the average of the completed requests' lower bounds,
    /// and p99 over their p99 (1 would be the best any policy could do; simulator only).
    #[serde(default)]
    pub headroom: Option<Headroom>,
}

/// How far a run is from the best any policy could do on the same requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Headroom {
    /// Average latency over the average lower bound.
    pub avg: f64,
    /// p99 latency over the p99 lower bound.
    pub p99: f64,
}

impl Headroom {
    /// Of the completed records `done` that carry a lower bound (`None` when none does).
    fn of(done: &[&RequestRecord], latency: &Percentiles) -> Option<Self> {
        let bounds: Vec<f64> = done.iter().filter_map(|r| r.lower_bound_ms).collect();
        if bounds.is_empty() || bounds.len() < done.len() {
            return None;
        }
        let bound = Percentiles::of(bounds.into_iter());
        (bound.mean > 0.0 && bound.p99 > 0.0).then(|| Self {
            avg: latency.mean / bound.mean,
            p99: latency.p99 / bound.p99,
        })
    }
}

/// How a run is judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Judging {
    /// Latency SLO for goodput, milliseconds.
    pub slo_ms: f64,
    /// Requests slower than this count as timed out, milliseconds.
    pub timeout_ms: f64,
}

impl Default for Judging {
    fn default() -> Self {
        Self {
            slo_ms: 10_000.0,
            timeout_ms: 600_000.0,
        }
    }
}

impl Summary {
    /// Summarises `run`.
    pub fn of(run: &RunResult, judging: Judging) -> Self {
        let done: Vec<&RequestRecord> = run
            .records
            .iter()
            .filter(|r| r.latency_ms().is_some())
            .collect();
        let abandoned =
            |r: &RequestRecord| r.error.as_deref().is_some_and(|e| e.starts_with("timeout"));
        let refused = |r: &RequestRecord| r.error.as_deref().is_some_and(is_refusal);
        let errors = run
            .records
            .iter()
            .filter(|r| r.error.is_some() && !abandoned(r) && !refused(r))
            .count();
        let refused = run.records.iter().filter(|r| refused(r)).count();
        let timed_out = run
            .records
            .iter()
            .filter(|r| {
                abandoned(r)
                    || (r.error.is_none() && r.latency_ms().is_none_or(|l| l > judging.timeout_ms))
            })
            .count();
        let start = run
            .records
            .iter()
            .map(|r| r.sent_ms)
            .fold(f64::INFINITY, f64::min);
        let end = done
            .iter()
            .filter_map(|r| r.end_ms)
            .fold(f64::NEG_INFINITY, f64::max);
        let span_s = if end > start {
            (end - start) / 1e3
        } else {
            f64::INFINITY
        };
        let prompt: u64 = done.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let cached: u64 = done.iter().map(|r| u64::from(r.cached_tokens)).sum();
        let mut per_worker = vec![0usize; run.workers.len()];
        let mut decisions = BTreeMap::new();
        for r in &run.records {
            if let Some(w) = r.worker.and_then(|w| per_worker.get_mut(w as usize)) {
                *w += 1;
            }
            if let Some(d) = &r.decision {
                *decisions.entry(d.clone()).or_insert(0) += 1;
            }
        }
        let load_spread = if per_worker.is_empty() || run.records.is_empty() {
            0.0
        } else {
            let mean = per_worker.iter().sum::<usize>() as f64 / per_worker.len() as f64;
            let max = per_worker.iter().copied().max().unwrap_or(0) as f64;
            let min = per_worker.iter().copied().min().unwrap_or(0) as f64;
            if mean > 0.0 { (max - min) / mean } else { 0.0 }
        };
        let latency_ms = Percentiles::of(done.iter().filter_map(|r| r.latency_ms()));
        Self {
            headroom: Headroom::of(&done, &latency_ms),
            mode: run.mode.clone(),
            workload: run.workload.clone(),
            policy: run.policy.clone(),
            rate: run.rate,
            requests: run.records.len(),
            completed: done.len(),
            errors,
            refused,
            timed_out,
            latency_ms,
            ttft_ms: Percentiles::of(done.iter().filter_map(|r| r.ttft_ms())),
            tpot_ms: Percentiles::of(done.iter().filter_map(|r| r.tpot_ms())),
            throughput_rps: done.len() as f64 / span_s,
            output_tps: done.iter().map(|r| f64::from(r.output_tokens)).sum::<f64>() / span_s,
            goodput_rps: done
                .iter()
                .filter(|r| r.latency_ms().is_some_and(|l| l <= judging.slo_ms))
                .count() as f64
                / span_s,
            slo_ms: judging.slo_ms,
            prefix_hit_ratio: if prompt > 0 {
                cached as f64 / prompt as f64
            } else {
                0.0
            },
            load_spread,
            decisions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, sent: f64, first: f64, end: f64, out: u32) -> RequestRecord {
        RequestRecord {
            id,
            sent_ms: sent,
            first_token_ms: Some(first),
            end_ms: Some(end),
            prompt_tokens: 100,
            cached_tokens: 50,
            output_tokens: out,
            worker: Some((id % 2) as u32),
            decision: Some("explore".into()),
            error: None,
            lower_bound_ms: Some((end - sent) / 2.0),
        }
    }

    #[test]
    fn summary_counts_latencies_errors_and_goodput() {
        let mut run = RunResult {
            workers: vec!["a".into(), "b".into()],
            records: vec![
                record(0, 0.0, 10.0, 100.0, 10),
                record(1, 0.0, 20.0, 2000.0, 3),
                record(2, 100.0, 110.0, 300.0, 1),
            ],
            ..RunResult::default()
        };
        run.records.push(RequestRecord {
            id: 3,
            error: Some("boom".into()),
            ..RequestRecord::default()
        });
        run.records.push(RequestRecord {
            id: 4,
            error: Some("HTTP 503 Service Unavailable: overloaded".into()),
            ..RequestRecord::default()
        });
        let s = Summary::of(
            &run,
            Judging {
                slo_ms: 500.0,
                timeout_ms: 1000.0,
            },
        );
        assert_eq!(
            (s.requests, s.completed, s.errors, s.refused, s.timed_out),
            (5, 3, 1, 1, 1)
        );
        assert!((s.latency_ms.mean - (100.0 + 2000.0 + 200.0) / 3.0).abs() < 1e-9);
        assert!((s.tpot_ms.p50 - 10.0).abs() < 0.1, "{:?}", s.tpot_ms);
        assert!(
            (s.goodput_rps - 2.0 / 2.0).abs() < 1e-9,
            "{}",
            s.goodput_rps
        );
        assert!((s.prefix_hit_ratio - 0.5).abs() < 1e-9);
        assert_eq!(s.decisions["explore"], 3);
        // Every bound is half its request's latency: twice the best possible.
        let headroom = s.headroom.expect("every completed record has a bound");
        assert!((headroom.avg - 2.0).abs() < 1e-9, "{headroom:?}");
        assert!((headroom.p99 - 2.0).abs() < 0.01, "{headroom:?}");
        // A run without bounds (live) has no headroom.
        for r in &mut run.records {
            r.lower_bound_ms = None;
        }
        assert_eq!(Summary::of(&run, Judging::default()).headroom, None);
    }
}
