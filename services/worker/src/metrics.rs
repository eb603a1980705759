//! The worker's Prometheus metrics (names after vLLM's, with the `preble:` prefix).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of a worker.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Requests accepted from the scheduler.
    pub requests_accepted: IntCounter,
    /// Requests rejected at dispatch.
    pub requests_rejected: IntCounter,
    /// Requests that ended, by reason (`stop`, `length`, `cancelled`, `error`).
    pub requests_finished: IntCounterVec,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens: IntCounter,
    /// Generated tokens.
    pub generation_tokens: IntCounter,
    /// Engine iterations.
    pub iterations: IntCounter,
    /// Requests in the running batch.
    pub running: IntGauge,
    /// Requests waiting.
    pub waiting: IntGauge,
    /// KV slots in use (cache plus requests' own).
    pub kv_used_tokens: IntGauge,
    /// Tokens held by the prefix cache.
    pub kv_cached_tokens: IntGauge,
    /// Prompt tokens served from the prefix cache instead of computed.
    pub prefix_hit_tokens: IntCounter,
    /// Tokens the engine computed (prefill chunks and decode steps; cached tokens are not).
    pub computed_tokens: IntCounter,
    /// Iterations the engine failed (their requests failed with them).
    pub engine_errors: IntCounter,
    /// Requests preempted (to be recomputed) because decodes ran out of KV slots.
    pub preemptions: IntCounter,
    /// Cache events published, by kind (`inserted`, `evicted`).
    pub kv_events: IntCounterVec,
    /// Malformed messages received.
    pub malformed_messages: IntCounter,
    /// Requests stopped because the gateway holding their client stopped beating.
    pub requests_orphaned: IntCounter,
    /// Worker-side time to first token.
    pub time_to_first_token: Histogram,
    /// Time per output token after the first, per request.
    pub time_per_output_token: Histogram,
    /// Worker-side time from acceptance to the end, per request.
    pub e2e_request_latency: Histogram,
    /// Time from acceptance to the first iteration that computed part of the request.
    pub request_queue_time: Histogram,
    /// Prompt tokens looked up in the prefix cache (hit ratio = hits / queries).
    pub prefix_cache_queries: IntCounter,
    /// Fraction of KV slots in use, 0 to 1.
    pub kv_cache_usage: prometheus::Gauge,
    /// Duration of engine iterations.
    pub iteration_seconds: Histogram,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(preble_telemetry::latency_buckets()),
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let requests_finished = IntCounterVec::new(
            Opts::new(
                "preble:request_finished_total",
                "Requests that ended, by reason",
            ),
            &["finished_reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests_finished.clone()))
            .expect("unique metric");
        let kv_events = IntCounterVec::new(
            Opts::new(
                "preble:kv_events_total",
                "KV-cache events published, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(kv_events.clone()))
            .expect("unique metric");
        Metrics {
            kv_events,
            kv_cached_tokens: gauge(
                "preble:kv_cache_cached_tokens",
                "Tokens held by the prefix cache",
            ),
            prefix_hit_tokens: counter(
                "preble:prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache",
            ),
            computed_tokens: counter(
                "preble:engine_computed_tokens_total",
                "Tokens the engine computed (cached prompt tokens are not)",
            ),
            engine_errors: counter(
                "preble:engine_errors_total",
                "Engine iterations that failed",
            ),
            preemptions: counter(
                "preble:num_preemptions_total",
                "Requests preempted for lack of KV slots",
            ),
            requests_accepted: counter("preble:requests_accepted_total", "Requests accepted"),
            requests_rejected: counter(
                "preble:requests_rejected_total",
                "Requests rejected at dispatch",
            ),
            requests_finished,
            prompt_tokens: counter(
                "preble:prompt_tokens_total",
                "Prompt tokens of accepted requests",
            ),
            generation_tokens: counter("preble:generation_tokens_total", "Generated tokens"),
            iterations: counter("preble:iterations_total", "Engine iterations"),
            running: gauge(
                "preble:num_requests_running",
                "Requests in the running batch",
            ),
            waiting: gauge(
                "preble:num_requests_waiting",
                "Requests waiting for admission",
            ),
            kv_used_tokens: gauge("preble:kv_cache_used_tokens", "KV-cache slots in use"),
            requests_orphaned: counter(
                "preble:requests_orphaned_total",
                "Requests stopped because the gateway holding their client stopped beating",
            ),
            malformed_messages: counter(
                "preble:malformed_messages_total",
                "Malformed messages received",
            ),
            time_to_first_token: histogram(
                "preble:time_to_first_token_seconds",
                "Worker-side time from acceptance to first token",
            ),
            time_per_output_token: histogram(
                "preble:time_per_output_token_seconds",
                "Time per output token after the first, per request",
            ),
            e2e_request_latency: histogram(
                "preble:e2e_request_latency_seconds",
                "Worker-side time from acceptance to the end of a request",
            ),
            request_queue_time: histogram(
                "preble:request_queue_time_seconds",
                "Time from acceptance to the first iteration computing the request",
            ),
            prefix_cache_queries: counter(
                "preble:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache (hits / queries = hit ratio)",
            ),
            kv_cache_usage: {
                let g = prometheus::Gauge::with_opts(Opts::new(
                    "preble:kv_cache_usage_perc",
                    "Fraction of KV-cache slots in use (0 to 1)",
                ))
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            iteration_seconds: histogram("preble:iteration_seconds", "Engine iteration time"),
            registry,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
