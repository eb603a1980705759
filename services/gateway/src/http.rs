//! The HTTP API: OpenAI-compatible routes, `/health` and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, header},
    middleware::{self, Next},
    response::{IntoResponse, Response, sse::Event, sse::Sse},
    routing::{get, post},
};
use futures::{Stream, StreamExt, stream};
use preble_protocol::{ErrorCode, Usage};
use serde_json::json;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::models::{Models, ServedModel};
use crate::openai::{
    self, ChatRequest, CompletionRequest, Endpoint, Generation, Prompt, ResponseMeta,
};
use crate::relay::Relay;
use crate::text::{TextEvent, TextGeneration};

/// Shared state of the gateway.
pub struct AppState {
    /// Configuration.
    pub config: Config,
    /// Served models.
    pub models: Models,
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
    let client = preble_telemetry::connect_nats(&config.nats_url, "preble-gateway").await?;
    let metrics = Metrics::new();
    let relay = Relay::new(
        client.clone(),
        config.subjects.clone(),
        config.stream_idle_timeout,
        metrics.clone(),
    );
    let listener = preble_telemetry::bind(config.http_addr).await?;
    let state = Arc::new(AppState {
        config,
        models,
        relay,
        metrics,
    });
    let nats_api = tokio::spawn(crate::nats_api::serve(client.clone(), state.clone()));
    info!(
        addr = %listener.local_addr()?,
        models = ?state.models.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        "gateway ready"
    );
    // Token streams are many small writes: without TCP_NODELAY a chunk can wait for the
    // client's delayed ACK of the previous one.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(error = %e, "could not set TCP_NODELAY on a client connection");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    nats_api.abort();
    client.flush().await.ok();
    Ok(())
}

/// The routes.
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
        .with_state(state)
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.config.api_keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(key) if state.config.api_keys.iter().any(|k| k == key) => next.run(request).await,
        _ => ApiError::new(
            ErrorCode::InvalidApiKey,
            "missing or unknown API key (send `Authorization: Bearer <key>`)",
        )
        .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    preble_telemetry::render_metrics(&state.metrics.registry)
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .models
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

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let request: CompletionRequest = openai::parse_request(&body)?;
        let generation = request.params.validate(16)?;
        let model = state.models.get(&request.model)?;
        let prompt = match request.prompt {
            Prompt::Text(text) => model.encode(&text)?,
            Prompt::Tokens(ids) => ids,
            Prompt::Texts(mut texts) if texts.len() == 1 => model.encode(&texts.remove(0))?,
            Prompt::Texts(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "batched prompts are not supported; send one prompt per request",
                ));
            }
        };
        model.check_prompt(&prompt, generation.sampling.max_tokens, "prompt")?;
        Ok((model, prompt, generation))
    }
    .await;
    respond(&state, Endpoint::Completions, result, &headers).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let request: ChatRequest = openai::parse_request(&body)?;
        let model = state.models.get(&request.model)?;
        let conversation = request.conversation()?;
        let text = model.render_chat(&conversation)?;
        let prompt = model.encode(&text)?;
        let default = state
            .config
            .default_max_tokens
            .min(model.context_len.saturating_sub(prompt.len() as u32))
            .max(1);
        let generation = request.params.validate(default)?;
        model.check_prompt(&prompt, generation.sampling.max_tokens, "messages")?;
        Ok((model, prompt, generation))
    }
    .await;
    respond(&state, Endpoint::Chat, result, &headers).await
}

type Prepared = (Arc<ServedModel>, Vec<u32>, Generation);

/// Submits a prepared request and answers it, streaming or not. `headers` are the HTTP
/// request's: a W3C trace context in them makes the request's trace part of the caller's.
async fn respond(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    prepared: Result<Prepared, ApiError>,
    headers: &HeaderMap,
) -> Response {
    let label = match endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat",
    };
    let response = match prepared {
        Ok((model, prompt, generation)) => {
            let caller_trace = preble_telemetry::propagation::from_http(headers);
            serve(state, endpoint, model, prompt, generation, caller_trace)
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

/// Decrements the in-flight gauge when a request ends, however it ends.
struct InFlight(Metrics);

impl InFlight {
    fn new(metrics: &Metrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

async fn serve(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    model: Arc<ServedModel>,
    prompt: Vec<u32>,
    generation: Generation,
    caller_trace: Option<async_nats::HeaderMap>,
) -> Result<Response, ApiError> {
    let in_flight = InFlight::new(&state.metrics);
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
        _in_flight: in_flight,
    };
    if generation.stream {
        let events = sse_events(text, first, meta, generation.include_usage, observer);
        return Ok(Sse::new(events).into_response());
    }
    let mut output = String::new();
    let mut event = first;
    loop {
        match event {
            TextEvent::Delta { text: t, .. } => output.push_str(&t),
            TextEvent::Done {
                finish_reason,
                usage,
            } => {
                observer.done(&usage);
                return Ok(Json(meta.full(&output, finish_reason, &usage)).into_response());
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
    _in_flight: InFlight,
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

/// The SSE events of a streaming response, ending with `data: [DONE]`.
fn sse_events(
    text: TextGeneration,
    first: TextEvent,
    meta: ResponseMeta,
    include_usage: bool,
    observer: Observer,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    struct S {
        text: TextGeneration,
        pending: Option<TextEvent>,
        meta: ResponseMeta,
        include_usage: bool,
        observer: Observer,
        first_chunk: bool,
        ended: bool,
    }
    let state = S {
        text,
        pending: Some(first),
        meta,
        include_usage,
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
            Some(Ok(TextEvent::Delta { text, .. })) => {
                let chunk = s.meta.chunk(Some(&text), s.first_chunk, None);
                s.first_chunk = false;
                vec![data(chunk)]
            }
            Some(Ok(TextEvent::Done {
                finish_reason,
                usage,
            })) => {
                s.observer.done(&usage);
                s.ended = true;
                let mut events = vec![data(s.meta.chunk(None, s.first_chunk, Some(finish_reason)))];
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
