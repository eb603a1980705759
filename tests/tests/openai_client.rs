//! The official `openai` Python client (installed with pip into a virtualenv under `target/`)
//! lists models, completes, chats and streams against the gateway, and gets OpenAI errors.

use preble_tests::{Options, TestCluster};

#[tokio::test]
async fn the_official_openai_python_client_works_against_the_gateway() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let seen = c.run_openai_script("openai_smoke.py").await;
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
