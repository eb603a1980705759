//! End to end with the torch engine: gateway + scheduler + 2 torch workers on the project's
//! tiny Llama answer chat requests through the OpenAI API, and a repeated conversation reuses
//! its cached prefix instead of recomputing it.
//!
//! Needs the worker built with the torch engine and `make tiny-model`; `make test-torch` does
//! both.
#![cfg(feature = "torch")]

mod common;

use common::*;
use preble_tests::{TestCluster, tiny_model_dir, torch_options};
use serde_json::json;

#[tokio::test]
async fn torch_workers_answer_chat_and_reuse_cached_prefixes() {
    let c = TestCluster::start(torch_options(2, tiny_model_dir()))
        .await
        .unwrap();
    let body = json!({
        "model": c.model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant who answers questions about the preble scheduler in detail."},
            {"role": "user", "content": "Which worker should serve a request whose prefix is cached?"},
        ],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, first) = post(&c.gateway, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{first}\n{}", c.logs());
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["usage"]["completion_tokens"], 12);
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let text = first["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());

    // Greedy: the same conversation gives the same answer, now from the cached prefix.
    let (status, second) = post(&c.gateway, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["choices"][0]["message"]["content"], text);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= prompt_tokens / 2,
        "the scheduler routed the repeat to the worker holding its prefix: {cached} of {prompt_tokens} cached"
    );

    // The workers computed exactly the uncached prompt tokens and one step per further
    // output token: the cached prefix was read, not recomputed.
    let computed = c.worker_sum("preble:engine_computed_tokens_total").await as u64;
    assert_eq!(computed, prompt_tokens + (prompt_tokens - cached) + 2 * 11);

    // Streaming, sampled with a seed: reproducible.
    let mut sampled = body.clone();
    sampled["temperature"] = json!(0.8);
    sampled["seed"] = json!(42);
    sampled["stream"] = json!(true);
    let (status, a) = stream(&c.gateway, "/v1/chat/completions", &sampled).await;
    assert_eq!(status, 200);
    let (_, b) = stream(&c.gateway, "/v1/chat/completions", &sampled).await;
    assert!(!streamed_text(&a).is_empty());
    assert_eq!(streamed_text(&a), streamed_text(&b));
}

#[tokio::test]
async fn a_greedy_stream_whose_torch_worker_dies_goes_on_on_the_other_exactly() {
    let mut c = TestCluster::start(torch_options(2, tiny_model_dir()))
        .await
        .unwrap();
    let body = json!({
        "model": c.model,
        "prompt": "The scheduler lost a worker in the middle of this answer, and",
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, reference) = post(&c.gateway, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reference}\n{}", c.logs());
    let reference_text = reference["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let (status, events, _) =
        stream_killing_its_worker(&mut c, "/v1/completions", &streaming, 100.0).await;
    assert_eq!(status, 200);
    assert!(error_events(&events).is_empty(), "{events:?}\n{}", c.logs());
    assert_eq!(
        streamed_text(&events),
        reference_text,
        "the other worker computed the shown output as prompt and went on as if undisturbed"
    );
    let metrics = format!("{}/metrics", c.gateway);
    assert_eq!(
        preble_tests::scrape(&metrics, "preble:streams_resumed_total")
            .await
            .unwrap(),
        1.0
    );
}
