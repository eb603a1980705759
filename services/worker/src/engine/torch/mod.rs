//! The `torch` engine: a Llama-architecture model on libtorch (CPU or CUDA) whose KV cache is
//! the slot pool the local scheduler's radix cache indexes, so a cached prefix is read, never
//! recomputed.

pub mod kv_pool;
pub mod model;
pub mod weights;

use std::path::Path;

use preble_costmodel::{Profile, SeqWork};
use tch::{Device, Kind};

use super::llama_config::{LlamaConfig, ModelError};
use super::sampling::{SamplingSpec, logprobs, sample};
use super::{Engine, EngineError, StepOutput, StepSeq};
use kv_pool::KvPool;
use model::{Llama, LogitsOf, SeqInput};
use weights::Weights;

/// How to load a model for the torch engine.
#[derive(Clone, Debug)]
pub struct TorchOptions {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16`; default: f32 on CPU, bf16 on CUDA.
    pub dtype: Option<String>,
    /// KV pool size in tokens; default: `kv_memory_fraction` of the free memory.
    pub kv_capacity_tokens: Option<u64>,
    /// Fraction of the device's free memory (after the weights) the KV pool may take;
    /// default 0.25 on CPU, 0.85 on CUDA.
    pub kv_memory_fraction: Option<f64>,
    /// Cost profile used only for the load estimates the scheduler receives.
    pub profile: Profile,
}

/// A loaded model with its KV pool.
pub struct TorchEngine {
    model: Llama,
    pool: KvPool,
    profile: Profile,
    computed_tokens: u64,
}

impl TorchEngine {
    /// Loads the model in `dir` (Hugging Face layout) onto the device `options` names.
    pub fn load(dir: &Path, options: &TorchOptions) -> Result<TorchEngine, ModelError> {
        let device = parse_device(&options.device)?;
        let kind = parse_dtype(options.dtype.as_deref(), device)?;
        let config = LlamaConfig::load(dir)?;
        let weights = Weights::load(dir, &config, kind, device)?;
        let model = Llama::new(config, weights, device, kind)?;
        let bytes_per_token = model
            .config()
            .kv_bytes_per_token(kind.elt_size_in_bytes() as i64);
        let capacity = match options.kv_capacity_tokens {
            Some(tokens) => tokens,
            None => {
                let fraction = options
                    .kv_memory_fraction
                    .unwrap_or(if device == Device::Cpu { 0.25 } else { 0.85 });
                let free = free_memory_bytes(device)?;
                (free as f64 * fraction / bytes_per_token as f64) as u64
            }
        };
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX - 1);
        if capacity < 16 {
            return Err(ModelError::Device(format!(
                "a KV pool of {capacity} tokens is too small to serve anything"
            )));
        }
        let pool = KvPool::new(model.config(), capacity, kind, device)?;
        Ok(TorchEngine {
            model,
            pool,
            profile: options.profile.clone(),
            computed_tokens: 0,
        })
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Tokens the model has run through its layers so far (prefill and decode), for tests and
    /// metrics: cached tokens are not among them.
    pub fn computed_tokens(&self) -> u64 {
        self.computed_tokens
    }

    /// Runs `seqs` and returns the logits `logits_of` asks for, as rows of f32.
    pub fn logits(
        &mut self,
        seqs: &[SeqInput<'_>],
        sample: &[bool],
        logits_of: LogitsOf,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let logits = self
            .model
            .forward(&mut self.pool, seqs, sample, logits_of)?;
        self.computed_tokens += seqs.iter().map(|s| s.tokens.len() as u64).sum::<u64>();
        let rows = logits.size()[0] as usize;
        let flat: Vec<f32> = Vec::try_from(&logits.f_flatten(0, -1)?)?;
        let width = flat.len() / rows.max(1);
        Ok(flat.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
    }
}

impl Engine for TorchEngine {
    fn kind(&self) -> &'static str {
        "torch"
    }

    fn kv_capacity(&self) -> Option<u32> {
        Some(self.pool.capacity())
    }

    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<StepOutput, EngineError> {
        let seqs: Vec<SeqInput<'_>> = batch
            .iter()
            .map(|s| {
                let start = s.work.context as usize;
                let end = start + s.work.extend as usize;
                SeqInput {
                    tokens: &s.tokens[start..end],
                    start,
                    slots: &s.slots[..end],
                }
            })
            .collect();
        let samples: Vec<bool> = batch.iter().map(|s| s.samples).collect();
        let rows = self
            .logits(&seqs, &samples, LogitsOf::Last)
            .map_err(|e| EngineError(e.to_string()))?;
        let mut rows = rows.into_iter();
        let (tokens, logprobs) = batch
            .iter()
            .map(|s| {
                if !s.samples {
                    return (None, None);
                }
                let Some(row) = rows.next() else {
                    return (None, None);
                };
                let spec = SamplingSpec {
                    temperature: s.sampling.temperature,
                    top_p: s.sampling.top_p,
                    top_k: s.sampling.top_k,
                    seed: s.seed,
                    index: s.output_index,
                };
                let token = sample(&row, &spec);
                let logprobs = s.sampling.logprobs.map(|top| logprobs(&row, token, top));
                (Some(token), logprobs)
            })
            .unzip();
        Ok(StepOutput {
            tokens,
            logprobs,
            busy_for: std::time::Duration::ZERO,
        })
    }

    fn estimate_ms(&self, batch: &[SeqWork]) -> f64 {
        self.profile.iteration_ms(batch)
    }
}

/// `cpu`, `cuda` or `cuda:N`, checked against what this libtorch sees.
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => {
                return Err(ModelError::Device(format!(
                    "unknown device {other:?}: use cpu, cuda or cuda:N"
                )));
            }
        },
    };
    if let Device::Cuda(n) = device {
        if !tch::Cuda::is_available() {
            return Err(ModelError::Device(format!(
                "device {name:?}: CUDA is not available to this libtorch (no GPU, no driver, or a CPU-only build)"
            )));
        }
        let count = tch::Cuda::device_count();
        if n as i64 >= count {
            return Err(ModelError::Device(format!(
                "device {name:?}: this machine has {count} CUDA device(s)"
            )));
        }
    }
    Ok(device)
}

/// The element type for `dtype` on `device`.
pub fn parse_dtype(dtype: Option<&str>, device: Device) -> Result<Kind, ModelError> {
    let kind = match dtype {
        None if device == Device::Cpu => Kind::Float,
        None => Kind::BFloat16,
        Some("f32" | "float32") => Kind::Float,
        Some("bf16" | "bfloat16") => Kind::BFloat16,
        Some("f16" | "float16") => Kind::Half,
        Some(other) => {
            return Err(ModelError::Device(format!(
                "unknown dtype {other:?}: use f32, bf16 or f16"
            )));
        }
    };
    if device == Device::Cpu && kind == Kind::Half {
        return Err(ModelError::Device(
            "dtype f16 is not supported on cpu (its kernels are incomplete there): use f32 or bf16"
                .to_string(),
        ));
    }
    Ok(kind)
}

/// Memory the KV pool may draw from: available RAM on CPU, free GPU memory on CUDA.
fn free_memory_bytes(device: Device) -> Result<u64, ModelError> {
    match device {
        Device::Cpu => {
            let meminfo =
                std::fs::read_to_string("/proc/meminfo").map_err(|source| ModelError::Io {
                    path: "/proc/meminfo".to_string(),
                    source,
                })?;
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|kb| kb * 1024)
                .ok_or_else(|| {
                    ModelError::Device("cannot read MemAvailable: pass --kv-capacity-tokens".into())
                })
        }
        Device::Cuda(n) => {
            let output = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.free",
                    "--format=csv,noheader,nounits",
                    &format!("--id={n}"),
                ])
                .output();
            output
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|mib| mib * 1024 * 1024)
                .ok_or_else(|| {
                    ModelError::Device(
                        "cannot read free GPU memory (nvidia-smi): pass --kv-capacity-tokens"
                            .into(),
                    )
                })
        }
        other => Err(ModelError::Device(format!(
            "device {other:?} is not supported"
        ))),
    }
}
