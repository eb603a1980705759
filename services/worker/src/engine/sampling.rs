//! Picking the next token from a row of logits: greedy, temperature, top-k and top-p.
//!
//! The random draw depends only on (seed, output index), never on the batch a request ran in
//! or on a global generator, so the same seed gives the same output whatever else the worker
//! is serving, and a preempted request continues exactly as it would have.

use preble_prefix::mix64;

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
