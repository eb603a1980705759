//! Every payload that crosses NATS. Each top-level message carries `v`, the protocol version.
//!
//! Optional and newer fields have serde defaults, so an older sender's message still decodes;
//! unknown fields are ignored, so a newer sender's message does too.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, PROTOCOL_VERSION};

fn version() -> u16 {
    PROTOCOL_VERSION
}

/// A message type that crosses NATS: it knows its own protocol version.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// The `v` field of this message.
    fn version(&self) -> u16;
}

macro_rules! message {
    ($($t:ty),* $(,)?) => {
        $(impl Message for $t {
            fn version(&self) -> u16 {
                self.v
            }
        })*
    };
}

message!(
    GenerateRequest,
    Dispatch,
    DispatchReply,
    StreamMessage,
    Cancel,
    WorkerEvent,
    DigestRequest,
    ApiRequest,
    ApiEvent,
    GatewayBeat,
);

/// How to sample the continuation of one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Softmax temperature; 0 means greedy.
    #[serde(default = "one")]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[serde(default = "one")]
    pub top_p: f32,
    /// Sample only among the `top_k` most likely tokens; absent: no limit.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling; absent means the worker picks one.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Token ids that end generation (besides the model's own end-of-sequence tokens).
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens (benchmarks want exact output lengths).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Return each generated token's log-probability and those of the `n` most likely
    /// tokens at its position (at most [`MAX_TOP_LOGPROBS`]); absent: none.
    #[serde(default)]
    pub logprobs: Option<u32>,
}

/// The most alternatives a request may ask log-probabilities of per token (as vLLM's default
/// `max_logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// One generated token's log-probability (natural log) under the model's distribution, and
/// the most likely tokens at its position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The generated token's log-probability.
    pub logprob: f32,
    /// `(token id, log-probability)` of the most likely tokens, most likely first.
    #[serde(default)]
    pub top: Vec<(u32, f32)>,
}

fn one() -> f32 {
    1.0
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// A tokenised request, published by the gateway to the requests stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// Unique id chosen by the gateway; names the stream subject too.
    pub request_id: String,
    /// Served model name.
    pub model: String,
    /// The prompt as token ids of that model's tokenizer.
    pub prompt_tokens: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Key of the request's token stream: its worker publishes it on
    /// [`crate::Subjects::stream_from`] under its own id, and the gateway listens on
    /// [`crate::Subjects::stream_of`] this key.
    pub stream_key: String,
    /// Gateway wall-clock time of submission, milliseconds since the Unix epoch.
    #[serde(default)]
    pub submitted_at_ms: u64,
    /// The end user, as given by the client (for logs and fairness later).
    #[serde(default)]
    pub user: Option<String>,
    /// The gateway instance holding the client ([`GatewayBeat`]): when it stops beating, the
    /// request has nobody to answer and its worker stops it.
    #[serde(default)]
    pub gateway_id: Option<String>,
    /// How many of `prompt_tokens`' last tokens are output an earlier attempt already streamed
    /// to the client (the stream lost its worker and resumes here). The worker counts them as
    /// output positions `0..resumed_tokens`, so a seeded or greedy request continues exactly
    /// as it would have, and reports usage of the original prompt and the whole output.
    /// `sampling.max_tokens` is what is left to generate.
    #[serde(default)]
    pub resumed_tokens: u32,
}

/// A gateway instance's proof of life, on [`crate::Subjects::gateway_beat`]: workers stop the
/// requests of a gateway that has stopped beating (it died with its clients' connections).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatewayBeat {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// The gateway instance.
    pub gateway_id: String,
    /// Beat period in milliseconds (gone after three missed).
    pub period_ms: u64,
}

impl GenerateRequest {
    /// A request of the current protocol version.
    pub fn new(
        request_id: String,
        model: String,
        prompt_tokens: Vec<u32>,
        sampling: SamplingParams,
        stream_key: String,
    ) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            request_id,
            model,
            prompt_tokens,
            sampling,
            stream_key,
            submitted_at_ms: 0,
            user: None,
            gateway_id: None,
            resumed_tokens: 0,
        }
    }

    /// The prompt the client sent: `prompt_tokens` without the output of earlier attempts.
    pub fn original_prompt(&self) -> &[u32] {
        let original = self
            .prompt_tokens
            .len()
            .saturating_sub(self.resumed_tokens as usize);
        &self.prompt_tokens[..original]
    }
}

