//! Command-line flags (each with a `PREBLE_*` environment fallback) and the validated config.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail};
use clap::Parser;
use preble_costmodel::Profile;
use preble_policy::{CacheAwareConfig, E2Config, KvCostConfig, PolicyKind, PolicySettings};
use preble_protocol::Subjects;
use preble_telemetry::LogFormat;

/// The preble global scheduler: routes every request to a worker.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// NATS connection: URL, credentials, TLS.
    #[command(flatten)]
    pub nats: preble_telemetry::nats::NatsArgs,
    /// Subject prefix of the deployment.
    #[arg(long, env = "PREBLE_SUBJECT_PREFIX", default_value = preble_protocol::subjects::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// Routing policy: e2, e2-paper (the paper's public code, for comparison), dynamo (NVIDIA
    /// Dynamo's KV router, its own code), sglang (the SGLang model gateway's cache-aware rule
    /// on its own tree), cache-aware, kv-cost (our imitations of those two), least-load or
    /// round-robin.
    #[arg(long, env = "PREBLE_POLICY", default_value = "e2")]
    pub policy: PolicyKind,
    /// Seed of the policy's random choices.
    #[arg(long, env = "PREBLE_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Cost profile (GPU x model) the policy estimates with.
    #[arg(long, env = "PREBLE_PROFILE", default_value = "a6000-mistral-7b")]
    pub profile: String,
    /// E2: load window, milliseconds.
    #[arg(long, env = "PREBLE_WINDOW_MS", default_value_t = 180_000)]
    pub window_ms: u64,
    /// E2: rebalance when a holder's load exceeds the lightest worker's by this factor.
    #[arg(long, env = "PREBLE_REBALANCE_THRESHOLD", default_value_t = 1.5)]
    pub rebalance_threshold: f64,
    /// E2: requests routed before rebalancing may start.
    #[arg(long, env = "PREBLE_WARMUP_REQUESTS", default_value_t = 50)]
    pub warmup_requests: u64,
    /// E2: replicate a prefix when its holder's TTFT grew by this factor over the window.
    #[arg(long, env = "PREBLE_REPLICATE_TTFT_RATIO", default_value_t = 2.0)]
    pub replicate_ttft_ratio: f64,
    /// E2: weight of a worker's queued prefill in its load cost (0: the paper's load cost).
    #[arg(long, env = "PREBLE_QUEUE_WEIGHT", default_value_t = 1.0)]
    pub queue_weight: f64,
    /// E2: also rebalance as the paper does, moving whole prefixes from the most to the least
    /// loaded worker (`false`: only the per-request rule and replication balance load).
    #[arg(long, env = "PREBLE_SUBTREE_REBALANCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub subtree_rebalance: bool,
    /// E2 and kv-cost: softmax temperature over normalised costs (0: pick the minimum).
    #[arg(long, env = "PREBLE_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f64,
    /// Bound of the global prefix tree, tokens.
    #[arg(long, env = "PREBLE_MAX_TREE_TOKENS", default_value_t = preble_policy::mirror::DEFAULT_MAX_TREE_TOKENS)]
    pub max_tree_tokens: u64,
    /// cache-aware: minimum matched fraction of the prompt to follow the cache.
    #[arg(long, env = "PREBLE_CACHE_THRESHOLD", default_value_t = 0.5)]
    pub cache_threshold: f64,
    /// cache-aware: absolute imbalance (outstanding requests) that switches to least load.
    #[arg(long, env = "PREBLE_BALANCE_ABS_THRESHOLD", default_value_t = 32)]
    pub balance_abs_threshold: u32,
    /// cache-aware: relative imbalance that switches to least load.
    #[arg(long, env = "PREBLE_BALANCE_REL_THRESHOLD", default_value_t = 1.0001)]
    pub balance_rel_threshold: f64,
    /// kv-cost: tokens per KV block.
    #[arg(long, env = "PREBLE_KV_BLOCK_SIZE", default_value_t = 16)]
    pub kv_block_size: u32,
    /// kv-cost: weight of prefill blocks against active decode blocks.
    #[arg(long, env = "PREBLE_OVERLAP_WEIGHT", default_value_t = 1.0)]
    pub overlap_weight: f64,
    /// How long a worker has to accept a dispatch before another is tried, milliseconds.
    #[arg(long, env = "PREBLE_DISPATCH_TIMEOUT_MS", default_value_t = 1000)]
    pub dispatch_timeout_ms: u64,
    /// Workers tried per request before it fails.
    #[arg(long, env = "PREBLE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// How long a request waits for a live worker before failing with `overloaded`, ms.
    #[arg(long, env = "PREBLE_NO_WORKER_WAIT_MS", default_value_t = 2000)]
    pub no_worker_wait_ms: u64,
    /// After a restart, how long the scheduler waits for the workers its restored tree names to
    /// report before it routes, ms: a backlog then goes to all of them, not to the first that
    /// speaks.
    #[arg(long, env = "PREBLE_STARTUP_WAIT_MS", default_value_t = 3000)]
    pub startup_wait_ms: u64,
    /// Heartbeats a worker may miss before it is declared dead.
    #[arg(long, env = "PREBLE_HEARTBEAT_MISSES", default_value_t = 3)]
    pub heartbeat_misses: u32,
    /// How long JetStream waits for an acknowledgement before redelivering, seconds.
    #[arg(long, env = "PREBLE_ACK_WAIT_S", default_value_t = 30)]
    pub ack_wait_s: u64,
    /// Requests taken from the stream but not yet accepted by a worker, at most.
    #[arg(long, env = "PREBLE_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: i64,
    /// Address of the `/health` and `/metrics` endpoint.
    #[arg(long, env = "PREBLE_HTTP_ADDR", default_value = "127.0.0.1:9000")]
    pub http_addr: SocketAddr,
    /// Redis holding the prefix tree's snapshot and op log.
    #[arg(
        long,
        env = "PREBLE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Keep the prefix tree in memory only (no Redis).
    #[arg(long, env = "PREBLE_NO_PERSISTENCE")]
    pub no_persistence: bool,
    /// Seconds between snapshots of the prefix tree (each compacts the op log).
    #[arg(long, env = "PREBLE_SNAPSHOT_INTERVAL_S", default_value_t = 30)]
    pub snapshot_interval_s: u64,
    /// Log format: `pretty` or `json`.
    #[arg(long, env = "PREBLE_LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// NATS connection settings.
    pub nats: preble_telemetry::nats::NatsConfig,
    /// Subjects of the deployment.
    pub subjects: Subjects,
    /// Routing policy.
    pub policy: PolicyKind,
    /// Every policy's settings.
    pub policy_settings: PolicySettings,
    /// Dispatch timeout.
    pub dispatch_timeout: Duration,
    /// Workers tried per request.
    pub max_attempts: u32,
    /// Wait for a live worker.
    pub no_worker_wait: Duration,
    /// Longest wait after a restart for the known workers to report.
    pub startup_wait: Duration,
    /// Missed heartbeats before death.
    pub heartbeat_misses: u32,
    /// JetStream ack wait.
    pub ack_wait: Duration,
    /// Max un-acked requests.
    pub max_in_flight: i64,
    /// HTTP address.
    pub http_addr: SocketAddr,
    /// Redis URL of the tree's persistence; `None` keeps it in memory only.
    pub redis_url: Option<String>,
    /// Time between snapshots.
    pub snapshot_interval: Duration,
}

