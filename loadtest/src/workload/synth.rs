//! Generators of Preble's five workloads, shaped after the paper's Table 1 (prompt and output
//! length, shared-prefix share, requests per key prefix; `../shared/PAPER.md`).
//!
//! Every prompt is `[global prefix][key portion][request's own tokens]`:
//! - the global prefix is shared by every request of the workload (the system prompt: the
//!   shared share minus the key share of the prompt, absent when that is negative);
//! - the key portion is what groups of requests share (a tool's spec, an environment's
//!   few-shot examples, a problem, a video, a document); each key serves `per_key` requests
//!   on average, picked uniformly or by a Zipf popularity;
//! - the rest is the request's own (a query, a question).
//!
//! The embodied-agent workload differs: each key holds episodes, chains of turns where every
//! turn's prompt extends the previous turn's prompt, and turns of one episode arrive in order.
//!
//! Generators fix content and order only; [`crate::workload::arrivals`] sets the times.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal, Zipf};

use super::{Request, Segment, json_safe_seed};

/// A workload shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Tool use (ToolBench-like).
    ToolBench,
    /// Embodied agent (ALFWorld-like): multi-turn chains.
    Alfworld,
    /// Programming (APPS-like): long shared prompt, many samples per problem.
    Apps,
    /// Video question answering (NExT-QA-like): long per-video prefix, short answers.
    VideoQa,
    /// Long-document question answering (LooGLE-like).
    Loogle,
    /// Equal shares of the five, interleaved at random.
    Mixed,
}

impl Kind {
    /// Command-line names.
    pub const NAMES: [&'static str; 6] = [
        "toolbench",
        "alfworld",
        "apps",
        "videoqa",
        "loogle",
        "mixed",
    ];
    /// The five single workloads.
    pub const SINGLE: [Kind; 5] = [
        Kind::ToolBench,
        Kind::Alfworld,
        Kind::Apps,
        Kind::VideoQa,
        Kind::Loogle,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ToolBench => "toolbench",
            Kind::Alfworld => "alfworld",
            Kind::Apps => "apps",
            Kind::VideoQa => "videoqa",
            Kind::Loogle => "loogle",
            Kind::Mixed => "mixed",
        }
    }

    /// The paper's statistics of this workload (`None` for the mix).
    pub fn shape(self) -> Option<Shape> {
        let s = |prompt: (f64, f64), output: (f64, f64), shared, key, per_key, cap| Shape {
            prompt_mean: prompt.0,
            prompt_std: prompt.1,
            output_mean: output.0,
            output_std: output.1,
            shared,
            key,
            per_key,
            output_cap: cap,
        };
        Some(match self {
            Kind::ToolBench => s((1835.0, 742.0), (43.0, 16.0), 0.85, 0.76, 39.0, 256),
            Kind::Alfworld => s((2285.0, 471.0), (16.0, 13.0), 0.97, 0.76, 48.0, 128),
            Kind::Apps => s((3871.0, 1656.0), (190.0, 343.0), 0.97, 0.78, 126.0, 2048),
            Kind::VideoQa => s((9865.0, 5976.0), (4.0, 1.5), 0.88, 0.99, 8.6, 16),
            Kind::Loogle => s((23474.0, 6105.0), (16.0, 9.9), 0.91, 0.94, 18.0, 45),
            Kind::Mixed => return None,
        })
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| [Kind::SINGLE.as_slice(), &[Kind::Mixed]].concat()[i])
            .ok_or_else(|| format!("unknown workload {s:?}; known: {}", Kind::NAMES.join(", ")))
    }
}

/// One workload's statistics (paper Table 1; means and standard deviations).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    /// Prompt tokens, mean.
    pub prompt_mean: f64,
    /// Prompt tokens, standard deviation.
    pub prompt_std: f64,
    /// Output tokens, mean.
    pub output_mean: f64,
    /// Output tokens, standard deviation.
    pub output_std: f64,
    /// Share of the prompt shared with other requests.
    pub shared: f64,
    /// Share of the prompt that is the key portion.
    pub key: f64,
    /// Requests per key portion, mean.
    pub per_key: f64,
    /// Longest output.
    pub output_cap: u32,
}

/// How popular key prefixes are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Popularity {
    /// Every key equally often.
    Uniform,
    /// Key `k` (1-based) with weight `k^-s`.
    Zipf(f64),
}