/// The scheduler's forward of a request to the worker it picked (request-reply).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// The request itself.
    pub request: GenerateRequest,
    /// 1 for the first worker tried, 2 for the next, and so on.
    #[serde(default)]
    pub attempt: u32,
    /// Prompt tokens the scheduler believes this worker has cached.
    #[serde(default)]
    pub expected_cached_tokens: u32,
}

/// A worker's answer to a [`Dispatch`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchReply {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// The answering worker.
    pub worker_id: String,
    /// Accepted, or rejected with a reason.
    pub outcome: DispatchOutcome,
}

/// Whether a worker took a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DispatchOutcome {
    /// The worker owns the request now and will stream to its subject.
    Accepted,
    /// The worker will not run it; `retryable` says whether another worker may.
    Rejected {
        /// Why, as a client-visible code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
        /// Whether another worker might succeed.
        retryable: bool,
    },
}

/// One message of a request's token stream, ordered by `seq` (0, 1, 2, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamMessage {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// The request this belongs to.
    pub request_id: String,
    /// Position in the stream; the gateway reorders by it and detects gaps and duplicates.
    pub seq: u64,
    /// Tokens, the final message, or an error.
    pub body: StreamBody,
}

/// What a stream message carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StreamBody {
    /// Newly generated tokens, in order.
    Tokens {
        /// The token ids.
        token_ids: Vec<u32>,
        /// Their log-probabilities, one per token, when the request asked for them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprob>,
    },
    /// The end of a successful stream.
    Final {
        /// Why generation stopped.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Where the time went on the worker.
        #[serde(default)]
        timings: Timings,
    },
    /// The end of a failed stream. An error ends the stream whatever its `seq` (the scheduler
    /// reports a lost worker without knowing how many tokens were sent).
    Error {
        /// Client-visible code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled before the end.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV came from the cache instead of being computed.
    #[serde(default)]
    pub cached_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
}

/// Where one request's time went on its worker, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From acceptance to the first iteration that computed any of its prompt.
    pub queue_us: u64,
    /// From acceptance to the publication of its first token (engine time before first token).
    pub first_token_us: u64,
    /// From acceptance to the final message.
    pub total_us: u64,
}

/// Stop a request wherever it is (broadcast to every worker).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// The request to stop.
    pub request_id: String,
    /// Why, for logs.
    #[serde(default)]
    pub reason: String,
    /// Only this worker should act (the scheduler cancels a dispatch that timed out on one
    /// worker without touching its retry on another); `None` means every worker.
    #[serde(default)]
    pub worker_id: Option<String>,
}

impl Cancel {
    /// A cancellation, for every worker, of the current protocol version.
    pub fn new(request_id: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            request_id: request_id.into(),
            reason: reason.into(),
            worker_id: None,
        }
    }
}

/// Something a worker tells the scheduler; `seq` grows by one per event of that worker, so a
/// gap means lost events (the scheduler then asks for a digest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerEvent {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// The worker.
    pub worker_id: String,
    /// Per-worker event sequence number.
    pub seq: u64,
    /// Milliseconds since the Unix epoch at the worker.
    #[serde(default)]
    pub at_ms: u64,
    /// The event.
    pub body: WorkerEventBody,
}

/// The kinds of worker events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WorkerEventBody {
    /// I am alive, and this is what I serve.
    Heartbeat(Heartbeat),
    /// My current load.
    Load(LoadReport),
    /// My KV cache now holds `tokens` after the path whose hash is `parent_hash`, with a node
    /// boundary after them.
    KvInserted(KvInserted),
    /// My KV cache dropped the last `num_tokens` tokens of the path named by `path_hash`.
    KvEvicted(KvEvicted),
    /// The full content of my KV cache (answer to a digest request). It is sent only to the
    /// asker and takes no sequence number of its own: its `seq` is that of the next event on
    /// the events subject, so the asker applies the digest, then the events from `seq` on.
    Digest(Digest),
    /// A request left me (finished, failed or cancelled).
    Finished(FinishedRequest),
    /// I am shutting down: route nothing more to me.
    Leaving,
}

/// A worker's periodic proof of life and description.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Served model names.
    pub models: Vec<String>,
    /// Engine kind (`sim`, `torch`).
    pub engine: String,
    /// Cost profile name (GPU x model), for the scheduler's cost estimates.
    pub profile: String,
    /// KV-cache capacity in tokens.
    pub kv_capacity_tokens: u64,
    /// Heartbeat period in milliseconds (dead after three missed).
    pub period_ms: u64,
}

