//! A stream survives its worker: when the worker serving a stream is lost after the client saw
//! output, the gateway queues the rest as a new attempt whose prompt ends with the tokens
//! already shown, and the client sees one uninterrupted stream, byte for byte what an
//! undisturbed run gives. Attempts are capped.

mod common;

use common::*;
use futures::StreamExt;
use preble_protocol::{ErrorCode, StreamBody, StreamMessage, Subjects, decode, encode};
use preble_tests::{Options, TestCluster, scrape, scrape_where};
use serde_json::{Value, json};

/// A seeded, sampled completion long enough to be cut in the middle.
fn long_completion(model: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "prompt": "Tell the story of a scheduler that lost a GPU in the middle of a sentence.",
        "max_tokens": max_tokens,
        "temperature": 0.9,
        "seed": 11,
    })
}

/// The same request, streamed with its usage at the end.
fn streamed(body: &Value) -> Value {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// The usage chunk of a stream (sent last, with `include_usage`).
fn streamed_usage(events: &[String]) -> Value {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .unwrap_or_else(|| panic!("no usage chunk: {events:?}"))
}

/// The finish reason a stream ended with.
fn streamed_finish(events: &[String]) -> Option<String> {
    events
        .iter()
        .rev()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| {
            v["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        })
}

/// The completion's undisturbed answer, and its text.
async fn undisturbed(c: &TestCluster, body: &Value) -> (Value, String) {
    let (status, reference) = post(&c.gateway, "/v1/completions", body).await;
    assert_eq!(status, 200, "{reference}");
    let text = reference["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    (reference, text)
}

#[tokio::test]
async fn a_stream_whose_worker_dies_goes_on_on_another_worker_byte_for_byte() {
    let mut c = TestCluster::start(Options {
        workers: 2,
        time_scale: 0.2,
        ..Options::default()
    })
    .await
    .unwrap();
    let body = long_completion(&c.model, 300);
    let (reference, reference_text) = undisturbed(&c, &body).await;

    let (status, events, _) =
        stream_killing_its_worker(&mut c, "/v1/completions", &streamed(&body), 40.0).await;
    assert_eq!(status, 200);
    assert!(error_events(&events).is_empty(), "{events:?}\n{}", c.logs());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        streamed_text(&events),
        reference_text,
        "one stream, as if undisturbed"
    );
    assert_eq!(streamed_finish(&events).as_deref(), Some("length"));
    let usage = streamed_usage(&events);
    assert_eq!(usage["completion_tokens"], 300, "{usage}");
    assert_eq!(
        usage["prompt_tokens"], reference["usage"]["prompt_tokens"],
        "the original prompt, not the resumed one"
    );
    let metrics = format!("{}/metrics", c.gateway);
    assert_eq!(
        scrape(&metrics, "preble:streams_resumed_total")
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn a_stream_whose_only_worker_dies_ends_with_an_error_event() {
    let mut c = TestCluster::start(Options {
        workers: 1,
        time_scale: 0.2,
        ..Options::default()
    })
    .await
    .unwrap();
    let body = streamed(&long_completion(&c.model, 3000));
    let (status, events, _) =
        stream_killing_its_worker(&mut c, "/v1/completions", &body, 3.0).await;
    assert_eq!(status, 200);
    let errors = error_events(&events);
    assert_eq!(errors.len(), 1, "{events:?}");
    assert!(
        errors[0].contains("no live worker"),
        "the resumed attempt found nobody to serve it: {}",
        errors[0]
    );
    assert!(
        !streamed_text(&events).is_empty(),
        "output came before the error"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

/// Plays a worker declared lost: after the first tokens of each of the next `forgeries`
/// attempts (each on its own stream subject), publishes `worker_lost` on that subject. Returns
/// once it is listening.
async fn forge_worker_lost(
    client: async_nats::Client,
    subjects: Subjects,
    forgeries: usize,
) -> tokio::task::JoinHandle<()> {
    let mut watch = client.subscribe(subjects.all_streams()).await.unwrap();
    client.flush().await.unwrap();
    tokio::spawn(async move {
        let mut forged: Vec<String> = Vec::new();
        while forged.len() < forgeries {
            let Some(message) = watch.next().await else {
                break;
            };
            let subject = message.subject.to_string();
            let Ok(m) = decode::<StreamMessage>(&message.payload) else {
                continue;
            };
            if forged.contains(&subject) || !matches!(m.body, StreamBody::Tokens { .. }) {
                continue;
            }
            let lost = StreamMessage {
                body: StreamBody::Error {
                    code: ErrorCode::WorkerLost,
                    message: "forged".into(),
                },
                ..m
            };
            client
                .publish(subject.clone(), encode(&lost).into())
                .await
                .unwrap();
            client.flush().await.unwrap();
            forged.push(subject);
        }
    })
}

/// On one worker: the undisturbed output of a request, then the same request streamed while
/// the first `forgeries` of its attempts are declared lost.
async fn stream_with_forged_losses(forgeries: usize) -> (TestCluster, String, Vec<String>) {
    let c = TestCluster::start(Options {
        workers: 1,
        time_scale: 0.5,
        ..Options::default()
    })
    .await
    .unwrap();
    let body = long_completion(&c.model, 120);
    let (_, reference_text) = undisturbed(&c, &body).await;
    let client = async_nats::connect(c.nats_url.as_str()).await.unwrap();
    let forger = forge_worker_lost(client, Subjects::new(&c.prefix), forgeries).await;
    let (status, events) = stream(&c.gateway, "/v1/completions", &streamed(&body)).await;
    forger.abort();
    assert_eq!(status, 200);
    (c, reference_text, events)
}

#[tokio::test]
async fn each_resumed_attempt_continues_exactly_and_the_lost_ones_are_cancelled() {
    let (c, reference_text, events) = stream_with_forged_losses(2).await;
    assert!(error_events(&events).is_empty(), "{events:?}");
    assert_eq!(streamed_text(&events), reference_text);
    assert_eq!(streamed_usage(&events)["completion_tokens"], 120);
    let metrics = format!("{}/metrics", c.gateway);
    let resumed = scrape(&metrics, "preble:streams_resumed_total").await;
    assert_eq!(resumed.unwrap(), 2.0, "two attempts were declared lost");
    // The worker, alive all along, was told to stop each attempt declared lost.
    let worker = &c.workers[0].metrics_url;
    let cancelled = scrape_where(worker, "preble:request_finished_total", "cancelled")
        .await
        .unwrap();
    assert_eq!(cancelled, 2.0, "{}", c.logs());
}

#[tokio::test]
async fn a_stream_that_loses_a_third_worker_ends_with_worker_lost() {
    let (_c, reference_text, events) = stream_with_forged_losses(3).await;
    let errors = error_events(&events);
    assert_eq!(errors.len(), 1, "{events:?}");
    assert!(errors[0].contains("worker_lost"), "{}", errors[0]);
    assert!(errors[0].contains("3 times in all"), "{}", errors[0]);
    let shown = streamed_text(&events);
    assert!(
        reference_text.starts_with(&shown) && !shown.is_empty(),
        "what was shown is the undisturbed output's beginning: {shown:?}"
    );
}
