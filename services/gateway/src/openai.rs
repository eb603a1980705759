//! The OpenAI request types the gateway accepts, their validation, and response bodies.

use preble_protocol::{ChatMessage, FinishReason, MAX_TOP_LOGPROBS, SamplingParams, Usage};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;

/// A prompt: text, a batch of one text, or token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several texts (only one is supported).
    Texts(Vec<String>),
}

/// Stop strings: one or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling a model's `generation_config.json` asks for when a request does not say: its
/// `temperature`, `top_p` and `top_k` (as vLLM applies them), else OpenAI's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingDefaults {
    /// Temperature when the request gives none.
    pub temperature: f32,
    /// `top_p` when the request gives none.
    pub top_p: f32,
    /// `top_k` when the request gives none (`None`: no limit).
    pub top_k: Option<u32>,
}

impl Default for SamplingDefaults {
    /// OpenAI's: temperature 1, `top_p` 1, no `top_k`.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
        }
    }
}

impl SamplingDefaults {
    /// The defaults a `generation_config.json` sets; a value outside what requests may ask
    /// is an error naming it.
    pub fn from_generation_config(config: &Value) -> Result<Self, String> {
        let mut out = Self::default();
        let number = |key: &str| -> Result<Option<f64>, String> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("{key} is not a number: {v}")),
            }
        };
        if let Some(t) = number("temperature")? {
            if !(0.0..=2.0).contains(&t) {
                return Err(format!("temperature {t} is outside 0..=2"));
            }
            out.temperature = t as f32;
        }
        if let Some(p) = number("top_p")? {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p {p} is outside (0, 1]"));
            }
            out.top_p = p as f32;
        }
        if let Some(k) = number("top_k")? {
            out.top_k = match k {
                k if k == -1.0 || k == 0.0 => None,
                k if k >= 1.0 && k.fract() == 0.0 && k <= f64::from(u32::MAX) => Some(k as u32),
                k => return Err(format!("top_k {k} is not -1, 0 or a positive integer")),
            };
        }
        Ok(out)
    }
}

/// Parameters common to completions and chat.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0..=2.
    pub temperature: Option<f32>,
    /// Nucleus mass, (0, 1].
    pub top_p: Option<f32>,
    /// Sample among the k most likely tokens only (vLLM extension; -1 or absent: no limit).
    pub top_k: Option<i64>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop strings (at most 4).
    pub stop: Option<Stop>,
    /// Number of choices (only 1 is supported).
    pub n: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End-user id.
    pub user: Option<String>,
    /// Extra stop token ids (vLLM extension).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Generate past end-of-sequence (vLLM extension).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Log-probabilities: how many alternatives (completions), or whether (chat).
    pub logprobs: Option<LogprobsParam>,
    /// With `logprobs: true` (chat): how many alternatives per token.
    pub top_logprobs: Option<u32>,
}

/// `logprobs` as either endpoint writes it: the number of alternatives per token (completions),
/// or a switch with the number in `top_logprobs` (chat). Each endpoint takes both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LogprobsParam {
    /// `true` or `false`.
    Switch(bool),
    /// A number of alternatives.
    Top(u32),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// The rest (parsed separately: serde's `flatten` would lose the path of a bad field).
    #[serde(skip)]
    pub params: CommonParams,
}

/// Message content: text, or a list of parts of which the text ones are used.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One chat message as sent by a client. Fields of OpenAI's message that the gateway cannot
/// honour (`name`, `tool_calls`, `tool_call_id`, `function_call`, `refusal`, `audio`) are
/// refused when set; any other field is an error.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user` or `assistant` ([`crate::chat::ROLES`]).
    pub role: String,
    /// The content.
    pub content: Option<Content>,
    /// Participant name (refused: chat templates have no place for it).
    #[serde(default)]
    pub name: Option<Value>,
    /// Tool calls of an assistant turn (refused).
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// The call a tool message answers (refused).
    #[serde(default)]
    pub tool_call_id: Option<Value>,
    /// Legacy function call (refused).
    #[serde(default)]
    pub function_call: Option<Value>,
    /// An assistant's refusal (refused).
    #[serde(default)]
    pub refusal: Option<Value>,
    /// Audio of an assistant turn (refused).
    #[serde(default)]
    pub audio: Option<Value>,
}

