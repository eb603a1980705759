//! The scheduler's Prometheus metrics.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric of the scheduler.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Routing decisions by kind.
    pub decisions: IntCounterVec,
    /// Dispatches sent to workers.
    pub dispatches: IntCounter,
    /// Dispatches that were not accepted (rejected, timed out, no responder).
    pub dispatch_failures: IntCounter,
    /// Requests that failed at the scheduler, by code.
    pub request_errors: IntCounterVec,
    /// Malformed messages received.
    pub malformed_messages: IntCounter,
    /// Live workers.
    pub live_workers: IntGauge,
    /// Outstanding requests per worker.
    pub outstanding: IntGaugeVec,
    /// Worker event sequence gaps seen.
    pub event_gaps: IntCounter,
    /// Heartbeats of new workers refused because the cluster had as many as one scheduler
    /// routes to.
    pub refused_workers: IntCounter,
    /// Cache events rejected as lies (a path hash that does not match its tokens).
    pub rejected_events: IntCounter,
    /// Events from workers that have not sent a heartbeat, ignored.
    pub unknown_worker_events: IntCounter,
    /// Workers' KV-cache events received, by kind (`inserted`, `evicted`).
    pub kv_events: IntCounterVec,
    /// Cache digests asked of workers (on join, on an event gap, on an event out of step).
    pub digests_requested: IntCounter,
    /// Persistence of the prefix tree.
    pub persist: crate::persist::PersistMetrics,
    /// Tokens of the prefix tree restored from Redis at start.
    pub tree_tokens_restored: IntGauge,
    /// Nodes of the policy's prefix tree.
    pub tree_nodes: IntGauge,
    /// Tokens of the policy's prefix tree.
    pub tree_tokens: IntGauge,
    /// Requests the policy counts as running (their prefixes pinned in its tree).
    pub tree_running_requests: IntGauge,
    /// Each worker's own estimate of the time to drain its queue (from its load reports).
    pub worker_drain_ms: IntGaugeVec,
    /// Tree ops and snapshots queued for Redis and not yet written (persistence lag).
    pub persistence_pending_writes: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        use preble_telemetry::register as reg;
        let opts = Opts::new;
        Metrics {
            persist: crate::persist::PersistMetrics {
                degraded: reg(
                    &registry,
                    IntGauge::with_opts(opts(
                        "preble:scheduler_persistence_degraded",
                        "1 while the prefix tree cannot be written to Redis",
                    ))
                    .expect("valid metric"),
                ),
                dropped_ops: reg(
                    &registry,
                    IntCounter::with_opts(opts(
                        "preble:scheduler_persistence_dropped_ops_total",
                        "Tree ops that could not be written to Redis",
                    ))
                    .expect("valid metric"),
                ),
                snapshots: reg(
                    &registry,
                    IntCounter::with_opts(opts(
                        "preble:scheduler_tree_snapshots_total",
                        "Prefix tree snapshots written to Redis",
                    ))
                    .expect("valid metric"),
                ),
            },
            tree_tokens_restored: reg(
                &registry,
                IntGauge::with_opts(opts(
                    "preble:scheduler_tree_tokens_restored",
                    "Tokens of the prefix tree restored from Redis at start",
                ))
                .expect("valid metric"),
            ),
            digests_requested: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_digests_requested_total",
                    "Cache digests asked of workers",
                ))
                .expect("valid metric"),
            ),
            kv_events: reg(
                &registry,
                IntCounterVec::new(
                    opts(
                        "preble:scheduler_kv_events_total",
                        "Workers' KV-cache events received, by kind",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            decisions: reg(
                &registry,
                IntCounterVec::new(
                    opts(
                        "preble:scheduler_decisions_total",
                        "Routing decisions by kind",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            dispatches: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_dispatches_total",
                    "Dispatches sent to workers",
                ))
                .expect("valid metric"),
            ),
            dispatch_failures: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_dispatch_failures_total",
                    "Dispatches not accepted",
                ))
                .expect("valid metric"),
            ),
            request_errors: reg(
                &registry,
                IntCounterVec::new(
                    opts(
                        "preble:scheduler_request_errors_total",
                        "Requests failed at the scheduler",
                    ),
                    &["code"],
                )
                .expect("valid metric"),
            ),
            malformed_messages: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_malformed_messages_total",
                    "Malformed messages received",
                ))
                .expect("valid metric"),
            ),
            live_workers: reg(
                &registry,
                IntGauge::with_opts(opts("preble:scheduler_live_workers", "Live workers"))
                    .expect("valid metric"),
            ),
            outstanding: reg(
                &registry,
                IntGaugeVec::new(
                    opts(
                        "preble:scheduler_outstanding_requests",
                        "Requests dispatched and not finished, per worker",
                    ),
                    &["worker"],
                )
                .expect("valid metric"),
            ),
            tree_nodes: reg(
                &registry,
                IntGauge::with_opts(opts(
                    "preble:scheduler_tree_nodes",
                    "Nodes of the policy's prefix tree",
                ))
                .expect("valid metric"),
            ),
            tree_tokens: reg(
                &registry,
                IntGauge::with_opts(opts(
                    "preble:scheduler_tree_tokens",
                    "Tokens of the policy's prefix tree",
                ))
                .expect("valid metric"),
            ),
            tree_running_requests: reg(
                &registry,
                IntGauge::with_opts(opts(
                    "preble:scheduler_tree_running_requests",
                    "Requests the policy counts as running: routed, not yet released",
                ))
                .expect("valid metric"),
            ),
            worker_drain_ms: reg(
                &registry,
                IntGaugeVec::new(
                    opts(
                        "preble:scheduler_worker_load_estimate_ms",
                        "Each worker's estimate of the time to drain its queue, from its load reports",
                    ),
                    &["worker"],
                )
                .expect("valid metric"),
            ),
            persistence_pending_writes: reg(
                &registry,
                IntGauge::with_opts(opts(
                    "preble:scheduler_persistence_pending_writes",
                    "Tree ops and snapshots queued for Redis, not yet written (persistence lag)",
                ))
                .expect("valid metric"),
            ),
            event_gaps: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_event_gaps_total",
                    "Gaps in worker event sequences",
                ))
                .expect("valid metric"),
            ),
            refused_workers: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_workers_refused_total",
                    "Heartbeats of new workers refused: the cluster had as many as one scheduler routes to",
                ))
                .expect("valid metric"),
            ),
            rejected_events: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_rejected_events_total",
                    "Cache events rejected as lies (path hash not matching the tokens)",
                ))
                .expect("valid metric"),
            ),
            unknown_worker_events: reg(
                &registry,
                IntCounter::with_opts(opts(
                    "preble:scheduler_unknown_worker_events_total",
                    "Events from workers that have not sent a heartbeat, ignored",
                ))
                .expect("valid metric"),
            ),
            registry,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
