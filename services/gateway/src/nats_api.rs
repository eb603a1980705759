//! The NATS request API: a client publishes an [`ApiRequest`] to the API subject with a reply
//! inbox and receives [`ApiEvent`]s there, numbered from 0, ending with `Done` or `Error`.

use std::sync::Arc;

use async_nats::{Client, Subject};
use futures::StreamExt;
use preble_protocol::{ApiEvent, ApiEventBody, ApiRequest, PROTOCOL_VERSION, decode, encode};
use tracing::warn;

use crate::error::ApiError;
use crate::http::AppState;
use crate::openai::CommonParams;
use crate::text::{TextEvent, TextGeneration};

/// Serves the API subject until the subscription ends.
pub async fn serve(client: Client, state: Arc<AppState>) {
    let subject = state.config.subjects.api_generate();
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(error = %e, %subject, "cannot serve the NATS API");
            return;
        }
    };
    while let Some(message) = sub.next().await {
        let Some(reply) = message.reply else {
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
            match decode::<ApiRequest>(&message.payload) {
                Ok(request) => {
                    let caller_trace = message.headers.as_ref();
                    if let Err(e) = generate(&state, request, caller_trace, &mut out).await {
                        out.send(ApiEventBody::Error {
                            code: e.code,
                            message: e.message,
                        })
                        .await;
                    }
                }
                Err(e) => {
                    state.metrics.malformed_messages.inc();
                    out.send(ApiEventBody::Error {
                        code: preble_protocol::ErrorCode::InvalidRequest,
                        message: format!("malformed API request: {e}"),
                    })
                    .await;
                }
            }
        });
    }
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

/// Serves one NATS API request; `caller_trace` is the request message's headers (a W3C trace
/// context in them makes the request's trace part of the caller's).
async fn generate(
    state: &AppState,
    request: ApiRequest,
    caller_trace: Option<&async_nats::HeaderMap>,
    out: &mut Replier,
) -> Result<(), ApiError> {
    let model = state.models.get(&request.model)?;
    let prompt = match (&request.prompt, &request.prompt_tokens, &request.messages) {
        (Some(text), None, None) => model.encode(text)?,
        (None, Some(ids), None) => ids.clone(),
        (None, None, Some(messages)) => model.encode(&model.render_chat(messages)?)?,
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "set exactly one of prompt, prompt_tokens and messages",
            ));
        }
    };
    let params = CommonParams {
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k.map(i64::from),
        seed: request.seed,
        stop: Some(crate::openai::Stop::Many(request.stop.clone())),
        user: request.user.clone(),
        ignore_eos: request.ignore_eos,
        ..CommonParams::default()
    };
    let default = if request.messages.is_some() {
        state.config.default_max_tokens
    } else {
        16
    };
    let generation = params.validate(default)?;
    model.check_prompt(&prompt, generation.sampling.max_tokens, "prompt")?;
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
            TextEvent::Delta { text, token_ids } => {
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
