//! How one worker uses one node of the global tree: its requests through the node in the load
//! window, those running now, and when it last used the node (its cache's eviction order).

use crate::workers::WorkerIdx;

/// One worker's use of one node.
///
/// The windowed count is a sliding-window estimate over two fixed windows of length H: the
/// current one counts fully, the previous one by the share of it still inside the sliding
/// window. That keeps it O(1) in time and space per node and worker; a request is never
/// counted more than once and is forgotten after at most 2H.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerUse {
    /// The worker.
    pub worker: WorkerIdx,
    /// Requests through the node running on the worker now.
    pub active: u32,
    /// When the worker last used the node (routed a request through it or cached it).
    pub last_ms: u64,
    epoch: u64,
    current: u32,
    previous: u32,
}

impl WorkerUse {
    /// No use yet by `worker`, last used at `last_ms`.
    pub fn new(worker: WorkerIdx, last_ms: u64) -> Self {
        Self {
            worker,
            active: 0,
            last_ms,
            epoch: 0,
            current: 0,
            previous: 0,
        }
    }

    /// Counts one request through the node at `now_ms`.
    pub fn record(&mut self, now_ms: u64, window_ms: u64) {
        self.roll(now_ms, window_ms);
        self.current = self.current.saturating_add(1);
    }

    /// Requests through the node in the window ending at `now_ms` (an estimate, see above).
    pub fn requests(&self, now_ms: u64, window_ms: u64) -> f64 {
        let window = window_ms.max(1);
        let epoch = now_ms / window;
        let left = 1.0 - (now_ms % window) as f64 / window as f64;
        if self.epoch == epoch {
            f64::from(self.current) + f64::from(self.previous) * left
        } else if self.epoch + 1 == epoch {
            f64::from(self.current) * left
        } else {
            0.0
        }
    }

    /// Keeps the larger of two records of the same worker (when two nodes become one).
    pub fn absorb(&mut self, other: &WorkerUse) {
        if other.epoch > self.epoch {
            *self = WorkerUse {
                active: self.active.max(other.active),
                last_ms: self.last_ms.max(other.last_ms),
                ..*other
            };
            return;
        }
        if other.epoch == self.epoch {
            self.current = self.current.max(other.current);
            self.previous = self.previous.max(other.previous);
        }
        self.active = self.active.max(other.active);
        self.last_ms = self.last_ms.max(other.last_ms);
    }

    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let epoch = now_ms / window_ms.max(1);
        if epoch == self.epoch {
            return;
        }
        self.previous = if epoch == self.epoch + 1 {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.epoch = epoch;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_fade_out_of_the_window() {
        let mut u = WorkerUse::new(0, 0);
        for t in [1_000, 2_000, 3_000] {
            u.record(t, 10_000);
        }
        assert_eq!(u.requests(5_000, 10_000), 3.0);
        // Next window, a quarter in: three quarters of the old ones still count.
        assert!((u.requests(12_500, 10_000) - 2.25).abs() < 1e-9);
        u.record(12_500, 10_000);
        assert!((u.requests(12_500, 10_000) - 3.25).abs() < 1e-9);
        // Two windows later everything has gone.
        assert_eq!(u.requests(30_000, 10_000), 0.0);
        u.record(30_000, 10_000);
        assert_eq!(u.requests(30_000, 10_000), 1.0);
    }

    #[test]
    fn absorbing_keeps_the_larger_record() {
        let mut a = WorkerUse::new(1, 10);
        a.record(100, 1_000);
        let mut b = WorkerUse::new(1, 50);
        b.record(100, 1_000);
        b.record(200, 1_000);
        b.active = 2;
        a.absorb(&b);
        assert_eq!(a.requests(300, 1_000), 2.0);
        assert_eq!((a.active, a.last_ms), (2, 50));
    }
}
