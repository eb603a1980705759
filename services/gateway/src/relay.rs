//! Submits a tokenised request over NATS and yields its token stream in order.
//!
//! The stream subscription is made before the request is published, so nothing is missed.
//! Messages are reordered by `seq`; duplicates are dropped; a gap that does not fill, or
//! silence longer than the idle timeout, ends the stream with an error. Dropping a
//! [`Generation`] before its end (client gone, stop string hit) broadcasts a cancellation so
//! the worker stops computing it. A request whose worker is lost before the caller saw any of
//! its output is queued again (and routed to another worker) instead of failing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Subscriber, jetstream};
use futures::StreamExt;
use preble_protocol::{
    Cancel, ErrorCode, FinishReason, GenerateRequest, SamplingParams, StreamBody, StreamMessage,
    Subjects, Usage, decode, encode,
};
use tracing::{Span, debug, field::Empty, warn};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Messages held past a missing one before the stream is declared broken.
const MAX_REORDER: usize = 256;

/// Times a request is queued again when its worker is lost before it produced any output.
const MAX_RESUBMISSIONS: u32 = 2;

/// What a generation yields.
#[derive(Clone, Debug, PartialEq)]
pub enum RelayEvent {
    /// New tokens.
    Tokens(Vec<u32>),
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

/// Broadcasts a cancellation when dropped while armed.
struct CancelGuard {
    client: Client,
    subject: String,
    request_id: String,
    armed: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let subject = std::mem::take(&mut self.subject);
        let cancel = Cancel::new(std::mem::take(&mut self.request_id), "client went away");
        runtime.spawn(async move {
            if let Err(e) = client.publish(subject, encode(&cancel).into()).await {
                warn!(error = %e, "failed to publish a cancellation");
            }
        });
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
    /// The request as last queued.
    request: GenerateRequest,
    /// Times the request was queued again after losing its worker.
    resubmissions: u32,
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
                return Some(self.deliver(body));
            }
            if self.buffer.len() > MAX_REORDER {
                return Some(self.fail(ApiError::new(
                    ErrorCode::Internal,
                    format!("token stream lost message {}", self.next_seq),
                )));
            }
            let message =
                match tokio::time::timeout(self.idle_timeout, self.subscription.next()).await {
                    Err(_) => {
                        return Some(self.fail(ApiError::new(
                            ErrorCode::Timeout,
                            format!("no tokens for {} s", self.idle_timeout.as_secs()),
                        )));
                    }
                    Ok(None) => {
                        return Some(
                            self.fail(ApiError::new(ErrorCode::Internal, "message bus closed")),
                        );
                    }
                    Ok(Some(message)) => message,
                };
            let message = match decode::<StreamMessage>(&message.payload) {
                Ok(m) if m.request_id == self.request_id => m,
                Ok(_) | Err(_) => {
                    self.metrics.malformed_messages.inc();
                    warn!(request = %self.request_id, "malformed or foreign message on a token stream");
                    continue;
                }
            };
            if let StreamBody::Error { code, .. } = &message.body {
                if *code == ErrorCode::WorkerLost && self.next_seq == 0 {
                    match self.resubmit().await {
                        Ok(()) => continue,
                        Err(e) => return Some(self.fail(e)),
                    }
                }
                return Some(self.deliver(message.body));
            }
            if message.seq < self.next_seq || self.buffer.contains_key(&message.seq) {
                self.metrics.duplicate_messages.inc();
                continue;
            }
            self.buffer.insert(message.seq, message.body);
        }
    }

    /// Queues the request again after its worker was lost before the caller saw any of its
    /// output, on a fresh stream subject so that nothing from the lost attempt can mix in.
    /// Gives up (with `worker_lost`) after [`MAX_RESUBMISSIONS`].
    async fn resubmit(&mut self) -> Result<(), ApiError> {
        if self.resubmissions >= MAX_RESUBMISSIONS {
            return Err(ApiError::new(
                ErrorCode::WorkerLost,
                format!("lost {} workers before any output", self.resubmissions + 1),
            ));
        }
        self.resubmissions += 1;
        self.request.stream_key = format!("{}-retry{}", self.request_id, self.resubmissions);
        warn!(request = %self.request_id, attempt = self.resubmissions, "worker lost before any output: queued again");
        self.subscription = self.relay.publish(&self.request, &self.span).await?;
        self.buffer.clear();
        self.metrics.resubmissions.inc();
        self.span.record("resubmissions", self.resubmissions);
        Ok(())
    }

    fn deliver(&mut self, body: StreamBody) -> Result<RelayEvent, ApiError> {
        match body {
            StreamBody::Tokens { token_ids } => Ok(RelayEvent::Tokens(token_ids)),
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
