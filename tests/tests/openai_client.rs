//! The official `openai` Python client (installed with pip into a virtualenv under `target/`)
//! lists models, completes, chats and streams against the gateway, and gets OpenAI errors.

use std::path::Path;

use preble_tests::{Options, TestCluster, openai_python};
use serde_json::Value;

#[tokio::test]
async fn the_official_openai_python_client_works_against_the_gateway() {
    let python = tokio::task::spawn_blocking(openai_python).await.unwrap();
    let c = TestCluster::start(Options::default()).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_smoke.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .arg(&c.gateway)
        .arg(&c.model)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "openai client failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        c.logs()
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["models"][0], c.model);
    assert!(!seen["completion_text"].as_str().unwrap().is_empty());
    assert_eq!(seen["streamed_chat_text"], seen["chat_text"]);
    let prompt_tokens = seen["prompt_tokens"].as_u64().unwrap();
    let cached = seen["cached_tokens_on_repeat"].as_u64().unwrap();
    assert!(
        cached > prompt_tokens / 2,
        "the repeated prompt reused the cache: {cached} of {prompt_tokens}"
    );
    assert_eq!(seen["unknown_model_code"], "model_not_found");
    assert_eq!(seen["n2_param"], "n");
}
