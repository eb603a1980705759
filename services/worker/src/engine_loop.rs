//! The engine loop: owns the local scheduler and the engine, runs one iteration at a time,
//! streams tokens, ends requests, and turns cache changes and load into worker events.
//!
//! It is the only owner of the KV cache, so other tasks talk to it through [`Command`]s.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use async_nats::{Client, Subject};
use preble_costmodel::SeqWork;
use preble_localsched::{CacheEvent, CacheSpan, LocalScheduler, SchedulerConfig, SeqId, Sequence};
use preble_protocol::{
    ErrorCode, FinishReason, FinishedRequest, KvEvicted, KvInserted, LoadReport, PROTOCOL_VERSION,
    SamplingParams, StreamBody, StreamMessage, Timings, TokenLogprob, Usage, WorkerEventBody,
    encode,
};
use preble_telemetry::propagation::child_span;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::engine::{Engine, RequestView, step_batch};
use crate::metrics::Metrics;

/// A request's serving state, carried through the local scheduler.
#[derive(Debug)]
pub struct Active {
    /// The request id.
    pub request_id: String,
    /// Where its tokens go.
    pub stream_subject: String,
    /// How to sample.
    pub sampling: SamplingParams,
    /// Hash of its original prompt (the sim engine's tokens depend on it).
    pub prompt_hash: u64,
    /// Output an earlier attempt streamed, at the end of its prompt
    /// ([`preble_protocol::GenerateRequest::resumed_tokens`]).
    pub resumed_tokens: u32,
    /// Sampling seed: the request's own, else one drawn at acceptance.
    pub seed: u64,
    /// `worker.request`: from acceptance to the end, child of the scheduler's route span.
    pub span: tracing::Span,
    /// The phase under way, a child of `span`: `worker.queue`, `worker.prefill` (with the
    /// tokens computed and reused), then `worker.decode`.
    pub phase: Option<tracing::Span>,
    /// Next stream sequence number.
    pub next_stream_seq: u64,
    /// When the worker accepted it.
    pub accepted_at: Instant,
    /// When an iteration first computed part of it.
    pub started_at: Option<Instant>,
    /// When its first token was published.
    pub first_token_at: Option<Instant>,
    /// The gateway instance holding its client, if the request names one.
    pub gateway_id: Option<String>,
}

/// Commands to the engine loop.
#[derive(Debug)]
pub enum Command {
    /// Run this accepted request.
    Admit {
        /// Its state.
        active: Box<Active>,
        /// Its prompt.
        prompt: Vec<u32>,
    },
    /// Stop this request.
    Cancel(String),
    /// Send the cache's digest to this subject.
    Digest(Subject),
    /// Finish what is running, then stop; cancel what is left at the deadline.
    Drain(Instant),
    /// These gateways are alive: stop every request accepted before `accepted_before` whose
    /// gateway is not among them (nobody is left to read its answer).
    LiveGateways {
        /// The gateways heard from recently.
        live: HashSet<String>,
        /// Requests accepted since could belong to a gateway not heard from yet.
        accepted_before: Instant,
    },
}

/// What the events task publishes, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// An event for the events subject (takes the next sequence number).
    Event(WorkerEventBody),
    /// Part of a digest for one asker (takes no sequence number; see the protocol).
    Digest {
        /// The asker's inbox.
        to: Subject,
        /// Spans of this part.
        spans: Vec<KvInserted>,
        /// Whether more parts follow.
        more: bool,
    },
}

/// Tokens per digest message at most (keeps messages under NATS's default payload limit).
const DIGEST_PART_TOKENS: usize = 100_000;

/// How a request ended.
enum Ending {
    Finished(FinishReason),
    Failed(ErrorCode, String),
}

/// Owns the local scheduler and the engine; one iteration at a time.
pub struct EngineLoop {
    client: Client,
    engine: Box<dyn Engine>,
    sched: LocalScheduler<Active>,
    ids: HashMap<String, SeqId>,
    /// Each running request's gateway and acceptance time.
    gateways: HashMap<String, (String, Instant)>,
    metrics: Metrics,
    events: mpsc::UnboundedSender<Outgoing>,
    load: watch::Sender<LoadReport>,
    eos: Vec<u32>,
    draining_until: Option<Instant>,
}

