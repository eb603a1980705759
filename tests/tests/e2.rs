//! E2 end to end: 4 sim workers, requests over 8 long shared prefixes. The scheduler learns
//! what each worker caches from its cache events, so later requests reuse the prefixes while
//! the prefixes stay spread over the workers.

mod common;

use std::time::Duration;

use common::{PREFIX_TOKENS, post, shared_prefix};
use preble_tests::{Options, TestCluster, scrape};
use serde_json::json;

const PREFIXES: u32 = 8;
const ROUNDS: u32 = 8;

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
            let mut prompt = shared_prefix(k);
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
    let accepted = cluster
        .worker_values("preble:requests_accepted_total")
        .await;
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

/// Which worker's `metric` grew between two snapshots.
async fn grew(cluster: &TestCluster, metric: &str, before: &[f64]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, w) in cluster.workers.iter().enumerate() {
        if scrape(&w.metrics_url, metric).await.unwrap() > before[i] {
            out.push(i);
        }
    }
    out
}

async fn snapshot(cluster: &TestCluster, metric: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for w in &cluster.workers {
        out.push(scrape(&w.metrics_url, metric).await.unwrap());
    }
    out
}

fn request(model: &str, k: u32, unique: u32, max_tokens: u32) -> serde_json::Value {
    let mut prompt = shared_prefix(k);
    prompt.extend((0..20).map(|t| 5 + (unique * 20 + t) % 570));
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true})
}

#[tokio::test]
async fn a_restarted_scheduler_loses_no_request_and_finds_the_cached_prefixes_again() {
    let mut cluster = TestCluster::start(Options {
        workers: 4,
        time_scale: 1.0,
        scheduler_args: vec!["--ack-wait-s".into(), "2".into()],
        ..Options::default()
    })
    .await
    .unwrap();
    let accepted = "preble:requests_accepted_total";
    let before = snapshot(&cluster, accepted).await;
    let (status, out) = post(
        &cluster.gateway,
        "/v1/completions",
        &request(&cluster.model, 0, 0, 2),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let holder = grew(&cluster, accepted, &before).await;
    assert_eq!(holder.len(), 1);
    let holder = holder[0];

    // Kill the scheduler while requests are in flight, then start a new one.
    let load = (1..17).map(|i| {
        let body = request(&cluster.model, i % 4 + 1, 100 + i, 24);
        let gateway = cluster.gateway.clone();
        tokio::spawn(async move { post(&gateway, "/v1/completions", &body).await })
    });
    let load: Vec<_> = load.collect();
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    cluster.kill_scheduler();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cluster.start_scheduler().unwrap();
    for handle in load {
        let (status, out) = handle.await.unwrap();
        assert_eq!(
            status,
            200,
            "a request was lost across the restart: {out}\n{}",
            cluster.logs()
        );
        assert_eq!(out["usage"]["completion_tokens"], 24);
    }

    // The new scheduler learned every worker's cache from digests: prefix 0 goes home.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while scrape(
        &cluster.scheduler_metrics,
        "preble:scheduler_digests_requested_total",
    )
    .await
    .unwrap_or(0.0)
        < 4.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no digests after the restart"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let hits = "preble:prefix_cache_hit_tokens_total";
    let before = snapshot(&cluster, hits).await;
    let (status, out) = post(
        &cluster.gateway,
        "/v1/completions",
        &request(&cluster.model, 0, 999, 2),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        grew(&cluster, hits, &before).await,
        vec![holder],
        "the known prefix did not go back to its holder\n{}",
        cluster.logs()
    );
    assert!(
        out["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= u64::from(PREFIX_TOKENS)
    );
}

/// Polls the scheduler's count of running requests until it equals `want` (10 s at most).
async fn running_requests_reach(cluster: &TestCluster, want: f64) -> f64 {
    let mut seen = f64::NAN;
    for _ in 0..200 {
        seen = scrape(
            &cluster.scheduler_metrics,
            "preble:scheduler_tree_running_requests",
        )
        .await
        .unwrap();
        if seen == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    seen
}

#[tokio::test]
async fn e2_pins_a_requests_prefix_while_it_runs_and_releases_it_when_done() {
    let cluster = TestCluster::start(Options {
        workers: 2,
        time_scale: 1.0,
        ..Options::default()
    })
    .await
    .unwrap();
    // 150 tokens at real-time sim speed: a few seconds of decoding.
    let body = request(&cluster.model, 0, 0, 150);
    let gateway = cluster.gateway.clone();
    let long = tokio::spawn(async move { post(&gateway, "/v1/completions", &body).await });
    let during = running_requests_reach(&cluster, 1.0).await;
    assert_eq!(during, 1.0, "while it runs\n{}", cluster.logs());
    let (status, out) = long.await.unwrap();
    assert_eq!(status, 200, "{out}");
    let after = running_requests_reach(&cluster, 0.0).await;
    assert_eq!(after, 0.0, "after it finished\n{}", cluster.logs());
}

#[tokio::test]
async fn a_restarted_scheduler_spreads_its_backlog_over_every_worker_it_knew() {
    let mut cluster = TestCluster::start(Options {
        workers: 3,
        time_scale: 0.5,
        ..Options::default()
    })
    .await
    .unwrap();
    // Every worker caches something, so the persisted tree names all three.
    let accepted = "preble:requests_accepted_total";
    for k in 0..6 {
        let (status, out) = post(
            &cluster.gateway,
            "/v1/completions",
            &request(&cluster.model, k, k, 2),
        )
        .await;
        assert_eq!(status, 200, "{out}");
    }
    let warm = snapshot(&cluster, accepted).await;
    assert!(warm.iter().all(|&n| n >= 1.0), "{warm:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // With the scheduler down, a backlog of distinct requests queues up in JetStream.
    cluster.kill_scheduler();
    let backlog: Vec<_> = (0..30)
        .map(|i| {
            let body = request(&cluster.model, 100 + i, 1000 + i, 8);
            let gateway = cluster.gateway.clone();
            tokio::spawn(async move { post(&gateway, "/v1/completions", &body).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.start_scheduler().unwrap();
    for handle in backlog {
        let (status, out) = handle.await.unwrap();
        assert_eq!(status, 200, "{out}\n{}", cluster.logs());
    }
    // The backlog went to every worker the new scheduler knew, not the first that spoke.
    let after = snapshot(&cluster, accepted).await;
    let share: Vec<f64> = after.iter().zip(&warm).map(|(a, b)| a - b).collect();
    assert_eq!(share.iter().sum::<f64>(), 30.0, "{share:?}");
    assert!(
        share.iter().all(|&n| n >= 5.0),
        "the backlog herded: {share:?}\n{}",
        cluster.logs()
    );
}
