//! What the worker needs from a Hugging Face model directory.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The facts about a model that scheduling and the sim engine need.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Served name.
    pub name: String,
    /// Vocabulary size (`config.json`).
    pub vocab_size: u32,
    /// Longest context (`max_position_embeddings`).
    pub context_len: u32,
    /// Token ids that end generation (`generation_config.json`, else `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// Ids of special (added) tokens, which the sim engine never generates.
    pub special_token_ids: Vec<u32>,
}

impl ModelInfo {
    /// Reads `config.json`, `generation_config.json` (optional) and `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<ModelInfo> {
        let config = read_json(&dir.join("config.json"))?;
        let vocab_size = field_u32(&config, "vocab_size")?;
        let context_len = field_u32(&config, "max_position_embeddings")?;
        let generation = dir.join("generation_config.json");
        let eos_source = if generation.exists() {
            read_json(&generation)?
        } else {
            config.clone()
        };
        let eos_token_ids = match eos_source.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_u64().map(|n| n as u32))
                .collect(),
            _ => Vec::new(),
        };
        let tokenizer = read_json(&dir.join("tokenizer.json"))?;
        let special_token_ids = tokenizer
            .get("added_tokens")
            .and_then(Value::as_array)
            .map(|tokens| {
                tokens
                    .iter()
                    .filter_map(|t| t.get("id").and_then(Value::as_u64).map(|n| n as u32))
                    .collect()
            })
            .unwrap_or_default();
        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_string());
        if vocab_size == 0 || context_len == 0 {
            bail!("vocab_size and max_position_embeddings must be positive");
        }
        Ok(ModelInfo {
            name,
            vocab_size,
            context_len,
            eos_token_ids,
            special_token_ids,
        })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn field_u32(value: &Value, name: &str) -> Result<u32> {
    value
        .get(name)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .with_context(|| format!("config.json has no valid `{name}`"))
}
