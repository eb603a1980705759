//! The worker service: takes dispatched requests over NATS, runs them through the local
//! scheduler and the engine, streams tokens back, and reports heartbeats, load, cache changes
//! and finished requests.
//!
//! Tasks: the engine loop owns the local scheduler (with the KV cache) and the engine (no
//! shared locks); the dispatch, cancel and digest subscribers talk to it through a command
//! channel; one events task numbers and publishes worker events in order; one heartbeat task;
//! the HTTP endpoint.

use std::time::Instant;

use anyhow::{Context, Result};
use async_nats::{Client, Subject};
use futures::StreamExt;
use preble_localsched::SchedulerConfig;
use preble_protocol::{
    Cancel, Digest, DigestRequest, Dispatch, DispatchOutcome, DispatchReply, ErrorCode, Heartbeat,
    LoadReport, MAX_TOP_LOGPROBS, PROTOCOL_VERSION, WorkerEvent, WorkerEventBody, decode, encode,
};
use preble_telemetry::propagation::{child_span, continue_trace};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, field::Empty, info, warn};

use crate::config::Config;
use crate::engine_loop::{Active, Command, EngineLoop, Outgoing};
use crate::metrics::Metrics;

/// Runs a worker until `shutdown` resolves, then drains and returns.
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let role = preble_protocol::roles::Role::Worker(config.worker_id.clone());
    let client =
        preble_telemetry::nats::connect(&config.nats, "preble-worker", &role.inbox_prefix())
            .await?;
    let engine = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || crate::engine::build(&config))
            .await
            .context("loading the engine")??
    };
    if let Some(capacity) = engine.kv_capacity() {
        config.kv_capacity_tokens = u64::from(capacity);
    }
    let metrics = Metrics::new();
    let listener = preble_telemetry::bind(config.http_addr).await?;
    info!(
        worker = %config.worker_id,
        model = %config.model.name,
        profile = config.profile.name,
        engine = engine.kind(),
        kv_capacity_tokens = config.kv_capacity_tokens,
        http = %listener.local_addr()?,
        "worker starting"
    );

    let stop = CancellationToken::new();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let events_task = tokio::spawn(publish_events(
        client.clone(),
        config.subjects.events(&config.worker_id),
        config.worker_id.clone(),
        events_rx,
    ));
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let (load_tx, load_rx) = watch::channel(LoadReport::default());
    let engine_loop = EngineLoop::new(
        client.clone(),
        engine,
        SchedulerConfig {
            kv_capacity: config.kv_capacity_tokens.min(u64::from(u32::MAX)) as u32,
            prefill_budget: config.chunk_tokens,
            max_running: config.max_running,
            priority_groups: config.priority_groups,
            wait_order: config.wait_order,
            decode_reserve: config.decode_reserve,
        },
        metrics.clone(),
        events_tx.clone(),
        load_tx,
        config.model.eos_token_ids.clone(),
    );
    let engine_done = engine_loop
        .spawn(commands_rx)
        .context("starting the engine thread")?;

    let dispatch_sub = client
        .subscribe(config.subjects.worker(&config.worker_id))
        .await?;
    let cancel_sub = client.subscribe(config.subjects.cancel()).await?;
    let digest_sub = client
        .subscribe(config.subjects.digest(&config.worker_id))
        .await?;
    let gateway_beats = client
        .subscribe(config.subjects.all_gateway_beats())
        .await?;
    client.flush().await?;
    let dispatch_task = tokio::spawn(serve_dispatch(
        client.clone(),
        config.clone(),
        dispatch_sub,
        commands_tx.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let cancel_task = tokio::spawn(serve_cancel(
        config.worker_id.clone(),
        cancel_sub,
        commands_tx.clone(),
        metrics.clone(),
    ));
    let digest_task = tokio::spawn(serve_digest(
        digest_sub,
        commands_tx.clone(),
        metrics.clone(),
    ));
    let presence_task = tokio::spawn(crate::presence::watch_gateways(
        client.clone(),
        gateway_beats,
        commands_tx.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let heartbeat_task = tokio::spawn(heartbeat(
        config.clone(),
        events_tx.clone(),
        load_rx,
        stop.clone(),
    ));
    let http_stop = stop.clone();
    let http_task = tokio::spawn(preble_telemetry::serve_ops(
        listener,
        metrics.registry.clone(),
        async move { http_stop.cancelled().await },
    ));
    info!(worker = %config.worker_id, "worker ready");

    shutdown.await;
    info!(worker = %config.worker_id, "shutting down: draining");
    stop.cancel();
    let _ = dispatch_task.await;
    let _ = events_tx.send(Outgoing::Event(WorkerEventBody::Leaving));
    let _ = commands_tx.send(Command::Drain(Instant::now() + config.drain_timeout));
    let _ = engine_done.await;
    cancel_task.abort();
    digest_task.abort();
    presence_task.abort();
    let _ = heartbeat_task.await;
    drop(events_tx);
    drop(commands_tx);
    let _ = events_task.await;
    let _ = http_task.await;
    client.flush().await.ok();
    info!(worker = %config.worker_id, "worker stopped");
    Ok(())
}

/// Numbers worker events in order and publishes them; digest parts go to their asker with
/// the number of the next event.
async fn publish_events(
    client: Client,
    subject: String,
    worker_id: String,
    mut events: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut seq = 0u64;
    while let Some(outgoing) = events.recv().await {
        let (to, body, this_seq) = match outgoing {
            Outgoing::Event(body) => {
                seq += 1;
                (Subject::from(subject.as_str()), body, seq - 1)
            }
            Outgoing::Digest { to, spans, more } => {
                (to, WorkerEventBody::Digest(Digest { spans, more }), seq)
            }
        };
        let event = WorkerEvent {
            v: PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            seq: this_seq,
            at_ms: preble_telemetry::unix_ms(),
            body,
        };
        if let Err(e) = client.publish(to, encode(&event).into()).await {
            warn!(error = %e, "failed to publish worker event");
        }
    }
    client.flush().await.ok();
}

/// Sends a heartbeat and a load report every period until stopped.
async fn heartbeat(
    config: Config,
    events: mpsc::UnboundedSender<Outgoing>,
    load: watch::Receiver<LoadReport>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = Heartbeat {
            models: vec![config.model.name.clone()],
            engine: config.engine.name().to_string(),
            profile: config.profile.name.to_string(),
            kv_capacity_tokens: config.kv_capacity_tokens,
            period_ms: config.heartbeat.as_millis() as u64,
        };
        let report = *load.borrow();
        if events
            .send(Outgoing::Event(WorkerEventBody::Heartbeat(beat)))
            .is_err()
            || events
                .send(Outgoing::Event(WorkerEventBody::Load(report)))
                .is_err()
        {
            return;
        }
    }
}

/// Answers dispatches: validate, accept (hand to the engine loop) or reject.
async fn serve_dispatch(
    client: Client,
    config: Config,
    mut sub: async_nats::Subscriber,
    commands: mpsc::UnboundedSender<Command>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let outcome = match decode::<Dispatch>(&message.payload) {
            Err(e) => {
                metrics.malformed_messages.inc();
                warn!(error = %e, subject = %message.subject, "malformed dispatch");
                reject(
                    ErrorCode::InvalidRequest,
                    format!("malformed dispatch: {e}"),
                    false,
                )
            }
            Ok(dispatch) => match validate(&config, &dispatch) {
                Err(outcome) => outcome,
                Ok(()) => {
                    let request = dispatch.request;
                    metrics.requests_accepted.inc();
                    metrics
                        .prompt_tokens
                        .inc_by(request.prompt_tokens.len() as u64);
                    debug!(request = %request.request_id, "accepted");
                    let seed = request
                        .sampling
                        .seed
                        .unwrap_or_else(|| drawn_seed(&request.request_id));
                    let span = continue_trace(message.headers.as_ref(), || {
                        tracing::info_span!(
                            "worker.request",
                            otel.kind = "consumer",
                            otel.status_code = Empty,
                            request_id = %request.request_id,
                            worker = %config.worker_id,
                            engine = config.engine.name(),
                            prompt_tokens = request.prompt_tokens.len(),
                            cached_tokens = Empty,
                            completion_tokens = Empty,
                            finish_reason = Empty,
                            error = Empty,
                        )
                    });
                    let phase = Some(child_span(
                        &span,
                        || tracing::info_span!(parent: &span, "worker.queue"),
                    ));
                    let active = Active {
                        prompt_hash: preble_prefix::path_hash(request.original_prompt()),
                        resumed_tokens: request.resumed_tokens,
                        seed,
                        span,
                        phase,
                        request_id: request.request_id,
                        // Published under this worker's own id, whatever the request says.
                        stream_subject: config
                            .subjects
                            .stream_from(&config.worker_id, &request.stream_key),
                        sampling: request.sampling,
                        next_stream_seq: 0,
                        accepted_at: Instant::now(),
                        started_at: None,
                        first_token_at: None,
                        gateway_id: request.gateway_id,
                    };
                    let admit = Command::Admit {
                        active: Box::new(active),
                        prompt: request.prompt_tokens,
                    };
                    if commands.send(admit).is_err() {
                        reject(ErrorCode::Overloaded, "worker is stopping".into(), true)
                    } else {
                        DispatchOutcome::Accepted
                    }
                }
            },
        };
        if matches!(outcome, DispatchOutcome::Rejected { .. }) {
            metrics.requests_rejected.inc();
        }
        reply(&client, message.reply, &config.worker_id, outcome).await;
    }
    // Anything that arrives after this answers "no responders" and the scheduler tries
    // another worker.
    sub.unsubscribe().await.ok();
}

fn reject(code: ErrorCode, message: String, retryable: bool) -> DispatchOutcome {
    DispatchOutcome::Rejected {
        code,
        message,
        retryable,
    }
}

fn validate(config: &Config, dispatch: &Dispatch) -> Result<(), DispatchOutcome> {
    let r = &dispatch.request;
    if r.model != config.model.name {
        return Err(reject(
            ErrorCode::ModelNotFound,
            format!(
                "this worker serves {:?}, not {:?}",
                config.model.name, r.model
            ),
            true,
        ));
    }
    if r.prompt_tokens.is_empty() {
        return Err(reject(
            ErrorCode::InvalidRequest,
            "empty prompt".into(),
            false,
        ));
    }
    if r.resumed_tokens as usize >= r.prompt_tokens.len() {
        return Err(reject(
            ErrorCode::InvalidRequest,
            format!(
                "resumed_tokens ({}) must be fewer than the prompt's {} tokens",
                r.resumed_tokens,
                r.prompt_tokens.len()
            ),
            false,
        ));
    }
    if r.sampling.max_tokens == 0 {
        return Err(reject(
            ErrorCode::InvalidRequest,
            "max_tokens must be at least 1".into(),
            false,
        ));
    }
    if let Some(n) = r.sampling.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(reject(
            ErrorCode::InvalidRequest,
            format!("logprobs asks for the top {n} tokens; at most {MAX_TOP_LOGPROBS}"),
            false,
        ));
    }
    if let Some(&bad) = r
        .prompt_tokens
        .iter()
        .find(|&&t| t >= config.model.vocab_size)
    {
        return Err(reject(
            ErrorCode::InvalidRequest,
            format!(
                "token id {bad} is outside the vocabulary ({})",
                config.model.vocab_size
            ),
            false,
        ));
    }
    let need = r.prompt_tokens.len() as u64 + u64::from(r.sampling.max_tokens);
    if need > u64::from(config.model.context_len) {
        return Err(reject(
            ErrorCode::ContextLengthExceeded,
            format!(
                "prompt ({}) plus max_tokens ({}) exceeds the context length {}",
                r.prompt_tokens.len(),
                r.sampling.max_tokens,
                config.model.context_len
            ),
            false,
        ));
    }
    if need > config.kv_capacity_tokens {
        return Err(reject(
            ErrorCode::ContextLengthExceeded,
            format!(
                "request needs {need} KV slots; this worker has {}",
                config.kv_capacity_tokens
            ),
            true,
        ));
    }
    Ok(())
}

