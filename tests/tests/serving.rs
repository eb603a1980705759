//! End to end: completions and chat, streaming and not, many concurrent streams, stop
//! conditions, cancellation on disconnect, the NATS API.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use preble_protocol::{ApiEvent, ApiEventBody, ApiRequest, FinishReason, Subjects, decode, encode};
use preble_tests::{Options, TestCluster, scrape};
use serde_json::{Value, json};

#[tokio::test]
async fn completions_stream_the_same_tokens_as_non_streaming() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let body = json!({"model": c.model, "prompt": "The capital of France is", "max_tokens": 12, "seed": 7});
    let (status, full) = post(&c.gateway, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "text_completion");
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    assert_eq!(full["usage"]["completion_tokens"], 12);
    assert!(full["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (status, events) = stream(&c.gateway, "/v1/completions", &streaming).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        streamed_text(&events),
        text,
        "same seed, same tokens, in order, once"
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let finish: Value = serde_json::from_str(&events[events.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");

    // A different seed gives a different continuation.
    let mut other = body.clone();
    other["seed"] = json!(8);
    let (_, other) = post(&c.gateway, "/v1/completions", &other).await;
    assert_ne!(other["choices"][0]["text"].as_str().unwrap(), text);
}

#[tokio::test]
async fn chat_applies_the_template_and_streams_deltas() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let body = json!({
        "model": c.model,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 5,
        "seed": 1,
    });
    let (status, full) = post(&c.gateway, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["choices"][0]["message"]["role"], "assistant");
    // "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert!(full["usage"]["prompt_tokens"].as_u64().unwrap() >= 10);
    let mut s = body.clone();
    s["stream"] = json!(true);
    let (status, events) = stream(&c.gateway, "/v1/chat/completions", &s).await;
    assert_eq!(status, 200);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        streamed_text(&events),
        full["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn two_hundred_concurrent_streams_over_four_workers_all_complete_exactly() {
    let c = TestCluster::start(Options {
        workers: 4,
        ..Options::default()
    })
    .await
    .unwrap();
    let requests = (0..200).map(|i| {
        let gateway = c.gateway.clone();
        let model = c.model.clone();
        async move {
            let body = json!({"model": model, "prompt": format!("request number {i} asks a question"), "max_tokens": 10, "seed": i, "stream": true, "stream_options": {"include_usage": true}});
            let (status, events) = stream(&gateway, "/v1/completions", &body).await;
            assert_eq!(status, 200);
            let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
            assert_eq!(usage["usage"]["completion_tokens"], 10, "request {i}");
            (i, streamed_text(&events))
        }
    });
    let streamed = futures::future::join_all(requests).await;
    // Every stream carried exactly the tokens of the same request made without streaming.
    for (i, text) in streamed.iter().step_by(10) {
        let body = json!({"model": c.model, "prompt": format!("request number {i} asks a question"), "max_tokens": 10, "seed": i});
        let (_, full) = post(&c.gateway, "/v1/completions", &body).await;
        assert_eq!(
            &full["choices"][0]["text"].as_str().unwrap(),
            text,
            "request {i}"
        );
    }
    // All four workers took part.
    for w in &c.workers {
        let n = scrape(&w.metrics_url, "preble:requests_accepted_total")
            .await
            .unwrap();
        assert!(n >= 10.0, "{} served only {n}", w.id);
    }
}

#[tokio::test]
async fn stop_token_ids_and_stop_strings_end_generation() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let body = json!({"model": c.model, "prompt": [40, 41, 42, 43], "max_tokens": 8, "seed": 3, "stream": true});
    let (_, events) = stream(&c.gateway, "/v1/completions", &body).await;
    assert!(events.len() >= 3);
    // Find the third token through the NATS API, which reports token ids.
    let client = async_nats::connect(preble_tests::NATS_URL).await.unwrap();
    let subjects = Subjects::new(&c.prefix);
    let mut request = ApiRequest::completion(&c.model, "");
    request.prompt = None;
    request.prompt_tokens = Some(vec![40, 41, 42, 43]);
    request.max_tokens = Some(8);
    request.seed = Some(3);
    let events = nats_generate(&client, &subjects, &request).await;
    let ids: Vec<u32> = events
        .iter()
        .filter_map(|e| match &e.body {
            ApiEventBody::Delta { token_ids, .. } => Some(token_ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(ids.len(), 8);
    let third = ids[2];
    let first_of_third = ids.iter().position(|&t| t == third).unwrap();
    let body = json!({"model": c.model, "prompt": [40, 41, 42, 43], "max_tokens": 8, "seed": 3, "stop_token_ids": [third]});
    let (status, full) = post(&c.gateway, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["choices"][0]["finish_reason"], "stop");
    assert_eq!(full["usage"]["completion_tokens"], first_of_third + 1);

    // A stop string: take a piece of the deterministic output and stop on it.
    let body = json!({"model": c.model, "prompt": "stop strings", "max_tokens": 16, "seed": 5});
    let (_, full) = post(&c.gateway, "/v1/completions", &body).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    for streaming in [false, true] {
        let body = json!({"model": c.model, "prompt": "stop strings", "max_tokens": 16, "seed": 5, "stop": [stop], "stream": streaming});
        let got = if streaming {
            let (_, events) = stream(&c.gateway, "/v1/completions", &body).await;
            let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
            assert_eq!(last["choices"][0]["finish_reason"], "stop");
            streamed_text(&events)
        } else {
            let (_, full) = post(&c.gateway, "/v1/completions", &body).await;
            assert_eq!(full["choices"][0]["finish_reason"], "stop");
            full["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(got, expected, "streaming={streaming}");
    }
}

async fn nats_generate(
    client: &async_nats::Client,
    subjects: &Subjects,
    request: &ApiRequest,
) -> Vec<ApiEvent> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subjects.api_generate(), inbox, encode(request).into())
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(20), sub.next()).await {
        let event: ApiEvent = decode(&m.payload).unwrap();
        let end = matches!(
            event.body,
            ApiEventBody::Done { .. } | ApiEventBody::Error { .. }
        );
        events.push(event);
        if end {
            break;
        }
    }
    events
}

#[tokio::test]
async fn nats_api_streams_text_and_reports_errors() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let client = async_nats::connect(preble_tests::NATS_URL).await.unwrap();
    let subjects = Subjects::new(&c.prefix);
    let mut request = ApiRequest::completion(&c.model, "The capital of France is");
    request.max_tokens = Some(6);
    request.seed = Some(7);
    let events = nats_generate(&client, &subjects, &request).await;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64);
    }
    let Some(ApiEventBody::Done {
        finish_reason,
        usage,
    }) = events.last().map(|e| &e.body)
    else {
        panic!("no Done: {events:?}");
    };
    assert_eq!(*finish_reason, FinishReason::Length);
    assert_eq!(usage.completion_tokens, 6);
    let text: String = events
        .iter()
        .filter_map(|e| match &e.body {
            ApiEventBody::Delta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let body =
        json!({"model": c.model, "prompt": "The capital of France is", "max_tokens": 6, "seed": 7});
    let (_, full) = post(&c.gateway, "/v1/completions", &body).await;
    assert_eq!(
        text,
        full["choices"][0]["text"].as_str().unwrap(),
        "HTTP and NATS agree"
    );

    // Unknown model and malformed bytes get an error event, and the API keeps serving.
    let events = nats_generate(&client, &subjects, &ApiRequest::completion("nope", "x")).await;
    assert!(
        matches!(
            &events[0].body,
            ApiEventBody::Error {
                code: preble_protocol::ErrorCode::ModelNotFound,
                ..
            }
        ),
        "{events:?}"
    );
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subjects.api_generate(), inbox, "garbage".into())
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    let event: ApiEvent = decode(&m.payload).unwrap();
    assert!(matches!(
        event.body,
        ApiEventBody::Error {
            code: preble_protocol::ErrorCode::InvalidRequest,
            ..
        }
    ));
    let events = nats_generate(&client, &subjects, &request).await;
    assert!(matches!(
        events.last().unwrap().body,
        ApiEventBody::Done { .. }
    ));
}

#[tokio::test]
async fn client_disconnect_stops_the_workers_work() {
    let c = TestCluster::start(Options {
        workers: 1,
        time_scale: 0.2,
        ..Options::default()
    })
    .await
    .unwrap();
    let body = json!({"model": c.model, "prompt": "a very long answer please", "max_tokens": 20000, "stream": true});
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", c.gateway))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut bytes = response.bytes_stream();
    for _ in 0..3 {
        bytes.next().await.unwrap().unwrap();
    }
    drop(bytes);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cancelled = scrape(&c.workers[0].metrics_url, "preble:request_finished_total")
            .await
            .unwrap_or(0.0);
        if cancelled >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never stopped the request:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = reqwest::get(&c.workers[0].metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("preble:request_finished_total{finished_reason=\"cancelled\"} 1"),
        "{text}"
    );
    assert_eq!(
        scrape(&c.workers[0].metrics_url, "preble:num_requests_running")
            .await
            .unwrap(),
        0.0
    );
    let generated = c.worker_sum("preble:generation_tokens_total").await;
    assert!(generated < 20000.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.worker_sum("preble:generation_tokens_total").await,
        generated,
        "no more tokens after the cancel"
    );
}

#[tokio::test]
async fn a_dead_gateways_requests_are_stopped_on_their_workers() {
    let mut c = TestCluster::start(Options {
        workers: 2,
        time_scale: 0.5,
        gateway_env: vec![("PREBLE_PRESENCE_PERIOD_MS".into(), "200".into())],
        ..Options::default()
    })
    .await
    .unwrap();
    // Long generations, streaming to clients of this gateway.
    let mut clients = Vec::new();
    for i in 0..4 {
        let gateway = c.gateway.clone();
        let body = json!({"model": c.model, "prompt": format!("orphan {i}"), "max_tokens": 5000,
            "ignore_eos": true, "stream": true});
        // Each client reads its stream until the connection dies with the gateway.
        clients.push(tokio::spawn(async move {
            let Ok(response) = reqwest::Client::new()
                .post(format!("{gateway}/v1/completions"))
                .json(&body)
                .send()
                .await
            else {
                return;
            };
            let mut chunks = response.bytes_stream();
            while let Some(Ok(_)) = chunks.next().await {}
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.worker_sum("preble:num_requests_running").await < 4.0 {
        assert!(Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.kill_gateway();
    let killed = Instant::now();
    // Within a few seconds (three missed beats and the workers' listening allowance), nothing
    // computes for the dead gateway's clients.
    while c.worker_sum("preble:num_requests_running").await > 0.0 {
        assert!(
            killed.elapsed() < Duration::from_secs(8),
            "still computing for a dead gateway\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "orphans stopped {:?} after the gateway died",
        killed.elapsed()
    );
    assert_eq!(
        c.worker_sum("preble:requests_orphaned_total").await,
        4.0,
        "{}",
        c.logs()
    );
    for client in clients {
        client.abort();
    }
}

#[tokio::test]
async fn logprobs_come_with_every_token_in_each_endpoints_format() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    // Completions: tokens, their log-probabilities, the top 3 at each place, text offsets.
    let body = json!({"model": c.model, "prompt": "Scores, please:", "max_tokens": 6,
                      "seed": 3, "logprobs": 3});
    let (status, full) = post(&c.gateway, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{full}");
    let text = full["choices"][0]["text"].as_str().unwrap();
    let lp = &full["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 6, "{full}");
    assert_eq!(tokens.concat(), text, "the tokens spell the text");
    // The sim draws uniformly from its vocabulary: every token is as likely as any other.
    let first = lp["token_logprobs"][0].as_f64().unwrap();
    assert!(first < -1.0, "{full}");
    let mut offset = 0;
    for i in 0..6 {
        assert_eq!(lp["token_logprobs"][i].as_f64(), Some(first), "{full}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3, "{full}");
        assert_eq!(
            top[tokens[i]].as_f64(),
            Some(first),
            "the drawn token is among the top"
        );
        assert_eq!(lp["text_offset"][i], offset, "{full}");
        offset += tokens[i].chars().count();
    }
    // Without logprobs: null, as before.
    let mut plain = body.clone();
    plain["logprobs"] = Value::Null;
    let (_, plain) = post(&c.gateway, "/v1/completions", &plain).await;
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
    assert_eq!(plain["choices"][0]["text"], text);

    // Chat, streamed: each chunk's tokens with their top 2; the same draws as unstreamed.
    let chat = json!({"model": c.model, "messages": [{"role": "user", "content": "Score me."}],
                      "max_tokens": 5, "seed": 3, "logprobs": true, "top_logprobs": 2,
                      "stream": true});
    let (status, events) = stream(&c.gateway, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200);
    let mut streamed_tokens = String::new();
    let mut entries = 0;
    for event in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let Some(content) = chunk["choices"][0]["logprobs"]["content"].as_array() else {
            continue;
        };
        for entry in content {
            entries += 1;
            let token = entry["token"].as_str().unwrap();
            streamed_tokens.push_str(token);
            assert_eq!(entry["bytes"], json!(token.as_bytes()));
            assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2);
            assert_eq!(entry["top_logprobs"][0]["token"], token);
            assert_eq!(entry["logprob"].as_f64(), Some(first));
        }
    }
    assert_eq!(entries, 5, "{events:?}");
    assert_eq!(streamed_tokens, streamed_text(&events));
}
