//! Command-line flags (each with a `PREBLE_*` environment fallback) and the validated config.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail};
use clap::Parser;
use preble_policy::PolicyKind;
use preble_protocol::Subjects;
use preble_telemetry::LogFormat;

/// The preble global scheduler: routes every request to a worker.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// NATS server URL.
    #[arg(long, env = "PREBLE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Subject prefix of the deployment.
    #[arg(long, env = "PREBLE_SUBJECT_PREFIX", default_value = preble_protocol::subjects::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// Routing policy: least-load or round-robin.
    #[arg(long, env = "PREBLE_POLICY", default_value = "least-load")]
    pub policy: PolicyKind,
    /// Seed of the policy's random tie-breaks.
    #[arg(long, env = "PREBLE_SEED", default_value_t = 0)]
    pub seed: u64,
    /// How long a worker has to accept a dispatch before another is tried, milliseconds.
    #[arg(long, env = "PREBLE_DISPATCH_TIMEOUT_MS", default_value_t = 1000)]
    pub dispatch_timeout_ms: u64,
    /// Workers tried per request before it fails.
    #[arg(long, env = "PREBLE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// How long a request waits for a live worker before failing with `overloaded`, ms.
    #[arg(long, env = "PREBLE_NO_WORKER_WAIT_MS", default_value_t = 2000)]
    pub no_worker_wait_ms: u64,
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
    /// Log format: `pretty` or `json`.
    #[arg(long, env = "PREBLE_LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// NATS server URL.
    pub nats_url: String,
    /// Subjects of the deployment.
    pub subjects: Subjects,
    /// Routing policy.
    pub policy: PolicyKind,
    /// Tie-break seed.
    pub seed: u64,
    /// Dispatch timeout.
    pub dispatch_timeout: Duration,
    /// Workers tried per request.
    pub max_attempts: u32,
    /// Wait for a live worker.
    pub no_worker_wait: Duration,
    /// Missed heartbeats before death.
    pub heartbeat_misses: u32,
    /// JetStream ack wait.
    pub ack_wait: Duration,
    /// Max un-acked requests.
    pub max_in_flight: i64,
    /// HTTP address.
    pub http_addr: SocketAddr,
}

impl Config {
    /// Validates flags into a configuration.
    pub fn from_args(args: Args) -> Result<Config> {
        if args.max_attempts == 0 || args.heartbeat_misses == 0 || args.max_in_flight <= 0 {
            bail!("--max-attempts, --heartbeat-misses and --max-in-flight must be positive");
        }
        Ok(Config {
            nats_url: args.nats_url,
            subjects: Subjects::new(args.subject_prefix),
            policy: args.policy,
            seed: args.seed,
            dispatch_timeout: Duration::from_millis(args.dispatch_timeout_ms),
            max_attempts: args.max_attempts,
            no_worker_wait: Duration::from_millis(args.no_worker_wait_ms),
            heartbeat_misses: args.heartbeat_misses,
            ack_wait: Duration::from_secs(args.ack_wait_s.max(1)),
            max_in_flight: args.max_in_flight,
            http_addr: args.http_addr,
        })
    }
}
