//! One request preparation for both front doors (HTTP and the NATS API): API key, model,
//! conversation and parameter checks, defaults (the context clamp of `max_tokens`), the chat
//! template and tokenisation. Large requests are parsed, rendered and tokenised on blocking
//! threads, at most a configured number at once, so a burst of huge prompts never stalls the
//! async runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use preble_protocol::{ApiRequest, ChatMessage, ErrorCode};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::models::{Models, ServedModel};
use crate::openai::{
    ChatMessageIn, ChatRequest, CommonParams, CompletionRequest, Content, Endpoint, Generation,
    Prompt, Stop,
};

/// A client's request as either front door parsed it, not yet validated.
#[derive(Clone, Debug)]
pub enum ClientRequest {
    /// A completion (`/v1/completions`, or a NATS request with `prompt` or `prompt_tokens`).
    Completion(CompletionRequest),
    /// A chat (`/v1/chat/completions`, or a NATS request with `messages`).
    Chat(ChatRequest),
}

impl ClientRequest {
    /// The OpenAI form of a NATS API request.
    pub fn from_api(request: ApiRequest) -> Result<ClientRequest, ApiError> {
        let params = CommonParams {
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k.map(i64::from),
            seed: request.seed,
            stop: Some(Stop::Many(request.stop)),
            user: request.user,
            ignore_eos: request.ignore_eos,
            stream: true,
            ..CommonParams::default()
        };
        let model = request.model;
        match (request.prompt, request.prompt_tokens, request.messages) {
            (Some(text), None, None) => Ok(ClientRequest::Completion(CompletionRequest {
                model,
                prompt: Prompt::Text(text),
                params,
            })),
            (None, Some(ids), None) => Ok(ClientRequest::Completion(CompletionRequest {
                model,
                prompt: Prompt::Tokens(ids),
                params,
            })),
            (None, None, Some(messages)) => Ok(ClientRequest::Chat(ChatRequest {
                model,
                messages: messages
                    .into_iter()
                    .map(|m| ChatMessageIn::text(m.role, m.content))
                    .collect(),
                params,
            })),
            _ => Err(ApiError::invalid(
                "prompt",
                "set exactly one of prompt, prompt_tokens and messages",
            )),
        }
    }

    /// Which endpoint the request is for.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            ClientRequest::Completion(_) => Endpoint::Completions,
            ClientRequest::Chat(_) => Endpoint::Chat,
        }
    }
}

/// A request ready to submit.
#[derive(Debug)]
pub struct Prepared {
    /// Which endpoint it came through.
    pub endpoint: Endpoint,
    /// The model it is for.
    pub model: Arc<ServedModel>,
    /// Its prompt tokens.
    pub prompt: Vec<u32>,
    /// Validated generation settings.
    pub generation: Generation,
}

/// What the prompt is before tokenisation.
enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

/// Prepares requests for both front doors (cheap to clone: shared).
#[derive(Clone)]
pub struct Preparer {
    inner: Arc<Inner>,
}

struct Inner {
    models: Models,
    api_keys: Vec<String>,
    default_max_tokens: u32,
    threads: Semaphore,
    max_waiting: usize,
    waiting: AtomicUsize,
}

/// Bodies up to this size are prepared inline: handing them to a thread would cost more than
/// it saves, and serialise a saturated gateway behind the handoffs.
pub const INLINE_BODY_BYTES: usize = 16 * 1024;

/// Limits of the preparation stage.
#[derive(Clone, Copy, Debug)]
pub struct PrepareLimits {
    /// Requests parsed, rendered and tokenised at once (each on a blocking thread).
    pub threads: usize,
    /// Requests allowed to wait for a thread; beyond that a request is refused at once with
    /// `overloaded` (each waiting request holds its body in memory).
    pub max_waiting: usize,
}