impl std::str::FromStr for Popularity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "uniform" {
            return Ok(Popularity::Uniform);
        }
        let exponent = s
            .strip_prefix("zipf:")
            .or_else(|| (s == "zipf").then_some("1.1"))
            .ok_or_else(|| format!("unknown popularity {s:?}; use uniform, zipf or zipf:S"))?;
        match exponent.parse::<f64>() {
            Ok(v) if v > 0.0 && v.is_finite() => Ok(Popularity::Zipf(v)),
            _ => Err(format!("zipf exponent must be positive, not {exponent:?}")),
        }
    }
}

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SynthConfig {
    /// The shape.
    pub kind: Kind,
    /// Number of requests.
    pub requests: usize,
    /// Seed of every random draw (same seed, same workload).
    pub seed: u64,
    /// Popularity of key prefixes.
    pub popularity: Popularity,
    /// Number of distinct key prefixes (the paper's prefix patterns); `None`: as many as the
    /// workload's requests per key portion (Table 1) give for `requests`. For `mixed`, per
    /// workload.
    pub patterns: Option<usize>,
    /// Longest prompt plus output (the model's context); longer prompts are cut in their key
    /// portion.
    pub max_context: u32,
}

impl SynthConfig {
    /// `requests` of `kind` with uniform popularity and a 32k context.
    pub fn new(kind: Kind, requests: usize, seed: u64) -> Self {
        Self {
            kind,
            requests,
            seed,
            popularity: Popularity::Uniform,
            patterns: None,
            max_context: 32_768,
        }
    }
}

/// Generates the requests in arrival order (times all zero).
pub fn generate(config: &SynthConfig) -> Vec<Request> {
    let mut requests = match config.kind {
        Kind::Mixed => mixed(config),
        Kind::Alfworld => chains(config),
        _ => keyed(config),
    };
    for (i, r) in requests.iter_mut().enumerate() {
        r.id = i as u64;
    }
    requests
}

/// Names segments: distinct per workload kind, seed, role and index.
struct Namer {
    base: u64,
}

impl Namer {
    fn new(config: &SynthConfig) -> Self {
        let kind = config.kind as u64 + 1;
        Self {
            base: preble_prefix::mix64(config.seed ^ preble_prefix::mix64(kind << 56)),
        }
    }

    fn seed(&self, role: u64, index: u64) -> u64 {
        json_safe_seed(preble_prefix::mix64(
            self.base ^ preble_prefix::mix64((role << 48) ^ index),
        ))
    }
}

const ROLE_GLOBAL: u64 = 1;
const ROLE_KEY: u64 = 2;
const ROLE_OWN: u64 = 3;
const ROLE_TURN: u64 = 4;

/// Draws from a normal distribution, clamped.
fn normal(rng: &mut StdRng, mean: f64, std: f64, lo: f64, hi: f64) -> f64 {
    let v = Normal::new(mean, std.max(1e-9))
        .map(|d| d.sample(rng))
        .unwrap_or(mean);
    v.clamp(lo, hi.max(lo))
}

/// Output length: normal, or log-normal when the spread exceeds the mean (long tails).
fn output_len(rng: &mut StdRng, shape: &Shape) -> u32 {
    let (m, s) = (shape.output_mean, shape.output_std);
    let v = if s > m {
        let sigma2 = (1.0 + (s / m).powi(2)).ln();
        LogNormal::new(m.ln() - sigma2 / 2.0, sigma2.sqrt())
            .map(|d| d.sample(rng))
            .unwrap_or(m)
    } else {
        normal(rng, m, s, 1.0, f64::from(shape.output_cap))
    };
    (v.round() as u32).clamp(1, shape.output_cap)
}

/// Which key each of `n` requests uses, in arrival order.
fn key_sequence(rng: &mut StdRng, n: usize, keys: usize, popularity: Popularity) -> Vec<usize> {
    match popularity {
        Popularity::Uniform => {
            let mut seq: Vec<usize> = (0..n).map(|i| i % keys).collect();
            seq.shuffle(rng);
            seq
        }
        Popularity::Zipf(s) => {
            let zipf = Zipf::new(keys as f64, s).ok();
            (0..n)
                .map(|_| {
                    zipf.as_ref()
                        .map_or(0, |z| (z.sample(rng) as usize).clamp(1, keys) - 1)
                })
                .collect()
        }
    }
}

/// Lengths of the three parts of a prompt of `shape`.
struct Parts {
    global: u32,
}

impl Parts {
    fn of(shape: &Shape) -> Self {
        Self {
            global: ((shape.shared - shape.key).max(0.0) * shape.prompt_mean).round() as u32,
        }
    }
}

/// How many key prefixes the workload has: `config.patterns`, or Table 1's requests per key
/// portion over `config.requests`.
fn key_count(config: &SynthConfig, shape: &Shape) -> usize {
    config
        .patterns
        .unwrap_or_else(|| (config.requests as f64 / shape.per_key).ceil() as usize)
        .max(1)
}

