//! The peers' own routing code behind our `Policy`: Dynamo's KV router (fed by our cache events
//! through the block ledger) and the SGLang gateway's cache-aware rule on `kv-index`'s tree.

use preble_localsched::{CacheEvent, RadixCache};
use preble_policy::{
    ClusterEvent, ClusterView, DecisionKind, Dynamo, DynamoConfig, Policy, PolicyKind,
    RouteRequest, Sglang, SglangConfig, TreeError,
};
use preble_prefix::{ROOT_HASH, path_hash};
use proptest::prelude::*;

mod common;
use common::{cache, route, serve, workers};

fn release(policy: &mut dyn Policy, worker: &str, id: &str) {
    policy
        .observe(&ClusterEvent::Released {
            worker,
            request_id: id,
        })
        .expect("applies");
}

fn prompt(family: u32, len: u32) -> Vec<u32> {
    (0..len).map(|t| family * 100_000 + t).collect()
}

#[test]
fn both_peers_are_named_and_built_from_flags() {
    for name in ["dynamo", "sglang"] {
        let kind: PolicyKind = name.parse().expect("a policy name");
        assert_eq!(kind.build(&Default::default()).name(), name);
    }
}

#[test]
fn dynamo_follows_the_workers_kv_events() {
    let ws = workers(3);
    let mut policy = Dynamo::new(DynamoConfig::default());
    let p = prompt(1, 1_000);
    cache(&mut policy, "gpu-2", &p, 0);
    let d = route(&mut policy, &ws, "r1", &p, 0);
    assert_eq!(d.worker, "gpu-2");
    assert_eq!(d.kind, DecisionKind::Exploit);
    assert_eq!(
        d.cached_tokens, 992,
        "62 complete blocks of 16 out of 1,000 tokens"
    );
    release(&mut policy, "gpu-2", "r1");
    // Evicted there: nothing is cached anywhere any more.
    policy
        .observe(&ClusterEvent::CacheEvicted {
            worker: "gpu-2",
            hash: path_hash(&p),
            num_tokens: 1_000,
        })
        .expect("applies");
    let d = route(&mut policy, &ws, "r2", &p, 10);
    assert_eq!(d.cached_tokens, 0);
    assert_eq!(d.kind, DecisionKind::Load);
}

