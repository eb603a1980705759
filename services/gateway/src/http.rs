//! The HTTP API: OpenAI-compatible routes, `/health` and `/metrics`; bodies are read within a
//! size limit and a read timeout, and every refusal has the OpenAI error shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderMap, Method, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response, sse::Event, sse::Sse},
    routing::{get, post},
};
use futures::{Stream, StreamExt, stream};
use http_body_util::LengthLimitError;
use preble_protocol::roles::Role;
use preble_protocol::{ErrorCode, Usage};
use serde_json::json;
use tracing::info;

use crate::admission::{Admission, Admitted};
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::models::{Models, ServedModel};
use crate::openai::{self, ChatRequest, CompletionRequest, Endpoint, ResponseMeta};
use crate::prepare::{ClientRequest, Prepared, Preparer};
use crate::relay::Relay;
use crate::text::{TextEvent, TextGeneration, token_choices};

/// Shared state of the gateway.
pub struct AppState {
    /// Configuration.
    pub config: Config,
    /// Prepares requests (both front doors): keys, validation, template, tokenisation.
    pub preparer: Preparer,
    /// Decides which requests are accepted.
    pub admission: Admission,
    /// Submits requests.
    pub relay: Relay,
    /// Metrics.
    pub metrics: Metrics,
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let models = Models::load(&config.model_dirs)?;
    let client = preble_telemetry::nats::connect(
        &config.nats,
        "preble-gateway",
        &Role::Gateway.inbox_prefix(),
    )
    .await?;
    let metrics = Metrics::new();
    let gateway_id = crate::presence::new_gateway_id();
    let relay = Relay::new(
        client.clone(),
        config.subjects.clone(),
        config.stream_idle_timeout,
        metrics.clone(),
        gateway_id.clone(),
        config.submit_budget,
    );
    let stop_beats = tokio_util::sync::CancellationToken::new();
    let beats = tokio::spawn(crate::presence::beat(
        client.clone(),
        config.subjects.clone(),
        gateway_id.clone(),
        config.presence_period,
        stop_beats.clone(),
    ));
    let listener = preble_telemetry::bind(config.http_addr).await?;
    let preparer = Preparer::new(
        models,
        config.api_keys.clone(),
        config.default_max_tokens,
        config.prepare_limits,
    );
    let admission = Admission::new(config.admission_limits, metrics.clone());
    let state = Arc::new(AppState {
        config,
        preparer,
        admission,
        relay,
        metrics,
    });
    let nats_api = tokio::spawn(crate::nats_api::serve(client.clone(), state.clone()));
    info!(
        addr = %listener.local_addr()?,
        models = ?state.preparer.models().iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        max_connections = state.config.connection_limits.max_connections,
        %gateway_id,
        "gateway ready"
    );
    crate::serve::serve(
        listener,
        router(state.clone()),
        crate::serve::fit_to_file_limit(state.config.connection_limits),
        state.metrics.clone(),
        shutdown,
    )
    .await;
    nats_api.abort();
    stop_beats.cancel();
    let _ = beats.await;
    client.flush().await.ok();
    Ok(())
}

/// The routes; an unknown route or method gets an OpenAI-shaped 404 or 405.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|uri: Uri| async move {
            ApiError::new(ErrorCode::NotFound, format!("no route {}", uri.path()))
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        // Bodies are read (within the limit) by the handlers themselves.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.preparer.authorize(presented) {
        Ok(_) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// Admits a request (the in-flight limit, its key's rate), before its body is even read.
fn admit(state: &AppState, request: &Request) -> Result<Admitted, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let key = state.preparer.authorize(presented)?;
    state.admission.admit(key)
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    preble_telemetry::render_metrics(&state.metrics.registry)
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .preparer
        .models()
        .iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": m.created,
                "owned_by": "preble",
                "max_model_len": m.context_len,
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    generate(state, request, Endpoint::Completions, |body| {
        openai::parse_request::<CompletionRequest>(body).map(ClientRequest::Completion)
    })
    .await
}

