//! The scheduler service: one routing actor owns the cluster view and the policy; dispatches
//! run as tasks that report back to it.
//!
//! A request is acknowledged on the JetStream stream only once a worker accepted it, so a
//! scheduler that dies mid-dispatch loses nothing: JetStream redelivers after the ack wait.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use async_nats::{Client, Request};
use futures::StreamExt;
use preble_policy::{ClusterEvent, ClusterView, Policy, RouteRequest, TreeError};
use preble_protocol::subjects::SCHEDULER_ORIGIN;
use preble_protocol::{
    Cancel, DigestRequest, Dispatch, DispatchOutcome, DispatchReply, ErrorCode, GenerateRequest,
    KvInserted, PROTOCOL_VERSION, StreamBody, StreamMessage, WorkerEvent, WorkerEventBody, decode,
    encode,
};
use preble_telemetry::propagation::continue_trace;
use tokio::sync::mpsc;
use tracing::{Span, debug, field::Empty, info, warn};

use crate::cluster::{Cluster, Outstanding};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::persist::{self, Keys, Persistence, Shadow, StoredOp, StoredSnapshot};
use crate::startup::Startup;

/// How often dead workers are reaped and waiting requests retried.
const TICK: Duration = Duration::from_millis(50);

/// Runs the scheduler until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let client = preble_telemetry::nats::connect(
        &config.nats,
        "preble-scheduler",
        &preble_protocol::roles::Role::Scheduler.inbox_prefix(),
    )
    .await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(stream::Config {
            name: config.subjects.requests_stream(),
            subjects: vec![config.subjects.requests()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .context("creating the requests stream")?;
    let durable = config.subjects.scheduler_consumer();
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_ack_pending: config.max_in_flight,
                ..Default::default()
            },
        )
        .await
        .context("creating the scheduler consumer")?;
    let mut requests = consumer.messages().await.context("consuming requests")?;
    let mut events = client.subscribe(config.subjects.all_events()).await?;
    client.flush().await?;

    let metrics = Metrics::new();
    let listener = preble_telemetry::bind(config.http_addr).await?;
    info!(
        http = %listener.local_addr()?,
        stream = %config.subjects.requests_stream(),
        policy = ?config.policy,
        "scheduler ready"
    );
    let stop_http = tokio_util::sync::CancellationToken::new();
    let http_token = stop_http.clone();
    let http = tokio::spawn(preble_telemetry::serve_ops(
        listener,
        metrics.registry.clone(),
        async move { http_token.cancelled().await },
    ));

    let mut policy = config.policy.build(&config.policy_settings);
    let mut known_workers = HashSet::new();
    let persistence = match &config.redis_url {
        Some(url) => {
            let keys = Keys::new(config.subjects.prefix());
            let mut shadow = Shadow::default();
            match persist::load(url, &keys).await {
                Ok((snapshot, ops)) => {
                    let tokens = restore(policy.as_mut(), &snapshot, &ops);
                    known_workers = persist::known_workers(&snapshot, &ops);
                    shadow = Shadow::restored(&snapshot, &ops);
                    metrics.tree_tokens_restored.set(tokens as i64);
                    info!(
                        spans = snapshot.spans.len(),
                        ops = ops.len(),
                        tokens,
                        "prefix tree restored from redis"
                    );
                }
                Err(e) => {
                    metrics.persist.degraded.set(1);
                    warn!(error = %e, "could not restore the prefix tree from redis; starting empty");
                }
            }
            Some(Persistence::start(
                url,
                keys,
                metrics.persist.clone(),
                shadow,
            )?)
        }
        None => None,
    };
    let (results_tx, mut results) = mpsc::unbounded_channel();
    let (digests_tx, mut digests) = mpsc::unbounded_channel();
    let startup = Startup::new(known_workers, config.startup_wait);
    let mut router = Router {
        startup,
        disconnected: false,
        policy,
        persistence,
        last_snapshot: Instant::now(),
        digests: digests_tx,
        digests_pending: HashSet::new(),
        last_refusal_warning: None,
        cluster: Cluster::new(config.heartbeat_misses),
        waiting: VecDeque::new(),
        in_flight: 0,
        client: client.clone(),
        results: results_tx,
        metrics,
        config,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            message = requests.next(), if router.startup.routing() => match message {
                Some(Ok(message)) => router.on_request(message),
                Some(Err(e)) => warn!(error = %e, "error consuming requests"),
                None => {
                    warn!("requests consumer ended");
                    break;
                }
            },
            Some(event) = events.next() => router.on_event(&event.subject, &event.payload),
            Some(result) = results.recv() => router.on_result(result),
            Some(digest) = digests.recv() => router.on_digest(digest),
            _ = tick.tick() => router.on_tick(),
        }
    }
    info!(in_flight = router.in_flight, "scheduler stopping");
    // Stop taking requests; let dispatches in flight finish so their acks are sent. What is
    // left unacknowledged is redelivered to the next scheduler.
    drop(requests);
    let deadline = tokio::time::Instant::now() + router.config.dispatch_timeout * 2;
    while router.in_flight > 0 {
        match tokio::time::timeout_at(deadline, results.recv()).await {
            Ok(Some(result)) => router.on_result(result),
            _ => break,
        }
    }
    stop_http.cancel();
    let _ = http.await;
    client.flush().await.ok();
    Ok(())
}

