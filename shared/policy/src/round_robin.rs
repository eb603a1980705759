//! Round-robin: the baseline the paper compares against (SGLang data parallel).

use crate::{ClusterView, Decision, DecisionKind, Policy, RouteError, RouteRequest};

/// Sends each request to the next worker in turn, ignoring load and cache.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn route(
        &mut self,
        cluster: &ClusterView<'_>,
        _request: &RouteRequest<'_>,
    ) -> Result<Decision, RouteError> {
        if cluster.workers.is_empty() {
            return Err(RouteError::NoEligibleWorker);
        }
        let i = self.next % cluster.workers.len();
        self.next = self.next.wrapping_add(1);
        Ok(Decision {
            worker: cluster.workers[i].id.clone(),
            kind: DecisionKind::Load,
            cached_tokens: 0,
            reason: format!("turn {i} of {}", cluster.workers.len()),
        })
    }
}