async fn reply(client: &Client, to: Option<Subject>, worker_id: &str, outcome: DispatchOutcome) {
    let Some(to) = to else {
        warn!("dispatch without a reply subject; nobody to answer");
        return;
    };
    let answer = DispatchReply {
        v: PROTOCOL_VERSION,
        worker_id: worker_id.to_string(),
        outcome,
    };
    if let Err(e) = client.publish(to, encode(&answer).into()).await {
        warn!(error = %e, "failed to answer dispatch");
    }
}

/// Forwards cancellations to the engine loop.
async fn serve_cancel(
    worker_id: String,
    mut sub: async_nats::Subscriber,
    commands: mpsc::UnboundedSender<Command>,
    metrics: Metrics,
) {
    while let Some(message) = sub.next().await {
        match decode::<Cancel>(&message.payload) {
            Ok(cancel) if cancel.worker_id.as_ref().is_some_and(|w| *w != worker_id) => {}
            Ok(cancel) => {
                if commands.send(Command::Cancel(cancel.request_id)).is_err() {
                    return;
                }
            }
            Err(e) => {
                metrics.malformed_messages.inc();
                warn!(error = %e, "malformed cancel");
            }
        }
    }
}

/// Answers digest requests: the engine loop, which owns the cache, sends the digest.
async fn serve_digest(
    mut sub: async_nats::Subscriber,
    commands: mpsc::UnboundedSender<Command>,
    metrics: Metrics,
) {
    while let Some(message) = sub.next().await {
        if let Err(e) = decode::<DigestRequest>(&message.payload) {
            metrics.malformed_messages.inc();
            warn!(error = %e, "malformed digest request");
            continue;
        }
        let Some(to) = message.reply else {
            warn!("digest request without a reply subject");
            continue;
        };
        if commands.send(Command::Digest(to)).is_err() {
            return;
        }
    }
}

/// A seed for a request that brought none: different for every request.
fn drawn_seed(request_id: &str) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let id = request_id
        .bytes()
        .fold(0u64, |h, b| preble_prefix::mix64(h ^ u64::from(b)));
    preble_prefix::mix64(id ^ nanos)
}
