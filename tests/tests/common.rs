//! HTTP helpers shared by the end-to-end tests.
#![allow(dead_code)]

use futures::StreamExt;
use serde_json::Value;

/// Length of [`shared_prefix`], tokens.
pub const PREFIX_TOKENS: u32 = 400;

/// Shared prefix `k`'s tokens (ids clear of the special tokens 0..5, inside the sim model's
/// 578-token vocabulary): long prefixes the routing tests reuse.
pub fn shared_prefix(k: u32) -> Vec<u32> {
    (0..PREFIX_TOKENS)
        .map(|t| 5 + (k * 977 + t * 13) % 570)
        .collect()
}

/// POSTs JSON; returns the status and the body as JSON.
pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    post_raw(base, path, body.to_string(), None).await
}

/// POSTs a raw body, optionally with a bearer key.
pub async fn post_raw(base: &str, path: &str, body: String, key: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = request.send().await.expect("gateway answers");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json)
}

/// POSTs a streaming request and collects every SSE `data:` payload (the last is `[DONE]`).
pub async fn stream(base: &str, path: &str, body: &Value) -> (u16, Vec<String>) {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
    }
    let data = buffer
        .split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .map(str::to_string)
        })
        .collect();
    (status, data)
}

/// The text of a streamed completion or chat, from its chunks.
pub fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk is JSON"))
        .filter_map(|v| {
            let choice = v["choices"].get(0)?.clone();
            choice["text"]
                .as_str()
                .or_else(|| choice["delta"]["content"].as_str())
                .map(str::to_string)
        })
        .collect()
}

/// The error code of an OpenAI error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

/// Publishes a NATS API request (with `headers`) and waits for its last event (`Done` or
/// `Error`), at most 10 s between events.
pub async fn nats_api_call(
    client: &async_nats::Client,
    subject: String,
    request: &preble_protocol::ApiRequest,
    headers: async_nats::HeaderMap,
) -> preble_protocol::ApiEventBody {
    use preble_protocol::{ApiEvent, ApiEventBody};
    let inbox = client.new_inbox();
    let mut events = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply_and_headers(
            subject,
            inbox,
            headers,
            preble_protocol::encode(request).into(),
        )
        .await
        .expect("publish");
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), events.next())
            .await
            .expect("an answer")
            .expect("subscription open");
        let event: ApiEvent = preble_protocol::decode(&message.payload).expect("an API event");
        if matches!(
            event.body,
            ApiEventBody::Done { .. } | ApiEventBody::Error { .. }
        ) {
            return event.body;
        }
    }
}

/// A worker event as a (possibly forged) worker would publish it.
pub fn worker_event(
    worker: &str,
    seq: u64,
    body: preble_protocol::WorkerEventBody,
) -> preble_protocol::WorkerEvent {
    preble_protocol::WorkerEvent {
        v: preble_protocol::PROTOCOL_VERSION,
        worker_id: worker.into(),
        seq,
        at_ms: 0,
        body,
    }
}

/// A sim worker's heartbeat serving `model` with a cache of `kv_capacity_tokens`.
pub fn heartbeat_body(
    model: &str,
    kv_capacity_tokens: u64,
    period_ms: u64,
) -> preble_protocol::WorkerEventBody {
    preble_protocol::WorkerEventBody::Heartbeat(preble_protocol::Heartbeat {
        models: vec![model.into()],
        engine: "sim".into(),
        profile: "a6000-mistral-7b".into(),
        kv_capacity_tokens,
        period_ms,
    })
}

/// A cached span from the root, true to its hash: 100 tokens numbered from `i * 1000`.
pub fn true_root_span(i: u32) -> preble_protocol::KvInserted {
    let tokens: Vec<u32> = (0..100).map(|t| i * 1000 + t).collect();
    preble_protocol::KvInserted {
        parent_hash: preble_prefix::ROOT_HASH,
        path_hash: preble_prefix::path_hash(&tokens),
        tokens,
    }
}

/// Streams `body` (a streaming request) and kills the worker serving it once it has
/// generated `after_tokens` of it: the first worker whose generated-token count grows that
/// much past where it stood. Returns the stream's status and events, and which worker died.
pub async fn stream_killing_its_worker(
    c: &mut preble_tests::TestCluster,
    path: &'static str,
    body: &Value,
    after_tokens: f64,
) -> (u16, Vec<String>, usize) {
    let before = futures::future::join_all(
        c.workers
            .iter()
            .map(|w| preble_tests::scrape(&w.metrics_url, "preble:generation_tokens_total")),
    )
    .await;
    let gateway = c.gateway.clone();
    let request = body.clone();
    let streaming = tokio::spawn(async move { stream(&gateway, path, &request).await });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let busy = 'found: loop {
        for (i, worker) in c.workers.iter().enumerate() {
            let now = preble_tests::scrape(&worker.metrics_url, "preble:generation_tokens_total")
                .await
                .unwrap_or(0.0);
            let was = before.get(i).and_then(|b| b.as_ref().ok()).copied();
            if now - was.unwrap_or(0.0) >= after_tokens {
                break 'found i;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no worker generated {after_tokens} tokens; logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    c.workers[busy].kill();
    let (status, events) = tokio::time::timeout(std::time::Duration::from_secs(60), streaming)
        .await
        .expect("the stream ends")
        .expect("the streaming task");
    (status, events, busy)
}

/// The error events of a stream.
pub fn error_events(events: &[String]) -> Vec<&String> {
    events.iter().filter(|e| e.contains("\"error\"")).collect()
}
