//! E2 end to end: 4 sim workers, requests over 8 long shared prefixes. The scheduler learns
//! what each worker caches from its cache events, so later requests reuse the prefixes while
//! the prefixes stay spread over the workers.

mod common;

use common::post;
use preble_tests::{Options, TestCluster, scrape};
use serde_json::json;

const PREFIX_TOKENS: u32 = 400;
const PREFIXES: u32 = 8;
const ROUNDS: u32 = 8;

/// Prefix `k`'s tokens (ids clear of the special tokens 0..5, inside the 578-token vocabulary).
fn prefix(k: u32) -> Vec<u32> {
    (0..PREFIX_TOKENS)
        .map(|t| 5 + (k * 977 + t * 13) % 570)
        .collect()
}

#[tokio::test]
async fn e2_reuses_shared_prefixes_and_keeps_workers_balanced() {
    let cluster = TestCluster::start(Options {
        workers: 4,
        ..Options::default()
    })
    .await
    .unwrap();
    for round in 0..ROUNDS {
        let requests = (0..PREFIXES).map(|k| {
            let mut prompt = prefix(k);
            // A suffix unique to the request whose first token differs from every other's.
            prompt.extend((0..20).map(|t| 5 + ((round * PREFIXES + k) * 20 + t) % 570));
            let body = json!({"model": cluster.model, "prompt": prompt, "max_tokens": 8});
            let gateway = cluster.gateway.clone();
            async move { post(&gateway, "/v1/completions", &body).await }
        });
        for (status, out) in futures::future::join_all(requests).await {
            assert_eq!(status, 200, "{out}");
        }
    }
    let hits = cluster
        .worker_sum("preble:prefix_cache_hit_tokens_total")
        .await;
    let ideal = f64::from((ROUNDS - 1) * PREFIXES * PREFIX_TOKENS);
    let mut accepted = Vec::new();
    for w in &cluster.workers {
        accepted.push(
            scrape(&w.metrics_url, "preble:requests_accepted_total")
                .await
                .unwrap(),
        );
    }
    let (max, min) = (
        accepted.iter().copied().fold(0.0, f64::max),
        accepted.iter().copied().fold(f64::INFINITY, f64::min),
    );
    eprintln!("prefix hits {hits} of an ideal {ideal}; requests per worker {accepted:?}");
    assert!(
        hits >= 0.9 * ideal,
        "prefix hits {hits} of an ideal {ideal}; requests per worker {accepted:?}\n{}",
        cluster.logs()
    );
    assert!(
        max <= 1.5 * min,
        "requests per worker {accepted:?} are not balanced"
    );
}