async fn chat_completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    generate(state, request, Endpoint::Chat, |body| {
        openai::parse_request::<ChatRequest>(body).map(ClientRequest::Chat)
    })
    .await
}

/// Serves one generation request: admission, body, preparation (`parse` reads the body as
/// the endpoint's request), then the answer.
async fn generate(
    state: Arc<AppState>,
    request: Request,
    endpoint: Endpoint,
    parse: fn(&[u8]) -> Result<ClientRequest, ApiError>,
) -> Response {
    let headers = request.headers().clone();
    let prepared = async {
        let admitted = admit(&state, &request)?;
        let body = read_body(&state.config, request).await?;
        let prepared = state
            .preparer
            .prepare(body.len(), move || parse(&body))
            .await?;
        Ok((admitted, prepared))
    }
    .await;
    respond(&state, endpoint, prepared, &headers).await
}

/// Reads a request body within the size limit and the body read timeout.
async fn read_body(config: &Config, request: Request) -> Result<Bytes, ApiError> {
    let limit = config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            ErrorCode::RequestTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = axum::body::to_bytes(request.into_body(), limit);
    match tokio::time::timeout(config.body_read_timeout, read).await {
        Err(_) => Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!(
                "the request body took longer than {} s to arrive",
                config.body_read_timeout.as_secs()
            ),
        )),
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => {
            let inner = e.into_inner();
            if inner.downcast_ref::<LengthLimitError>().is_some() {
                Err(too_large())
            } else {
                Err(ApiError::invalid(
                    "body",
                    format!("reading the body failed: {inner}"),
                ))
            }
        }
    }
}

/// Submits a prepared request and answers it, streaming or not. `headers` are the HTTP
/// request's: a W3C trace context in them makes the request's trace part of the caller's.
async fn respond(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    prepared: Result<(Admitted, Prepared), ApiError>,
    headers: &HeaderMap,
) -> Response {
    let label = match endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat",
    };
    let response = match prepared {
        Ok((admitted, prepared)) => {
            let caller_trace = preble_telemetry::propagation::from_http(headers);
            serve(state, admitted, prepared, caller_trace)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        }
        Err(e) => e.into_response(),
    };
    state
        .metrics
        .requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    response
}

async fn serve(
    state: &Arc<AppState>,
    admitted: Admitted,
    prepared: Prepared,
    caller_trace: Option<async_nats::HeaderMap>,
) -> Result<Response, ApiError> {
    let Prepared {
        endpoint,
        model,
        prompt,
        generation,
    } = prepared;
    let started = Instant::now();
    let prompt_len = prompt.len() as u32;
    let submitted = state
        .relay
        .submit(
            &model.name,
            prompt,
            generation.sampling.clone(),
            generation.user.clone(),
            caller_trace.as_ref(),
        )
        .await?;
    submitted.span().record("stream", generation.stream);
    let meta = ResponseMeta {
        id: match endpoint {
            Endpoint::Completions => format!("cmpl-{}", submitted.request_id()),
            Endpoint::Chat => format!("chatcmpl-{}", submitted.request_id()),
        },
        model: model.name.clone(),
        created: preble_telemetry::unix_ms() / 1000,
        endpoint,
    };
    let logprobs = generation
        .sampling
        .logprobs
        .is_some()
        .then(|| model.clone());
    let mut text = TextGeneration::new(submitted, model, generation.stop.clone(), prompt_len);
    // Wait for the first event before answering, so that errors before any token (no worker,
    // rejected request) get their proper HTTP status even when streaming.
    let first = match text.next().await {
        Some(Ok(event)) => event,
        Some(Err(e)) => return Err(e),
        None => return Err(ApiError::new(ErrorCode::Internal, "empty token stream")),
    };
    state
        .metrics
        .time_to_first_token
        .observe(started.elapsed().as_secs_f64());
    let observer = Observer {
        metrics: state.metrics.clone(),
        started,
        _admitted: admitted,
    };
    if generation.stream {
        let events = sse_events(
            text,
            first,
            meta,
            generation.include_usage,
            logprobs,
            observer,
        );
        return Ok(Sse::new(events).into_response());
    }
    let mut output = String::new();
    let mut choices = Vec::new();
    let mut event = first;
    loop {
        match event {
            TextEvent::Delta {
                text: t,
                token_ids,
                logprobs: lp,
            } => {
                output.push_str(&t);
                if let Some(model) = &logprobs {
                    choices.extend(token_choices(model, &token_ids, &lp)?);
                }
            }
            TextEvent::Done {
                finish_reason,
                usage,
            } => {
                observer.done(&usage);
                let lp = logprobs.as_ref().map(|_| meta.logprobs(&choices, 0));
                return Ok(Json(meta.full(&output, finish_reason, &usage, lp)).into_response());
            }
        }
        event = match text.next().await {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "token stream ended early",
                ));
            }
        };
    }
}