/// Workloads of independent requests grouped by key.
fn keyed(config: &SynthConfig) -> Vec<Request> {
    let Some(shape) = config.kind.shape() else {
        return Vec::new();
    };
    let mut rng = StdRng::seed_from_u64(config.seed ^ (config.kind as u64) << 32);
    let names = Namer::new(config);
    let parts = Parts::of(&shape);
    let keys = key_count(config, &shape);
    let max_prompt = f64::from(config.max_context.saturating_sub(shape.output_cap)).max(64.0);
    // Each key sets the scale of its prompts: total length ~ N(mean, std), of which the
    // request's own part is the unshared share.
    let key_lens: Vec<(u32, f64)> = (0..keys)
        .map(|_| {
            let total = normal(
                &mut rng,
                shape.prompt_mean,
                shape.prompt_std,
                f64::from(parts.global) + 32.0,
                max_prompt,
            );
            let own = ((1.0 - shape.shared) * total).max(4.0);
            let key = (total - f64::from(parts.global) - own).max(16.0) as u32;
            (key, own)
        })
        .collect();
    let sequence = key_sequence(&mut rng, config.requests, keys, config.popularity);
    sequence
        .into_iter()
        .enumerate()
        .map(|(i, key)| {
            let (key_len, own_mean) = key_lens[key];
            let own = normal(&mut rng, own_mean, own_mean / 4.0, 1.0, own_mean * 3.0) as u32;
            let room = (max_prompt as u32)
                .saturating_sub(parts.global + own)
                .max(1);
            let mut segments = Vec::with_capacity(3);
            if parts.global > 0 {
                segments.push(Segment {
                    seed: names.seed(ROLE_GLOBAL, 0),
                    len: parts.global,
                });
            }
            segments.push(Segment {
                seed: names.seed(ROLE_KEY, key as u64),
                len: key_len.min(room),
            });
            segments.push(Segment {
                seed: names.seed(ROLE_OWN, i as u64),
                len: own,
            });
            Request {
                id: 0,
                at_ms: 0.0,
                segments,
                output_tokens: output_len(&mut rng, &shape),
                kind: config.kind.name().to_string(),
                key: names.seed(ROLE_KEY, key as u64),
            }
        })
        .collect()
}

/// The embodied-agent workload: episodes of turns, each turn extending the previous prompt.
fn chains(config: &SynthConfig) -> Vec<Request> {
    let Some(shape) = config.kind.shape() else {
        return Vec::new();
    };
    let mut rng = StdRng::seed_from_u64(config.seed ^ (config.kind as u64) << 32);
    let names = Namer::new(config);
    let parts = Parts::of(&shape);
    const TURN_MEAN: f64 = 70.0;
    const TURNS: std::ops::RangeInclusive<u32> = 4..=12;
    // Turn t of an episode of T turns carries t turn segments: (T + 1) / 2 on average.
    let mean_turns = f64::from(TURNS.start() + TURNS.end()) / 2.0;
    let key_mean =
        shape.prompt_mean - f64::from(parts.global) - TURN_MEAN * (mean_turns + 1.0) / 2.0;
    let keys = key_count(config, &shape);
    let key_lens: Vec<u32> = (0..keys)
        .map(|_| normal(&mut rng, key_mean, shape.prompt_std, 64.0, 3.0 * key_mean) as u32)
        .collect();
    // Episodes until there are enough turns; each picks its key by popularity.
    let mut episodes: Vec<(usize, u32)> = Vec::new();
    let mut total = 0usize;
    while total < config.requests {
        let turns = rng
            .random_range(TURNS)
            .min((config.requests - total) as u32);
        episodes.push((0, turns));
        total += turns as usize;
    }
    let episode_keys = key_sequence(&mut rng, episodes.len(), keys, config.popularity);
    for (e, key) in episodes.iter_mut().zip(episode_keys) {
        e.0 = key;
    }
    // Interleave: an episode starts at a random point and its turns follow in order.
    let mut timed: Vec<(f64, Request)> = Vec::with_capacity(config.requests);
    for (episode, &(key, turns)) in episodes.iter().enumerate() {
        let start: f64 = rng.random();
        let length: f64 = rng.random_range(0.02..0.2);
        let mut segments = Vec::new();
        if parts.global > 0 {
            segments.push(Segment {
                seed: names.seed(ROLE_GLOBAL, 0),
                len: parts.global,
            });
        }
        segments.push(Segment {
            seed: names.seed(ROLE_KEY, key as u64),
            len: key_lens[key],
        });
        for turn in 0..turns {
            let len = normal(&mut rng, TURN_MEAN, TURN_MEAN / 3.0, 8.0, 4.0 * TURN_MEAN) as u32;
            segments.push(Segment {
                seed: names.seed(ROLE_TURN, ((episode as u64) << 8) | u64::from(turn)),
                len,
            });
            let request = Request {
                id: 0,
                at_ms: 0.0,
                segments: segments.clone(),
                output_tokens: output_len(&mut rng, &shape),
                kind: config.kind.name().to_string(),
                key: names.seed(ROLE_KEY, key as u64),
            };
            timed.push((start + length * f64::from(turn) / f64::from(turns), request));
        }
    }
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    timed.into_iter().map(|(_, r)| r).collect()
}

