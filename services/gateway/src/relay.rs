//! Submits a tokenised request over NATS and yields its token stream in order.
//!
//! The stream subscription is made before the request is published, so nothing is missed.
//! Messages are reordered by `seq`; duplicates are dropped; silence longer than the idle
//! timeout ends the stream with an error. Dropping a
//! [`Generation`] before its end (client gone, stop string hit) broadcasts a cancellation so
//! the worker stops computing it.
//!
//! A request whose worker is lost, or whose stream lost messages (a gap, or silence after
//! this gateway reconnected to NATS, that nothing repairs within two seconds), is queued
//! again, as a new attempt routed like any request (Dynamo's request migration). Before any output it simply starts over; after output, the
//! attempt's prompt is the original prompt plus every token the caller has seen, and the
//! worker continues at that output position
//! ([`preble_protocol::GenerateRequest::resumed_tokens`]). Sampling depends only on (seed,
//! position), so a seeded or greedy stream goes on exactly as it would have, and the caller
//! sees one uninterrupted stream. Each attempt has its own id (`{request}-a{n}`) and stream
//! subject, so nothing of a lost attempt mixes in, and the lost attempt is cancelled in case
//! its worker is alive after all.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Subscriber, jetstream};
use futures::StreamExt;
use preble_protocol::{
    Cancel, ErrorCode, FinishReason, GenerateRequest, SamplingParams, StreamBody, StreamMessage,
    Subjects, TokenLogprob, Usage, decode, encode,
};
use tracing::{Span, debug, field::Empty, warn};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Messages held past a missing one before the stream is taken as broken at once.
const MAX_REORDER: usize = 256;

/// Times a request is queued again after losing its worker.
const MAX_RESUBMISSIONS: u32 = 2;

/// The most output a stream may have shown and still resume on another worker, which must
/// compute it again as prompt.
const MAX_RESUMED_TOKENS: usize = 16_384;

/// What a generation yields.
#[derive(Clone, Debug, PartialEq)]
pub enum RelayEvent {
    /// New tokens, with their log-probabilities when the request asked for them.
    Tokens(Vec<u32>, Vec<TokenLogprob>),
    /// The end.
    Final {
        /// Why it stopped.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
}

/// Publishes requests and opens their streams.
#[derive(Clone)]
pub struct Relay {
    client: Client,
    jetstream: jetstream::Context,
    subjects: Subjects,
    idle_timeout: Duration,
    metrics: Metrics,
    gateway_id: String,
    submit_budget: Duration,
}

/// Pause between attempts to queue a request while the request queue is unreachable.
const SUBMIT_RETRY_PAUSE: Duration = Duration::from_millis(250);

impl Relay {
    /// A relay over `client` for gateway instance `gateway_id` (named in every request); a
    /// request that cannot be queued is retried for up to `submit_budget` (a NATS outage)
    /// before it fails with `overloaded`.
    pub fn new(
        client: Client,
        subjects: Subjects,
        idle_timeout: Duration,
        metrics: Metrics,
        gateway_id: String,
        submit_budget: Duration,
    ) -> Self {
        Self {
            jetstream: jetstream::new(client.clone()),
            client,
            subjects,
            idle_timeout,
            metrics,
            gateway_id,
            submit_budget,
        }
    }

    /// Submits a request; its stream starts immediately. The request's trace starts here
    /// (span `gateway.request`, ended when the [`Generation`] is dropped; a child of the
    /// caller's trace when `caller_trace` carries one) and travels in the NATS headers.
    pub async fn submit(
        &self,
        model: &str,
        prompt_tokens: Vec<u32>,
        sampling: SamplingParams,
        user: Option<String>,
        caller_trace: Option<&HeaderMap>,
    ) -> Result<Generation, ApiError> {
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let span = preble_telemetry::propagation::start_trace(caller_trace, || {
            tracing::info_span!(
                "gateway.request",
                otel.kind = "server",
                otel.status_code = Empty,
                request_id = %request_id,
                model = %model,
                prompt_tokens = prompt_tokens.len(),
                max_tokens = sampling.max_tokens,
                stream = Empty,
                finish_reason = Empty,
                completion_tokens = Empty,
                cached_tokens = Empty,
                resubmissions = Empty,
                resumed_tokens = Empty,
                error = Empty,
            )
        });
        let mut request = GenerateRequest::new(
            request_id.clone(),
            model.to_string(),
            prompt_tokens,
            sampling,
            request_id.clone(),
        );
        request.submitted_at_ms = preble_telemetry::unix_ms();
        request.user = user;
        request.gateway_id = Some(self.gateway_id.clone());
        let subscription = self.publish(&request, &span).await?;
        Ok(Generation {
            prompt_len: request.prompt_tokens.len(),
            max_tokens: request.sampling.max_tokens,
            delivered: Vec::new(),
            last_heard: Instant::now(),
            suspect_since: None,
            connects_seen: self.connects(),
            guard: CancelGuard {
                client: self.client.clone(),
                subject: self.subjects.cancel(),
                request_id: request_id.clone(),
                armed: true,
            },
            request_id,
            subscription,
            buffer: BTreeMap::new(),
            next_seq: 0,
            idle_timeout: self.idle_timeout,
            metrics: self.metrics.clone(),
            finished: false,
            span,
            relay: self.clone(),
            request,
            resubmissions: 0,
        })
    }

