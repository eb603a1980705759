//! Each request's latency lower bound in a run: its prompt alone on an idle serving unit,
//! with as much of it cached as any request that arrived before it shares with it
//! ([`preble_costmodel::Profile::latency_lower_bound_ms`] gives the rest of the argument).
//!
//! Why only earlier arrivals: KV a request reuses was computed on its own unit for some other
//! request. If that request arrived later (or at the same time), the computation ran on that
//! unit after this request arrived and before this request used it, so those tokens' prefill
//! still lies between this request's arrival and its end, in iterations each at least as long
//! as computing the same tokens itself would take (the cost bounds are per token, per
//! iteration and per attention pair, and the attention pairs of a prefix computed first and
//! the rest after add up to those of the whole prompt). Reusing it cannot beat computing it.
//! Only KV computed for an earlier arrival can have been ready before this one came.

use std::collections::BTreeSet;

use preble_costmodel::Profile;
use preble_prefix::common_prefix_len;

use crate::workload::Request;

/// The lower bound of each request's latency, milliseconds, in `requests`' order, for units
/// of `profile` running prefill chunks of at most `chunk_tokens`.
pub fn lower_bounds(requests: &[Request], profile: &Profile, chunk_tokens: u32) -> Vec<f64> {
    let prompts: Vec<Vec<u32>> = requests.iter().map(Request::prompt).collect();
    let arrivals: Vec<f64> = requests.iter().map(|r| r.at_ms).collect();
    let reusable = shared_with_earlier(&prompts, &arrivals);
    requests
        .iter()
        .zip(&prompts)
        .zip(reusable)
        .map(|((r, p), cached)| {
            profile.latency_lower_bound_ms(p.len() as u32, cached, r.output_tokens, chunk_tokens)
        })
        .collect()
}

/// For each prompt, the longest prefix it shares with any prompt that arrived strictly
/// before it. In lexicographic order the shared prefix of two prompts is the least of the
/// neighbours' shared prefixes between them, so the best earlier prompt is the nearest
/// earlier arrival on either side.
fn shared_with_earlier(prompts: &[Vec<u32>], arrivals: &[f64]) -> Vec<u32> {
    let n = prompts.len();
    let mut sorted: Vec<usize> = (0..n).collect();
    sorted.sort_unstable_by(|&a, &b| prompts[a].cmp(&prompts[b]));
    let mut position = vec![0usize; n];
    for (p, &i) in sorted.iter().enumerate() {
        position[i] = p;
    }
    let neighbours: Vec<u32> = sorted
        .windows(2)
        .map(|w| common_prefix_len(&prompts[w[0]], &prompts[w[1]]) as u32)
        .collect();
    let range_min = RangeMin::new(neighbours);
    let mut by_arrival: Vec<usize> = (0..n).collect();
    by_arrival.sort_by(|&a, &b| arrivals[a].total_cmp(&arrivals[b]));
    let mut earlier: BTreeSet<usize> = BTreeSet::new();
    let mut out = vec![0u32; n];
    for group in by_arrival.chunk_by(|&a, &b| arrivals[a] == arrivals[b]) {
        for &i in group {
            let p = position[i];
            let left = earlier.range(..p).next_back().map(|&q| range_min.min(q, p));
            let right = earlier.range(p + 1..).next().map(|&q| range_min.min(p, q));
            out[i] = left.max(right).unwrap_or(0);
        }
        earlier.extend(group.iter().map(|&i| position[i]));
    }
    out
}

/// Minimum over index ranges of a fixed array (a sparse table).
struct RangeMin {
    levels: Vec<Vec<u32>>,
}

impl RangeMin {
    fn new(values: Vec<u32>) -> Self {
        let mut levels = vec![values];
        let mut width = 1;
        while let Some(last) = levels.last()
            && last.len() > width
        {
            let next: Vec<u32> = (0..last.len() - width)
                .map(|i| last[i].min(last[i + width]))
                .collect();
            levels.push(next);
            width *= 2;
        }
        Self { levels }
    }

    /// The minimum of the values at `from..to` (`from < to`).
    fn min(&self, from: usize, to: usize) -> u32 {
        let len = to - from;
        let level = (usize::BITS - 1 - len.leading_zeros()) as usize;
        let row = &self.levels[level];
        row[from].min(row[to - (1 << level)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_nearest_earlier_neighbours_give_the_longest_shared_prefix(
            requests in proptest::collection::vec(
                (proptest::collection::vec(0u32..3, 0..12), 0u8..6), 1..30)
        ) {
            let prompts: Vec<Vec<u32>> = requests.iter().map(|(p, _)| p.clone()).collect();
            let arrivals: Vec<f64> = requests.iter().map(|(_, t)| f64::from(*t)).collect();
            let fast = shared_with_earlier(&prompts, &arrivals);
            for (i, p) in prompts.iter().enumerate() {
                let naive = prompts
                    .iter()
                    .zip(&arrivals)
                    .filter(|(_, t)| **t < arrivals[i])
                    .map(|(q, _)| common_prefix_len(p, q) as u32)
                    .max()
                    .unwrap_or(0);
                prop_assert_eq!(fast[i], naive, "prompt {}", i);
            }
        }
    }
}
