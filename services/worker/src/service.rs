//! The worker service: takes dispatched requests over NATS, runs them through the batcher and
//! the engine, streams tokens back, and reports heartbeats, load and finished requests.
//!
//! Tasks: one engine loop owns the batcher and the engine (no shared locks); the dispatch,
//! cancel and digest subscribers talk to it through a command channel; one events task
//! numbers and publishes worker events in order; one heartbeat task; the HTTP endpoint.

use std::time::Instant;

use anyhow::{Context, Result};
use async_nats::{Client, Subject};
use futures::StreamExt;
use preble_costmodel::SeqWork;
use preble_protocol::{
    Cancel, Digest, DigestRequest, Dispatch, DispatchOutcome, DispatchReply, ErrorCode,
    FinishReason, FinishedRequest, Heartbeat, LoadReport, PROTOCOL_VERSION, StreamBody,
    StreamMessage, Timings, Usage, WorkerEvent, WorkerEventBody, decode, encode,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::{Batcher, Sequence};
use crate::config::Config;
use crate::engine::{Engine, SimEngine, StepSeq, sim::hash_tokens};
use crate::metrics::Metrics;

/// Commands to the engine loop.
#[derive(Debug)]
enum Command {
    /// Run this accepted request.
    Admit(Box<Sequence>),
    /// Stop this request.
    Cancel(String),
    /// Finish what is running, then stop; cancel what is left at the deadline.
    Drain(Instant),
}

/// Runs a worker until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let client = async_nats::connect(&config.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {}", config.nats_url))?;
    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    info!(
        worker = %config.worker_id,
        model = %config.model.name,
        profile = config.profile.name,
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
    let engine = SimEngine::new(
        config.profile.clone(),
        config.time_scale,
        config.model.vocab_size,
        &config.model.special_token_ids,
    );
    let engine_loop = EngineLoop {
        client: client.clone(),
        engine: Box::new(engine),
        batcher: Batcher::new(
            config.kv_capacity_tokens,
            config.chunk_tokens,
            config.max_running,
        ),
        metrics: metrics.clone(),
        events: events_tx.clone(),
        load: load_tx,
        eos: config.model.eos_token_ids.clone(),
        draining_until: None,
    };
    let engine_task = tokio::spawn(engine_loop.run(commands_rx));

    let dispatch_sub = client
        .subscribe(config.subjects.worker(&config.worker_id))
        .await?;
    let cancel_sub = client.subscribe(config.subjects.cancel()).await?;
    let digest_sub = client
        .subscribe(config.subjects.digest(&config.worker_id))
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
        client.clone(),
        config.worker_id.clone(),
        digest_sub,
        metrics.clone(),
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
    let _ = events_tx.send(WorkerEventBody::Leaving);
    let _ = commands_tx.send(Command::Drain(Instant::now() + config.drain_timeout));
    let _ = engine_task.await;
    cancel_task.abort();
    digest_task.abort();
    let _ = heartbeat_task.await;
    drop(events_tx);
    drop(commands_tx);
    let _ = events_task.await;
    let _ = http_task.await;
    client.flush().await.ok();
    info!(worker = %config.worker_id, "worker stopped");
    Ok(())
}

/// Numbers worker events in order and publishes them.
async fn publish_events(
    client: Client,
    subject: String,
    worker_id: String,
    mut events: mpsc::UnboundedReceiver<WorkerEventBody>,
) {
    let mut seq = 0u64;
    while let Some(body) = events.recv().await {
        let event = WorkerEvent {
            v: PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            seq,
            at_ms: preble_telemetry::unix_ms(),
            body,
        };
        seq += 1;
        if let Err(e) = client.publish(subject.clone(), encode(&event).into()).await {
            warn!(error = %e, "failed to publish worker event");
        }
    }
    client.flush().await.ok();
}

/// Sends a heartbeat and a load report every period until stopped.
async fn heartbeat(
    config: Config,
    events: mpsc::UnboundedSender<WorkerEventBody>,
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
            engine: "sim".to_string(),
            profile: config.profile.name.to_string(),
            kv_capacity_tokens: config.kv_capacity_tokens,
            period_ms: config.heartbeat.as_millis() as u64,
        };
        let report = *load.borrow();
        if events.send(WorkerEventBody::Heartbeat(beat)).is_err()
            || events.send(WorkerEventBody::Load(report)).is_err()
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
                    let hash = hash_tokens(&request.prompt_tokens);
                    debug!(request = %request.request_id, "accepted");
                    let seq = Sequence::new(request, hash, Instant::now());
                    if commands.send(Command::Admit(Box::new(seq))).is_err() {
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
    if r.sampling.max_tokens == 0 {
        return Err(reject(
            ErrorCode::InvalidRequest,
            "max_tokens must be at least 1".into(),
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

/// Answers digest requests. This worker keeps no prefix cache yet, so its digest is empty.
async fn serve_digest(
    client: Client,
    worker_id: String,
    mut sub: async_nats::Subscriber,
    metrics: Metrics,
) {
    while let Some(message) = sub.next().await {
        if let Err(e) = decode::<DigestRequest>(&message.payload) {
            metrics.malformed_messages.inc();
            warn!(error = %e, "malformed digest request");
        }
        let Some(to) = message.reply else { continue };
        let event = WorkerEvent {
            v: PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            seq: 0,
            at_ms: preble_telemetry::unix_ms(),
            body: WorkerEventBody::Digest(Digest::default()),
        };
        client.publish(to, encode(&event).into()).await.ok();
    }
}

/// Owns the batcher and the engine; one iteration at a time.
struct EngineLoop {
    client: Client,
    engine: Box<dyn Engine>,
    batcher: Batcher,
    metrics: Metrics,
    events: mpsc::UnboundedSender<WorkerEventBody>,
    load: watch::Sender<LoadReport>,
    eos: Vec<u32>,
    draining_until: Option<Instant>,
}

/// How a sequence ended.
enum Ending {
    Finished(FinishReason),
    Failed(ErrorCode, String),
}

impl EngineLoop {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.batcher.is_idle() {
                self.report_load();
                if self.draining_until.is_some() {
                    break;
                }
                match commands.recv().await {
                    Some(command) => self.apply(command).await,
                    None => break,
                }
                continue;
            }
            while let Ok(command) = commands.try_recv() {
                self.apply(command).await;
            }
            if self.draining_until.is_some_and(|d| Instant::now() >= d) {
                for seq in self.batcher.drain_all() {
                    self.end(
                        seq,
                        Ending::Failed(ErrorCode::Cancelled, "worker shut down".into()),
                    )
                    .await;
                }
                break;
            }
            self.iterate().await;
        }
        self.report_load();
    }

    async fn apply(&mut self, command: Command) {
        match command {
            Command::Admit(seq) => {
                if let Err(e) = self.batcher.enqueue(*seq) {
                    warn!(error = %e, "admitted a request that can never run");
                }
            }
            Command::Cancel(id) => {
                if let Some(seq) = self.batcher.remove(&id) {
                    debug!(request = %id, "cancelled");
                    self.end(seq, Ending::Finished(FinishReason::Cancelled))
                        .await;
                }
            }
            Command::Drain(deadline) => self.draining_until = Some(deadline),
        }
    }

    async fn iterate(&mut self) {
        let plan = self.batcher.plan();
        if plan.is_empty() {
            // Waiting requests that do not fit yet while nothing runs cannot happen (admission
            // checks they fit an empty cache); yield rather than spin if it ever does.
            tokio::task::yield_now().await;
            return;
        }
        let began = Instant::now();
        let steps: Vec<StepSeq<'_>> = plan
            .iter()
            .map(|p| {
                let seq = &self.batcher.running[p.index];
                StepSeq {
                    prompt: &seq.request.prompt_tokens,
                    prompt_hash: seq.prompt_hash,
                    seed: seq.request.sampling.seed.unwrap_or(0),
                    output_index: seq.generated,
                    work: p.work,
                    samples: p.samples,
                }
            })
            .collect();
        let output = self.engine.step(&steps);
        drop(steps);
        for p in &plan {
            let seq = &mut self.batcher.running[p.index];
            seq.started_at.get_or_insert(began);
        }
        tokio::time::sleep(output.busy_for).await;
        self.metrics.iterations.inc();
        self.metrics
            .iteration_seconds
            .observe(began.elapsed().as_secs_f64());

        let mut endings: Vec<(usize, Ending)> = Vec::new();
        for (p, token) in plan.iter().zip(output.tokens) {
            let seq = &mut self.batcher.running[p.index];
            if !seq.is_decoding() {
                seq.prefilled += p.work.extend;
            }
            let Some(token) = token else { continue };
            seq.generated += 1;
            self.metrics.generation_tokens.inc();
            if seq.first_token_at.is_none() {
                seq.first_token_at = Some(Instant::now());
                self.metrics
                    .time_to_first_token
                    .observe(seq.accepted_at.elapsed().as_secs_f64());
            }
            let stops = seq.request.sampling.stop_token_ids.contains(&token)
                || (!seq.request.sampling.ignore_eos && self.eos.contains(&token));
            if stops {
                endings.push((p.index, Ending::Finished(FinishReason::Stop)));
                continue;
            }
            let message = StreamMessage {
                v: PROTOCOL_VERSION,
                request_id: seq.request.request_id.clone(),
                seq: seq.next_stream_seq,
                body: StreamBody::Tokens {
                    token_ids: vec![token],
                },
            };
            seq.next_stream_seq += 1;
            let subject = seq.request.stream_subject.clone();
            if seq.generated >= seq.request.sampling.max_tokens {
                endings.push((p.index, Ending::Finished(FinishReason::Length)));
            }
            if let Err(e) = self.client.publish(subject, encode(&message).into()).await {
                warn!(error = %e, "failed to publish tokens");
            }
        }
        // Descending order keeps the remaining indices valid across swap_remove.
        endings.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (index, ending) in endings {
            let seq = self.batcher.finish(index);
            self.end(seq, ending).await;
        }
        self.report_load();
    }

    /// Sends the final stream message and the finished event.
    async fn end(&mut self, seq: Sequence, ending: Ending) {
        let usage = Usage {
            prompt_tokens: seq.prompt_len(),
            cached_tokens: seq.cached,
            completion_tokens: seq.generated,
        };
        let since = |t: Option<Instant>| {
            t.map(|t| t.duration_since(seq.accepted_at).as_micros() as u64)
                .unwrap_or(0)
        };
        let timings = Timings {
            queue_us: since(seq.started_at),
            first_token_us: since(seq.first_token_at),
            total_us: seq.accepted_at.elapsed().as_micros() as u64,
        };
        let (body, finish_reason, label) = match ending {
            Ending::Finished(reason) => (
                StreamBody::Final {
                    finish_reason: reason,
                    usage,
                    timings,
                },
                Some(reason),
                reason.as_str(),
            ),
            Ending::Failed(code, message) => (StreamBody::Error { code, message }, None, "error"),
        };
        self.metrics
            .requests_finished
            .with_label_values(&[label])
            .inc();
        let message = StreamMessage {
            v: PROTOCOL_VERSION,
            request_id: seq.request.request_id.clone(),
            seq: seq.next_stream_seq,
            body,
        };
        if let Err(e) = self
            .client
            .publish(seq.request.stream_subject.clone(), encode(&message).into())
            .await
        {
            warn!(error = %e, "failed to publish the end of a stream");
        }
        let ttft_ms = since(seq.first_token_at) as f64 / 1e3;
        let tpot_ms = match seq.first_token_at {
            Some(first) if seq.generated > 1 => {
                first.elapsed().as_secs_f64() * 1e3 / f64::from(seq.generated - 1)
            }
            _ => 0.0,
        };
        let _ = self.events.send(WorkerEventBody::Finished(FinishedRequest {
            request_id: seq.request.request_id,
            finish_reason,
            usage,
            ttft_ms,
            tpot_ms,
        }));
    }

    fn report_load(&mut self) {
        let load = self.batcher.load();
        self.metrics.running.set(i64::from(load.running));
        self.metrics.waiting.set(i64::from(load.waiting));
        self.metrics
            .kv_used_tokens
            .set((self.batcher.kv_capacity() - load.free_kv_tokens) as i64);
        let remaining_decode_steps = self
            .batcher
            .running
            .iter()
            .map(|s| s.request.sampling.max_tokens.saturating_sub(s.generated))
            .max()
            .unwrap_or(0);
        let prefill_ms = if load.queued_prefill_tokens > 0 {
            self.engine.estimate_ms(&[SeqWork {
                extend: load.queued_prefill_tokens.min(u64::from(u32::MAX)) as u32,
                context: 0,
            }])
        } else {
            0.0
        };
        let per_decode = if load.running > 0 {
            let each = (load.running_decode_tokens / u64::from(load.running)) as u32;
            self.engine
                .estimate_ms(&vec![SeqWork::decode(each); load.running as usize])
        } else {
            0.0
        };
        let report = LoadReport {
            running: load.running,
            waiting: load.waiting,
            queued_prefill_tokens: load.queued_prefill_tokens,
            running_decode_tokens: load.running_decode_tokens,
            free_kv_tokens: load.free_kv_tokens,
            est_drain_ms: prefill_ms + per_decode * f64::from(remaining_decode_steps),
        };
        self.load.send_replace(report);
    }
}