    /// Subscribes to `request`'s stream subject, then queues the request (with `span`'s trace
    /// context) and waits until the queue has it.
    async fn publish(
        &self,
        request: &GenerateRequest,
        span: &Span,
    ) -> Result<Subscriber, ApiError> {
        let subscription = self
            .client
            .subscribe(self.subjects.stream_of(&request.stream_key))
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Overloaded,
                    format!("message bus unavailable: {e}"),
                )
            })?;
        // The stream key names this submission: JetStream drops a repeat of it (an attempt
        // whose confirmation was lost), so retrying never queues a request twice.
        let mut headers = preble_telemetry::propagation::headers_for(span);
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            request.stream_key.as_str(),
        );
        let payload: bytes::Bytes = encode(request).into();
        let deadline = Instant::now() + self.submit_budget;
        loop {
            match self.publish_once(headers.clone(), payload.clone()).await {
                Ok(()) => return Ok(subscription),
                Err(e) if Instant::now() + SUBMIT_RETRY_PAUSE < deadline => {
                    debug!(error = %e, "request queue unavailable; retrying");
                    tokio::time::sleep(SUBMIT_RETRY_PAUSE).await;
                }
                Err(e) => return Err(e.retry_after(Duration::from_secs(1))),
            }
        }
    }

    /// How many times this gateway has connected to NATS.
    fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    /// One attempt to put a request on the requests stream, confirmed.
    async fn publish_once(
        &self,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), ApiError> {
        let ack = self
            .jetstream
            .publish_with_headers(self.subjects.requests(), headers, payload)
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Overloaded,
                    format!("request queue unavailable: {e}"),
                )
            })?;
        ack.await.map_err(|e| {
            ApiError::new(
                ErrorCode::Overloaded,
                format!("request queue did not confirm: {e}"),
            )
        })?;
        Ok(())
    }
}

/// How long a stream may look broken (a gap, or silence after this gateway reconnected to
/// NATS) before the rest is asked of a new attempt.
const STREAM_PATIENCE: Duration = Duration::from_secs(2);

/// How often a waiting stream checks whether the gateway reconnected to NATS.
const RECONNECT_POLL: Duration = Duration::from_millis(250);

/// What waiting on a stream heard.
enum Heard {
    /// A message on the attempt's subject.
    Message(async_nats::Message),
    /// Messages were lost and nothing repaired it in time.
    Interrupted,
    /// Silence for the idle timeout.
    Nothing,
    /// The subscription ended.
    Closed,
}

/// Why a request is queued again.
#[derive(Clone, Copy)]
enum Cause {
    /// The scheduler declared its worker lost.
    WorkerLost,
    /// Its token stream lost messages.
    Interrupted,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::WorkerLost => "its worker was lost",
            Cause::Interrupted => "its token stream was interrupted",
        }
    }
}

/// What queueing a request again led to.
enum Attempt {
    /// A new attempt is on its way.
    Queued,
    /// Nothing was left to generate: the stream ends with this.
    Complete(StreamBody),
}

/// Broadcasts a cancellation of the current attempt when dropped while armed.
struct CancelGuard {
    client: Client,
    subject: String,
    request_id: String,
    armed: bool,
}