impl EngineLoop {
    /// A loop over `engine` with a local scheduler of `config`.
    pub fn new(
        client: Client,
        engine: Box<dyn Engine>,
        config: SchedulerConfig,
        metrics: Metrics,
        events: mpsc::UnboundedSender<Outgoing>,
        load: watch::Sender<LoadReport>,
        eos: Vec<u32>,
    ) -> Self {
        Self {
            client,
            engine,
            sched: LocalScheduler::new(config),
            ids: HashMap::new(),
            gateways: HashMap::new(),
            metrics,
            events,
            load,
            eos,
            draining_until: None,
        }
    }

    /// Runs the loop on a thread of its own, so model compute never blocks the service's
    /// runtime; the receiver resolves when the loop has ended.
    pub fn spawn(
        self,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("engine".to_string())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(self.run(commands)),
                    Err(e) => warn!(error = %e, "cannot start the engine thread's runtime"),
                }
                let _ = done_tx.send(());
            })?;
        Ok(done_rx)
    }

    /// Runs until drained (or every command sender is gone).
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.sched.is_idle() {
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
                for seq in self.sched.drain() {
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
        self.publish_cache_events();
        self.report_load();
    }

    async fn apply(&mut self, command: Command) {
        match command {
            Command::Admit { active, prompt } => {
                let max_tokens = active.sampling.max_tokens;
                if let Err(e) = self.sched.check(prompt.len(), max_tokens) {
                    warn!(error = %e, "accepted a request that can never run");
                    let message = e.to_string();
                    self.fail_unqueued(*active, ErrorCode::ContextLengthExceeded, message)
                        .await;
                    return;
                }
                let request_id = active.request_id.clone();
                let gateway = active.gateway_id.clone().map(|g| (g, active.accepted_at));
                match self.sched.enqueue(*active, prompt, max_tokens) {
                    Ok(id) => {
                        if let Some(gateway) = gateway {
                            self.gateways.insert(request_id.clone(), gateway);
                        }
                        self.ids.insert(request_id, id);
                    }
                    Err(e) => warn!(error = %e, "checked request refused"),
                }
            }
            Command::LiveGateways {
                live,
                accepted_before,
            } => self.stop_orphans(&live, accepted_before).await,
            Command::Cancel(request_id) => {
                self.gateways.remove(&request_id);
                let Some(id) = self.ids.remove(&request_id) else {
                    return;
                };
                if let Some(seq) = self.sched.remove(id) {
                    debug!(request = %request_id, "cancelled");
                    self.end(seq, Ending::Finished(FinishReason::Cancelled))
                        .await;
                    self.publish_cache_events();
                }
            }
            Command::Digest(to) => self.send_digest(to),
            Command::Drain(deadline) => self.draining_until = Some(deadline),
        }
    }

    async fn iterate(&mut self) {
        let plan = self.sched.plan();
        self.metrics.preemptions.inc_by(plan.preempted.len() as u64);
        if plan.is_empty() {
            // Cannot happen while requests wait (admission with nothing running always fits);
            // yield rather than spin if it ever does.
            tokio::task::yield_now().await;
            return;
        }
        let began = Instant::now();
        for item in &plan.items {
            let seq = self.sched.running_mut(item.index);
            if seq.payload.started_at.is_none() {
                seq.payload.started_at = Some(began);
                let reused = seq.cached_prompt_tokens();
                self.metrics.prefix_hit_tokens.inc_by(u64::from(reused));
                self.metrics
                    .prefix_cache_queries
                    .inc_by(u64::from(seq.prompt_len()));
                self.metrics
                    .request_queue_time
                    .observe(began.duration_since(seq.payload.accepted_at).as_secs_f64());
                let prefill = child_span(&seq.payload.span, || {
                    tracing::info_span!(
                        parent: &seq.payload.span,
                        "worker.prefill",
                        reused_tokens = reused,
                        computed_tokens = seq.prompt_len() - reused,
                    )
                });
                seq.payload.span.record("cached_tokens", reused);
                seq.payload.phase = Some(prefill);
            }
        }
        let steps = step_batch(&self.sched, &plan, |active: &Active| RequestView {
            prompt_hash: active.prompt_hash,
            sampling: &active.sampling,
            seed: active.seed,
            output_offset: active.resumed_tokens,
        });
        let result = self.engine.step(&steps);
        drop(steps);
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                warn!(error = %e, requests = plan.items.len(), "engine step failed; failing its batch");
                self.metrics.engine_errors.inc();
                self.fail_batch(&plan, e.to_string()).await;
                return;
            }
        };
        tokio::time::sleep(output.busy_for).await;
        self.metrics.iterations.inc();
        self.metrics
            .computed_tokens
            .inc_by(plan.items.iter().map(|i| u64::from(i.extend)).sum());
        self.metrics
            .iteration_seconds
            .observe(began.elapsed().as_secs_f64());

        // Each sampled token's log-probabilities, by its sequence's index in the batch.
        let mut logprobs: HashMap<usize, TokenLogprob> = plan
            .items
            .iter()
            .zip(output.logprobs)
            .filter_map(|(item, lp)| Some((item.index, lp?)))
            .collect();
        let mut sampled = self.sched.commit(&plan, &output.tokens);
        let running = self.sched.running();
        let first_tokens = first_tokens_first(&mut sampled, |index| {
            running[index].payload.first_token_at.is_none()
        });
        let mut endings: Vec<(usize, Ending)> = Vec::new();
        for (position, (index, token)) in sampled.into_iter().enumerate() {
            if position == first_tokens && first_tokens > 0 {
                // Send the first tokens on their way before writing the rest.
                if let Err(e) = self.client.flush().await {
                    warn!(error = %e, "failed to flush first tokens");
                }
            }
            let seq = self.sched.running_mut(index);
            self.metrics.generation_tokens.inc();
            if seq.payload.first_token_at.is_none() {
                seq.payload.first_token_at = Some(Instant::now());
                let decode = child_span(
                    &seq.payload.span,
                    || tracing::info_span!(parent: &seq.payload.span, "worker.decode"),
                );
                seq.payload.phase = Some(decode);
                self.metrics
                    .time_to_first_token
                    .observe(seq.payload.accepted_at.elapsed().as_secs_f64());
            }
            let sampling = &seq.payload.sampling;
            if sampling.stop_token_ids.contains(&token)
                || (!sampling.ignore_eos && self.eos.contains(&token))
            {
                endings.push((index, Ending::Finished(FinishReason::Stop)));
                continue;
            }
            let generated = seq.generated().len() as u32;
            let active = &mut seq.payload;
            let message = StreamMessage {
                v: PROTOCOL_VERSION,
                request_id: active.request_id.clone(),
                seq: active.next_stream_seq,
                body: StreamBody::Tokens {
                    token_ids: vec![token],
                    logprobs: logprobs.remove(&index).into_iter().collect(),
                },
            };
            active.next_stream_seq += 1;
            let subject = active.stream_subject.clone();
            if generated >= active.sampling.max_tokens {
                endings.push((index, Ending::Finished(FinishReason::Length)));
            }
            if let Err(e) = self.client.publish(subject, encode(&message).into()).await {
                warn!(error = %e, "failed to publish tokens");
            }
        }
        // Descending order keeps the remaining indices valid.
        endings.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (index, ending) in endings {
            let seq = self.sched.finish(index);
            self.end(seq, ending).await;
        }
        self.publish_cache_events();
        self.report_load();
    }

    /// Ends every request of a plan whose step failed. Nothing of the failed step is
    /// committed, so the cache keeps only KV computed by earlier, successful steps.
    async fn fail_batch(&mut self, plan: &preble_localsched::Plan, message: String) {
        let mut indices: Vec<usize> = plan.items.iter().map(|i| i.index).collect();
        indices.sort_unstable_by(|a, b| b.cmp(a));
        indices.dedup();
        for index in indices {
            let seq = self.sched.finish(index);
            self.end(seq, Ending::Failed(ErrorCode::Internal, message.clone()))
                .await;
        }
        self.publish_cache_events();
        self.report_load();
    }

    /// Sends the final stream message and the finished event.
    /// A resumed request's usage counts its original prompt and its whole output.
    async fn end(&mut self, seq: Sequence<Active>, ending: Ending) {
        let resumed = seq.payload.resumed_tokens;
        let prompt_tokens = seq.prompt_len().saturating_sub(resumed);
        let usage = Usage {
            prompt_tokens,
            cached_tokens: seq.cached_prompt_tokens().min(prompt_tokens),
            completion_tokens: seq.generated().len() as u32 + resumed,
        };
        self.ids.remove(&seq.payload.request_id);
        self.gateways.remove(&seq.payload.request_id);
        self.finish_stream(seq.payload, usage, ending).await;
    }

    /// Stops the requests whose gateway is gone.
    async fn stop_orphans(&mut self, live: &HashSet<String>, accepted_before: Instant) {
        let orphans: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, (gateway, at))| *at < accepted_before && !live.contains(gateway))
            .map(|(request, _)| request.clone())
            .collect();
        let mut stopped = 0;
        for request_id in orphans {
            self.gateways.remove(&request_id);
            let Some(id) = self.ids.remove(&request_id) else {
                continue;
            };
            if let Some(seq) = self.sched.remove(id) {
                warn!(request = %request_id, "its gateway is gone: stopped");
                self.metrics.requests_orphaned.inc();
                stopped += 1;
                self.end(
                    seq,
                    Ending::Failed(
                        ErrorCode::Cancelled,
                        "the gateway holding the client is gone".into(),
                    ),
                )
                .await;
            }
        }
        if stopped > 0 {
            self.publish_cache_events();
        }
    }

    /// Ends a request that never reached the scheduler's queue.
    async fn fail_unqueued(&mut self, active: Active, code: ErrorCode, message: String) {
        let usage = Usage::default();
        self.finish_stream(active, usage, Ending::Failed(code, message))
            .await;
    }

    async fn finish_stream(&mut self, mut active: Active, usage: Usage, ending: Ending) {
        active.phase = None;
        let span = &active.span;
        span.record("completion_tokens", usage.completion_tokens);
        match &ending {
            Ending::Finished(reason) => {
                span.record("finish_reason", reason.as_str());
            }
            Ending::Failed(code, message) => {
                span.record("otel.status_code", "ERROR");
                span.record("error", format!("{}: {message}", code.as_str()));
            }
        }
        let since = |t: Option<Instant>| {
            t.map(|t| t.duration_since(active.accepted_at).as_micros() as u64)
                .unwrap_or(0)
        };
        let timings = Timings {
            queue_us: since(active.started_at),
            first_token_us: since(active.first_token_at),
            total_us: active.accepted_at.elapsed().as_micros() as u64,
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
            request_id: active.request_id.clone(),
            seq: active.next_stream_seq,
            body,
        };
        if let Err(e) = self
            .client
            .publish(active.stream_subject.clone(), encode(&message).into())
            .await
        {
            warn!(error = %e, "failed to publish the end of a stream");
        }
        let ttft_ms = since(active.first_token_at) as f64 / 1e3;
        let generated_here = usage
            .completion_tokens
            .saturating_sub(active.resumed_tokens);
        let tpot_ms = match active.first_token_at {
            Some(first) if generated_here > 1 => {
                first.elapsed().as_secs_f64() * 1e3 / f64::from(generated_here - 1)
            }
            _ => 0.0,
        };
        if tpot_ms > 0.0 {
            self.metrics.time_per_output_token.observe(tpot_ms / 1e3);
        }
        self.metrics
            .e2e_request_latency
            .observe(active.accepted_at.elapsed().as_secs_f64());
        let _ = self.events.send(Outgoing::Event(WorkerEventBody::Finished(
            FinishedRequest {
                request_id: active.request_id,
                finish_reason,
                usage,
                ttft_ms,
                tpot_ms,
            },
        )));
    }

    /// Publishes the cache's inserts and evictions since the last call, in order.
    fn publish_cache_events(&mut self) {
        for event in self.sched.take_events() {
            let body = match event {
                CacheEvent::Inserted(span) => {
                    self.metrics
                        .kv_events
                        .with_label_values(&["inserted"])
                        .inc();
                    WorkerEventBody::KvInserted(to_wire(span))
                }
                CacheEvent::Evicted { hash, num_tokens } => {
                    self.metrics.kv_events.with_label_values(&["evicted"]).inc();
                    WorkerEventBody::KvEvicted(KvEvicted {
                        path_hash: hash,
                        num_tokens,
                    })
                }
            };
            let _ = self.events.send(Outgoing::Event(body));
        }
    }

    /// Sends the whole cache to `to`, in parts, after every event so far (so the asker can
    /// continue from the next event's sequence number).
    fn send_digest(&mut self, to: Subject) {
        self.publish_cache_events();
        let spans = self.sched.cache().digest();
        let mut part = Vec::new();
        let mut tokens = 0;
        for span in spans {
            tokens += span.tokens.len();
            part.push(to_wire(span));
            if tokens >= DIGEST_PART_TOKENS {
                let _ = self.events.send(Outgoing::Digest {
                    to: to.clone(),
                    spans: std::mem::take(&mut part),
                    more: true,
                });
                tokens = 0;
            }
        }
        let _ = self.events.send(Outgoing::Digest {
            to,
            spans: part,
            more: false,
        });
    }

    fn report_load(&mut self) {
        let load = self.sched.load();
        let capacity = u64::from(self.sched.config().kv_capacity);
        self.metrics.running.set(i64::from(load.running));
        self.metrics.waiting.set(i64::from(load.waiting));
        self.metrics
            .kv_used_tokens
            .set((capacity - load.free_slots) as i64);
        self.metrics
            .kv_cache_usage
            .set((capacity - load.free_slots) as f64 / capacity.max(1) as f64);
        self.metrics.kv_cached_tokens.set(load.cached_tokens as i64);
        let remaining_decode_steps = self
            .sched
            .running()
            .iter()
            .map(|s| s.max_new_tokens() - s.generated().len() as u32)
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
            free_kv_tokens: load.available_slots,
            est_drain_ms: prefill_ms + per_decode * f64::from(remaining_decode_steps),
            cached_tokens: load.cached_tokens,
            remaining_decode_tokens: load.remaining_decode_tokens,
        };
        self.load.send_replace(report);
    }
}

