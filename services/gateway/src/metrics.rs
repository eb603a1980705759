//! The gateway's Prometheus metrics (names after vLLM's where one exists).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of the gateway.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Requests by endpoint (`completions`, `chat`, `nats`) and HTTP status (the status a NATS
    /// API answer would have had).
    pub requests: IntCounterVec,
    /// Requests being served.
    pub in_flight: IntGauge,
    /// Time to first token seen by the gateway.
    pub time_to_first_token: Histogram,
    /// Whole-request latency.
    pub e2e_latency: Histogram,
    /// Prompt tokens.
    pub prompt_tokens: IntCounter,
    /// Prompt tokens served from a cache.
    pub cached_prompt_tokens: IntCounter,
    /// Generated tokens.
    pub generation_tokens: IntCounter,
    /// Malformed messages received.
    pub malformed_messages: IntCounter,
    /// Duplicate stream messages dropped.
    pub duplicate_messages: IntCounter,
    /// Requests queued again because their worker was lost (before or after output).
    pub resubmissions: IntCounter,
    /// Streams that lost their worker after showing output and went on on another.
    pub resumed_streams: IntCounter,
    /// Requests refused at admission, by reason (`overloaded`, `rate_limited`).
    pub refused: IntCounterVec,
    /// Client connections open.
    pub connections_open: IntGauge,
    /// Connections that never sent a request, closed to make room for new ones.
    pub connections_evicted: IntCounter,
    /// Connections refused because every slot was serving a request.
    pub connections_refused: IntCounter,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        use preble_telemetry::register as reg;
        let counter = |r: &Registry, n: &str, h: &str| {
            reg(
                r,
                IntCounter::with_opts(Opts::new(n, h)).expect("valid metric"),
            )
        };
        let histogram = |r: &Registry, n: &str, h: &str| {
            reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(n, h).buckets(preble_telemetry::latency_buckets()),
                )
                .expect("valid metric"),
            )
        };
        Metrics {
            requests: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "preble:http_requests_total",
                        "Requests by endpoint (completions, chat; nats for the NATS API) and HTTP status",
                    ),
                    &["endpoint", "status"],
                )
                .expect("valid metric"),
            ),
            in_flight: reg(
                &registry,
                IntGauge::with_opts(Opts::new(
                    "preble:requests_in_flight",
                    "Requests being served",
                ))
                .expect("valid metric"),
            ),
            time_to_first_token: histogram(
                &registry,
                "preble:time_to_first_token_seconds",
                "Time to first token at the gateway",
            ),
            e2e_latency: histogram(
                &registry,
                "preble:e2e_request_latency_seconds",
                "End-to-end request latency at the gateway",
            ),
            prompt_tokens: counter(&registry, "preble:prompt_tokens_total", "Prompt tokens"),
            cached_prompt_tokens: counter(
                &registry,
                "preble:prompt_tokens_cached_total",
                "Prompt tokens served from a KV cache",
            ),
            generation_tokens: counter(
                &registry,
                "preble:generation_tokens_total",
                "Generated tokens",
            ),
            malformed_messages: counter(
                &registry,
                "preble:malformed_messages_total",
                "Malformed messages received",
            ),
            duplicate_messages: counter(
                &registry,
                "preble:duplicate_stream_messages_total",
                "Duplicate stream messages dropped",
            ),
            resubmissions: counter(
                &registry,
                "preble:requests_resubmitted_total",
                "Requests queued again because their worker was lost",
            ),
            resumed_streams: counter(
                &registry,
                "preble:streams_resumed_total",
                "Streams that lost their worker after showing output and resumed on another",
            ),
            refused: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "preble:requests_refused_total",
                        "Requests refused at admission (in-flight limit, rate limit)",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            connections_open: reg(
                &registry,
                IntGauge::with_opts(Opts::new(
                    "preble:http_connections_open",
                    "Client connections open",
                ))
                .expect("valid metric"),
            ),
            connections_evicted: counter(
                &registry,
                "preble:http_connections_evicted_total",
                "Connections that never sent a request, closed to make room for new ones",
            ),
            connections_refused: counter(
                &registry,
                "preble:http_connections_refused_total",
                "Connections refused because every slot was serving a request",
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
