//! When requests arrive: a Poisson process at a rate, or a trace's timestamps.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp};

use super::Request;

/// How arrival times are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Arrivals {
    /// Exponential gaps at `rate` requests per second.
    Poisson {
        /// Requests per second.
        rate: f64,
        /// Seed of the gaps.
        seed: u64,
    },
    /// These times (milliseconds from the start), multiplied by `scale`, reused in order
    /// (cycled when there are fewer times than requests, each cycle after the last).
    Timestamps {
        /// Times, ascending.
        times_ms: Vec<f64>,
        /// Multiplier (0.5 replays twice as fast).
        scale: f64,
    },
}

impl Arrivals {
    /// Sets the arrival time of each request, in their current order.
    pub fn apply(&self, requests: &mut [Request]) {
        match self {
            Arrivals::Poisson { rate, seed } => {
                let mut rng = StdRng::seed_from_u64(*seed);
                let gap = Exp::new(rate.max(1e-9)).ok();
                let mut t = 0.0;
                for r in requests.iter_mut() {
                    r.at_ms = t;
                    t += gap.as_ref().map_or(0.0, |g| g.sample(&mut rng) * 1e3);
                }
            }
            Arrivals::Timestamps { times_ms, scale } => {
                let Some(&last) = times_ms.last() else {
                    requests.iter_mut().for_each(|r| r.at_ms = 0.0);
                    return;
                };
                let first = times_ms[0];
                // A cycle lasts the trace's span plus one mean gap.
                let period = (last - first) * (1.0 + 1.0 / times_ms.len() as f64);
                for (i, r) in requests.iter_mut().enumerate() {
                    let cycle = (i / times_ms.len()) as f64;
                    let t = times_ms[i % times_ms.len()] - first + cycle * period;
                    r.at_ms = t * scale;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Segment;

    fn requests(n: usize) -> Vec<Request> {
        (0..n)
            .map(|i| Request {
                id: i as u64,
                at_ms: 0.0,
                segments: vec![Segment { seed: 1, len: 1 }],
                output_tokens: 1,
                kind: "t".into(),
                key: 0,
            })
            .collect()
    }

    #[test]
    fn poisson_has_the_asked_rate() {
        let mut rs = requests(20_000);
        Arrivals::Poisson {
            rate: 50.0,
            seed: 1,
        }
        .apply(&mut rs);
        let rate = rs.len() as f64 / (rs.last().unwrap().at_ms / 1e3);
        assert!((rate - 50.0).abs() < 2.0, "{rate}");
        assert!(rs.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn timestamps_are_scaled_and_cycled() {
        let mut rs = requests(5);
        Arrivals::Timestamps {
            times_ms: vec![1000.0, 1100.0, 1300.0],
            scale: 2.0,
        }
        .apply(&mut rs);
        let t: Vec<f64> = rs.iter().map(|r| r.at_ms).collect();
        assert_eq!(&t[..3], &[0.0, 200.0, 600.0]);
        assert!(t[3] > t[2] && t[4] > t[3], "{t:?}");
    }
}
