//! What the worker needs from a Hugging Face model directory.

use std::path::Path;

use anyhow::{Context, Result, bail};
use preble_modeldir::read_json;
use serde_json::Value;

/// The facts about a model that scheduling and the sim engine need.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Served name.
    pub name: String,
    /// The directory it was read from.
    pub dir: std::path::PathBuf,
    /// Vocabulary size (`config.json`).
    pub vocab_size: u32,
    /// Longest context (`max_position_embeddings`).
    pub context_len: u32,
    /// Token ids that end generation (`generation_config.json`, else `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// Ids of special (added) tokens, which the sim engine never generates.
    pub special_token_ids: Vec<u32>,
    /// Ids of byte-level tokens whose bytes are not text on their own (a piece of a multi-byte
    /// character): the sim engine does not generate them either, so that every token it emits
    /// can be streamed as soon as it is made, as a real model's almost always can.
    pub partial_token_ids: Vec<u32>,
}

impl ModelInfo {
    /// Reads `config.json`, `generation_config.json` (optional) and `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<ModelInfo> {
        let config = read_json(&dir.join("config.json"))?;
        let vocab_size = field_u32(&config, "vocab_size")?;
        let context_len = field_u32(&config, "max_position_embeddings")?;
        let generation_path = dir.join("generation_config.json");
        let generation = if generation_path.exists() {
            Some(read_json(&generation_path)?)
        } else {
            None
        };
        let eos_token_ids = eos_token_ids(generation.as_ref(), &config, vocab_size)?;
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
        let partial_token_ids = partial_byte_level_tokens(&tokenizer);
        let name = preble_modeldir::served_name(dir)?;
        if vocab_size == 0 || context_len == 0 {
            bail!("vocab_size and max_position_embeddings must be positive");
        }
        Ok(ModelInfo {
            name,
            dir: dir.to_path_buf(),
            vocab_size,
            context_len,
            eos_token_ids,
            special_token_ids,
            partial_token_ids,
        })
    }
}

/// The ids that end generation: `eos_token_id` of `generation_config.json` where it gives one,
/// else of `config.json`; a number or a list of numbers, each inside the vocabulary. A model
/// with none, or with one the worker cannot read, is refused: it would only ever stop at
/// `max_tokens`.
fn eos_token_ids(generation: Option<&Value>, config: &Value, vocab_size: u32) -> Result<Vec<u32>> {
    let (file, value) = match generation.and_then(|g| g.get("eos_token_id")) {
        Some(v) if !v.is_null() => ("generation_config.json", v),
        _ => match config.get("eos_token_id") {
            Some(v) if !v.is_null() => ("config.json", v),
            _ => bail!(
                "no eos_token_id in generation_config.json or config.json: the worker could not tell where a generation ends"
            ),
        },
    };
    let items: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        single => vec![single],
    };
    let ids = items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n < vocab_size)
                .with_context(|| {
                    format!(
                        "{file}: eos_token_id {v} is not a token id below vocab_size {vocab_size}"
                    )
                })
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        bail!("{file}: eos_token_id is an empty list");
    }
    Ok(ids)
}

/// Ids in a byte-level BPE vocabulary whose bytes are not valid UTF-8 by themselves (empty
/// for other tokenizers).
fn partial_byte_level_tokens(tokenizer: &Value) -> Vec<u32> {
    if tokenizer.pointer("/decoder/type").and_then(Value::as_str) != Some("ByteLevel") {
        return Vec::new();
    }
    let Some(vocab) = tokenizer.pointer("/model/vocab").and_then(Value::as_object) else {
        return Vec::new();
    };
    let byte_of = unicode_to_byte();
    vocab
        .iter()
        .filter_map(|(piece, id)| {
            let bytes: Option<Vec<u8>> = piece.chars().map(|c| byte_of.get(&c).copied()).collect();
            let partial = bytes.is_some_and(|b| std::str::from_utf8(&b).is_err());
            partial.then(|| id.as_u64()).flatten().map(|id| id as u32)
        })
        .collect()
}

/// The inverse of GPT-2's byte-level alphabet: printable bytes stand for themselves, the
/// others for the characters from U+0100 on, in byte order.
fn unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
}

fn field_u32(value: &Value, name: &str) -> Result<u32> {
    value
        .get(name)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .with_context(|| format!("config.json has no valid `{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_comes_from_generation_config_then_config_and_must_be_valid() {
        let config = serde_json::json!({"eos_token_id": 2});
        let ids = |g: Option<Value>| eos_token_ids(g.as_ref(), &config, 100);
        assert_eq!(ids(None).unwrap(), [2]);
        assert_eq!(
            ids(Some(serde_json::json!({"eos_token_id": [2, 7]}))).unwrap(),
            [2, 7]
        );
        // A generation config without one falls back to config.json.
        assert_eq!(
            ids(Some(serde_json::json!({"temperature": 0.6}))).unwrap(),
            [2]
        );
        for bad in [
            serde_json::json!({"eos_token_id": 100}),
            serde_json::json!({"eos_token_id": [2, "x"]}),
            serde_json::json!({"eos_token_id": -1}),
            serde_json::json!({"eos_token_id": []}),
        ] {
            let e = ids(Some(bad.clone())).unwrap_err().to_string();
            assert!(e.contains("generation_config.json"), "{bad}: {e}");
        }
        let none = eos_token_ids(None, &serde_json::json!({}), 100).unwrap_err();
        assert!(none.to_string().contains("no eos_token_id"), "{none}");
    }

    #[test]
    fn byte_level_pieces_of_characters_are_found() {
        // 0xC3 alone starts a two-byte character; 0xC3 0xA9 is "é"; "Ġ" is a space.
        let tokenizer = serde_json::json!({
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {"a": 0, "Ã": 1, "Ã©": 2, "Ġ": 3, "©": 4}},
        });
        let mut partial = partial_byte_level_tokens(&tokenizer);
        partial.sort_unstable();
        assert_eq!(partial, vec![1, 4]);
        let other =
            serde_json::json!({"decoder": {"type": "Metaspace"}, "model": {"vocab": {"Ã": 1}}});
        assert!(partial_byte_level_tokens(&other).is_empty());
    }
}