fn to_wire(span: CacheSpan) -> KvInserted {
    KvInserted {
        parent_hash: span.parent_hash,
        path_hash: span.hash,
        tokens: span.tokens,
    }
}

/// Puts the sampled tokens that are their request's first (`is_first` of the batch index)
/// ahead of the others, keeping each group's order, and returns how many there are. The plan
/// puts decodes before prefills; with hundreds of streams a new request's first token would
/// otherwise wait behind every running stream's next token, on NATS and at the gateway.
fn first_tokens_first(sampled: &mut [(usize, u32)], is_first: impl Fn(usize) -> bool) -> usize {
    sampled.sort_by_key(|&(index, _)| !is_first(index));
    sampled
        .iter()
        .take_while(|&&(index, _)| is_first(index))
        .count()
}

#[cfg(test)]
mod tests {
    use super::first_tokens_first;

    #[test]
    fn first_tokens_go_ahead_of_decodes_in_batch_order() {
        // Batch indices 0..5; 3 and 1 are new requests' first tokens.
        let mut sampled = vec![(0, 10), (2, 12), (3, 13), (4, 14), (1, 11)];
        let firsts = first_tokens_first(&mut sampled, |index| index == 3 || index == 1);
        assert_eq!(firsts, 2);
        assert_eq!(sampled, vec![(3, 13), (1, 11), (0, 10), (2, 12), (4, 14)]);
        let mut none = vec![(0, 1), (1, 2)];
        assert_eq!(first_tokens_first(&mut none, |_| false), 0);
        assert_eq!(none, vec![(0, 1), (1, 2)]);
    }
}