/// A request being routed.
struct Pending {
    request: GenerateRequest,
    message: jetstream::Message,
    attempts: u32,
    tried: Vec<String>,
    since: Instant,
    /// `scheduler.route`: from arrival to acceptance or failure, child of the gateway's span.
    span: Span,
}

/// What a dispatch task reports back.
struct DispatchResult {
    pending: Pending,
    worker: String,
    outcome: Result<DispatchOutcome, String>,
}

/// How often the refusal of workers past the most one scheduler routes to is logged.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The routing actor.
struct Router {
    /// The wait for the known workers after a restart.
    startup: Startup,
    /// The scheduler's own NATS connection is down (seen at the last tick).
    disconnected: bool,
    config: Config,
    client: Client,
    policy: Box<dyn Policy>,
    cluster: Cluster,
    waiting: VecDeque<Pending>,
    in_flight: usize,
    results: mpsc::UnboundedSender<DispatchResult>,
    digests: mpsc::UnboundedSender<DigestResult>,
    /// Workers whose digest was asked for and has not arrived.
    digests_pending: HashSet<String>,
    /// When a worker refused at join was last logged.
    last_refusal_warning: Option<Instant>,
    persistence: Option<Persistence>,
    last_snapshot: Instant,
    metrics: Metrics,
}

/// After the scheduler's own NATS outage, how long workers have to be heard from again before
/// their allowance of missed heartbeats starts (they reconnect in their own time).
const RECONNECT_GRACE: Duration = Duration::from_secs(5);

/// Why a worker's cache event was not taken.
#[derive(Debug)]
enum Lie {
    /// The tree refused it (out of step, or a path hash that does not match its tokens).
    Tree(TreeError),
    /// The worker would hold more tokens than the capacity it announced.
    OverCapacity,
}

impl std::fmt::Display for Lie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lie::Tree(e) => e.fmt(f),
            Lie::OverCapacity => {
                f.write_str("the worker claims more cached tokens than its announced capacity")
            }
        }
    }
}

/// A worker's digest (or why it could not be had).
struct DigestResult {
    worker: String,
    spans: Result<Vec<KvInserted>, String>,
}