/// A worker's load, reported at a fixed period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests in the running batch.
    pub running: u32,
    /// Requests waiting for admission.
    pub waiting: u32,
    /// Prompt tokens still to prefill (waiting and partially prefilled requests).
    pub queued_prefill_tokens: u64,
    /// Context tokens of the requests that are decoding.
    pub running_decode_tokens: u64,
    /// KV slots that could be had now (free, or cached and unused by any request).
    pub free_kv_tokens: u64,
    /// Estimated time to finish everything queued, by the cost model, in milliseconds.
    pub est_drain_ms: f64,
    /// Tokens held by the prefix cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Output tokens the running requests may still generate.
    #[serde(default)]
    pub remaining_decode_tokens: u64,
}

/// A span of tokens cached by a worker. Path hashes are `preble_prefix::path_hash` of the
/// token path from the root. The span follows a node boundary the receiver already knows (from
/// an earlier insert or a digest), and may repeat tokens it already holds: an edge split in
/// two is announced as an insert of its upper part, so receivers learn every boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvInserted {
    /// Hash of the path from the root to the span's parent (0 for the root).
    pub parent_hash: u64,
    /// Hash of the path from the root through this span.
    pub path_hash: u64,
    /// The span's tokens.
    pub tokens: Vec<u32>,
}

/// A span of tokens a worker evicted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvEvicted {
    /// Hash of the path from the root through the evicted span.
    pub path_hash: u64,
    /// How many tokens the span held.
    pub num_tokens: u32,
}

/// Everything a worker's KV cache holds: one span per node of its radix tree, each after the
/// span it follows (replaying them as inserts on an empty mirror rebuilds the tree).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    /// The tree's nodes, parents first.
    pub spans: Vec<KvInserted>,
    /// More parts follow (a large cache is sent in several messages, in order).
    #[serde(default)]
    pub more: bool,
}

/// Ask a worker for its [`Digest`] (request-reply on its digest subject; the answer is a
/// [`WorkerEvent`] with a `Digest` body).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DigestRequest {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
}

impl Default for DigestRequest {
    fn default() -> Self {
        Self {
            v: PROTOCOL_VERSION,
        }
    }
}

/// A request that left a worker, with what the scheduler learns from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinishedRequest {
    /// The request.
    pub request_id: String,
    /// How it ended; `None` when it failed.
    pub finish_reason: Option<FinishReason>,
    /// Token counts.
    pub usage: Usage,
    /// Time to first token at the worker, milliseconds.
    pub ttft_ms: f64,
    /// Mean time per output token after the first, milliseconds.
    pub tpot_ms: f64,
}

/// One message of a chat conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A generation request from a client that speaks NATS instead of HTTP. Exactly one of
/// `prompt`, `prompt_tokens` and `messages` must be set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiRequest {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// Served model name.
    pub model: String,
    /// Prompt text (completion).
    #[serde(default)]
    pub prompt: Option<String>,
    /// Prompt token ids (completion).
    #[serde(default)]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Conversation (chat; the model's chat template is applied).
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Softmax temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k limit (vLLM extension).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Vec<String>,
    /// End user.
    #[serde(default)]
    pub user: Option<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks want exact output lengths).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl ApiRequest {
    /// A completion request for `prompt` of the current protocol version.
    pub fn completion(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            model: model.into(),
            prompt: Some(prompt.into()),
            prompt_tokens: None,
            messages: None,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            user: None,
            ignore_eos: false,
        }
    }
}

/// One message the gateway sends to a NATS client's reply inbox, ordered by `seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiEvent {
    /// Protocol version.
    #[serde(default = "version")]
    pub v: u16,
    /// Id the gateway gave the request.
    pub request_id: String,
    /// Position in the stream.
    pub seq: u64,
    /// Text, end or error.
    pub body: ApiEventBody,
}

/// What an [`ApiEvent`] carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ApiEventBody {
    /// New text and the tokens it came from.
    Delta {
        /// Detokenised text (may be empty while a multi-byte character is incomplete).
        text: String,
        /// The tokens.
        token_ids: Vec<u32>,
    },
    /// Successful end.
    Done {
        /// Why generation stopped.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// Failed end.
    Error {
        /// Client-visible code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}