/// Equal shares of the five workloads, interleaved at random.
fn mixed(config: &SynthConfig) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x006d_6978_6564);
    let parts: Vec<Vec<Request>> = Kind::SINGLE
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let share = config.requests / 5 + usize::from(i < config.requests % 5);
            generate(&SynthConfig {
                kind,
                requests: share,
                ..*config
            })
        })
        .collect();
    // Pick the source of each slot at random, keeping each source's own order.
    let mut sources: Vec<usize> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| std::iter::repeat_n(i, p.len()))
        .collect();
    sources.shuffle(&mut rng);
    let mut iters: Vec<_> = parts.into_iter().map(|p| p.into_iter()).collect();
    sources
        .into_iter()
        .filter_map(|s| iters[s].next())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::stats::Stats;

    #[test]
    fn generators_are_deterministic_and_sized() {
        for kind in Kind::NAMES.iter().map(|n| n.parse::<Kind>().unwrap()) {
            let c = SynthConfig::new(kind, 500, 3);
            let a = generate(&c);
            assert_eq!(a.len(), 500, "{kind:?}");
            assert_eq!(a, generate(&c), "{kind:?}");
            assert_ne!(a, generate(&SynthConfig { seed: 4, ..c }), "{kind:?}");
            assert!(
                a.iter()
                    .all(|r| r.prompt_len() + r.output_tokens <= c.max_context)
            );
        }
    }

    #[test]
    fn shapes_follow_the_papers_table() {
        for kind in Kind::SINGLE {
            let shape = kind.shape().unwrap();
            let requests = generate(&SynthConfig::new(kind, 4000, 1));
            let s = Stats::of(&requests);
            let near = |got: f64, want: f64, tol: f64| (got - want).abs() <= tol * want;
            assert!(
                near(s.prompt_mean, shape.prompt_mean, 0.15),
                "{kind:?} prompt {}",
                s.prompt_mean
            );
            assert!(
                near(s.output_mean, shape.output_mean, 0.25),
                "{kind:?} output {}",
                s.output_mean
            );
            assert!(
                near(s.shared_fraction, shape.shared, 0.1),
                "{kind:?} shared {}",
                s.shared_fraction
            );
            assert!(
                near(s.requests_per_key, shape.per_key, 0.25),
                "{kind:?} per key {}",
                s.requests_per_key
            );
        }
    }

    #[test]
    fn chains_extend_the_previous_turn() {
        let requests = generate(&SynthConfig::new(Kind::Alfworld, 300, 9));
        let extends = requests.iter().enumerate().any(|(i, r)| {
            requests[..i].iter().any(|p| {
                p.segments.len() + 1 == r.segments.len() && r.segments.starts_with(&p.segments)
            })
        });
        assert!(extends);
    }

    #[test]
    fn zipf_concentrates_on_few_keys() {
        let count_top = |p| {
            let rs = generate(&SynthConfig {
                popularity: p,
                ..SynthConfig::new(Kind::ToolBench, 2000, 5)
            });
            let mut counts = std::collections::HashMap::new();
            for r in &rs {
                *counts.entry(r.key).or_insert(0usize) += 1;
            }
            counts.values().copied().max().unwrap_or(0)
        };
        assert!(count_top(Popularity::Zipf(1.1)) > 4 * count_top(Popularity::Uniform));
        assert!("zipf:0".parse::<Popularity>().is_err());
        assert_eq!("zipf".parse::<Popularity>(), Ok(Popularity::Zipf(1.1)));
    }

    #[test]
    fn the_number_of_prefix_patterns_is_the_one_asked_for() {
        for kind in Kind::SINGLE {
            let keys = |config: &SynthConfig| {
                generate(config)
                    .iter()
                    .map(|r| r.key)
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            };
            let even = SynthConfig {
                patterns: Some(7),
                ..SynthConfig::new(kind, 400, 3)
            };
            assert_eq!(keys(&even), 7, "{kind:?}");
            let zipf = SynthConfig {
                popularity: Popularity::Zipf(1.1),
                ..even
            };
            assert!((1..=7).contains(&keys(&zipf)), "{kind:?}");
            // By default the count follows Table 1's requests per key portion.
            let per_key = kind.shape().map(|shape| shape.per_key).unwrap_or(1.0);
            assert_eq!(
                keys(&SynthConfig::new(kind, 400, 3)),
                (400.0 / per_key).ceil() as usize,
                "{kind:?}"
            );
        }
    }
}