/// Records the end of a request in the metrics.
struct Observer {
    metrics: Metrics,
    started: Instant,
    /// The request counts as in flight until its response ends.
    _admitted: Admitted,
}

impl Observer {
    fn done(&self, usage: &Usage) {
        self.metrics
            .e2e_latency
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .prompt_tokens
            .inc_by(u64::from(usage.prompt_tokens));
        self.metrics
            .cached_prompt_tokens
            .inc_by(u64::from(usage.cached_tokens));
        self.metrics
            .generation_tokens
            .inc_by(u64::from(usage.completion_tokens));
    }
}

/// The SSE events of a streaming response, ending with `data: [DONE]`; with `logprobs`
/// (the model, to decode tokens), each chunk carries its tokens' log-probabilities.
fn sse_events(
    text: TextGeneration,
    first: TextEvent,
    meta: ResponseMeta,
    include_usage: bool,
    logprobs: Option<Arc<ServedModel>>,
    observer: Observer,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    struct S {
        text: TextGeneration,
        pending: Option<TextEvent>,
        meta: ResponseMeta,
        include_usage: bool,
        logprobs: Option<Arc<ServedModel>>,
        text_offset: usize,
        observer: Observer,
        first_chunk: bool,
        ended: bool,
    }
    let state = S {
        text,
        pending: Some(first),
        meta,
        include_usage,
        logprobs,
        text_offset: 0,
        observer,
        first_chunk: true,
        ended: false,
    };
    stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        let next = match s.pending.take() {
            Some(event) => Some(Ok(event)),
            None => s.text.next().await,
        };
        let data = |v: serde_json::Value| Event::default().data(v.to_string());
        let events = match next {
            Some(Ok(TextEvent::Delta {
                text,
                token_ids,
                logprobs,
            })) => {
                let choices = s
                    .logprobs
                    .as_ref()
                    .map(|model| token_choices(model, &token_ids, &logprobs))
                    .transpose();
                match choices {
                    Ok(choices) => {
                        let lp = choices.map(|c| s.meta.logprobs(&c, s.text_offset));
                        s.text_offset += text.chars().count();
                        let chunk = s.meta.chunk(Some(&text), s.first_chunk, None, lp);
                        s.first_chunk = false;
                        vec![data(chunk)]
                    }
                    Err(e) => {
                        s.ended = true;
                        vec![data(e.body()), Event::default().data("[DONE]")]
                    }
                }
            }
            Some(Ok(TextEvent::Done {
                finish_reason,
                usage,
            })) => {
                s.observer.done(&usage);
                s.ended = true;
                let mut events = vec![data(s.meta.chunk(
                    None,
                    s.first_chunk,
                    Some(finish_reason),
                    None,
                ))];
                if s.include_usage {
                    events.push(data(s.meta.usage_chunk(&usage)));
                }
                events.push(Event::default().data("[DONE]"));
                events
            }
            Some(Err(e)) => {
                s.ended = true;
                vec![data(e.body()), Event::default().data("[DONE]")]
            }
            None => {
                s.ended = true;
                let e = ApiError::new(ErrorCode::Internal, "token stream ended early");
                vec![data(e.body()), Event::default().data("[DONE]")]
            }
        };
        Some((stream::iter(events.into_iter().map(Ok)), s))
    })
    .flatten()
}
