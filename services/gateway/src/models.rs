//! Served models: each model directory's tokenizer, chat template and context length.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use minijinja::Environment;
use preble_modeldir::read_json;
use preble_protocol::{ChatMessage, ErrorCode};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::ApiError;
use crate::openai::SamplingDefaults;

/// One served model.
pub struct ServedModel {
    /// Name clients use.
    pub name: String,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Longest prompt plus output.
    pub context_len: u32,
    /// Unix time the gateway loaded it (the `created` of `/v1/models`).
    pub created: u64,
    /// Sampling for what a request leaves out, from `generation_config.json`.
    pub sampling_defaults: SamplingDefaults,
    /// The same tokenizer with special-token matching off: special-token text is plain text.
    pub(crate) plain_tokenizer: Tokenizer,
    /// The special tokens' texts and ids, longest text first.
    pub(crate) special_tokens: Vec<(String, u32)>,
    /// Bytes of the longest vocabulary entry: no token covers more text than this.
    longest_token_bytes: usize,
    /// The compiled chat template (`None`: the model serves completions only).
    templates: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.name)
            .field("context_len", &self.context_len)
            .finish_non_exhaustive()
    }
}

/// A special token in `tokenizer_config.json` is a string or `{"content": ...}`.
fn token_string(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ServedModel {
    /// Loads a model directory: `tokenizer.json` and `config.json` are required,
    /// `tokenizer_config.json` and `generation_config.json` are optional; one that is there
    /// but cannot be read, or asks for sampling no request could, is an error.
    pub fn load(dir: &Path) -> Result<ServedModel> {
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow!("loading {}: {e}", dir.join("tokenizer.json").display()))?;
        let config = read_json(&dir.join("config.json"))?;
        let context_len = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .context("config.json has no valid max_position_embeddings")?;
        let tokenizer_config_path = dir.join("tokenizer_config.json");
        let tokenizer_config = if tokenizer_config_path.exists() {
            read_json(&tokenizer_config_path)?
        } else {
            Value::Null
        };
        let name = preble_modeldir::served_name(dir)?;
        let generation_config_path = dir.join("generation_config.json");
        let sampling_defaults = if generation_config_path.exists() {
            SamplingDefaults::from_generation_config(&read_json(&generation_config_path)?)
                .map_err(|e| anyhow!("{}: {e}", generation_config_path.display()))?
        } else {
            SamplingDefaults::default()
        };
        let templates = match crate::template::find(dir, &tokenizer_config)? {
            Some(template) => Some(compile_template(template)?),
            None => {
                tracing::warn!(model = %name, "no chat template in the model directory: it serves completions only");
                None
            }
        };
        let mut plain_tokenizer = tokenizer.clone();
        plain_tokenizer.set_encode_special_tokens(true);
        let mut special_tokens: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        special_tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let longest_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(ServedModel {
            name,
            tokenizer,
            context_len,
            plain_tokenizer,
            special_tokens,
            longest_token_bytes,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            templates,
            sampling_defaults,
            bos_token: token_string(tokenizer_config.get("bos_token")),
            eos_token: token_string(tokenizer_config.get("eos_token")),
        })
    }

    /// Token ids of `text` (special tokens written in the text are recognised: a completion
    /// prompt is the client's own markup; chat content goes through [`Self::encode_chat`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("tokenisation failed: {e}")))
    }

    /// Refuses, before tokenising it, a text so long that it cannot fit the context whatever
    /// its tokens: each token covers at most the longest vocabulary entry (a margin of 2 covers
    /// normalisers that shorten text), so a huge prompt costs no tokenisation.
    pub fn check_text_len(&self, text_bytes: usize, param: &str) -> Result<(), ApiError> {
        let most = (self.context_len as usize)
            .saturating_mul(self.longest_token_bytes)
            .saturating_mul(2);
        if text_bytes > most {
            return Err(ApiError {
                code: ErrorCode::ContextLengthExceeded,
                message: format!(
                    "This model's maximum context length is {} tokens; the {text_bytes}-byte prompt cannot fit it.",
                    self.context_len
                ),
                param: Some(param.to_string()),
                retry_after: None,
            });
        }
        Ok(())
    }

    /// Checks that the prompt is usable and that it plus `max_tokens` fits the context.
    pub fn check_prompt(
        &self,
        prompt: &[u32],
        max_tokens: u32,
        param: &str,
    ) -> Result<(), ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid(param, "the prompt must not be empty"));
        }
        let vocab = self.tokenizer.get_vocab_size(true) as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::invalid(
                param,
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let total = prompt.len() as u64 + u64::from(max_tokens);
        if total > u64::from(self.context_len) {
            return Err(ApiError {
                code: ErrorCode::ContextLengthExceeded,
                message: format!(
                    "This model's maximum context length is {} tokens. However, you requested {total} tokens ({} in the prompt, {max_tokens} for the completion).",
                    self.context_len,
                    prompt.len()
                ),
                param: Some(param.to_string()),
                retry_after: None,
            });
        }
        Ok(())
    }

    /// Renders a conversation with the model's chat template, ready for generation (roles as
    /// given: [`Self::encode_chat`] checks them first).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ApiError> {
        let Some(templates) = &self.templates else {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "the model `{}` has no chat template; use /v1/completions with a prompt",
                    self.name
                ),
            ));
        };
        let template = templates
            .get_template("chat")
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages.iter().map(|m| minijinja::context! {
                    role => m.role.clone(),
                    content => m.content.clone(),
                }).collect::<Vec<_>>(),
                add_generation_prompt => true,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| ApiError::invalid("messages", format!("chat template failed: {e}")))
    }
}