impl Preparer {
    /// A preparer for `models`; `api_keys` empty means no authentication.
    pub fn new(
        models: Models,
        api_keys: Vec<String>,
        default_max_tokens: u32,
        limits: PrepareLimits,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                models,
                api_keys,
                default_max_tokens,
                threads: Semaphore::new(limits.threads.max(1)),
                max_waiting: limits.max_waiting,
                waiting: AtomicUsize::new(0),
            }),
        }
    }

    /// The served models.
    pub fn models(&self) -> &Models {
        &self.inner.models
    }

    /// Checks a presented `Authorization` header value (`Bearer <key>`); returns the key it
    /// matched (`None` when the gateway has no keys).
    pub fn authorize<'a>(
        &self,
        authorization: Option<&'a str>,
    ) -> Result<Option<&'a str>, ApiError> {
        if self.inner.api_keys.is_empty() {
            return Ok(None);
        }
        let presented = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(key) if self.inner.api_keys.iter().any(|k| k == key) => Ok(Some(key)),
            _ => Err(ApiError::new(
                ErrorCode::InvalidApiKey,
                "missing or unknown API key (send `Authorization: Bearer <key>`)",
            )),
        }
    }

    /// Parses a request (`parse` turns the front door's `body_bytes` bytes into a
    /// [`ClientRequest`]), validates it, applies the defaults and tokenises its prompt. A small
    /// request is prepared at once, where it is (that takes well under a millisecond); a large
    /// one on a blocking thread under the concurrency bound, so it never stalls the runtime.
    pub async fn prepare(
        &self,
        body_bytes: usize,
        parse: impl FnOnce() -> Result<ClientRequest, ApiError> + Send + 'static,
    ) -> Result<Prepared, ApiError> {
        if body_bytes <= INLINE_BODY_BYTES {
            return self.inner.prepare(parse()?);
        }
        let permit =
            {
                let _waiting = Waiting::enter(&self.inner)?;
                self.inner.threads.acquire().await.map_err(|_| {
                    ApiError::new(ErrorCode::Internal, "the gateway is shutting down")
                })?
            };
        let inner = self.inner.clone();
        let prepared = tokio::task::spawn_blocking(move || inner.prepare(parse()?))
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("preparation failed: {e}")))?;
        drop(permit);
        prepared
    }
}

/// Counts a request waiting for a preparation thread while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(inner: &'a Inner) -> Result<Self, ApiError> {
        let before = inner.waiting.fetch_add(1, Ordering::AcqRel);
        let entered = Waiting(&inner.waiting);
        if before >= inner.max_waiting {
            return Err(ApiError::new(
                ErrorCode::Overloaded,
                "too many requests are waiting to be tokenised; retry shortly",
            ));
        }
        Ok(entered)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    fn prepare(&self, request: ClientRequest) -> Result<Prepared, ApiError> {
        let endpoint = request.endpoint();
        let (model, input, params, default_max_tokens, param) = match request {
            ClientRequest::Completion(r) => {
                let input = match r.prompt {
                    Prompt::Text(text) => PromptInput::Text(text),
                    Prompt::Tokens(ids) => PromptInput::Tokens(ids),
                    Prompt::Texts(mut texts) if texts.len() == 1 => {
                        PromptInput::Text(texts.remove(0))
                    }
                    Prompt::Texts(_) => {
                        return Err(ApiError::invalid(
                            "prompt",
                            "batched prompts are not supported; send one prompt per request",
                        ));
                    }
                };
                (r.model, input, r.params, 16, "prompt")
            }
            ClientRequest::Chat(r) => {
                let conversation = r.conversation()?;
                let default = self.default_max_tokens;
                (
                    r.model,
                    PromptInput::Chat(conversation),
                    r.params,
                    default,
                    "messages",
                )
            }
        };
        let model = self.models.get(&model)?;
        // Parameters are checked before the (costly) tokenisation.
        params.validate(default_max_tokens, &model.sampling_defaults)?;
        let prompt = match input {
            PromptInput::Text(text) => {
                model.check_text_len(text.len(), param)?;
                model.encode(&text)?
            }
            PromptInput::Chat(messages) => {
                let bytes = messages.iter().map(|m| m.content.len()).sum();
                model.check_text_len(bytes, param)?;
                model.encode_chat(&messages)?
            }
            PromptInput::Tokens(ids) => ids,
        };
        let room = model.context_len.saturating_sub(prompt.len() as u32).max(1);
        let generation = params.validate(default_max_tokens.min(room), &model.sampling_defaults)?;
        model.check_prompt(&prompt, generation.sampling.max_tokens, param)?;
        Ok(Prepared {
            endpoint,
            model,
            prompt,
            generation,
        })
    }
}

impl ChatMessageIn {
    /// A message with text content.
    pub fn text(role: String, content: String) -> Self {
        Self {
            role,
            content: Some(Content::Text(content)),
            ..Self::default()
        }
    }
}
