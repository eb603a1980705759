//! Policy inputs come from the network: lying cache events and impossible timings are refused
//! or dropped, and the policies keep routing.

use preble_policy::{
    ClusterEvent, ClusterView, E2, E2Config, Policy, RouteRequest, TreeError, WorkerLoad,
    WorkerView,
};
use preble_prefix::{ROOT_HASH, path_hash};

fn workers(n: usize) -> Vec<WorkerView> {
    (0..n)
        .map(|i| WorkerView {
            id: format!("gpu-{i}"),
            load: WorkerLoad::default(),
            kv_capacity_tokens: 200_000,
        })
        .collect()
}

fn route(policy: &mut dyn Policy, ws: &[WorkerView], id: &str, prompt: &[u32], now_ms: u64) {
    policy
        .route(
            &ClusterView { workers: ws },
            &RouteRequest {
                request_id: id,
                prompt,
                max_tokens: 64,
                now_ms,
            },
        )
        .expect("a decision");
}

fn policies() -> Vec<Box<dyn Policy>> {
    vec![
        Box::new(E2::new(E2Config::default())),
        Box::new(E2::new(E2Config::default().paper())),
    ]
}

#[test]
fn a_cache_event_whose_hash_does_not_match_its_tokens_is_refused() {
    for mut policy in policies() {
        let tokens: Vec<u32> = (0..100).collect();
        let lie = policy.observe(&ClusterEvent::CacheInserted {
            worker: "gpu-0",
            parent_hash: ROOT_HASH,
            hash: path_hash(&tokens) ^ 1,
            tokens: &tokens,
            now_ms: 0,
        });
        assert!(
            matches!(lie, Err(TreeError::HashMismatch { .. })),
            "{lie:?}"
        );
        // Nothing of the lie was kept, and the policy routes on.
        let ws = workers(2);
        route(policy.as_mut(), &ws, "r", &tokens, 1);
        policy
            .observe(&ClusterEvent::CacheInserted {
                worker: "gpu-0",
                parent_hash: ROOT_HASH,
                hash: path_hash(&tokens),
                tokens: &tokens,
                now_ms: 2,
            })
            .expect("the truth applies");
    }
}

#[test]
fn impossible_timings_never_poison_routing() {
    for mut policy in policies() {
        let ws = workers(3);
        for (i, (ttft, tpot)) in [
            (f64::NAN, f64::INFINITY),
            (f64::INFINITY, f64::NAN),
            (-5.0, f64::MAX),
            (1e300, -1.0),
        ]
        .into_iter()
        .cycle()
        .take(400)
        .enumerate()
        {
            policy
                .observe(&ClusterEvent::Finished {
                    worker: &ws[i % 3].id,
                    output_tokens: u32::MAX,
                    ttft_ms: ttft,
                    tpot_ms: tpot,
                    now_ms: i as u64,
                })
                .expect("a finish applies");
        }
        // Idle workers and poisoned estimates: every request still gets a worker.
        for i in 0..20u32 {
            let prompt: Vec<u32> = (0..50).map(|t| t + i * 1000).collect();
            route(policy.as_mut(), &ws, &format!("r{i}"), &prompt, 1_000);
        }
    }
}
