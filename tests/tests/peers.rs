//! The peers' own routers drive a live stack: `--policy dynamo` (Dynamo's KV router, fed the
//! workers' real cache events through NATS and the block ledger) and `--policy sglang` (the
//! SGLang gateway's cache-aware rule on its own tree) route 4 sim workers over 8 long shared
//! prefixes, so later requests reuse what earlier ones left cached, and the prefixes spread.

mod common;

use common::{PREFIX_TOKENS, post, shared_prefix};
use preble_tests::{Options, TestCluster, scrape_where};
use serde_json::json;

const PREFIXES: u32 = 8;
const ROUNDS: u32 = 4;

async fn reuses_shared_prefixes(policy: &str) {
    let cluster = TestCluster::start(Options {
        workers: 4,
        scheduler_args: vec!["--policy".into(), policy.into()],
        ..Options::default()
    })
    .await
    .unwrap();
    // One at a time: every decision sees the cache events of the requests before it and no
    // load, so a holder always wins (concurrent requests would trade reuse for balance).
    for round in 0..ROUNDS {
        for k in 0..PREFIXES {
            let mut prompt = shared_prefix(k);
            prompt.extend((0..20).map(|t| 5 + ((round * PREFIXES + k) * 20 + t) % 570));
            let body = json!({"model": cluster.model, "prompt": prompt, "max_tokens": 8});
            let (status, out) = post(&cluster.gateway, "/v1/completions", &body).await;
            assert_eq!(status, 200, "{policy}: {out}");
        }
    }
    let hits = cluster
        .worker_sum("preble:prefix_cache_hit_tokens_total")
        .await;
    let ideal = f64::from((ROUNDS - 1) * PREFIXES * PREFIX_TOKENS);
    let exploits = scrape_where(
        &cluster.scheduler_metrics,
        "preble:scheduler_decisions_total",
        "kind=\"exploit\"",
    )
    .await
    .unwrap();
    let accepted = cluster
        .worker_values("preble:requests_accepted_total")
        .await;
    eprintln!(
        "{policy}: prefix hits {hits} of {ideal}, {exploits} exploits, per worker {accepted:?}"
    );
    assert!(
        hits >= 0.85 * ideal,
        "{policy}: prefix hits {hits} of an ideal {ideal}; per worker {accepted:?}\n{}",
        cluster.logs()
    );
    assert!(
        exploits >= f64::from((ROUNDS - 1) * PREFIXES),
        "{policy}: {exploits} exploit decisions"
    );
    assert!(
        accepted.iter().filter(|&&n| n > 0.0).count() >= 2,
        "{policy}: the prefixes all went to one worker: {accepted:?}"
    );
}

#[tokio::test]
async fn dynamos_router_reuses_prefixes_from_the_workers_kv_events() {
    reuses_shared_prefixes("dynamo").await;
}

#[tokio::test]
async fn the_sglang_gateways_rule_reuses_prefixes_it_routed() {
    reuses_shared_prefixes("sglang").await;
}
