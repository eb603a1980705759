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
}