impl Config {
    /// Validates flags into a configuration.
    pub fn from_args(args: Args) -> Result<Config> {
        if args.max_attempts == 0 || args.heartbeat_misses == 0 || args.max_in_flight <= 0 {
            bail!("--max-attempts, --heartbeat-misses and --max-in-flight must be positive");
        }
        let profile = Profile::by_name(&args.profile)?;
        if !(args.rebalance_threshold >= 1.0 && args.replicate_ttft_ratio >= 1.0) {
            bail!("--rebalance-threshold and --replicate-ttft-ratio must be at least 1");
        }
        if args.queue_weight.is_nan() || args.queue_weight < 0.0 {
            bail!("--queue-weight must be >= 0");
        }
        if !(args.temperature >= 0.0 && (0.0..=1.0).contains(&args.cache_threshold)) {
            bail!("--temperature must be >= 0 and --cache-threshold within 0..=1");
        }
        if args.window_ms == 0 || args.kv_block_size == 0 {
            bail!("--window-ms and --kv-block-size must be positive");
        }
        let policy_settings = PolicySettings {
            e2: E2Config {
                window_ms: args.window_ms,
                rebalance_threshold: args.rebalance_threshold,
                warmup_requests: args.warmup_requests,
                replicate_ttft_ratio: args.replicate_ttft_ratio,
                queue_weight: args.queue_weight,
                subtree_rebalance: args.subtree_rebalance,
                temperature: args.temperature,
                max_tree_tokens: args.max_tree_tokens,
                profile,
                ..E2Config::default()
            },
            cache_aware: CacheAwareConfig {
                cache_threshold: args.cache_threshold,
                balance_abs_threshold: args.balance_abs_threshold,
                balance_rel_threshold: args.balance_rel_threshold,
                max_tree_tokens: args.max_tree_tokens,
                ..CacheAwareConfig::default()
            },
            kv_cost: KvCostConfig {
                block_size: args.kv_block_size,
                overlap_weight: args.overlap_weight,
                temperature: args.temperature,
                max_tree_tokens: args.max_tree_tokens,
                ..KvCostConfig::default()
            },
            seed: args.seed,
            ..PolicySettings::default()
        };
        Ok(Config {
            nats: args.nats.config()?,
            subjects: Subjects::new(args.subject_prefix),
            policy: args.policy,
            policy_settings,
            dispatch_timeout: Duration::from_millis(args.dispatch_timeout_ms),
            max_attempts: args.max_attempts,
            no_worker_wait: Duration::from_millis(args.no_worker_wait_ms),
            startup_wait: Duration::from_millis(args.startup_wait_ms),
            heartbeat_misses: args.heartbeat_misses,
            ack_wait: Duration::from_secs(args.ack_wait_s.max(1)),
            max_in_flight: args.max_in_flight,
            http_addr: args.http_addr,
            redis_url: (!args.no_persistence).then_some(args.redis_url),
            snapshot_interval: Duration::from_secs(args.snapshot_interval_s.max(1)),
        })
    }
}
