//! End to end: every kind of bad input gets a clear error and the services keep serving.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use preble_protocol::{StreamMessage, Subjects, decode, encode};
use preble_tests::{Options, TestCluster, scrape};
use serde_json::json;

#[tokio::test]
async fn malformed_and_invalid_http_requests_get_openai_errors() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let (status, body) = post_raw(&c.gateway, "/v1/completions", "{not json".into(), None).await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "x", "max_tokens": "ten"}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    assert_eq!(body["error"]["param"], "max_tokens");

    let (status, body) = post(
        &c.gateway,
        "/v1/chat/completions",
        &json!({"model": c.model}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    assert_eq!(body["error"]["param"], "messages");

    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": "gpt-9", "prompt": "x"}),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "model_not_found"));

    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "x", "max_tokens": 40000}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "context_length_exceeded"));

    let (status, body) = post(
        &c.gateway,
        "/v1/chat/completions",
        &json!({"model": c.model, "messages": [{"role": "user", "content": "x"}], "n": 2}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    assert_eq!(body["error"]["param"], "n");

    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": [1, 99999999]}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));

    // Still serving.
    let (status, _) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn no_live_worker_is_overloaded_after_a_bounded_wait() {
    let c = TestCluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!((status, code(&body)), (503, "overloaded"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Streaming requests get the status too, not a broken stream.
    let (status, _) = stream(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "x", "max_tokens": 2, "stream": true}),
    )
    .await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn api_keys_are_enforced_when_configured() {
    let c = TestCluster::start(Options {
        gateway_env: vec![("PREBLE_API_KEYS".into(), "k1,k2".into())],
        ..Options::default()
    })
    .await
    .unwrap();
    let body = json!({"model": c.model, "prompt": "x", "max_tokens": 2}).to_string();
    let (status, err) = post_raw(&c.gateway, "/v1/completions", body.clone(), None).await;
    assert_eq!((status, code(&err)), (401, "invalid_api_key"));
    let (status, _) = post_raw(&c.gateway, "/v1/completions", body.clone(), Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = post_raw(&c.gateway, "/v1/completions", body, Some("k2")).await;
    assert_eq!(status, 200);
    let models = reqwest::get(format!("{}/v1/models", c.gateway))
        .await
        .unwrap();
    assert_eq!(models.status().as_u16(), 401);
    let health = reqwest::get(format!("{}/health", c.gateway)).await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "health needs no key");
}

#[tokio::test]
async fn malformed_nats_messages_are_logged_answered_and_survived() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let client = async_nats::connect(preble_tests::NATS_URL).await.unwrap();
    let s = Subjects::new(&c.prefix);
    // The requests stream: dropped (nobody to answer), the scheduler keeps routing.
    let js = async_nats::jetstream::new(client.clone());
    js.publish(s.requests(), "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A worker's dispatch subject: answered with a rejection.
    let reply = client
        .request(s.worker("gpu-0"), "garbage".into())
        .await
        .unwrap();
    let reply: preble_protocol::DispatchReply = decode(&reply.payload).unwrap();
    assert!(matches!(
        reply.outcome,
        preble_protocol::DispatchOutcome::Rejected {
            code: preble_protocol::ErrorCode::InvalidRequest,
            ..
        }
    ));
    // A resumed request whose "already generated" output is its whole prompt: refused.
    let mut resumed = preble_protocol::GenerateRequest::new(
        "forged-resume".into(),
        c.model.clone(),
        vec![7, 8, 9],
        preble_protocol::SamplingParams::default(),
        "forged-resume".into(),
    );
    resumed.resumed_tokens = 3;
    let dispatch = preble_protocol::Dispatch {
        v: preble_protocol::PROTOCOL_VERSION,
        request: resumed,
        attempt: 1,
        expected_cached_tokens: 0,
    };
    let reply = client
        .request(s.worker("gpu-0"), encode(&dispatch).into())
        .await
        .unwrap();
    let reply: preble_protocol::DispatchReply = decode(&reply.payload).unwrap();
    match reply.outcome {
        preble_protocol::DispatchOutcome::Rejected { code, message, .. } => {
            assert_eq!(code, preble_protocol::ErrorCode::InvalidRequest);
            assert!(message.contains("resumed_tokens"), "{message}");
        }
        other => panic!("accepted a resume with no prompt: {other:?}"),
    }
    // Events, cancellations, a token stream nobody asked for.
    client
        .publish(s.events("gpu-0"), "garbage".into())
        .await
        .unwrap();
    client.publish(s.cancel(), "garbage".into()).await.unwrap();
    client.flush().await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scrape(
        &c.scheduler_metrics,
        "preble:scheduler_malformed_messages_total",
    )
    .await
    .unwrap()
        < 2.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "scheduler did not see both malformed messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.worker_sum("preble:malformed_messages_total").await >= 2.0);
    for _ in 0..3 {
        let (status, _) = post(
            &c.gateway,
            "/v1/completions",
            &json!({"model": c.model, "prompt": "still there?", "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn every_request_of_a_dead_worker_is_served_by_another() {
    // One request at a time per worker, so a worker holds queued requests it has not started
    // beside the one it runs.
    let mut c = TestCluster::start(Options {
        workers: 2,
        time_scale: 0.5,
        worker_args: vec!["--max-running".into(), "1".into()],
        ..Options::default()
    })
    .await
    .unwrap();
    let sent = 8;
    let max_tokens = 30;
    // A long shared prefix: E2 sends them all to the worker that got the first one.
    let shared = "You are a careful assistant that answers questions about the queue. ".repeat(8);
    let mut requests = Vec::new();
    for i in 0..sent {
        let gateway = c.gateway.clone();
        let body = json!({"model": c.model, "prompt": format!("{shared} request {i}"), "max_tokens": max_tokens, "ignore_eos": true});
        requests.push(tokio::spawn(async move {
            post(&gateway, "/v1/completions", &body).await
        }));
    }
    // Kill the first worker seen generating (its other requests wait behind that one).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let busy = 'found: loop {
        for (i, worker) in c.workers.iter().enumerate() {
            let generated = scrape(&worker.metrics_url, "preble:generation_tokens_total")
                .await
                .unwrap_or(0.0);
            if generated >= 1.0 {
                break 'found i;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.workers[busy].kill();
    for request in requests {
        let (status, body) = tokio::time::timeout(Duration::from_secs(30), request)
            .await
            .unwrap()
            .unwrap();
        // The one the lost worker had started resumed on the other worker.
        assert_eq!(status, 200, "{body}\n{}", c.logs());
        assert_eq!(body["usage"]["completion_tokens"], max_tokens, "{body}");
    }
    // The one it ran and at least one waiting on it were queued again.
    let metrics = format!("{}/metrics", c.gateway);
    let resubmitted = scrape(&metrics, "preble:requests_resubmitted_total")
        .await
        .unwrap();
    assert!(resubmitted >= 2.0, "{resubmitted} resubmitted");
}

#[tokio::test]
async fn stray_foreign_and_duplicate_stream_messages_do_not_change_what_the_client_gets() {
    let c = TestCluster::start(Options {
        workers: 1,
        time_scale: 1.0,
        ..Options::default()
    })
    .await
    .unwrap();
    let body =
        json!({"model": c.model, "prompt": "A stream under attack", "max_tokens": 40, "seed": 5});
    let (status, reference) = post(&c.gateway, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reference}");
    let reference = reference["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();

    // Watch every token stream; on the first message of the next request, inject: garbage
    // bytes, a well-formed message for another request, and a replay of the message itself
    // (a duplicate seq), all on that request's stream subject.
    let s = Subjects::new(&c.prefix);
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let mut watch = client.subscribe(s.all_streams()).await.unwrap();
    client.flush().await.unwrap();
    let injector = {
        let client = client.clone();
        tokio::spawn(async move {
            let first = watch.next().await.expect("a stream message");
            let message: StreamMessage = decode(&first.payload).unwrap();
            let subject = first.subject.to_string();
            client
                .publish(subject.clone(), "garbage".into())
                .await
                .unwrap();
            let mut foreign = message.clone();
            foreign.request_id = "someone-else".into();
            foreign.seq = message.seq + 1;
            client
                .publish(subject.clone(), encode(&foreign).into())
                .await
                .unwrap();
            client
                .publish(subject, encode(&message).into())
                .await
                .unwrap();
            client.flush().await.unwrap();
        })
    };
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let (status, events) = stream(&c.gateway, "/v1/completions", &streaming).await;
    injector.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        streamed_text(&events),
        reference,
        "every token once, in order, none of the injected ones"
    );
    let metrics = format!("{}/metrics", c.gateway);
    assert!(
        scrape(&metrics, "preble:malformed_messages_total")
            .await
            .unwrap()
            >= 2.0,
        "garbage and the foreign message are counted"
    );
    assert!(
        scrape(&metrics, "preble:duplicate_stream_messages_total")
            .await
            .unwrap()
            >= 1.0,
        "the replay is counted as a duplicate"
    );
}

#[tokio::test]
async fn lying_and_anonymous_worker_events_leave_the_scheduler_routing() {
    use preble_protocol::{KvInserted, WorkerEventBody};
    let c = TestCluster::start(Options::default()).await.unwrap();
    let client = async_nats::connect(preble_tests::NATS_URL).await.unwrap();
    let s = Subjects::new(&c.prefix);
    let true_span = true_root_span(1);
    let lie = |worker: &str, seq: u64| {
        let forged = KvInserted {
            path_hash: true_span.path_hash ^ 0xdead,
            ..true_span.clone()
        };
        worker_event(worker, seq, WorkerEventBody::KvInserted(forged))
    };
    // A path hash that does not match its tokens, from a live worker (this once panicked a
    // debug scheduler), and the same from a worker that never announced itself.
    for seq in [1_000_000, 1_000_001] {
        client
            .publish(s.events("gpu-0"), encode(&lie("gpu-0", seq)).into())
            .await
            .unwrap();
    }
    client
        .publish(s.events("ghost"), encode(&lie("ghost", 1)).into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rejected = scrape(
            &c.scheduler_metrics,
            "preble:scheduler_rejected_events_total",
        )
        .await
        .unwrap();
        let unknown = scrape(
            &c.scheduler_metrics,
            "preble:scheduler_unknown_worker_events_total",
        )
        .await
        .unwrap();
        if rejected >= 1.0 && unknown >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rejected {rejected}, unknown {unknown}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..3 {
        let (status, body) = post(
            &c.gateway,
            "/v1/completions",
            &json!({"model": c.model, "prompt": format!("after the lie {i}"), "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200, "{body}\n{}", c.logs());
    }
}

#[tokio::test]
async fn a_digest_larger_than_its_worker_can_hold_is_refused() {
    use preble_protocol::{Digest, WorkerEventBody};
    let c = TestCluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await
    .unwrap();
    let client = async_nats::connect(preble_tests::NATS_URL).await.unwrap();
    let s = Subjects::new(&c.prefix);
    let event = |seq: u64, body: WorkerEventBody| worker_event("liar", seq, body);
    // A worker that claims a 100-token cache, then answers its digest request with 5,000
    // tokens of spans that are each well-formed.
    let mut digests = client.subscribe(s.digest("liar")).await.unwrap();
    client.flush().await.unwrap();
    client
        .publish(
            s.events("liar"),
            encode(&event(1, heartbeat_body(&c.model, 100, 100_000))).into(),
        )
        .await
        .unwrap();
    let asked = tokio::time::timeout(Duration::from_secs(10), digests.next())
        .await
        .expect("the scheduler asks for a digest")
        .unwrap();
    let spans = (0..50u32).map(true_root_span).collect();
    let answer = event(2, WorkerEventBody::Digest(Digest { spans, more: false }));
    client
        .publish(asked.reply.unwrap(), encode(&answer).into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let tokens = scrape(&c.scheduler_metrics, "preble:scheduler_tree_tokens")
            .await
            .unwrap();
        assert_eq!(
            tokens,
            0.0,
            "the oversized digest was applied\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.logs().contains("more than the worker can hold"),
        "{}",
        c.logs()
    );
}

#[tokio::test]
async fn a_worker_claiming_more_than_its_cache_holds_loses_its_picture() {
    use preble_protocol::WorkerEventBody;
    let c = TestCluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await
    .unwrap();
    let client = async_nats::connect(preble_tests::NATS_URL).await.unwrap();
    let s = Subjects::new(&c.prefix);
    let event = |seq: u64, body: WorkerEventBody| worker_event("braggart", seq, body);
    client
        .publish(
            s.events("braggart"),
            encode(&event(1, heartbeat_body(&c.model, 100, 100_000))).into(),
        )
        .await
        .unwrap();
    // Well-formed spans, each true to its hash, 1,000 tokens in all: ten times its cache.
    for i in 0..10u32 {
        let span = true_root_span(i);
        client
            .publish(
                s.events("braggart"),
                encode(&event(2 + u64::from(i), WorkerEventBody::KvInserted(span))).into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rejected = scrape(
            &c.scheduler_metrics,
            "preble:scheduler_rejected_events_total",
        )
        .await
        .unwrap();
        let tokens = scrape(&c.scheduler_metrics, "preble:scheduler_tree_tokens")
            .await
            .unwrap();
        // The claims past twice its capacity were refused and its picture dropped.
        if rejected >= 1.0 && tokens <= 200.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rejected {rejected}, tree tokens {tokens}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
