//! The workers' prefix caches end to end: reuse shows in usage, cache events reach the
//! scheduler, digests describe the cache exactly, and a malformed digest request is refused
//! without harm.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::post;
use futures::StreamExt;
use preble_protocol::{
    DigestRequest, KvInserted, Subjects, WorkerEvent, WorkerEventBody, decode, encode,
};
use preble_tests::{NATS_URL, Options, TestCluster, scrape, scrape_where};
use serde_json::json;

fn long_prompt(topic: &str, words: usize) -> String {
    (0..words)
        .map(|i| format!("{topic}{}", i % 17))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn a_repeated_prompt_is_served_from_the_prefix_cache() {
    let cluster = TestCluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let prompt = long_prompt("alpha", 120);
    let body = json!({"model": cluster.model, "prompt": prompt, "max_tokens": 4, "seed": 1});
    let (status, first) = post(&cluster.gateway, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (status, second) = post(&cluster.gateway, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{second}");
    let prompt_tokens = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 100);
    // Everything but the last prompt token is reused (it is computed to get the first logits).
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(prompt_tokens - 1)
    );
    assert_eq!(
        first["choices"][0]["text"], second["choices"][0]["text"],
        "reuse does not change the output"
    );
    let hits = cluster
        .worker_sum("preble:prefix_cache_hit_tokens_total")
        .await;
    assert_eq!(hits as u64, prompt_tokens - 1);
}

/// Collects a worker's digest over NATS.
async fn digest(client: &async_nats::Client, subjects: &Subjects, worker: &str) -> Vec<KvInserted> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            subjects.digest(worker),
            inbox,
            encode(&DigestRequest::default()).into(),
        )
        .await
        .unwrap();
    let mut spans = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("the worker answers its digest")
            .expect("subscription open");
        let event: WorkerEvent = decode(&m.payload).unwrap();
        let WorkerEventBody::Digest(part) = event.body else {
            panic!("not a digest: {:?}", event.body);
        };
        spans.extend(part.spans);
        if !part.more {
            return spans;
        }
    }
}

#[tokio::test]
async fn evictions_reach_the_scheduler_and_the_digest_matches_the_cache() {
    let capacity = 700;
    let cluster = TestCluster::start(Options {
        workers: 1,
        worker_args: vec!["--kv-capacity-tokens".into(), capacity.to_string()],
        ..Options::default()
    })
    .await
    .unwrap();
    for topic in [
        "red", "green", "blue", "cyan", "plum", "teal", "gold", "rose",
    ] {
        let body =
            json!({"model": cluster.model, "prompt": long_prompt(topic, 60), "max_tokens": 8});
        let (status, out) = post(&cluster.gateway, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{out}");
    }
    let worker = &cluster.workers[0].metrics_url;
    let evicted_at_worker = scrape_where(worker, "preble:kv_events_total", "kind=\"evicted\"")
        .await
        .unwrap();
    assert!(evicted_at_worker > 0.0, "a small cache must evict");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut same = true;
        for kind in ["kind=\"evicted\"", "kind=\"inserted\""] {
            let sent = scrape_where(worker, "preble:kv_events_total", kind)
                .await
                .unwrap();
            let got = scrape_where(
                &cluster.scheduler_metrics,
                "preble:scheduler_kv_events_total",
                kind,
            )
            .await
            .unwrap();
            same &= sent == got;
        }
        if same {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler did not get every cache event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client = async_nats::connect(NATS_URL).await.unwrap();
    let subjects = Subjects::new(cluster.prefix.clone());
    // A malformed digest request is counted and dropped; the worker keeps answering.
    client
        .publish(subjects.digest("gpu-0"), vec![0xc1, 0xff, 0x00].into())
        .await
        .unwrap();
    let spans = digest(&client, &subjects, "gpu-0").await;
    assert!(
        scrape(worker, "preble:malformed_messages_total")
            .await
            .unwrap()
            >= 1.0
    );
    // Replaying the digest: every span follows a known boundary and its hash is right.
    let mut paths: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut total = 0u64;
    for span in &spans {
        let mut path = if span.parent_hash == preble_prefix::ROOT_HASH {
            Vec::new()
        } else {
            paths
                .get(&span.parent_hash)
                .cloned()
                .expect("parent listed first")
        };
        path.extend_from_slice(&span.tokens);
        assert_eq!(preble_prefix::path_hash(&path), span.path_hash);
        paths.insert(span.path_hash, path);
        total += span.tokens.len() as u64;
    }
    let cached = scrape(worker, "preble:kv_cache_cached_tokens")
        .await
        .unwrap();
    assert_eq!(
        total as f64, cached,
        "the digest holds exactly the cached tokens"
    );
    assert!(total > 0 && total <= capacity);
    // A real worker's events never read as lies, even with a cache small enough to evict.
    assert_eq!(
        scrape(
            &cluster.scheduler_metrics,
            "preble:scheduler_rejected_events_total"
        )
        .await
        .unwrap(),
        0.0
    );
}

/// Runs the same concurrent requests on one worker with `worker_args`; returns each answer's
/// text and finish reason, and the worker's preemption count.
async fn concurrent_answers(worker_args: Vec<String>) -> (Vec<(String, String)>, f64) {
    let cluster = TestCluster::start(Options {
        workers: 1,
        worker_args,
        ..Options::default()
    })
    .await
    .unwrap();
    let requests = (0..12).map(|i| {
        let body = json!({
            "model": cluster.model,
            "prompt": long_prompt(&format!("w{i}x"), 30 + i * 3),
            "max_tokens": 60,
            "seed": i,
        });
        let gateway = cluster.gateway.clone();
        async move { post(&gateway, "/v1/completions", &body).await }
    });
    let answers = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(|(status, out)| {
            assert_eq!(status, 200, "{out}");
            let choice = &out["choices"][0];
            (
                choice["text"].as_str().unwrap().to_string(),
                choice["finish_reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let preemptions = cluster.worker_sum("preble:num_preemptions_total").await;
    (answers, preemptions)
}

#[tokio::test]
async fn an_overcommitted_worker_preempts_and_still_returns_the_same_tokens() {
    let (roomy, roomy_preemptions) = concurrent_answers(vec![]).await;
    let tight_args = ["--kv-capacity-tokens", "420", "--decode-reserve", "0"];
    let (tight, tight_preemptions) =
        concurrent_answers(tight_args.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(roomy_preemptions, 0.0);
    assert!(tight_preemptions > 0.0, "the tight worker must preempt");
    assert_eq!(roomy, tight, "preemption changed an answer");
}
