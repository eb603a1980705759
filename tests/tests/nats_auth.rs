//! End to end on a NATS server of the test's own, configured by `preble-nats-auth`: every
//! service has its own identity, anonymous clients are refused, and a client holding one
//! worker's credentials can act only as that worker.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use preble_protocol::roles::Role;
use preble_protocol::{Cancel, Subjects, encode};
use preble_tests::{Options, TestCluster, scrape};
use serde_json::json;
use tokio::sync::mpsc;

async fn authenticated_cluster() -> TestCluster {
    TestCluster::start(Options {
        workers: 2,
        time_scale: 0.2,
        auth: true,
        ..Options::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_stack_serves_with_its_own_identities_and_refuses_anonymous_clients() {
    let c = authenticated_cluster().await;
    let nats = c.nats.as_ref().unwrap();
    let (status, body) = post(
        &c.gateway,
        "/v1/chat/completions",
        &json!({"model": c.model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    let (status, events) = stream(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "stream me", "max_tokens": 4, "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(!streamed_text(&events).is_empty(), "{events:?}");

    let anonymous = async_nats::ConnectOptions::new()
        .connect(nats.url.as_str())
        .await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    let (user, _) = nats.user_of("gateway.env").unwrap();
    let wrong = async_nats::ConnectOptions::with_user_and_password(user, "guess".into())
        .connect(nats.url.as_str())
        .await;
    assert!(wrong.is_err(), "a wrong password was let in");
}

/// A client with worker `gpu-0`'s credentials, and the server's permission errors it gets.
async fn as_worker_zero(c: &TestCluster) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let nats = c.nats.as_ref().unwrap();
    let (user, password) = nats.user_of("worker-gpu-0.env").unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user, password)
        .custom_inbox_prefix(Role::Worker("gpu-0".into()).inbox_prefix())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(nats.url.as_str())
        .await
        .unwrap();
    (client, rx)
}

fn heartbeat(worker: &str, seq: u64) -> preble_protocol::WorkerEvent {
    worker_event(worker, seq, heartbeat_body("anything", 1_000_000, 100))
}

/// Waits until a permission error naming `subject` has arrived.
async fn violation_for(
    errors: &mut mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    subject: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if seen
            .iter()
            .any(|e| e.contains("Permissions Violation") && e.contains(subject))
        {
            return;
        }
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(e)) => seen.push(e),
            _ => panic!("no permission violation for {subject}; errors seen: {seen:?}"),
        }
    }
}

#[tokio::test]
async fn a_worker_identity_can_act_only_as_itself() {
    let c = authenticated_cluster().await;
    let s = Subjects::new(&c.prefix);
    let (attacker, mut errors) = as_worker_zero(&c).await;
    let mut seen = Vec::new();

    // It can read no request's stream: subscribing is refused, and nothing arrives while a
    // request streams.
    let mut streams = attacker.subscribe(s.all_streams()).await.unwrap();
    attacker.flush().await.unwrap();
    violation_for(&mut errors, &mut seen, &s.all_streams()).await;

    // It cannot register another worker, nor speak as gpu-1.
    for worker in ["ghost", "gpu-1"] {
        attacker
            .publish(s.events(worker), encode(&heartbeat(worker, 1)).into())
            .await
            .unwrap();
        attacker.flush().await.unwrap();
        violation_for(&mut errors, &mut seen, &s.events(worker)).await;
    }
    // It cannot dispatch to another worker, cancel, or write into another worker's streams.
    attacker
        .publish(s.worker("gpu-1"), "dispatch".into())
        .await
        .unwrap();
    let cancel = Cancel::new("anything", "attack");
    attacker
        .publish(s.cancel(), encode(&cancel).into())
        .await
        .unwrap();
    attacker
        .publish(s.stream_from("gpu-1", "anything"), "x".into())
        .await
        .unwrap();
    attacker.flush().await.unwrap();
    violation_for(&mut errors, &mut seen, &s.worker("gpu-1")).await;
    violation_for(&mut errors, &mut seen, &s.cancel()).await;
    violation_for(&mut errors, &mut seen, &s.stream_from("gpu-1", "anything")).await;

    // On its own subject, a body naming another worker is a lie the scheduler drops.
    attacker
        .publish(s.events("gpu-0"), encode(&heartbeat("ghost", 1)).into())
        .await
        .unwrap();
    attacker.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while scrape(
        &c.scheduler_metrics,
        "preble:scheduler_rejected_events_total",
    )
    .await
    .unwrap()
        < 1.0
    {
        assert!(std::time::Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The cluster still has exactly its two workers and serves; the attacker saw no stream.
    for i in 0..4 {
        let (status, body) = post(
            &c.gateway,
            "/v1/completions",
            &json!({"model": c.model, "prompt": format!("request {i}"), "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let live = scrape(&c.scheduler_metrics, "preble:scheduler_live_workers")
        .await
        .unwrap();
    assert_eq!(live, 2.0);
    let leaked = tokio::time::timeout(Duration::from_millis(300), streams.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "the attacker read a stream: {leaked:?}"
    );
}

#[tokio::test]
async fn the_stack_runs_on_a_nats_that_requires_tls() {
    let c = TestCluster::start(Options {
        workers: 1,
        auth: true,
        nats_tls: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let nats = c.nats.as_ref().unwrap();
    assert!(nats.url.starts_with("tls://"), "{}", nats.url);
    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "over TLS", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    // The right password without trusting the server's CA gets nowhere.
    let (user, password) = nats.user_of("client.env").unwrap();
    let untrusting = async_nats::ConnectOptions::with_user_and_password(user, password)
        .connect(nats.url.as_str())
        .await;
    assert!(
        untrusting.is_err(),
        "connected without verifying the server"
    );
    // The API client identity, over TLS, is answered.
    let client = nats.connect_as("client.env", "_INBOX").await.unwrap();
    let mut request = preble_protocol::ApiRequest::completion(&c.model, "hello");
    request.max_tokens = Some(2);
    let subject = Subjects::new(&c.prefix).api_generate();
    let answer = nats_api_call(&client, subject, &request, async_nats::HeaderMap::new()).await;
    assert!(
        matches!(answer, preble_protocol::ApiEventBody::Done { .. }),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_nats_outage_drops_no_worker_and_fails_no_request_sent_during_it() {
    let mut c = TestCluster::start(Options {
        workers: 2,
        auth: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let live = || scrape(&c.scheduler_metrics, "preble:scheduler_live_workers");
    assert_eq!(live().await.unwrap(), 2.0);
    // Down for 6 s: twenty heartbeat allowances (workers beat every 100 ms, dead after 3
    // missed), and longer than JetStream's 5 s wait for a confirmation.
    let metrics = c.scheduler_metrics.clone();
    let watch = tokio::spawn(async move {
        let mut lowest = f64::MAX;
        let until = std::time::Instant::now() + Duration::from_secs(11);
        while std::time::Instant::now() < until {
            if let Ok(n) = scrape(&metrics, "preble:scheduler_live_workers").await {
                lowest = lowest.min(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lowest
    });
    // Requests sent while NATS is down wait for it (within the gateway's submit budget).
    let during: Vec<_> = (0..4)
        .map(|i| {
            let gateway = c.gateway.clone();
            let body = json!({"model": c.model, "prompt": format!("during {i}"), "max_tokens": 3});
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                post(&gateway, "/v1/completions", &body).await
            })
        })
        .collect();
    c.nats
        .as_mut()
        .unwrap()
        .restart(Duration::from_secs(6))
        .await
        .unwrap();
    for request in during {
        let (status, body) = request.await.unwrap();
        assert_eq!(
            status,
            200,
            "a request sent during the outage failed: {body}\n{}",
            c.logs()
        );
    }
    let lowest = watch.await.unwrap();
    assert_eq!(
        lowest,
        2.0,
        "the scheduler declared workers dead while it was itself cut off\n{}",
        c.logs()
    );
    // And once NATS is back, the stack serves again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = post(
            &c.gateway,
            "/v1/completions",
            &json!({"model": c.model, "prompt": "after the outage", "max_tokens": 3}),
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{status}: {body}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn streams_in_flight_through_a_nats_outage_end_as_if_undisturbed() {
    let mut c = TestCluster::start(Options {
        workers: 2,
        time_scale: 1.0,
        auth: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let max_tokens = 400;
    let bodies: Vec<serde_json::Value> = (0..6)
        .map(|i| {
            json!({"model": c.model, "prompt": format!("A story told through an outage, part {i}"),
                   "max_tokens": max_tokens, "temperature": 0.8, "seed": i})
        })
        .collect();
    let undisturbed = futures::future::join_all(
        bodies
            .iter()
            .map(|body| post(&c.gateway, "/v1/completions", body)),
    )
    .await;
    let generated_before = c.worker_sum("preble:generation_tokens_total").await;
    let streams: Vec<_> = bodies
        .iter()
        .map(|body| {
            let gateway = c.gateway.clone();
            let mut body = body.clone();
            body["stream"] = json!(true);
            tokio::spawn(async move { stream(&gateway, "/v1/completions", &body).await })
        })
        .collect();
    // Every stream is under way (a few dozen tokens each) when NATS goes down for 4 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.worker_sum("preble:generation_tokens_total").await < generated_before + 6.0 * 30.0 {
        assert!(std::time::Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "streams outlast the outage"
    );
    c.nats
        .as_mut()
        .unwrap()
        .restart(Duration::from_secs(4))
        .await
        .unwrap();
    for (stream, (status, reference)) in streams.into_iter().zip(undisturbed) {
        assert_eq!(status, 200, "{reference}");
        let (status, events) = tokio::time::timeout(Duration::from_secs(60), stream)
            .await
            .expect("the stream ends")
            .unwrap();
        assert_eq!(status, 200);
        assert!(
            error_events(&events).is_empty(),
            "a stream failed: {events:?}\n{}",
            c.logs()
        );
        assert_eq!(
            streamed_text(&events),
            reference["choices"][0]["text"].as_str().unwrap(),
            "every stream whole, as if undisturbed"
        );
    }
}