impl CancelGuard {
    /// Broadcasts a cancellation of the current attempt, without waiting for it.
    fn cancel_now(&self, reason: &str) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let subject = self.subject.clone();
        let cancel = Cancel::new(self.request_id.clone(), reason);
        runtime.spawn(async move {
            if let Err(e) = client.publish(subject, encode(&cancel).into()).await {
                warn!(error = %e, "failed to publish a cancellation");
            }
        });
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            self.cancel_now("client went away");
        }
    }
}

/// The token stream of one submitted request.
pub struct Generation {
    request_id: String,
    subscription: Subscriber,
    buffer: BTreeMap<u64, StreamBody>,
    next_seq: u64,
    idle_timeout: Duration,
    metrics: Metrics,
    finished: bool,
    guard: CancelGuard,
    span: Span,
    /// For queueing the request again.
    relay: Relay,
    /// The request as last queued: the current attempt.
    request: GenerateRequest,
    /// Times the request was queued again after losing its worker.
    resubmissions: u32,
    /// Length of the prompt the caller sent.
    prompt_len: usize,
    /// The caller's `max_tokens`.
    max_tokens: u32,
    /// Every token yielded to the caller so far, over all attempts.
    delivered: Vec<u32>,
    /// When the current attempt last sent a message (or started).
    last_heard: Instant,
    /// Since when messages of the current attempt may have been lost (see [`Self::wait`]).
    suspect_since: Option<Instant>,
    /// The gateway's NATS connection count when last looked at.
    connects_seen: u64,
}

impl Generation {
    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The request's span (`gateway.request`), for recording what the caller knows.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The next event; `None` after the end.
    pub async fn next(&mut self) -> Option<Result<RelayEvent, ApiError>> {
        if self.finished {
            return None;
        }
        loop {
            if let Some(body) = self.buffer.remove(&self.next_seq) {
                self.next_seq += 1;
                if self.buffer.is_empty() {
                    self.suspect_since = None;
                }
                return Some(self.deliver(body));
            }
            let message = match self.wait().await {
                Heard::Message(message) => message,
                Heard::Interrupted => match self.retry(Cause::Interrupted).await {
                    None => continue,
                    end => return end,
                },
                Heard::Nothing => {
                    return Some(self.fail(ApiError::new(
                        ErrorCode::Timeout,
                        format!("no tokens for {} s", self.idle_timeout.as_secs()),
                    )));
                }
                Heard::Closed => {
                    return Some(
                        self.fail(ApiError::new(ErrorCode::Internal, "message bus closed")),
                    );
                }
            };
            let message = match decode::<StreamMessage>(&message.payload) {
                Ok(m) if m.request_id == self.request.request_id => m,
                Ok(_) | Err(_) => {
                    self.metrics.malformed_messages.inc();
                    warn!(request = %self.request_id, "malformed or foreign message on a token stream");
                    continue;
                }
            };
            self.last_heard = Instant::now();
            if let StreamBody::Error { code, .. } = &message.body {
                if *code == ErrorCode::WorkerLost {
                    match self.retry(Cause::WorkerLost).await {
                        None => continue,
                        end => return end,
                    }
                }
                return Some(self.deliver(message.body));
            }
            if message.seq < self.next_seq || self.buffer.contains_key(&message.seq) {
                self.metrics.duplicate_messages.inc();
                continue;
            }
            if message.seq > self.next_seq {
                self.suspect_since.get_or_insert_with(Instant::now);
            }
            self.buffer.insert(message.seq, message.body);
            if self.buffer.len() > MAX_REORDER
                && let Some(end) = self.retry(Cause::Interrupted).await
            {
                return Some(end);
            }
        }
    }

