//! What a workload looks like, in the paper's Table 1 terms.

use std::collections::HashMap;

use serde::Serialize;

use super::{Request, Segment};

/// Summary statistics of a list of requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Requests.
    pub requests: usize,
    /// Prompt tokens, mean.
    pub prompt_mean: f64,
    /// Prompt tokens, standard deviation.
    pub prompt_std: f64,
    /// Output tokens, mean.
    pub output_mean: f64,
    /// Output tokens, standard deviation.
    pub output_std: f64,
    /// Mean share of a prompt that some other request of the workload starts with too.
    pub shared_fraction: f64,
    /// Requests per distinct key.
    pub requests_per_key: f64,
    /// Arrivals per second over the span of arrivals (0 when all arrive at once).
    pub rate: f64,
}

fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count().max(1) as f64;
    let mean = values.clone().sum::<f64>() / n;
    let var = values.map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

impl Stats {
    /// Statistics of `requests` (sharing is measured at segment granularity).
    pub fn of(requests: &[Request]) -> Self {
        let (prompt_mean, prompt_std) =
            mean_std(requests.iter().map(|r| f64::from(r.prompt_len())));
        let (output_mean, output_std) =
            mean_std(requests.iter().map(|r| f64::from(r.output_tokens)));
        let mut prefixes: HashMap<&[Segment], u32> = HashMap::new();
        for r in requests {
            for j in 1..=r.segments.len() {
                *prefixes.entry(&r.segments[..j]).or_default() += 1;
            }
        }
        let shared: f64 = requests
            .iter()
            .map(|r| {
                let shared_segments = (1..=r.segments.len())
                    .take_while(|&j| prefixes[&r.segments[..j]] >= 2)
                    .last()
                    .unwrap_or(0);
                let tokens: u32 = r.segments[..shared_segments].iter().map(|s| s.len).sum();
                f64::from(tokens) / f64::from(r.prompt_len().max(1))
            })
            .sum();
        let keys = requests
            .iter()
            .map(|r| r.key)
            .collect::<std::collections::HashSet<_>>()
            .len()
            .max(1);
        let span_s = requests.iter().map(|r| r.at_ms).fold(0.0f64, f64::max) / 1e3;
        Self {
            requests: requests.len(),
            prompt_mean,
            prompt_std,
            output_mean,
            output_std,
            shared_fraction: shared / requests.len().max(1) as f64,
            requests_per_key: requests.len() as f64 / keys as f64,
            rate: if span_s > 0.0 {
                requests.len() as f64 / span_s
            } else {
                0.0
            },
        }
    }
}