impl ChatMessageIn {
    /// The first field set that the gateway cannot honour.
    fn unsupported_field(&self) -> Option<&'static str> {
        [
            ("name", &self.name),
            ("tool_calls", &self.tool_calls),
            ("tool_call_id", &self.tool_call_id),
            ("function_call", &self.function_call),
            ("refusal", &self.refusal),
            ("audio", &self.audio),
        ]
        .into_iter()
        .find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_null()))
        .map(|(name, _)| name)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// Model name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// The rest (parsed separately: serde's `flatten` would lose the path of a bad field).
    #[serde(skip)]
    pub params: CommonParams,
}

/// A request body with the common parameters beside its own fields.
pub trait WithParams: serde::de::DeserializeOwned {
    /// The body's own fields (beyond [`crate::fields::COMMON`]).
    const OWN_FIELDS: &'static [&'static str];
    /// Where the common parameters go.
    fn params_mut(&mut self) -> &mut CommonParams;
}

impl WithParams for CompletionRequest {
    const OWN_FIELDS: &'static [&'static str] = crate::fields::COMPLETIONS;
    fn params_mut(&mut self) -> &mut CommonParams {
        &mut self.params
    }
}

impl WithParams for ChatRequest {
    const OWN_FIELDS: &'static [&'static str] = crate::fields::CHAT;
    fn params_mut(&mut self) -> &mut CommonParams {
        &mut self.params
    }
}

/// Parses a request body and its common parameters, naming the offending field in errors;
/// a field the gateway would not honour is refused ([`crate::fields::check`]).
pub fn parse_request<T: WithParams>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    crate::fields::check(&value, T::OWN_FIELDS)?;
    let mut request: T = parse_value(&value)?;
    *request.params_mut() = parse_value(&value)?;
    Ok(request)
}

/// Parses a JSON body, naming the offending field in the error.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    parse_value(&value)
}

fn parse_value<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = if path == "." || path.is_empty() {
            // A missing field is reported at the parent: pull its name out of the message.
            let msg = inner.to_string();
            msg.split('`').nth(1).unwrap_or("body").to_string()
        } else {
            path
        };
        ApiError::invalid(
            param.clone(),
            format!("invalid request body at `{param}`: {inner}"),
        )
    })
}

/// Validated generation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// What the worker needs.
    pub sampling: SamplingParams,
    /// Stop strings, applied by the gateway on the detokenised text.
    pub stop: Vec<String>,
    /// Whether to stream.
    pub stream: bool,
    /// Whether the stream ends with a usage chunk.
    pub include_usage: bool,
    /// End user.
    pub user: Option<String>,
}

impl CommonParams {
    /// Validates the parameters; `default_max_tokens` and the model's `defaults` apply to what
    /// the request does not give.
    pub fn validate(
        &self,
        default_max_tokens: u32,
        defaults: &SamplingDefaults,
    ) -> Result<Generation, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                format!("n={n} is not supported yet; use n=1"),
            ));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default_max_tokens);
        if max_tokens == 0 {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let temperature = self.temperature.unwrap_or(defaults.temperature);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                "temperature must be between 0 and 2",
            ));
        }
        let top_p = self.top_p.unwrap_or(defaults.top_p);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
        }
        let top_k = match self.top_k {
            None => defaults.top_k,
            Some(-1) => None,
            Some(k) if k >= 1 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
            Some(_) => {
                return Err(ApiError::invalid(
                    "top_k",
                    "top_k must be -1 (no limit) or at least 1",
                ));
            }
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "stop sequences must not be empty",
            ));
        }
        let logprobs = self.logprobs_wanted()?;
        if !self.stream && self.stream_options.is_some() {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options requires stream=true",
            ));
        }
        Ok(Generation {
            sampling: SamplingParams {
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed: self.seed,
                stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
                ignore_eos: self.ignore_eos,
                logprobs,
            },
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            user: self.user.clone(),
        })
    }
}

