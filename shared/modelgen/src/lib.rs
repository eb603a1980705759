//! Generates the small model directories preble ships with, instead of downloading any: a real
//! byte-level BPE `tokenizer.json` trained on text in this repository, and the Hugging Face
//! files around it (`config.json`, `tokenizer_config.json` with a chat template,
//! `generation_config.json`).
//!
//! The `sim` engine needs only these files (it computes no logits); the gateway tokenises real
//! text with them through the same code that loads any Hugging Face tokenizer.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

/// The text the tokenizer is trained on.
const CORPUS: &str = include_str!("../corpus/serving.txt");

/// Special tokens, in id order from 0.
pub const SPECIAL_TOKENS: [&str; 5] = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"];
/// Id of the beginning-of-sequence token.
pub const BOS_ID: u32 = 0;
/// Id of the end-of-sequence token.
pub const EOS_ID: u32 = 1;
/// Id of the end-of-turn token used by the chat template (also ends generation).
pub const END_OF_TURN_ID: u32 = 3;

/// A ChatML-style chat template (the default the gateway documents, written out explicitly).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// What to generate.
#[derive(Clone, Debug)]
pub struct SimModelOptions {
    /// Target vocabulary size (the corpus may support fewer merges; the real size is written).
    pub vocab_size: usize,
    /// Context length written as `max_position_embeddings`.
    pub context_len: u32,
}

impl Default for SimModelOptions {
    fn default() -> Self {
        Self {
            vocab_size: 2048,
            context_len: 32768,
        }
    }
}

/// Writes a model directory for the `sim` engine into `dir` (created if missing).
pub fn write_sim_model(dir: &Path, options: &SimModelOptions) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let vocab_size = train_tokenizer(&dir.join("tokenizer.json"), options.vocab_size)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": options.context_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    let tokenizer_config = json!({
        "bos_token": SPECIAL_TOKENS[BOS_ID as usize],
        "eos_token": SPECIAL_TOKENS[EOS_ID as usize],
        "pad_token": "<pad>",
        "model_max_length": options.context_len,
        "chat_template": CHAT_TEMPLATE,
    });
    let generation_config = json!({
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, END_OF_TURN_ID],
    });
    for (name, value) in [
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&value)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Trains a byte-level BPE on the corpus and saves it; returns the vocabulary size.
fn train_tokenizer(path: &Path, vocab_size: usize) -> Result<usize> {
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect(),
        )
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()
    .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?;
    let lines: Vec<String> = CORPUS.lines().map(|l| format!("{l}\n")).collect();
    tokenizer
        .train(&mut trainer, lines.iter())
        .map_err(|e| anyhow::anyhow!("training tokenizer: {e}"))?;
    let size = tokenizer.get_vocab_size(true);
    tokenizer
        .save(path, true)
        .map_err(|e| anyhow::anyhow!("saving {}: {e}", path.display()))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_tokenizer_that_round_trips_any_text() {
        let dir = tempfile::tempdir().unwrap();
        write_sim_model(dir.path(), &SimModelOptions::default()).unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        for text in [
            "The capital of France is Paris.",
            "héllo wörld ✓ 12345",
            "<|im_start|>user\nhi<|im_end|>",
        ] {
            let enc = tok.encode(text, false).unwrap();
            assert!(!enc.get_ids().is_empty());
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        // Merges were learned: common words take fewer tokens than bytes.
        let enc = tok
            .encode("the scheduler keeps a radix tree", false)
            .unwrap();
        assert!(enc.get_ids().len() < 20, "{}", enc.get_ids().len());
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(END_OF_TURN_ID));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["vocab_size"].as_u64().unwrap() as usize,
            tok.get_vocab_size(true)
        );
    }
}
