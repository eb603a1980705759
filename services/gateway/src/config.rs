//! Command-line flags (each with a `PREBLE_*` environment fallback) and the validated config.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::Parser;
use preble_protocol::Subjects;
use preble_telemetry::LogFormat;

/// The preble gateway: OpenAI-compatible HTTP and NATS APIs in front of the cluster.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// NATS server URL.
    #[arg(long, env = "PREBLE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
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
        Ok(Config {
            nats_url: args.nats_url,
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
        })
    }
}
