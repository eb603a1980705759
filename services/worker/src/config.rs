//! Command-line flags (each with a `PREBLE_*` environment fallback) and the validated config.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use preble_costmodel::Profile;
use preble_localsched::WaitOrder;
use preble_protocol::Subjects;
use preble_telemetry::LogFormat;

use crate::model::ModelInfo;

/// A preble worker: serves one model on one GPU (or a simulated one) for the scheduler.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// NATS connection: URL, credentials, TLS.
    #[command(flatten)]
    pub nats: preble_telemetry::nats::NatsArgs,
    /// Subject prefix of the deployment (several deployments can share one NATS).
    #[arg(long, env = "PREBLE_SUBJECT_PREFIX", default_value = preble_protocol::subjects::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// This worker's id (unique in the deployment); default: `worker-<pid>`.
    #[arg(long, env = "PREBLE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Model directory (Hugging Face layout: config.json, tokenizer.json, ...).
    #[arg(long, env = "PREBLE_MODEL_DIR", default_value = "models/preble-sim")]
    pub model_dir: PathBuf,
    /// Name the model is served under; default: the directory's name.
    #[arg(long, env = "PREBLE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Engine: `sim` (cost-model timing, deterministic tokens) or `torch` (the model itself on
    /// libtorch; needs a build with the cargo feature `torch`).
    #[arg(long, env = "PREBLE_ENGINE", default_value = "sim")]
    pub engine: String,
    /// Torch engine: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "PREBLE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Torch engine: `f32`, `bf16` or `f16`; default f32 on CPU, bf16 on CUDA.
    #[arg(long, env = "PREBLE_DTYPE")]
    pub dtype: Option<String>,
    /// Torch engine: fraction of free memory (after the weights) for the KV pool, unless
    /// `--kv-capacity-tokens` is given; default 0.25 on CPU, 0.85 on CUDA.
    #[arg(long, env = "PREBLE_KV_MEMORY_FRACTION")]
    pub kv_memory_fraction: Option<f64>,
    /// Cost profile (GPU x model) the sim engine imitates and the scheduler estimates with.
    #[arg(long, env = "PREBLE_PROFILE", default_value = "a6000-mistral-7b")]
    pub profile: String,
    /// Multiplies every simulated iteration time (0.5 runs the sim twice as fast).
    #[arg(long, env = "PREBLE_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    /// KV-cache capacity in tokens; default: the profile's.
    #[arg(long, env = "PREBLE_KV_CAPACITY_TOKENS")]
    pub kv_capacity_tokens: Option<u64>,
    /// Prefill tokens per iteration (chunked prefill budget).
    #[arg(long, env = "PREBLE_CHUNK_TOKENS", default_value_t = 512)]
    pub chunk_tokens: u32,
    /// Most requests in the running batch.
    #[arg(long, env = "PREBLE_MAX_RUNNING", default_value_t = 256)]
    pub max_running: usize,
    /// Priority groups of the wait queue, by cache-hit ratio (the paper uses 10).
    #[arg(long, env = "PREBLE_PRIORITY_GROUPS", default_value_t = 10)]
    pub priority_groups: usize,
    /// Order of the wait queue: priority (the groups above), fcfs, or lpm (SGLang's longest
    /// prefix match).
    #[arg(long, env = "PREBLE_WAIT_ORDER", default_value = "priority")]
    pub wait_order: WaitOrder,

    /// Fraction of the running requests' remaining output kept free when admitting (higher:
    /// fewer preemptions, smaller batches).
    #[arg(long, env = "PREBLE_DECODE_RESERVE", default_value_t = 0.25)]
    pub decode_reserve: f64,
    /// Heartbeat and load-report period, milliseconds.
    #[arg(long, env = "PREBLE_HEARTBEAT_MS", default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// Address of the `/health` and `/metrics` endpoint.
    #[arg(long, env = "PREBLE_HTTP_ADDR", default_value = "127.0.0.1:9100")]
    pub http_addr: SocketAddr,
    /// On shutdown, how long running requests may take to finish before they are cancelled.
    #[arg(long, env = "PREBLE_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Log format: `pretty` or `json`.
    #[arg(long, env = "PREBLE_LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
}

/// Which engine computes iterations.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineChoice {
    /// Cost-model timing, deterministic tokens.
    Sim,
    /// The model on libtorch.
    Torch {
        /// `cpu`, `cuda` or `cuda:N`.
        device: String,
        /// Element type, if given.
        dtype: Option<String>,
        /// Fraction of free memory for the KV pool, if given.
        kv_memory_fraction: Option<f64>,
    },
}