impl CommonParams {
    /// How many alternatives per token the request wants log-probabilities of, if any.
    fn logprobs_wanted(&self) -> Result<Option<u32>, ApiError> {
        let (wanted, param) = match (self.logprobs, self.top_logprobs) {
            (Some(LogprobsParam::Top(_)), Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs goes with logprobs=true; or give the number as logprobs",
                ));
            }
            (Some(LogprobsParam::Top(n)), None) => (Some(n), "logprobs"),
            (Some(LogprobsParam::Switch(true)), top) => (Some(top.unwrap_or(0)), "top_logprobs"),
            (_, Some(n)) if n > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs requires logprobs=true",
                ));
            }
            _ => (None, "logprobs"),
        };
        match wanted {
            Some(n) if n > MAX_TOP_LOGPROBS => Err(ApiError::invalid(
                param,
                format!("at most {MAX_TOP_LOGPROBS} alternatives per token (asked for {n})"),
            )),
            wanted => Ok(wanted),
        }
    }
}

impl ChatRequest {
    /// The conversation with text content only.
    pub fn conversation(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if let Some(field) = m.unsupported_field() {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].{field}"),
                        format!("the message field `{field}` is not supported"),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid(
                                        format!("messages[{i}].content"),
                                        format!("content parts of type {kind:?} are not supported"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(ChatMessage {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }
}

/// The `usage` object, with `prompt_tokens_details.cached_tokens`.
pub fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens.saturating_add(usage.completion_tokens),
        "prompt_tokens_details": { "cached_tokens": usage.cached_tokens },
    })
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// A generated token's log-probabilities with the token and its alternatives as text (a
/// token alone may decode to part of a character: U+FFFD then).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenChoice {
    /// The token's text.
    pub text: String,
    /// Its log-probability, at least [`LOGPROB_FLOOR`].
    pub logprob: f32,
    /// The most likely tokens at its position and their log-probabilities.
    pub top: Vec<(String, f32)>,
}

/// The least log-probability reported: impossible tokens get this instead of negative
/// infinity, which JSON cannot carry (vLLM's choice too).
pub const LOGPROB_FLOOR: f32 = -9999.0;

/// Identity of one response: id, model, creation time.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    /// Response id.
    pub id: String,
    /// Model name.
    pub model: String,
    /// Unix seconds.
    pub created: u64,
    /// Endpoint.
    pub endpoint: Endpoint,
}

