//! Helpers shared by the policy tests: a cluster of idle workers, one routing call, a cache
//! event, and a real radix cache caching a prompt.
#![allow(dead_code)]

use preble_localsched::RadixCache;
use preble_policy::{
    ClusterEvent, ClusterView, Decision, Policy, RouteRequest, WorkerLoad, WorkerView,
};
use preble_prefix::{ROOT_HASH, path_hash};

/// `n` idle workers `gpu-0..`, each with a 200,000-token cache.
pub fn workers(n: usize) -> Vec<WorkerView> {
    (0..n)
        .map(|i| WorkerView {
            id: format!("gpu-{i}"),
            load: WorkerLoad::default(),
            kv_capacity_tokens: 200_000,
        })
        .collect()
}

/// Routes request `id` (64 tokens at most) among `ws`; panics if no worker is picked.
pub fn route(
    policy: &mut dyn Policy,
    ws: &[WorkerView],
    id: &str,
    prompt: &[u32],
    now_ms: u64,
) -> Decision {
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
        .expect("a decision")
}

/// The worker caches the prompt, as its cache events would say.
pub fn cache(policy: &mut dyn Policy, worker: &str, prompt: &[u32], now_ms: u64) {
    policy
        .observe(&ClusterEvent::CacheInserted {
            worker,
            parent_hash: ROOT_HASH,
            hash: path_hash(prompt),
            tokens: prompt,
            now_ms,
        })
        .expect("applies");
}

/// Caches `tokens` in `cache` as a worker serving them would: reuse what matches, allocate
/// the rest (when it fits), insert, and let the path go.
pub fn serve(cache: &mut RadixCache, tokens: &[u32]) {
    let m = cache.match_prefix(tokens, tokens.len());
    cache.pin(m.node);
    if let Some(own) = cache.alloc(tokens.len() - m.len) {
        let mut slots = m.slots;
        slots.extend(own);
        cache.insert(tokens, &mut slots);
    }
    cache.unpin(m.node);
}