impl EngineChoice {
    /// The engine's name (as in `--engine` and heartbeats).
    pub fn name(&self) -> &'static str {
        match self {
            EngineChoice::Sim => "sim",
            EngineChoice::Torch { .. } => "torch",
        }
    }
}

/// The validated configuration a worker runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// NATS connection settings.
    pub nats: preble_telemetry::nats::NatsConfig,
    /// Subjects of the deployment.
    pub subjects: Subjects,
    /// This worker's id.
    pub worker_id: String,
    /// The model.
    pub model: ModelInfo,
    /// The engine and its settings.
    pub engine: EngineChoice,
    /// The cost profile.
    pub profile: Profile,
    /// Simulated-time multiplier.
    pub time_scale: f64,
    /// KV capacity, tokens (for the torch engine: what its pool got, once loaded).
    pub kv_capacity_tokens: u64,
    /// Whether `kv_capacity_tokens` was given explicitly.
    pub kv_capacity_given: bool,
    /// Chunked-prefill budget per iteration.
    pub chunk_tokens: u32,
    /// Running-batch cap.
    pub max_running: usize,
    /// Priority groups of the wait queue.
    pub priority_groups: usize,
    /// Order of the wait queue.
    pub wait_order: WaitOrder,
    /// Output fraction kept free when admitting.
    pub decode_reserve: f64,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// HTTP address.
    pub http_addr: SocketAddr,
    /// Drain deadline on shutdown.
    pub drain_timeout: Duration,
}

impl Config {
    /// Validates flags into a configuration; an unknown value is an error, never a fallback.
    pub fn from_args(args: Args) -> Result<Config> {
        let engine = match args.engine.as_str() {
            "sim" => EngineChoice::Sim,
            "torch" if cfg!(feature = "torch") => EngineChoice::Torch {
                device: args.device.clone(),
                dtype: args.dtype.clone(),
                kv_memory_fraction: args.kv_memory_fraction,
            },
            "torch" => bail!(
                "this worker was built without the torch engine: rebuild with `--features torch` (see the README)"
            ),
            other => bail!("unknown engine {other:?}: use sim or torch"),
        };
        if let Some(f) = args.kv_memory_fraction
            && !(f > 0.0 && f <= 1.0)
        {
            bail!("--kv-memory-fraction must be within (0, 1], not {f}");
        }
        let profile = Profile::by_name(&args.profile)?;
        if !(args.time_scale.is_finite() && args.time_scale >= 0.0) {
            bail!(
                "--time-scale must be a finite number >= 0, got {}",
                args.time_scale
            );
        }
        if !(0.0..=1.0).contains(&args.decode_reserve) {
            bail!(
                "--decode-reserve must be within 0..=1, not {}",
                args.decode_reserve
            );
        }
        if args.chunk_tokens == 0
            || args.max_running == 0
            || args.heartbeat_ms == 0
            || args.priority_groups == 0
        {
            bail!(
                "--chunk-tokens, --max-running, --heartbeat-ms and --priority-groups must be positive"
            );
        }
        let mut model = ModelInfo::load(&args.model_dir)
            .with_context(|| format!("loading model directory {}", args.model_dir.display()))?;
        if let Some(name) = args.served_model_name {
            model.name = name;
        }
        let kv_capacity_tokens = args
            .kv_capacity_tokens
            .unwrap_or(profile.kv_capacity_tokens);
        let worker_id = args
            .worker_id
            .unwrap_or_else(|| format!("worker-{}", std::process::id()));
        if !preble_protocol::subjects::valid_worker_id(&worker_id) {
            bail!(
                "--worker-id {worker_id:?}: use letters, digits, '-' and '_' (at most 64, not                  starting with '_'); it is a NATS subject token and the worker's identity"
            );
        }
        Ok(Config {
            nats: args.nats.config()?,
            subjects: Subjects::new(args.subject_prefix),
            worker_id,
            model,
            engine,
            profile,
            time_scale: args.time_scale,
            kv_capacity_tokens,
            kv_capacity_given: args.kv_capacity_tokens.is_some(),
            chunk_tokens: args.chunk_tokens,
            max_running: args.max_running,
            priority_groups: args.priority_groups,
            wait_order: args.wait_order,
            decode_reserve: args.decode_reserve,
            heartbeat: Duration::from_millis(args.heartbeat_ms),
            http_addr: args.http_addr,
            drain_timeout: Duration::from_secs(args.drain_timeout_s),
        })
    }
}
