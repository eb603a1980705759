//! A real model, SmolLM2-135M-Instruct (`make real-model`), through the gateway's own code and
//! through the whole stack on torch workers:
//! - the gateway's chat prompts are token for token what transformers' `apply_chat_template`
//!   makes, and its streaming detokeniser, fed one token at a time, gives what transformers'
//!   `decode(..., skip_special_tokens=True)` gives;
//! - a chat answers the question, streamed, stops at `<|im_end|>` with `finish_reason` `stop`,
//!   and a repeated long system prompt is served from the cache.
//!
//! Needs the worker built with the torch engine, the torch venv and the model; `make
//! test-torch` makes all three.
#![cfg(feature = "torch")]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use preble_gateway::models::ServedModel;
use preble_gateway::text::Detokenizer;
use preble_protocol::ChatMessage;
use preble_tests::{TestCluster, real_model_dir, torch_options, torch_venv};
use serde_json::{Value, json};

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// Conversations of every shape the template branches on, and a long one.
fn conversations() -> Vec<Vec<ChatMessage>> {
    let long: String = (0..120)
        .map(|i| format!("Rule {i}: requests that share a prefix go where it is cached. "))
        .collect();
    vec![
        vec![message("user", "What is the capital of France?")],
        vec![
            message("system", "You answer in one word."),
            message("user", "What colour is the sky?"),
        ],
        vec![
            message("user", "Hi!"),
            message("assistant", "Hello! How can I help?"),
            message(
                "user",
                "Tell me a joke about caches. Ünïcödé, 日本語, emoji 🚀.",
            ),
        ],
        vec![
            message("system", &long),
            message("user", "Summarise the rules."),
        ],
    ]
}

/// What transformers makes of `conversations` and `decode` (`scripts/chat_reference.py`).
fn transformers_reference(conversations: &[Vec<ChatMessage>], decode: &[Vec<u32>]) -> Value {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/chat_reference.py");
    let mut child = Command::new(torch_venv().join("bin/python"))
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the torch venv's python runs (make torch-env)");
    let request = json!({
        "model_dir": real_model_dir(),
        "conversations": conversations.iter().map(|c| c.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "decode": decode,
    });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("writing the reference request");
    let out = child.wait_with_output().expect("chat_reference.py ends");
    assert!(out.status.success(), "chat_reference.py failed");
    serde_json::from_slice(&out.stdout).expect("chat_reference.py prints JSON")
}

#[test]
fn chat_prompts_and_decoded_streams_match_transformers() {
    let model = ServedModel::load(&real_model_dir()).expect("the real model loads");
    let conversations = conversations();
    let ours: Vec<Vec<u32>> = conversations
        .iter()
        .map(|c| model.encode_chat(c).expect("the template renders"))
        .collect();
    // Each prompt decoded as a stream: special tokens dropped, multi-byte characters (the
    // third conversation's) split across tokens.
    let reference = transformers_reference(&conversations, &ours);
    let theirs: Vec<Vec<u32>> = serde_json::from_value(reference["prompts"].clone()).unwrap();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(
            a, b,
            "conversation {i}: the gateway's prompt ids differ from transformers'"
        );
    }
    assert_eq!(
        theirs[0].len(),
        37,
        "SmolLM2's template adds its default system prompt"
    );
    for (ids, expected) in ours.iter().zip(reference["decoded"].as_array().unwrap()) {
        let mut d = Detokenizer::default();
        let mut text = String::new();
        for id in ids {
            text.push_str(&d.push(&model, &[*id]).unwrap());
        }
        text.push_str(&d.finish(&model).unwrap());
        assert_eq!(text, expected.as_str().unwrap(), "token by token");
    }
}

#[tokio::test]
async fn two_torch_workers_serve_smollm2_answering_streaming_and_reusing_the_system_prompt() {
    let c = TestCluster::start(torch_options(2, real_model_dir()))
        .await
        .unwrap();
    let question = json!({
        "model": c.model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 40,
        "temperature": 0,
    });
    let (status, answer) = post(&c.gateway, "/v1/chat/completions", &question).await;
    assert_eq!(status, 200, "{answer}\n{}", c.logs());
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content:?}");
    assert!(!content.contains("<|im_end|>"), "{content:?}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() < 40);

    let mut streamed_request = question.clone();
    streamed_request["stream"] = json!(true);
    let (status, events) = stream(&c.gateway, "/v1/chat/completions", &streamed_request).await;
    assert_eq!(status, 200);
    assert_eq!(
        streamed_text(&events),
        content,
        "greedy: the stream says the same"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let system: String = (0..60)
        .map(|i| format!("Guideline {i}: keep answers short, exact and polite. "))
        .collect();
    let ask = |q: &str| {
        json!({
            "model": c.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "max_tokens": 8,
            "temperature": 0,
        })
    };
    let (status, first) = post(&c.gateway, "/v1/chat/completions", &ask("Name a colour.")).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = post(&c.gateway, "/v1/chat/completions", &ask("Name a fruit.")).await;
    assert_eq!(status, 200, "{again}");
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(prompt > 500, "{again}");
    assert!(
        cached * 10 >= prompt * 9,
        "the system prompt ({prompt} tokens) should be served from the cache, {cached} were"
    );
}
