//! Picking the next token from a row of logits: greedy, temperature, top-k and top-p.
//!
//! The random draw depends only on (seed, output index), never on the batch a request ran in
//! or on a global generator, so the same seed gives the same output whatever else the worker
//! is serving, and a preempted request continues exactly as it would have.

use preble_prefix::mix64;
use preble_protocol::TokenLogprob;

/// How to pick one token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingSpec {
    /// Softmax temperature; 0 (or less) is greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// Only the `top_k` most likely tokens compete; `None` (or 0) keeps every token.
    pub top_k: Option<u32>,
    /// The request's seed.
    pub seed: u64,
    /// Which output token this is (0 for the first), so each step draws a fresh number.
    pub index: u32,
}

impl SamplingSpec {
    /// Greedy decoding (what a temperature of 0 asks for).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
            index: 0,
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == Some(1)
    }

    /// A number in [0, 1) that depends only on the seed and the index.
    fn uniform(&self) -> f64 {
        let bits = mix64(self.seed ^ mix64(u64::from(self.index).wrapping_add(1)));
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The token `spec` picks from `logits` (one entry per vocabulary id). Non-finite logits
/// never win; an empty row gives token 0.
pub fn sample(logits: &[f32], spec: &SamplingSpec) -> u32 {
    if spec.is_greedy() {
        return argmax(logits);
    }
    let inverse_temperature = 1.0 / f64::from(spec.temperature);
    let mut candidates: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(id, &l)| (id as u32, f64::from(l) * inverse_temperature))
        .collect();
    if candidates.is_empty() {
        return 0;
    }
    let by_logit_descending =
        |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = spec
        .top_k
        .filter(|&k| k > 0 && (k as usize) < candidates.len())
    {
        candidates.select_nth_unstable_by(k as usize - 1, by_logit_descending);
        candidates.truncate(k as usize);
    }
    let nucleus = spec.top_p < 1.0;
    if nucleus {
        candidates.sort_unstable_by(by_logit_descending);
    }
    let max = candidates
        .iter()
        .map(|c| c.1)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for c in &mut candidates {
        c.1 = (c.1 - max).exp();
        total += c.1;
    }
    if nucleus {
        let keep_mass = f64::from(spec.top_p) * total;
        let mut mass = 0.0;
        let mut keep = candidates.len();
        for (i, c) in candidates.iter().enumerate() {
            mass += c.1;
            if mass >= keep_mass {
                keep = i + 1;
                break;
            }
        }
        candidates.truncate(keep);
        total = mass.min(total);
    }
    let target = spec.uniform() * total;
    let mut mass = 0.0;
    for &(id, weight) in &candidates {
        mass += weight;
        if target < mass {
            return id;
        }
    }
    candidates.last().map_or(0, |c| c.0)
}

/// The log-probability of `token` and of the `top` most likely tokens (most likely first,
/// lower id first among equals) under the model's own distribution: the softmax of the logits
/// as they are, before temperature, top-k or top-p (what vLLM reports by default). Non-finite
/// logits have no probability; a token outside the row gets negative infinity.
pub fn logprobs(logits: &[f32], token: u32, top: u32) -> TokenLogprob {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let log_total = f64::from(max) + total.ln();
    let logprob_of = |l: f32| {
        if l.is_finite() {
            (f64::from(l) - log_total) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    let mut ranked: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(id, &l)| (id as u32, l))
        .collect();
    let by_logit_descending =
        |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let n = (top as usize).min(ranked.len());
    if n > 0 && n < ranked.len() {
        ranked.select_nth_unstable_by(n - 1, by_logit_descending);
    }
    ranked.truncate(n);
    ranked.sort_unstable_by(by_logit_descending);
    TokenLogprob {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob_of(l)),
        top: ranked
            .into_iter()
            .map(|(id, l)| (id, logprob_of(l)))
            .collect(),
    }
}

