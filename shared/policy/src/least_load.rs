//! Least load: the worker with the fewest outstanding requests, then the least queued prefill.

use crate::{ClusterView, Decision, DecisionKind, Policy, RouteError, RouteRequest, tiebreak};

/// Picks the worker with the fewest outstanding requests; among those, the fewest prompt
/// tokens still to prefill (the scheduler's own charges plus the worker's report); remaining
/// ties are broken at random from the seed, so a burst spreads instead of herding.
#[derive(Debug)]
pub struct LeastLoad {
    seed: u64,
}

impl LeastLoad {
    /// A least-load policy breaking ties with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }
}

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least-load"
    }

    fn route(
        &mut self,
        cluster: &ClusterView<'_>,
        request: &RouteRequest<'_>,
    ) -> Result<Decision, RouteError> {
        let key = |i: usize| {
            let l = &cluster.workers[i].load;
            (
                l.outstanding,
                l.outstanding_prompt_tokens.max(l.reported_prefill_tokens),
            )
        };
        let best = (0..cluster.workers.len())
            .map(key)
            .min()
            .ok_or(RouteError::NoEligibleWorker)?;
        let tied: Vec<usize> = (0..cluster.workers.len())
            .filter(|&i| key(i) == best)
            .collect();
        let chosen = tiebreak::pick(&tied, self.seed, request.request_id)
            .ok_or(RouteError::NoEligibleWorker)?;
        Ok(Decision {
            worker: cluster.workers[chosen].id.clone(),
            kind: DecisionKind::Load,
            cached_tokens: 0,
            reason: format!(
                "outstanding={} prefill_tokens={} tied={}",
                best.0,
                best.1,
                tied.len()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{WorkerLoad, WorkerView};
    use proptest::prelude::*;

    fn worker(id: &str, outstanding: u32, tokens: u64) -> WorkerView {
        WorkerView {
            id: id.into(),
            load: WorkerLoad {
                outstanding,
                outstanding_prompt_tokens: tokens,
                ..WorkerLoad::default()
            },
            kv_capacity_tokens: 0,
        }
    }

    fn req(id: &str) -> RouteRequest<'_> {
        RouteRequest {
            request_id: id,
            prompt: &[1, 2, 3],
            max_tokens: 4,
            now_ms: 0,
        }
    }

    #[test]
    fn picks_fewest_outstanding_then_fewest_tokens() {
        let ws = [worker("a", 3, 0), worker("b", 1, 500), worker("c", 1, 100)];
        let d = LeastLoad::new(1)
            .route(&ClusterView { workers: &ws }, &req("r"))
            .unwrap();
        assert_eq!(d.worker, "c");
    }

    #[test]
    fn a_burst_on_an_idle_cluster_spreads_when_charged_at_dispatch() {
        let mut ws = vec![worker("a", 0, 0), worker("b", 0, 0), worker("c", 0, 0)];
        let mut p = LeastLoad::new(9);
        for i in 0..30 {
            let id = format!("r{i}");
            let d = p.route(&ClusterView { workers: &ws }, &req(&id)).unwrap();
            let w = ws.iter_mut().find(|w| w.id == d.worker).unwrap();
            w.load.outstanding += 1;
            w.load.outstanding_prompt_tokens += 3;
        }
        assert!(ws.iter().all(|w| w.load.outstanding == 10), "{ws:?}");
    }

    #[test]
    fn no_workers_is_an_error() {
        assert_eq!(
            LeastLoad::new(0).route(&ClusterView { workers: &[] }, &req("r")),
            Err(RouteError::NoEligibleWorker)
        );
    }

    proptest! {
        #[test]
        fn always_names_an_eligible_worker_and_is_deterministic(
            loads in proptest::collection::vec((0u32..5, 0u64..3), 1..8),
            seed in any::<u64>(),
        ) {
            let ws: Vec<_> = loads.iter().enumerate()
                .map(|(i, &(o, t))| worker(&format!("w{i}"), o, t)).collect();
            let view = ClusterView { workers: &ws };
            let a = LeastLoad::new(seed).route(&view, &req("x")).unwrap();
            let b = LeastLoad::new(seed).route(&view, &req("x")).unwrap();
            prop_assert_eq!(&a, &b);
            let chosen = ws.iter().find(|w| w.id == a.worker).unwrap();
            prop_assert!(ws.iter().all(|w| w.load.outstanding >= chosen.load.outstanding));
        }
    }
}