#[test]
fn dynamo_spreads_load_and_releases_it() {
    let ws = workers(4);
    let mut policy = Dynamo::new(DynamoConfig::default());
    // Four unrelated prompts, nothing cached: the blocks each booking adds send every one to
    // a different worker.
    let chosen: Vec<String> = (0..4)
        .map(|i| {
            route(
                &mut policy,
                &ws,
                &format!("r{i}"),
                &prompt(10 + i, 2_000),
                0,
            )
            .worker
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> = chosen.iter().collect();
    assert_eq!(distinct.len(), 4, "{chosen:?}");
    // The request on the third worker ends: that worker is the idle one again.
    release(&mut policy, &chosen[2], "r2");
    let next = route(&mut policy, &ws, "r4", &prompt(20, 2_000), 1).worker;
    assert_eq!(next, chosen[2]);
}

#[test]
fn dynamo_forgets_a_gone_worker_and_refuses_lies() {
    let ws = workers(2);
    let mut policy = Dynamo::new(DynamoConfig::default());
    let p = prompt(2, 320);
    cache(&mut policy, "gpu-1", &p, 0);
    policy
        .observe(&ClusterEvent::WorkerGone { worker: "gpu-1" })
        .expect("applies");
    assert_eq!(route(&mut policy, &ws, "r", &p, 0).cached_tokens, 0);
    let lie = policy.observe(&ClusterEvent::CacheInserted {
        worker: "gpu-0",
        parent_hash: ROOT_HASH,
        hash: 42,
        tokens: &p,
        now_ms: 0,
    });
    assert!(
        matches!(lie, Err(TreeError::HashMismatch { .. })),
        "{lie:?}"
    );
    let unknown = policy.observe(&ClusterEvent::CacheEvicted {
        worker: "gpu-0",
        hash: 7,
        num_tokens: 3,
    });
    assert_eq!(unknown, Err(TreeError::UnknownPath(7)));
    assert_eq!(
        policy.route(
            &ClusterView { workers: &[] },
            &RouteRequest {
                request_id: "none",
                prompt: &p,
                max_tokens: 1,
                now_ms: 0,
            },
        ),
        Err(preble_policy::RouteError::NoEligibleWorker)
    );
}

#[test]
fn sglang_follows_its_own_routes_until_the_cluster_is_imbalanced() {
    let mut ws = workers(3);
    let mut policy = Sglang::new(SglangConfig::default());
    let p = prompt(3, 500);
    let first = route(&mut policy, &ws, "a", &p, 0);
    assert_eq!(first.kind, DecisionKind::Explore);
    // The tree learned where it sent the prompt: the same prefix follows, even onto a worker
    // that is somewhat busier.
    let i = ws
        .iter()
        .position(|w| w.id == first.worker)
        .expect("a worker");
    ws[i].load.outstanding = 30;
    let again = route(&mut policy, &ws, "b", &p, 1);
    assert_eq!(again.worker, first.worker);
    assert_eq!(again.kind, DecisionKind::Exploit);
    assert_eq!(again.cached_tokens, 496, "page-aligned match of 500 tokens");
    // Past both balance thresholds (more than 64 apart and 1.5x), the least loaded wins.
    ws[i].load.outstanding = 100;
    for (j, w) in ws.iter_mut().enumerate() {
        if j != i {
            w.load.outstanding = 10 + j as u32;
        }
    }
    let spill = route(&mut policy, &ws, "c", &p, 2);
    assert_eq!(spill.kind, DecisionKind::Load);
    assert_eq!(
        spill.worker,
        ws.iter().min_by_key(|w| w.load.outstanding).expect("w").id
    );
}

#[test]
fn sglang_sends_a_weak_match_to_the_least_loaded_and_forgets_gone_workers() {
    let mut ws = workers(2);
    let mut policy = Sglang::new(SglangConfig::default());
    let shared = prompt(4, 100);
    let home = route(&mut policy, &ws, "a", &shared, 0).worker;
    let other = ws.iter().find(|w| w.id != home).expect("two").id.clone();
    // A prompt sharing only 100 of its 1,000 tokens (rate 0.1 < 0.3) goes to the idler one.
    let mut longer = shared.clone();
    longer.extend(prompt(5, 900));
    ws.iter_mut()
        .find(|w| w.id == home)
        .expect("home")
        .load
        .outstanding = 2;
    let d = route(&mut policy, &ws, "b", &longer, 1);
    assert_eq!(
        (d.worker.as_str(), d.kind),
        (other.as_str(), DecisionKind::Explore)
    );
    // A gone worker's routes are forgotten: its prefix no longer matches.
    policy
        .observe(&ClusterEvent::WorkerGone { worker: &home })
        .expect("applies");
    let alone = [ws.iter().find(|w| w.id == other).expect("other").clone()];
    let fresh = route(&mut policy, &alone, "c", &prompt(6, 50), 2);
    assert_eq!(fresh.cached_tokens, 0);
    assert!(
        policy
            .route(
                &ClusterView { workers: &[] },
                &RouteRequest {
                    request_id: "none",
                    prompt: &shared,
                    max_tokens: 1,
                    now_ms: 3
                }
            )
            .is_err()
    );
}

#[derive(Clone, Debug)]
enum Op {
    Insert(usize, Vec<u32>),
    Evict(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let path = proptest::collection::vec(0u32..3, 1..16);
    prop_oneof![
        4 => (0..3usize, path).prop_map(|(w, p)| Op::Insert(w, p)),
        1 => (0..3usize, 1u64..12).prop_map(|(w, n)| Op::Evict(w, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Real caches split, share and evict spans at any token; after every event, Dynamo's tree
    /// credits each worker with exactly the complete blocks of its longest cached prefix.
    #[test]
    fn dynamos_overlap_is_each_caches_complete_blocks(
        ops in proptest::collection::vec(op(), 1..60),
        probes in proptest::collection::vec(proptest::collection::vec(0u32..3, 1..16), 4),
    ) {
        let block = 2u32;
        let mut caches: Vec<RadixCache> = (0..3).map(|_| RadixCache::new(40)).collect();
        let ws = workers(3);
        let mut policy = Dynamo::new(DynamoConfig { block_size: block, ..DynamoConfig::default() });
        for (step, op) in ops.into_iter().enumerate() {
            let w = match &op { Op::Insert(w, _) | Op::Evict(w, _) => *w };
            let cache = &mut caches[w];
            match op {
                Op::Insert(_, tokens) => serve(cache, &tokens),
                Op::Evict(_, n) => {
                    cache.evict(n);
                }
            }
            let id = &ws[w].id;
            for event in cache.take_events() {
                let applied = match &event {
                    CacheEvent::Inserted(span) => policy.observe(&ClusterEvent::CacheInserted {
                        worker: id,
                        parent_hash: span.parent_hash,
                        hash: span.hash,
                        tokens: &span.tokens,
                        now_ms: step as u64,
                    }),
                    CacheEvent::Evicted { hash, num_tokens } => {
                        policy.observe(&ClusterEvent::CacheEvicted {
                            worker: id,
                            hash: *hash,
                            num_tokens: *num_tokens,
                        })
                    }
                };
                prop_assert!(applied.is_ok(), "{:?}: {:?}", event, applied);
            }
            for (i, probe) in probes.iter().enumerate() {
                for (k, cache) in caches.iter().enumerate() {
                    let d = route(&mut policy, &ws[k..=k], &format!("p{step}-{i}-{k}"), probe, step as u64);
                    let want = cache.peek_match_len(probe) as u32 / block * block;
                    prop_assert_eq!(d.cached_tokens, want, "worker {} probe {:?}", k, probe);
                }
            }
        }
    }
}