/// Compiles a chat template, with the helpers Hugging Face templates call.
fn compile_template(template: crate::template::ChatTemplate) -> Result<Environment<'static>> {
    let mut templates = Environment::new();
    templates.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    let from = template.from.clone();
    templates
        .add_template_owned("chat", template.source)
        .with_context(|| format!("compiling the chat template from {from}"))?;
    Ok(templates)
}

/// Every served model by name.
#[derive(Debug, Default)]
pub struct Models {
    by_name: BTreeMap<String, Arc<ServedModel>>,
}

impl Models {
    /// Loads every directory; two with the same name are an error.
    pub fn load(dirs: &[impl AsRef<Path>]) -> Result<Models> {
        let mut by_name = BTreeMap::new();
        for dir in dirs {
            let dir = dir.as_ref();
            let model = ServedModel::load(dir)
                .with_context(|| format!("loading model directory {}", dir.display()))?;
            if by_name.contains_key(&model.name) {
                anyhow::bail!("two model directories are both named {:?}", model.name);
            }
            by_name.insert(model.name.clone(), Arc::new(model));
        }
        Ok(Models { by_name })
    }

    /// The model named `name`, or `model_not_found`.
    pub fn get(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        self.by_name.get(name).cloned().ok_or_else(|| ApiError {
            code: ErrorCode::ModelNotFound,
            message: format!(
                "The model `{name}` does not exist. Served models: {}",
                self.by_name.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            param: Some("model".into()),
            retry_after: None,
        })
    }

    /// All served models.
    pub fn iter(&self) -> impl Iterator<Item = &ServedModel> {
        self.by_name.values().map(|m| m.as_ref())
    }
}

/// A freshly generated sim model, for the gateway's unit tests.
#[cfg(test)]
pub(crate) fn test_model() -> (tempfile::TempDir, ServedModel) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    preble_modelgen::write_sim_model(&path, &preble_modelgen::SimModelOptions::default()).unwrap();
    let m = ServedModel::load(&path).unwrap();
    (dir, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> (tempfile::TempDir, ServedModel) {
        test_model()
    }

    #[test]
    fn renders_the_chat_template_and_tokenises_specials() {
        let (_d, m) = model();
        assert_eq!(m.name, "m");
        let text = m
            .render_chat(&[
                ChatMessage {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "Hi".into(),
                },
            ])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = m.encode(&text).unwrap();
        let im_start = m.tokenizer.token_to_id("<|im_start|>").unwrap();
        assert_eq!(ids.iter().filter(|&&t| t == im_start).count(), 3);
    }

    #[test]
    fn a_model_without_a_chat_template_refuses_chat_and_one_in_jinja_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        preble_modelgen::write_sim_model(&path, &preble_modelgen::SimModelOptions::default())
            .unwrap();
        let config_path = path.join("tokenizer_config.json");
        let mut config = read_json(&config_path).unwrap();
        config.as_object_mut().unwrap().remove("chat_template");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let chat = [ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }];
        let base = ServedModel::load(&path).unwrap();
        let e = base.render_chat(&chat).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("no chat template"), "{e:?}");
        // transformers 5 writes the template to its own file.
        std::fs::write(
            path.join("chat_template.jinja"),
            "[{{ messages[0].content }}]",
        )
        .unwrap();
        let chat_model = ServedModel::load(&path).unwrap();
        assert_eq!(chat_model.render_chat(&chat).unwrap(), "[Hi]");
    }

    #[test]
    fn generation_config_sets_the_sampling_requests_leave_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuned");
        preble_modelgen::write_sim_model(&path, &preble_modelgen::SimModelOptions::default())
            .unwrap();
        let generation = path.join("generation_config.json");
        let mut config = read_json(&generation).unwrap();
        let set = |config: &mut Value, key: &str, v: Value| {
            config.as_object_mut().unwrap().insert(key.into(), v);
        };
        set(&mut config, "temperature", 0.6.into());
        set(&mut config, "top_p", 0.9.into());
        set(&mut config, "top_k", 20.into());
        std::fs::write(&generation, config.to_string()).unwrap();
        let m = ServedModel::load(&path).unwrap();
        let defaults = m.sampling_defaults;
        assert_eq!(
            (defaults.temperature, defaults.top_p, defaults.top_k),
            (0.6, 0.9, Some(20))
        );
        let parse =
            |json: &str| -> crate::openai::CommonParams { serde_json::from_str(json).unwrap() };
        let omitted = parse("{}").validate(16, &defaults).unwrap().sampling;
        assert_eq!(
            (omitted.temperature, omitted.top_p, omitted.top_k),
            (0.6, 0.9, Some(20))
        );
        let given = parse(r#"{"temperature":0,"top_p":1,"top_k":-1}"#)
            .validate(16, &defaults)
            .unwrap()
            .sampling;
        assert_eq!(
            (given.temperature, given.top_p, given.top_k),
            (0.0, 1.0, None)
        );
        // A value no request could ask for fails the load, naming file and field.
        set(&mut config, "temperature", 7.into());
        std::fs::write(&generation, config.to_string()).unwrap();
        let e = ServedModel::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("temperature"),
            "{e}"
        );
        std::fs::write(&generation, "{not json").unwrap();
        assert!(ServedModel::load(&path).is_err());
    }

    #[test]
    fn unknown_models_name_the_served_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha");
        preble_modelgen::write_sim_model(&path, &preble_modelgen::SimModelOptions::default())
            .unwrap();
        let models = Models::load(&[&path]).unwrap();
        let err = models.get("beta").unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        assert!(err.message.contains("alpha"));
    }
}
