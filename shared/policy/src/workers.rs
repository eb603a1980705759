//! Compact sets of workers, by small index, for the nodes of the global tree.

/// Most workers one tree tracks.
pub const MAX_WORKERS: usize = 256;

/// A worker's index in the tree (assigned by the policy, stable while the worker lives).
pub type WorkerIdx = u16;

/// A set of worker indices below [`MAX_WORKERS`], stored inline (32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkerSet([u64; MAX_WORKERS / 64]);

impl WorkerSet {
    /// The empty set.
    pub const EMPTY: WorkerSet = WorkerSet([0; MAX_WORKERS / 64]);

    /// Adds `w`.
    pub fn insert(&mut self, w: WorkerIdx) {
        self.0[usize::from(w) / 64] |= 1 << (w % 64);
    }

    /// Removes `w`.
    pub fn remove(&mut self, w: WorkerIdx) {
        self.0[usize::from(w) / 64] &= !(1 << (w % 64));
    }

    /// Whether `w` is in the set.
    pub fn contains(&self, w: WorkerIdx) -> bool {
        self.0[usize::from(w) / 64] & (1 << (w % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }

    /// Members of either set.
    pub fn union(&self, other: &WorkerSet) -> WorkerSet {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(other.0) {
            *a |= b;
        }
        out
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.0.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// Members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = WorkerIdx> + '_ {
        self.0.iter().enumerate().flat_map(|(word, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                Some((word * 64 + bit as usize) as WorkerIdx)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let mut s = WorkerSet::EMPTY;
        assert!(s.is_empty());
        for w in [0, 63, 64, 200, 255] {
            s.insert(w);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 200, 255]);
        assert_eq!(s.len(), 5);
        s.remove(64);
        assert!(!s.contains(64) && s.contains(63));
        let mut t = WorkerSet::EMPTY;
        t.insert(7);
        assert_eq!(s.union(&t).len(), 5);
    }
}