/// How long a digest may take to arrive in full.
const DIGEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Router {
    fn on_request(&mut self, message: jetstream::Message) {
        match decode::<GenerateRequest>(&message.payload) {
            Ok(request) => {
                debug!(request = %request.request_id, "request received");
                let span = continue_trace(message.headers.as_ref(), || {
                    tracing::info_span!(
                        "scheduler.route",
                        otel.kind = "consumer",
                        otel.status_code = Empty,
                        request_id = %request.request_id,
                        model = %request.model,
                        prompt_tokens = request.prompt_tokens.len(),
                        policy = self.config.policy.name(),
                        worker = Empty,
                        decision = Empty,
                        cached_tokens = Empty,
                        reason = Empty,
                        attempts = Empty,
                        error = Empty,
                    )
                });
                self.route(Pending {
                    request,
                    message,
                    attempts: 0,
                    tried: Vec::new(),
                    since: Instant::now(),
                    span,
                });
            }
            Err(e) => {
                // Nobody can be answered: the reply subject is inside the bytes we cannot
                // read. Log it and remove it from the stream so it is not redelivered.
                self.metrics.malformed_messages.inc();
                warn!(error = %e, "malformed request on the requests stream; dropped");
                tokio::spawn(async move {
                    message.ack_with(AckKind::Term).await.ok();
                });
            }
        }
    }

    fn route(&mut self, mut pending: Pending) {
        let eligible = self
            .cluster
            .eligible(&pending.request.model, &pending.tried);
        if eligible.is_empty() {
            if pending.since.elapsed() >= self.config.no_worker_wait {
                let why = if pending.tried.is_empty() {
                    format!("no live worker serves model {:?}", pending.request.model)
                } else {
                    format!(
                        "no worker accepted the request (tried {})",
                        pending.tried.join(", ")
                    )
                };
                self.fail(pending, ErrorCode::Overloaded, why);
            } else {
                self.waiting.push_back(pending);
            }
            return;
        }
        let request = &pending.request;
        let decision = match self.policy.route(
            &ClusterView { workers: &eligible },
            &RouteRequest {
                request_id: &request.request_id,
                prompt: &request.prompt_tokens,
                max_tokens: request.sampling.max_tokens,
                now_ms: preble_telemetry::unix_ms(),
            },
        ) {
            Ok(decision) => decision,
            Err(e) => {
                self.fail(pending, ErrorCode::Internal, format!("routing failed: {e}"));
                return;
            }
        };
        self.metrics
            .decisions
            .with_label_values(&[decision.kind.as_str()])
            .inc();
        debug!(request = %request.request_id, worker = %decision.worker, reason = %decision.reason, "routed");
        self.cluster.charge(
            &request.request_id,
            Outstanding {
                worker: decision.worker.clone(),
                prompt_tokens: request.prompt_tokens.len() as u64,
                stream_key: request.stream_key.clone(),
            },
        );
        pending.attempts += 1;
        pending.tried.push(decision.worker.clone());
        let span = &pending.span;
        span.record("worker", decision.worker.as_str());
        span.record("decision", decision.kind.as_str());
        span.record("cached_tokens", decision.cached_tokens);
        span.record("reason", decision.reason.as_str());
        span.record("attempts", pending.attempts);
        let headers = preble_telemetry::propagation::headers_for(span);
        let dispatch = Dispatch {
            v: PROTOCOL_VERSION,
            request: pending.request.clone(),
            attempt: pending.attempts,
            expected_cached_tokens: decision.cached_tokens,
        };
        self.in_flight += 1;
        self.metrics.dispatches.inc();
        let client = self.client.clone();
        let subject = self.config.subjects.worker(&decision.worker);
        let timeout = self.config.dispatch_timeout;
        let results = self.results.clone();
        let worker = decision.worker;
        tokio::spawn(async move {
            let request = Request::new()
                .headers(headers)
                .payload(encode(&dispatch).into())
                .timeout(Some(timeout));
            let outcome = match client.send_request(subject, request).await {
                Ok(reply) => decode::<DispatchReply>(&reply.payload)
                    .map(|r| r.outcome)
                    .map_err(|e| format!("malformed dispatch reply: {e}")),
                Err(e) => Err(e.to_string()),
            };
            if matches!(outcome, Ok(DispatchOutcome::Accepted))
                && let Err(e) = pending.message.ack().await
            {
                warn!(error = %e, "failed to acknowledge an accepted request");
            }
            let _ = results.send(DispatchResult {
                pending,
                worker,
                outcome,
            });
        });
    }

    /// Releases a request's charge in the cluster's books and the policy's.
    fn release(&mut self, request_id: &str) {
        if let Some(outstanding) = self.cluster.release(request_id) {
            let _ = self.policy.observe(&ClusterEvent::Released {
                worker: &outstanding.worker,
                request_id,
            });
        }
    }

    fn on_result(&mut self, result: DispatchResult) {
        self.in_flight -= 1;
        let DispatchResult {
            pending,
            worker,
            outcome,
        } = result;
        let retry_reason = match outcome {
            Ok(DispatchOutcome::Accepted) => return,
            Ok(DispatchOutcome::Rejected {
                code,
                message,
                retryable: false,
            }) => {
                self.metrics.dispatch_failures.inc();
                self.release(&pending.request.request_id);
                self.fail(pending, code, message);
                return;
            }
            Ok(DispatchOutcome::Rejected { code, message, .. }) => format!("{code}: {message}"),
            Err(transport) => {
                // The worker may have accepted without us hearing it: make sure it does not
                // run the request next to its retry elsewhere.
                let cancel = Cancel {
                    worker_id: Some(worker.clone()),
                    ..Cancel::new(&pending.request.request_id, "dispatch timed out")
                };
                let client = self.client.clone();
                let subject = self.config.subjects.cancel();
                tokio::spawn(async move {
                    client.publish(subject, encode(&cancel).into()).await.ok();
                });
                transport
            }
        };
        self.metrics.dispatch_failures.inc();
        self.release(&pending.request.request_id);
        warn!(request = %pending.request.request_id, %worker, reason = %retry_reason, "dispatch not accepted");
        if pending.attempts >= self.config.max_attempts {
            let why = format!(
                "no worker accepted the request after {} attempts (last: {retry_reason})",
                pending.attempts
            );
            self.fail(pending, ErrorCode::Overloaded, why);
        } else {
            self.route(pending);
        }
    }

    /// Applies one worker event. Its worker is the one its subject names (the server lets only
    /// that worker publish there); a body claiming another worker is a lie, dropped.
    fn on_event(&mut self, subject: &str, payload: &[u8]) {
        let event = match decode::<WorkerEvent>(payload) {
            Ok(event) => event,
            Err(e) => {
                self.metrics.malformed_messages.inc();
                warn!(error = %e, "malformed worker event");
                return;
            }
        };
        if self.config.subjects.events_worker(subject) != Some(event.worker_id.as_str()) {
            self.metrics.rejected_events.inc();
            warn!(%subject, claimed = %event.worker_id, "worker event published under another worker's name; dropped");
            return;
        }
        let observed = self.cluster.observe(&event, Instant::now());
        if !observed.known {
            // Cache and finish events count only from workers that have announced themselves.
            self.metrics.unknown_worker_events.inc();
            debug!(worker = %event.worker_id, "event from a worker that sent no heartbeat");
            return;
        }
        let worker = event.worker_id.as_str();
        let now_ms = preble_telemetry::unix_ms();
        let applied = match &event.body {
            WorkerEventBody::KvInserted(k) => {
                self.metrics
                    .kv_events
                    .with_label_values(&["inserted"])
                    .inc();
                self.policy.observe(&ClusterEvent::CacheInserted {
                    worker,
                    parent_hash: k.parent_hash,
                    hash: k.path_hash,
                    tokens: &k.tokens,
                    now_ms,
                })
            }
            WorkerEventBody::KvEvicted(k) => {
                self.metrics.kv_events.with_label_values(&["evicted"]).inc();
                self.policy.observe(&ClusterEvent::CacheEvicted {
                    worker,
                    hash: k.path_hash,
                    num_tokens: k.num_tokens,
                })
            }
            WorkerEventBody::Finished(f) => self.policy.observe(&ClusterEvent::Finished {
                worker,
                output_tokens: f.usage.completion_tokens,
                ttft_ms: f.ttft_ms,
                tpot_ms: f.tpot_ms,
                now_ms,
            }),
            _ => Ok(()),
        };
        if let Some(request_id) = &observed.released {
            let _ = self
                .policy
                .observe(&ClusterEvent::Released { worker, request_id });
        }
        let applied = applied
            .map_err(Lie::Tree)
            .and_then(|()| self.within_capacity(&event));
        match applied {
            Ok(()) => self.persist_event(&event),
            Err(e) => {
                if matches!(
                    e,
                    Lie::Tree(TreeError::HashMismatch { .. }) | Lie::OverCapacity
                ) {
                    self.metrics.rejected_events.inc();
                    warn!(%worker, error = %e, "lying cache event rejected; asking for a digest");
                } else {
                    debug!(%worker, error = %e, "cache event out of step");
                }
                self.request_digest(&event.worker_id);
            }
        }
        if observed.gap {
            self.metrics.event_gaps.inc();
            warn!(%worker, seq = event.seq, "gap in worker events");
            self.request_digest(&event.worker_id);
        }
        if observed.refused {
            self.metrics.refused_workers.inc();
            if self
                .last_refusal_warning
                .is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY)
            {
                self.last_refusal_warning = Some(Instant::now());
                warn!(
                    %worker,
                    max = preble_policy::workers::MAX_WORKERS,
                    "a worker joined past the most workers one scheduler routes to: not admitted"
                );
            }
        }
        if observed.joined {
            info!(%worker, "worker joined");
            self.startup.reported(worker);
            self.request_digest(&event.worker_id);
            self.retry_waiting();
        }
        self.metrics
            .live_workers
            .set(self.cluster.live_workers() as i64);
    }

    /// Asks `worker` for its full cache contents (once at a time per worker).
    fn request_digest(&mut self, worker: &str) {
        if !self.digests_pending.insert(worker.to_string()) {
            return;
        }
        self.metrics.digests_requested.inc();
        let client = self.client.clone();
        let subject = self.config.subjects.digest(worker);
        let results = self.digests.clone();
        // A cache holds at most what its worker announced, and the tree at most its bound: a
        // digest past that is a lie, refused before it is all in memory.
        let max_tokens = self
            .cluster
            .kv_capacity(worker)
            .unwrap_or(u64::MAX)
            .min(self.config.policy_settings.e2.max_tree_tokens);
        let worker = worker.to_string();
        tokio::spawn(async move {
            let fetched = fetch_digest(&client, subject, max_tokens);
            let spans = tokio::time::timeout(DIGEST_TIMEOUT, fetched)
                .await
                .unwrap_or_else(|_| Err("timed out".to_string()));
            let _ = results.send(DigestResult { worker, spans });
        });
    }

    /// Replaces what the policy believes a worker's cache holds by its digest.
    fn on_digest(&mut self, digest: DigestResult) {
        self.digests_pending.remove(&digest.worker);
        let worker = digest.worker.as_str();
        let spans = match digest.spans {
            Ok(spans) => spans,
            Err(e) => {
                warn!(%worker, error = %e, "no digest from worker");
                return;
            }
        };
        let now_ms = preble_telemetry::unix_ms();
        let _ = self.policy.observe(&ClusterEvent::CacheReset { worker });
        let mut tokens = 0;
        let mut applied = Vec::with_capacity(spans.len());
        for span in spans {
            match self.policy.observe(&ClusterEvent::CacheInserted {
                worker,
                parent_hash: span.parent_hash,
                hash: span.path_hash,
                tokens: &span.tokens,
                now_ms,
            }) {
                Ok(()) => {
                    tokens += span.tokens.len();
                    applied.push(span);
                }
                Err(e) => {
                    // Only what applied is persisted: a restore never replays a lie.
                    self.metrics.rejected_events.inc();
                    warn!(%worker, error = %e, "digest span refused");
                }
            }
        }
        let spans = applied;
        self.cluster.cache_reset(worker, tokens as u64);
        info!(%worker, spans = spans.len(), tokens, "cache digest applied");
        if let Some(p) = &self.persistence {
            // A digest can be large: a snapshot records it more cheaply than its ops.
            p.digest(
                worker,
                spans.into_iter().map(|span| StoredOp::Inserted {
                    worker: worker.to_string(),
                    parent_hash: span.parent_hash,
                    hash: span.path_hash,
                    tokens: span.tokens,
                }),
            );
        }
    }

    /// Appends a cache event the policy applied to the persisted op log.
    /// Counts a cache event against its worker's announced capacity; a worker that claims to
    /// hold more loses its picture (rebuilt from a digest, which is bounded by the capacity).
    fn within_capacity(&mut self, event: &WorkerEvent) -> Result<(), Lie> {
        let worker = event.worker_id.as_str();
        let (inserted, evicted) = match &event.body {
            WorkerEventBody::KvInserted(k) => (k.tokens.len() as u64, 0),
            WorkerEventBody::KvEvicted(k) => (0, u64::from(k.num_tokens)),
            _ => return Ok(()),
        };
        if self.cluster.cache_changed(worker, inserted, evicted) {
            return Ok(());
        }
        self.cluster.cache_reset(worker, 0);
        let _ = self.policy.observe(&ClusterEvent::CacheReset { worker });
        if let Some(p) = &self.persistence {
            p.record(StoredOp::Reset {
                worker: worker.to_string(),
            });
        }
        Err(Lie::OverCapacity)
    }

    fn persist_event(&self, event: &WorkerEvent) {
        let Some(p) = &self.persistence else {
            return;
        };
        let worker = event.worker_id.clone();
        let op = match &event.body {
            WorkerEventBody::KvInserted(k) => StoredOp::Inserted {
                worker,
                parent_hash: k.parent_hash,
                hash: k.path_hash,
                tokens: k.tokens.clone(),
            },
            WorkerEventBody::KvEvicted(k) => StoredOp::Evicted {
                worker,
                hash: k.path_hash,
                num_tokens: k.num_tokens,
            },
            _ => return,
        };
        p.record(op);
    }

    /// Asks for a snapshot when one is due: periodically (the writer exports its shadow),
    /// or from the policy's own tree when writes were lost on the way to the writer.
    fn maybe_snapshot(&mut self) {
        let Some(p) = &self.persistence else {
            return;
        };
        if p.take_export_wish() {
            p.export(self.policy.export());
            self.last_snapshot = Instant::now();
        } else if self.last_snapshot.elapsed() >= self.config.snapshot_interval {
            p.snapshot();
            self.last_snapshot = Instant::now();
        }
    }

    /// Whether silent workers may be declared dead now: only while the scheduler is itself
    /// connected to NATS (cut off, it hears nobody, and that is not their death). On
    /// reconnecting, every worker gets a fresh allowance.
    fn may_judge_workers(&mut self, now: Instant) -> bool {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        match (connected, self.disconnected) {
            (false, false) => {
                self.disconnected = true;
                warn!("cut off from NATS: no worker is declared dead until it is back");
            }
            (true, true) => {
                self.disconnected = false;
                self.cluster.refresh(now, RECONNECT_GRACE);
                info!("NATS is back: every worker's heartbeat allowance starts again");
            }
            _ => {}
        }
        connected
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let reaped = if self.may_judge_workers(now) {
            self.cluster.reap(now)
        } else {
            Vec::new()
        };
        for (worker, owed) in reaped {
            warn!(%worker, requests = owed.len(), "worker missed its heartbeats: dropped");
            let _ = self
                .policy
                .observe(&ClusterEvent::WorkerGone { worker: &worker });
            if let Some(p) = &self.persistence {
                p.record(StoredOp::Gone {
                    worker: worker.clone(),
                });
            }
            self.metrics
                .outstanding
                .remove_label_values(&[&worker])
                .ok();
            self.metrics
                .worker_drain_ms
                .remove_label_values(&[&worker])
                .ok();
            for (request_id, outstanding) in owed {
                self.send_error(
                    &request_id,
                    &outstanding.stream_key,
                    ErrorCode::WorkerLost,
                    format!("worker {worker} stopped responding"),
                );
            }
        }
        for (worker, n) in self.cluster.outstanding_by_worker() {
            self.metrics
                .outstanding
                .with_label_values(&[worker])
                .set(i64::from(n));
        }
        for (worker, load) in self.cluster.loads() {
            self.metrics
                .worker_drain_ms
                .with_label_values(&[worker])
                .set(load.reported_drain_ms.round() as i64);
        }
        if let Some(size) = self.policy.tree_size() {
            self.metrics.tree_nodes.set(size.nodes as i64);
            self.metrics.tree_tokens.set(size.tokens as i64);
            self.metrics
                .tree_running_requests
                .set(size.running_requests as i64);
        }
        if let Some(p) = &self.persistence {
            self.metrics
                .persistence_pending_writes
                .set(p.pending_writes() as i64);
        }
        self.metrics
            .live_workers
            .set(self.cluster.live_workers() as i64);
        self.retry_waiting();
        self.maybe_snapshot();
    }

    fn retry_waiting(&mut self) {
        for pending in std::mem::take(&mut self.waiting) {
            self.route(pending);
        }
    }

    /// Ends a request with an error on its stream and removes it from the requests stream.
    fn fail(&mut self, pending: Pending, code: ErrorCode, message: String) {
        warn!(request = %pending.request.request_id, %code, %message, "request failed");
        pending.span.record("otel.status_code", "ERROR");
        pending
            .span
            .record("error", format!("{}: {message}", code.as_str()));
        self.send_error(
            &pending.request.request_id,
            &pending.request.stream_key,
            code,
            message,
        );
        tokio::spawn(async move {
            pending.message.ack().await.ok();
        });
    }

    /// Ends the stream of key `stream_key` with an error, published under the scheduler's own
    /// origin.
    fn send_error(&self, request_id: &str, stream_key: &str, code: ErrorCode, message: String) {
        self.metrics
            .request_errors
            .with_label_values(&[code.as_str()])
            .inc();
        let error = StreamMessage {
            v: PROTOCOL_VERSION,
            request_id: request_id.to_string(),
            seq: u64::MAX,
            body: StreamBody::Error { code, message },
        };
        let client = self.client.clone();
        let subject = self
            .config
            .subjects
            .stream_from(SCHEDULER_ORIGIN, stream_key);
        tokio::spawn(async move {
            client.publish(subject, encode(&error).into()).await.ok();
        });
    }
}

