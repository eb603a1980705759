//! The wait of a scheduler that comes back: before it routes anything it waits (bounded) for
//! the workers its restored tree names to report, so a backlog queued while it was down goes to
//! all of them instead of the first that speaks.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// The wait of a restarted scheduler for the workers it knew, before it routes anything.
pub struct Startup {
    awaiting: HashSet<String>,
    until: Instant,
    open: bool,
}

impl Startup {
    /// Waits for `known` (the workers the restored tree names) for at most `wait`.
    pub fn new(known: HashSet<String>, wait: Duration) -> Self {
        let open = known.is_empty();
        if !open {
            info!(
                workers = known.len(),
                wait_ms = wait.as_millis() as u64,
                "waiting for the known workers to report before routing"
            );
        }
        Self {
            awaiting: known,
            until: Instant::now() + wait,
            open,
        }
    }

    /// A worker reported.
    pub fn reported(&mut self, worker: &str) {
        self.awaiting.remove(worker);
    }

    /// Whether requests may be routed: every known worker reported, or the wait is over.
    pub fn routing(&mut self) -> bool {
        if !self.open && (self.awaiting.is_empty() || Instant::now() >= self.until) {
            self.open = true;
            if self.awaiting.is_empty() {
                info!("every known worker reported: routing");
            } else {
                warn!(missing = ?self.awaiting, "known workers did not report in time: routing without them");
            }
        }
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn routing_opens_when_every_known_worker_reported_or_the_wait_is_over() {
        assert!(Startup::new(HashSet::new(), Duration::from_secs(60)).routing());
        let mut s = Startup::new(known(&["a", "b"]), Duration::from_secs(60));
        assert!(!s.routing());
        s.reported("a");
        s.reported("stranger");
        assert!(!s.routing());
        s.reported("b");
        assert!(s.routing());
        let mut late = Startup::new(known(&["a"]), Duration::ZERO);
        assert!(late.routing(), "the wait is bounded");
    }
}