impl ResponseMeta {
    /// The whole (non-streaming) response; `logprobs` as [`Self::logprobs`] made it.
    pub fn full(
        &self,
        text: &str,
        finish: FinishReason,
        usage: &Usage,
        logprobs: Option<Value>,
    ) -> Value {
        let logprobs = logprobs.unwrap_or(Value::Null);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.as_str(),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": logprobs,
                "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json(usage),
        })
    }

    /// A streaming chunk with new text (and, on the last one, the finish reason), with the
    /// log-probabilities of its tokens when asked for.
    pub fn chunk(
        &self,
        text: Option<&str>,
        first: bool,
        finish: Option<FinishReason>,
        logprobs: Option<Value>,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let logprobs = logprobs.unwrap_or(Value::Null);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The `logprobs` object of a choice, for these tokens, in the endpoint's format:
    /// completions' `tokens`, `token_logprobs`, `top_logprobs` and `text_offset` (each token's
    /// place in the text, counting from `text_offset` characters), or chat's `content` list.
    pub fn logprobs(&self, tokens: &[TokenChoice], text_offset: usize) -> Value {
        match self.endpoint {
            Endpoint::Completions => {
                let mut offsets = Vec::with_capacity(tokens.len());
                let mut at = text_offset;
                for t in tokens {
                    offsets.push(at);
                    at += t.text.chars().count();
                }
                json!({
                    "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens
                        .iter()
                        .map(|t| {
                            t.top
                                .iter()
                                .map(|(text, lp)| (text.clone(), json!(lp)))
                                .collect::<serde_json::Map<_, _>>()
                        })
                        .collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
            Endpoint::Chat => {
                let entry = |text: &str, logprob: f32| json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()});
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(&t.text, t.logprob);
                        e["top_logprobs"] =
                            t.top.iter().map(|(text, lp)| entry(text, *lp)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }

    /// The usage chunk that ends a stream when `include_usage` was asked for.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(usage),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_field() {
        let e =
            parse_request::<CompletionRequest>(br#"{"model":"m","prompt":"x","max_tokens":"ten"}"#)
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{e:?}");
        let e = parse_request::<CompletionRequest>(br#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"), "{e:?}");
        let e =
            parse_request::<ChatRequest>(br#"{"model":"m","messages":[{"role":1}]}"#).unwrap_err();
        assert!(
            e.param.as_deref().unwrap().starts_with("messages[0]"),
            "{e:?}"
        );
        let e = parse_request::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("body"));
        let ok = parse_request::<ChatRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"seed":4}"#,
        )
        .unwrap();
        assert_eq!(ok.params.seed, Some(4));
    }

    #[test]
    fn validation_rejects_unsupported_and_out_of_range() {
        let p = |json: &str| {
            parse::<CommonParams>(json.as_bytes())
                .unwrap()
                .validate(16, &SamplingDefaults::default())
        };
        assert_eq!(p(r#"{"n":2}"#).unwrap_err().param.as_deref(), Some("n"));
        assert_eq!(
            p(r#"{"temperature":3}"#).unwrap_err().param.as_deref(),
            Some("temperature")
        );
        assert_eq!(
            p(r#"{"top_p":0}"#).unwrap_err().param.as_deref(),
            Some("top_p")
        );
        assert_eq!(
            p(r#"{"top_k":0}"#).unwrap_err().param.as_deref(),
            Some("top_k")
        );
        assert_eq!(p(r#"{"top_k":-1}"#).unwrap().sampling.top_k, None);
        assert_eq!(p(r#"{"top_k":40}"#).unwrap().sampling.top_k, Some(40));
        assert_eq!(
            p(r#"{"max_tokens":0}"#).unwrap_err().param.as_deref(),
            Some("max_tokens")
        );
        let logprobs = |json: &str| p(json).map(|g| g.sampling.logprobs);
        assert_eq!(logprobs(r#"{}"#).unwrap(), None);
        assert_eq!(logprobs(r#"{"logprobs":3}"#).unwrap(), Some(3));
        assert_eq!(logprobs(r#"{"logprobs":0}"#).unwrap(), Some(0));
        assert_eq!(logprobs(r#"{"logprobs":true}"#).unwrap(), Some(0));
        assert_eq!(
            logprobs(r#"{"logprobs":true,"top_logprobs":5}"#).unwrap(),
            Some(5)
        );
        assert_eq!(
            logprobs(r#"{"logprobs":false,"top_logprobs":0}"#).unwrap(),
            None
        );
        for (json, param) in [
            (r#"{"top_logprobs":2}"#, "top_logprobs"),
            (r#"{"logprobs":false,"top_logprobs":2}"#, "top_logprobs"),
            (r#"{"logprobs":2,"top_logprobs":2}"#, "top_logprobs"),
            (r#"{"logprobs":21}"#, "logprobs"),
            (r#"{"logprobs":true,"top_logprobs":21}"#, "top_logprobs"),
        ] {
            assert_eq!(p(json).unwrap_err().param.as_deref(), Some(param), "{json}");
        }
        assert!(parse::<CommonParams>(br#"{"logprobs":-1}"#).is_err());
        let g =
            p(r#"{"stop":"\n","seed":3,"stream":true,"stream_options":{"include_usage":true}}"#)
                .unwrap();
        assert_eq!(g.stop, vec!["\n".to_string()]);
        assert_eq!(g.sampling.seed, Some(3));
        assert_eq!(g.sampling.max_tokens, 16);
        assert!(g.include_usage);
    }
}
