//! Names for token paths.
//!
//! A worker's KV cache and the scheduler's mirror of it talk about cached spans by the hash of
//! the whole token path from the root to the span's end. Both sides compute that hash with
//! [`extend`], one token at a time, so a mirror can name any point of a path it holds (including
//! a point where it had to split an edge) without asking the worker.

/// The hash of the empty path (the root of every tree).
pub const ROOT_HASH: u64 = 0;

const STEP_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
const STEP_OFFSET: u64 = 0x6A09_E667_F3BC_C909;

/// The hash of `path ++ [token]` given `hash`, the hash of `path`.
#[inline]
pub fn step(hash: u64, token: u32) -> u64 {
    (hash.rotate_left(26) ^ u64::from(token))
        .wrapping_add(STEP_OFFSET)
        .wrapping_mul(STEP_MULTIPLIER)
}

/// The hash of `path ++ tokens` given `hash`, the hash of `path`.
#[inline]
pub fn extend(hash: u64, tokens: &[u32]) -> u64 {
    tokens.iter().fold(hash, |h, &t| step(h, t))
}

/// The hash of a whole path from the root.
#[inline]
pub fn path_hash(tokens: &[u32]) -> u64 {
    extend(ROOT_HASH, tokens)
}

/// Length of the common prefix of two token sequences: blocks of tokens compared at once
/// (vectorised), then token by token in the first block that differs.
#[inline]
pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    const BLOCK: usize = 32;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// A 64-bit mix (SplitMix64's finaliser): spreads any input over all 64 bits, for seeded
/// choices and deterministic pseudo-random values.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hashing_is_compositional(a in proptest::collection::vec(0u32..50, 0..40),
                                    b in proptest::collection::vec(0u32..50, 0..40)) {
            let whole: Vec<u32> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(extend(path_hash(&a), &b), path_hash(&whole));
        }
    }

    proptest! {
        #[test]
        fn common_prefix_len_is_the_naive_one(a in proptest::collection::vec(0u32..3, 0..100),
                                              b in proptest::collection::vec(0u32..3, 0..100)) {
            let naive = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            prop_assert_eq!(common_prefix_len(&a, &b), naive);
            let mut c = a.clone();
            c.extend(&b);
            prop_assert_eq!(common_prefix_len(&a, &c), a.len());
        }
    }

    #[test]
    fn distinct_short_paths_get_distinct_hashes() {
        let mut seen = std::collections::HashSet::new();
        seen.insert(ROOT_HASH);
        for a in 0..64u32 {
            seen.insert(path_hash(&[a]));
            for b in 0..64u32 {
                seen.insert(path_hash(&[a, b]));
                seen.insert(path_hash(&[a, b, 0]));
            }
        }
        assert_eq!(seen.len(), 1 + 64 + 2 * 64 * 64);
    }
}
