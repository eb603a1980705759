//! A real model, SmolLM2-135M-Instruct (`make real-model`), through the gateway's own code and
//! through the whole stack on torch workers:
//! - the gateway's chat prompts are token for token what transformers' `apply_chat_template`
//!   makes, and its streaming detokeniser, fed one token at a time, gives what transformers'
//!   `decode(..., skip_special_tokens=True)` gives;
//! - through the official `openai` client, a chat answers the question, streamed, stops at
//!   `<|im_end|>` with `finish_reason` `stop`; stop strings end it, a seed repeats a sampled
//!   answer, a repeated long system prompt is served from the cache, and a prompt past the
//!   context is refused with `context_length_exceeded`.
//!
//! Needs the worker built with the torch engine, the torch venv and the model; `make
//! test-torch` makes all three.
#![cfg(feature = "torch")]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::post;
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

/// What a reference script of `scripts/` (run by the torch venv's python) answers to
/// `request`, given as JSON on its stdin.
fn reference(script: &str, request: &Value) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(script);
    let mut child = Command::new(torch_venv().join("bin/python"))
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the torch venv's python runs (make torch-env)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("writing the reference request");
    let out = child.wait_with_output().expect("the reference script ends");
    assert!(out.status.success(), "{script} failed");
    serde_json::from_slice(&out.stdout).expect("the reference script prints JSON")
}

/// What transformers makes of `conversations` and `decode` (`scripts/chat_reference.py`).
fn transformers_reference(conversations: &[Vec<ChatMessage>], decode: &[Vec<u32>]) -> Value {
    let request = json!({
        "model_dir": real_model_dir(),
        "conversations": conversations.iter().map(|c| c.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "decode": decode,
    });
    reference("chat_reference.py", &request)
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
async fn the_official_openai_client_chats_with_smollm2_on_two_torch_workers() {
    let c = TestCluster::start(torch_options(2, real_model_dir()))
        .await
        .unwrap();
    let seen = c.run_openai_script("openai_real_model.py").await;
    let text = |key: &str| seen[key].as_str().unwrap_or_default().to_string();

    // A real answer, ended by the model at <|im_end|>, which never shows.
    let answer = text("answer");
    assert!(answer.contains("Paris"), "{answer:?}");
    assert!(!answer.contains("<|im_end|>"), "{answer:?}");
    assert_eq!(seen["answer_finish"], "stop", "{seen}");
    assert!(seen["answer_tokens"].as_u64().unwrap() < 40, "{seen}");
    // Streamed, greedy: the same text, the same ending.
    assert_eq!(text("streamed"), answer);
    assert_eq!(seen["streamed_finish"], "stop");
    // A stop string ends the text before it.
    let stopped = text("stopped");
    assert!(
        answer.starts_with(&stopped) && !stopped.contains("Paris"),
        "{stopped:?}"
    );
    assert_eq!(seen["stopped_finish"], "stop");
    // Seeded sampling: the same seed, the same text; another seed, another.
    let sampled: Vec<&str> = seen["sampled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(sampled[0], sampled[1], "same seed");
    assert_ne!(sampled[0], sampled[2], "another seed");
    // A repeated long system prompt is served from the cache.
    let prompt = seen["repeat_prompt_tokens"].as_u64().unwrap();
    let cached = seen["repeat_cached_tokens"].as_u64().unwrap();
    assert!(prompt > 500, "{seen}");
    assert!(
        cached * 10 >= prompt * 9,
        "the system prompt ({prompt} tokens) should be served from the cache, {cached} were"
    );
    // Past the model's 8,192-token context.
    assert_eq!(seen["too_long"], "context_length_exceeded", "{seen}");
    // Log-probabilities: the tokens spell the answer; greedy picks the most likely, whose
    // log-probability is the first alternative's; streamed, the same tokens.
    let tokens: Vec<&str> = seen["logprob_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text("logprob_text"), "{seen}");
    for (value, top) in seen["logprob_values"]
        .as_array()
        .unwrap()
        .iter()
        .zip(seen["logprob_top"].as_array().unwrap())
    {
        let (value, top) = (value.as_f64().unwrap(), top.as_array().unwrap());
        assert_eq!(top.len(), 2, "{seen}");
        assert!(value <= 0.0, "{seen}");
        assert!((value - top[0].as_f64().unwrap()).abs() < 1e-6, "{seen}");
        assert!(top[0].as_f64() >= top[1].as_f64(), "{seen}");
    }
    assert_eq!(seen["streamed_logprob_tokens"], seen["logprob_tokens"]);
}

#[tokio::test]
async fn logprobs_are_those_transformers_computes() {
    let steps = 8;
    let expected = reference(
        "logprobs_reference.py",
        &json!({"model_dir": real_model_dir(), "text": "The capital of France is",
                "new_tokens": steps, "top": 3}),
    );
    let c = TestCluster::start(torch_options(1, real_model_dir()))
        .await
        .unwrap();
    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": expected["prompt_ids"], "max_tokens": steps,
                "temperature": 0, "logprobs": 3, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    let ours = &body["choices"][0]["logprobs"];
    let close = |a: &Value, b: &Value, what: &str| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!(
            (a - b).abs() < 1e-3,
            "{what}: {a} vs transformers' {b}\n{body}"
        );
    };
    for (i, step) in expected["steps"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ours["tokens"][i], step["token"], "token {i}\n{body}");
        close(&ours["token_logprobs"][i], &step["logprob"], "logprob");
        for alternative in step["top"].as_array().unwrap() {
            let text = alternative[0].as_str().unwrap();
            close(&ours["top_logprobs"][i][text], &alternative[1], text);
        }
    }
    let joined: String = (0..steps)
        .map(|i| ours["tokens"][i].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        joined, body["choices"][0]["text"],
        "the tokens spell the text"
    );
}