    /// Waits for the next message of the current attempt, watching for what says some of its
    /// messages were lost: a gap or a reconnection of this gateway to NATS (core NATS does
    /// not keep what was published while the subscription was away) that no message repairs
    /// within [`STREAM_PATIENCE`].
    async fn wait(&mut self) -> Heard {
        loop {
            let now = Instant::now();
            let interrupted_at = self.suspect_since.map(|since| since + STREAM_PATIENCE);
            if interrupted_at.is_some_and(|at| now >= at) {
                return Heard::Interrupted;
            }
            let idle_at = self.last_heard + self.idle_timeout;
            if now >= idle_at {
                return Heard::Nothing;
            }
            let until = [Some(idle_at), interrupted_at, Some(now + RECONNECT_POLL)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(idle_at);
            match tokio::time::timeout_at(until.into(), self.subscription.next()).await {
                Ok(Some(message)) => return Heard::Message(message),
                Ok(None) => return Heard::Closed,
                Err(_) => {
                    let connects = self.relay.connects();
                    if connects != self.connects_seen {
                        self.connects_seen = connects;
                        self.suspect_since.get_or_insert(now);
                    }
                }
            }
        }
    }

    /// Queues the request again: `None` when a new attempt is on its way, else how the
    /// stream ends.
    async fn retry(&mut self, cause: Cause) -> Option<Result<RelayEvent, ApiError>> {
        match self.resubmit(cause).await {
            Ok(Attempt::Queued) => None,
            Ok(Attempt::Complete(end)) => Some(self.deliver(end)),
            Err(e) => Some(self.fail(e)),
        }
    }

    /// Queues the request again after its worker was lost or its stream broke: a new attempt
    /// that resumes after the output the caller has seen. Gives up (with `worker_lost`) after
    /// [`MAX_RESUBMISSIONS`], or when more than [`MAX_RESUMED_TOKENS`] were shown.
    async fn resubmit(&mut self, cause: Cause) -> Result<Attempt, ApiError> {
        let shown = self.delivered.len();
        if self.resubmissions >= MAX_RESUBMISSIONS {
            return Err(ApiError::new(
                ErrorCode::WorkerLost,
                format!(
                    "{}, {} times in all (after {shown} tokens of output)",
                    cause.as_str(),
                    self.resubmissions + 1
                ),
            ));
        }
        if shown > MAX_RESUMED_TOKENS {
            return Err(ApiError::new(
                ErrorCode::WorkerLost,
                format!(
                    "{} after {shown} tokens, more than a stream resumes ({MAX_RESUMED_TOKENS})",
                    cause.as_str()
                ),
            ));
        }
        let left = self.max_tokens.saturating_sub(shown as u32);
        if left == 0 {
            // Every token arrived; only the final message was lost with the worker.
            return Ok(Attempt::Complete(StreamBody::Final {
                finish_reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: self.prompt_len as u32,
                    cached_tokens: 0,
                    completion_tokens: shown as u32,
                },
                timings: Default::default(),
            }));
        }
        self.guard.cancel_now(cause.as_str());
        self.resubmissions += 1;
        let attempt = format!("{}-a{}", self.request_id, self.resubmissions);
        self.request.request_id = attempt.clone();
        self.request.stream_key = attempt.clone();
        self.request.prompt_tokens.truncate(self.prompt_len);
        self.request
            .prompt_tokens
            .extend_from_slice(&self.delivered);
        self.request.resumed_tokens = shown as u32;
        self.request.sampling.max_tokens = left;
        warn!(request = %self.request_id, attempt = self.resubmissions, resumed_tokens = shown, "{}: queued again", cause.as_str());
        self.subscription = self.relay.publish(&self.request, &self.span).await?;
        self.guard.request_id = attempt;
        self.buffer.clear();
        self.next_seq = 0;
        self.suspect_since = None;
        self.last_heard = Instant::now();
        self.connects_seen = self.relay.connects();
        self.metrics.resubmissions.inc();
        if shown > 0 {
            self.metrics.resumed_streams.inc();
        }
        self.span.record("resubmissions", self.resubmissions);
        self.span.record("resumed_tokens", shown);
        Ok(Attempt::Queued)
    }

    fn deliver(&mut self, body: StreamBody) -> Result<RelayEvent, ApiError> {
        match body {
            StreamBody::Tokens {
                token_ids,
                logprobs,
            } => {
                self.delivered.extend_from_slice(&token_ids);
                Ok(RelayEvent::Tokens(token_ids, logprobs))
            }
            StreamBody::Final {
                finish_reason,
                usage,
                ..
            } => {
                self.finished = true;
                self.guard.armed = false;
                self.span.record("finish_reason", finish_reason.as_str());
                self.span
                    .record("completion_tokens", usage.completion_tokens);
                self.span.record("cached_tokens", usage.cached_tokens);
                Ok(RelayEvent::Final {
                    finish_reason,
                    usage,
                })
            }
            StreamBody::Error { code, message } => {
                self.guard.armed = false;
                self.fail(ApiError::new(code, message))
            }
        }
    }

    fn fail(&mut self, error: ApiError) -> Result<RelayEvent, ApiError> {
        self.finished = true;
        self.span.record("otel.status_code", "ERROR");
        self.span.record(
            "error",
            format!("{}: {}", error.code.as_str(), error.message),
        );
        Err(error)
    }
}
