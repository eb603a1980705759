//! Seeded random choice among equally good candidates, so bursts do not herd onto the first.

pub use preble_prefix::mix64;

/// FNV-1a hash of a string, for seeding from request ids.
pub fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Picks one index of `candidates` (non-empty) from `seed` and `request_id`, uniformly.
pub fn pick(candidates: &[usize], seed: u64, request_id: &str) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    let r = mix64(seed ^ hash_str(request_id));
    Some(candidates[(r % candidates.len() as u64) as usize])
}

/// Draws an index of `costs` (non-empty) with probability proportional to
/// `exp(-(cost - min) / scale)`, using the random bits `draw`: cheaper is likelier, and `scale`
/// (a temperature times a typical cost) sets how much likelier.
pub fn softmax_pick(costs: &[f64], scale: f64, draw: u64) -> usize {
    let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let weights: Vec<f64> = costs.iter().map(|c| (-(c - min) / scale).exp()).collect();
    let mut u = (draw >> 11) as f64 / (1u64 << 53) as f64 * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    costs.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_every_candidate_sometimes_and_reproducibly() {
        let c = [3, 5, 9];
        let mut seen = std::collections::HashSet::new();
        for i in 0..200 {
            let id = format!("r{i}");
            let a = pick(&c, 7, &id).unwrap();
            assert_eq!(Some(a), pick(&c, 7, &id));
            seen.insert(a);
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(pick(&[], 1, "x"), None);
    }

    #[test]
    fn softmax_prefers_cheap_costs_and_draws_every_one_sometimes() {
        let costs = [1.0, 2.0, 4.0];
        let mut counts = [0u32; 3];
        for i in 0..3000u64 {
            counts[softmax_pick(&costs, 1.0, mix64(i))] += 1;
        }
        assert!(
            counts[0] > counts[1] && counts[1] > counts[2] && counts[2] > 0,
            "{counts:?}"
        );
    }
}