/// Collects a worker's digest: asks on its digest subject, reads parts until the last; more
/// than `max_tokens` tokens in all is refused.
async fn fetch_digest(
    client: &Client,
    subject: String,
    max_tokens: u64,
) -> Result<Vec<KvInserted>, String> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .publish_with_reply(subject, inbox, encode(&DigestRequest::default()).into())
        .await
        .map_err(|e| e.to_string())?;
    let mut spans = Vec::new();
    let mut tokens = 0u64;
    while let Some(message) = sub.next().await {
        let event = decode::<WorkerEvent>(&message.payload).map_err(|e| e.to_string())?;
        let WorkerEventBody::Digest(part) = event.body else {
            return Err("digest answer is not a digest".into());
        };
        tokens = part
            .spans
            .iter()
            .fold(tokens, |n, s| n.saturating_add(s.tokens.len() as u64));
        if tokens > max_tokens {
            return Err(format!(
                "digest of more than {max_tokens} tokens (more than the worker can hold)"
            ));
        }
        spans.extend(part.spans);
        if !part.more {
            return Ok(spans);
        }
    }
    Err("digest subscription closed".into())
}

/// Replays a stored snapshot and op log into the policy; returns the tokens restored.
fn restore(policy: &mut dyn Policy, snapshot: &StoredSnapshot, ops: &[StoredOp]) -> usize {
    let now_ms = preble_telemetry::unix_ms();
    let mut tokens = 0;
    for span in &snapshot.spans {
        for worker in &span.holders {
            tokens += span.tokens.len();
            let _ = policy.observe(&ClusterEvent::CacheInserted {
                worker,
                parent_hash: span.parent_hash,
                hash: span.hash,
                tokens: &span.tokens,
                now_ms,
            });
        }
    }
    for op in ops {
        if let StoredOp::Inserted { tokens: span, .. } = op {
            tokens += span.len();
        }
        let _ = policy.observe(&op.event(now_ms));
    }
    tokens
}