/// The id of the largest finite logit (the lowest id among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (id, &l) in logits.iter().enumerate() {
        if l.is_finite() && best.is_none_or(|(_, b)| l > b) {
            best = Some((id, l));
        }
    }
    best.map_or(0, |(id, _)| id as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        temperature: f32,
        top_p: f32,
        top_k: Option<u32>,
        seed: u64,
        index: u32,
    ) -> SamplingSpec {
        SamplingSpec {
            temperature,
            top_p,
            top_k,
            seed,
            index,
        }
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_are_ranked() {
        let logits = [1.0f32, 3.0, f32::NAN, 2.0, 3.0];
        let lp = logprobs(&logits, 3, 3);
        let total: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        let expect = |l: f64| (l - total.ln()) as f32;
        assert!((lp.logprob - expect(2.0)).abs() < 1e-6, "{lp:?}");
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(
            ids,
            vec![1, 4, 3],
            "most likely first, lower id among equals"
        );
        assert!((lp.top[0].1 - expect(3.0)).abs() < 1e-6);
        let mass: f64 = (0..5)
            .filter(|&i| i != 2)
            .map(|i| f64::from(logprobs(&logits, i, 0).logprob).exp())
            .sum();
        assert!((mass - 1.0).abs() < 1e-6, "{mass}");
        assert_eq!(logprobs(&logits, 2, 0).logprob, f32::NEG_INFINITY);
        assert_eq!(
            logprobs(&logits, 99, 9).top.len(),
            4,
            "only finite logits rank"
        );
        assert!(logprobs(&[], 0, 5).top.is_empty());
    }

    #[test]
    fn greedy_takes_the_largest_finite_logit() {
        assert_eq!(argmax(&[0.1, 3.0, f32::NAN, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::INFINITY, 2.0]), 1);
        assert_eq!(sample(&[0.1, 0.2, 5.0], &SamplingSpec::greedy()), 2);
        assert_eq!(sample(&[9.0, 0.2, 5.0], &spec(1.0, 1.0, Some(1), 7, 0)), 0);
        assert_eq!(sample(&[], &SamplingSpec::greedy()), 0);
    }

    #[test]
    fn same_seed_and_index_same_token_and_seeds_differ() {
        let logits: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed, index| sample(&logits, &spec(1.0, 1.0, None, seed, index));
        let a: Vec<u32> = (0..50).map(|i| draw(11, i)).collect();
        let b: Vec<u32> = (0..50).map(|i| draw(11, i)).collect();
        let c: Vec<u32> = (0..50).map(|i| draw(12, i)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        // Logits ln(1), ln(2), ln(3), ln(4): probabilities 0.1, 0.2, 0.3, 0.4.
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|p| p.ln()).collect();
        let mut counts = [0u32; 4];
        let n = 20_000;
        for i in 0..n {
            counts[sample(&logits, &spec(1.0, 1.0, None, 3, i)) as usize] += 1;
        }
        for (id, &count) in counts.iter().enumerate() {
            let expected = (id as f64 + 1.0) / 10.0;
            let seen = f64::from(count) / f64::from(n);
            assert!(
                (seen - expected).abs() < 0.015,
                "token {id}: {seen} vs {expected}"
            );
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|p| p.ln()).collect();
        for i in 0..2_000 {
            let k = sample(&logits, &spec(1.0, 1.0, Some(2), 5, i));
            assert!(k == 2 || k == 3, "top_k 2 gave {k}");
            // 0.4 + 0.3 = 0.7 >= 0.65: the nucleus is {3, 2}.
            let p = sample(&logits, &spec(1.0, 0.65, None, 5, i));
            assert!(p == 2 || p == 3, "top_p 0.65 gave {p}");
            // 0.4 >= 0.3: only token 3 is left.
            assert_eq!(sample(&logits, &spec(1.0, 0.3, None, 5, i)), 3);
        }
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [0.0f32, 1.0];
        let picks_of_one = |t: f32| {
            (0..4_000)
                .filter(|&i| sample(&logits, &spec(t, 1.0, None, 9, i)) == 1)
                .count()
        };
        assert!(picks_of_one(0.1) > picks_of_one(1.0) + 500);
    }
}
