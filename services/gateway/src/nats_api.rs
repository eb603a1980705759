//! The NATS request API: a client publishes an [`ApiRequest`] to the API subject with a reply
//! inbox and receives [`ApiEvent`]s there, numbered from 0, ending with `Done` or `Error`. An
//! `Authorization: Bearer <key>` header carries the API key; the request is prepared exactly as
//! an HTTP one ([`crate::prepare`]).

use std::sync::Arc;

use async_nats::{Client, Message, Subject};
use futures::StreamExt;
use preble_protocol::{ApiEvent, ApiEventBody, ApiRequest, PROTOCOL_VERSION, decode, encode};
use tracing::warn;

use crate::error::ApiError;
use crate::http::AppState;
use crate::prepare::{ClientRequest, Prepared};
use crate::text::{TextEvent, TextGeneration};

/// The queue group of the API subject: with several gateways on one prefix, each request is
/// answered by exactly one.
pub const QUEUE_GROUP: &str = "preble-gateway";

/// Serves the API subject until the subscription ends.
pub async fn serve(client: Client, state: Arc<AppState>) {
    let subject = state.config.subjects.api_generate();
    let mut sub = match client
        .queue_subscribe(subject.clone(), QUEUE_GROUP.to_string())
        .await
    {
        Ok(sub) => sub,
        Err(e) => {
            warn!(error = %e, %subject, "cannot serve the NATS API");
            return;
        }
    };
    while let Some(message) = sub.next().await {
        let Some(reply) = message.reply.clone() else {
            state.metrics.malformed_messages.inc();
            warn!("NATS API request without a reply subject; nobody to answer");
            continue;
        };
        let client = client.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let mut out = Replier {
                client,
                reply,
                seq: 0,
                request_id: String::new(),
            };
            let served = answer(&state, message, &mut out).await;
            state
                .metrics
                .requests
                .with_label_values(&["nats", &status_of(&served)])
                .inc();
            if let Err(e) = served {
                out.send(ApiEventBody::Error {
                    code: e.code,
                    message: e.message,
                })
                .await;
            }
        });
    }
}

/// The HTTP status an outcome would have had, for the request counter.
fn status_of(served: &Result<(), ApiError>) -> String {
    match served {
        Ok(()) => "200".into(),
        Err(e) => e.code.http_status().to_string(),
    }
}

/// Checks the API key in the message's headers, prepares the request as HTTP would, and
/// streams its events.
async fn answer(state: &AppState, message: Message, out: &mut Replier) -> Result<(), ApiError> {
    let authorization = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Authorization"))
        .map(|v| v.as_str().to_string());
    let key = state.preparer.authorize(authorization.as_deref())?;
    let _admitted = state.admission.admit(key)?;
    let metrics = state.metrics.clone();
    let payload = message.payload.clone();
    let prepared = state
        .preparer
        .prepare(payload.len(), move || {
            match decode::<ApiRequest>(&payload) {
                Ok(request) => ClientRequest::from_api(request),
                Err(e) => {
                    metrics.malformed_messages.inc();
                    Err(ApiError::invalid(
                        "body",
                        format!("malformed API request: {e}"),
                    ))
                }
            }
        })
        .await?;
    generate(state, prepared, message.headers.as_ref(), out).await
}

/// Publishes numbered events to one client's inbox.
struct Replier {
    client: Client,
    reply: Subject,
    seq: u64,
    request_id: String,
}

impl Replier {
    async fn send(&mut self, body: ApiEventBody) {
        let event = ApiEvent {
            v: PROTOCOL_VERSION,
            request_id: self.request_id.clone(),
            seq: self.seq,
            body,
        };
        self.seq += 1;
        if let Err(e) = self
            .client
            .publish(self.reply.clone(), encode(&event).into())
            .await
        {
            warn!(error = %e, "failed to answer a NATS API client");
        }
    }
}

/// Streams one prepared request's events; `caller_trace` is the request message's headers (a
/// W3C trace context in them makes the request's trace part of the caller's).
async fn generate(
    state: &AppState,
    prepared: Prepared,
    caller_trace: Option<&async_nats::HeaderMap>,
    out: &mut Replier,
) -> Result<(), ApiError> {
    let Prepared {
        model,
        prompt,
        generation,
        ..
    } = prepared;
    let prompt_len = prompt.len() as u32;
    let submitted = state
        .relay
        .submit(
            &model.name,
            prompt,
            generation.sampling,
            generation.user,
            caller_trace,
        )
        .await?;
    submitted.span().record("stream", true);
    out.request_id = submitted.request_id().to_string();
    let mut text = TextGeneration::new(submitted, model, generation.stop, prompt_len);
    while let Some(event) = text.next().await {
        match event? {
            TextEvent::Delta {
                text, token_ids, ..
            } => {
                out.send(ApiEventBody::Delta { text, token_ids }).await;
            }
            TextEvent::Done {
                finish_reason,
                usage,
            } => {
                out.send(ApiEventBody::Done {
                    finish_reason,
                    usage,
                })
                .await;
                return Ok(());
            }
        }
    }
    Ok(())
}
