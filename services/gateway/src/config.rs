//! Command-line flags (each with a `PREBLE_*` environment fallback) and the validated config.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::Parser;
use preble_protocol::Subjects;
use preble_telemetry::LogFormat;

use crate::admission::AdmissionLimits;
use crate::prepare::PrepareLimits;
use crate::serve::ConnectionLimits;

/// The preble gateway: OpenAI-compatible HTTP and NATS APIs in front of the cluster.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// NATS connection: URL, credentials, TLS.
    #[command(flatten)]
    pub nats: preble_telemetry::nats::NatsArgs,
    /// Subject prefix of the deployment.
    #[arg(long, env = "PREBLE_SUBJECT_PREFIX", default_value = preble_protocol::subjects::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// HTTP listen address.
    #[arg(long, env = "PREBLE_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    /// Model directories to serve (comma-separated or repeated); each is served under its
    /// directory name.
    #[arg(
        long = "model-dir",
        env = "PREBLE_MODEL_DIRS",
        value_delimiter = ',',
        default_value = "models/preble-sim"
    )]
    pub model_dirs: Vec<PathBuf>,
    /// Accepted API keys, comma-separated; empty means no authentication.
    #[arg(
        long,
        env = "PREBLE_API_KEYS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub api_keys: Vec<String>,
    /// `max_tokens` of a chat request that gives none (completions default to 16, like OpenAI).
    #[arg(long, env = "PREBLE_DEFAULT_MAX_TOKENS", default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Longest silence allowed in a token stream before the request fails with `timeout`, s.
    #[arg(long, env = "PREBLE_STREAM_IDLE_TIMEOUT_S", default_value_t = 60)]
    pub stream_idle_timeout_s: u64,
    /// Most client connections open at once; when full, the oldest connection that never sent
    /// a request is closed to make room (also capped by the process's file limit).
    #[arg(long, env = "PREBLE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Longest wait for a complete request head, s (also how long a keep-alive connection may
    /// sit idle).
    #[arg(long, env = "PREBLE_HEADER_READ_TIMEOUT_S", default_value_t = 10)]
    pub header_read_timeout_s: u64,
    /// Longest wait for a whole request body, s.
    #[arg(long, env = "PREBLE_BODY_READ_TIMEOUT_S", default_value_t = 30)]
    pub body_read_timeout_s: u64,
    /// Largest request body, bytes.
    #[arg(long, env = "PREBLE_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Requests parsed and tokenised at once, each on a blocking thread (0: one per core but
    /// one, which is left to the async runtime).
    #[arg(long, env = "PREBLE_TOKENIZER_THREADS", default_value_t = 0)]
    pub tokenizer_threads: usize,
    /// Requests allowed to wait for a tokenizer thread before new ones are refused with
    /// `overloaded`.
    #[arg(long, env = "PREBLE_MAX_TOKENIZE_WAITING", default_value_t = 256)]
    pub max_tokenize_waiting: usize,
    /// Requests in flight (being prepared, queued, running, streaming) beyond which new ones
    /// are refused at once with 503 `overloaded` and `Retry-After`.
    #[arg(long, env = "PREBLE_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Requests per second each API key may start (all clients together without keys); beyond
    /// it, 429 `rate_limit_exceeded` with `Retry-After`. 0: unlimited.
    #[arg(long, env = "PREBLE_RATE_LIMIT", default_value_t = 0.0)]
    pub rate_limit: f64,
    /// Requests a key may start at once above its rate (default: one second's worth, at least
    /// one).
    #[arg(long, env = "PREBLE_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<f64>,
    /// How long a request that cannot be queued (NATS unreachable) is retried before it fails
    /// with `overloaded`, s.
    #[arg(long, env = "PREBLE_SUBMIT_BUDGET_S", default_value_t = 15)]
    pub submit_budget_s: u64,
    /// Period of this gateway's presence beats, ms; workers stop its requests when it has
    /// missed three.
    #[arg(long, env = "PREBLE_PRESENCE_PERIOD_MS", default_value_t = 1000)]
    pub presence_period_ms: u64,
    /// Longest wait at shutdown for open connections to finish, s.
    #[arg(long, env = "PREBLE_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
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
    /// HTTP address.
    pub http_addr: SocketAddr,
    /// Model directories.
    pub model_dirs: Vec<PathBuf>,
    /// API keys (empty: open).
    pub api_keys: Vec<String>,
    /// Chat default `max_tokens`.
    pub default_max_tokens: u32,
    /// Stream idle timeout.
    pub stream_idle_timeout: Duration,
    /// Limits on client connections.
    pub connection_limits: ConnectionLimits,
    /// Longest wait for a whole request body.
    pub body_read_timeout: Duration,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Limits of request preparation.
    pub prepare_limits: PrepareLimits,
    /// What the gateway accepts.
    pub admission_limits: AdmissionLimits,
    /// Period of the presence beats.
    pub presence_period: Duration,
    /// Longest retrying of a request that cannot be queued.
    pub submit_budget: Duration,
}

impl Config {
    /// Validates flags into a configuration.
    pub fn from_args(args: Args) -> Result<Config> {
        if args.model_dirs.is_empty() {
            bail!("at least one --model-dir is required");
        }
        if args.stream_idle_timeout_s == 0 {
            bail!("--stream-idle-timeout-s must be positive");
        }
        if args.header_read_timeout_s == 0 || args.body_read_timeout_s == 0 {
            bail!("--header-read-timeout-s and --body-read-timeout-s must be positive");
        }
        if args.max_connections == 0 || args.max_body_bytes == 0 {
            bail!("--max-connections and --max-body-bytes must be positive");
        }
        if !(args.rate_limit >= 0.0 && args.rate_limit.is_finite()) {
            bail!("--rate-limit must be a non-negative number of requests per second");
        }
        if args.max_in_flight == 0 || args.presence_period_ms == 0 {
            bail!("--max-in-flight and --presence-period-ms must be positive");
        }
        let tokenizer_threads = match args.tokenizer_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, usize::from)
                .saturating_sub(1)
                .max(1),
            n => n,
        };
        Ok(Config {
            nats: args.nats.config()?,
            subjects: Subjects::new(args.subject_prefix),
            http_addr: args.http_addr,
            model_dirs: args.model_dirs,
            api_keys: args
                .api_keys
                .into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
            default_max_tokens: args.default_max_tokens,
            stream_idle_timeout: Duration::from_secs(args.stream_idle_timeout_s),
            connection_limits: ConnectionLimits {
                max_connections: args.max_connections,
                header_read_timeout: Duration::from_secs(args.header_read_timeout_s),
                drain_timeout: Duration::from_secs(args.drain_timeout_s),
            },
            body_read_timeout: Duration::from_secs(args.body_read_timeout_s),
            max_body_bytes: args.max_body_bytes,
            prepare_limits: PrepareLimits {
                threads: tokenizer_threads,
                max_waiting: args.max_tokenize_waiting,
            },
            admission_limits: AdmissionLimits {
                max_in_flight: args.max_in_flight,
                rate_per_s: args.rate_limit,
                burst: args.rate_limit_burst.unwrap_or(args.rate_limit).max(1.0),
            },
            presence_period: Duration::from_millis(args.presence_period_ms),
            submit_budget: Duration::from_secs(args.submit_budget_s),
        })
    }
}
