//! Engines: what computes an iteration. The worker's loop hands an engine one batch per
//! iteration and streams the tokens it returns.

pub mod llama_config;
pub mod sampling;
pub mod sim;
#[cfg(feature = "torch")]
pub mod torch;

use std::time::Duration;

use preble_costmodel::SeqWork;
use preble_localsched::{LocalScheduler, Plan};
use preble_protocol::{SamplingParams, TokenLogprob};

pub use sim::SimEngine;

/// One sequence's part in an iteration.
#[derive(Clone, Copy, Debug)]
pub struct StepSeq<'a> {
    /// Prompt then generated tokens; this step computes
    /// `tokens[work.context..work.context + work.extend]`.
    pub tokens: &'a [u32],
    /// KV slots of `tokens[..work.context + work.extend]`, one per token: the engine reads the
    /// context's KV from the first `work.context` and writes the new tokens' KV to the rest.
    pub slots: &'a [u32],
    /// A hash of the prompt (computed once per request).
    pub prompt_hash: u64,
    /// How the request samples.
    pub sampling: &'a SamplingParams,
    /// The request's sampling seed: its own, or one the worker drew for it.
    pub seed: u64,
    /// Index of the token this step samples, if it samples one (0 for the first output token).
    pub output_index: u32,
    /// Tokens computed in this step and tokens already cached before it.
    pub work: SeqWork,
    /// Whether this step ends with a sampled token (last prefill chunk, or a decode step).
    pub samples: bool,
}

/// What an engine needs to know about one request besides its tokens.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// A hash of the prompt.
    pub prompt_hash: u64,
    /// How it samples.
    pub sampling: &'a SamplingParams,
    /// Its sampling seed.
    pub seed: u64,
    /// Output positions an earlier attempt already produced (the first token sampled here is
    /// output token `output_offset`).
    pub output_offset: u32,
}

/// The engine's batch for an iteration the local scheduler planned; `view` tells each
/// request's sampling facts from its payload.
pub fn step_batch<'a, T>(
    sched: &'a LocalScheduler<T>,
    plan: &Plan,
    view: impl Fn(&'a T) -> RequestView<'a>,
) -> Vec<StepSeq<'a>> {
    plan.items
        .iter()
        .map(|item| {
            let seq = &sched.running()[item.index];
            let request = view(&seq.payload);
            StepSeq {
                tokens: seq.tokens(),
                slots: &seq.slots()[..(item.start + item.extend) as usize],
                prompt_hash: request.prompt_hash,
                sampling: request.sampling,
                seed: request.seed,
                output_index: request.output_offset + seq.generated().len() as u32,
                work: SeqWork {
                    extend: item.extend,
                    context: item.start,
                },
                samples: item.samples,
            }
        })
        .collect()
}

/// What one iteration produced.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// For each sequence of the batch, in order: the sampled token, if it sampled.
    pub tokens: Vec<Option<u32>>,
    /// For each sequence of the batch, in order: the sampled token's log-probabilities, if its
    /// request asked for them (`SamplingParams::logprobs`); may be empty when none did.
    pub logprobs: Vec<Option<TokenLogprob>>,
    /// Time the device is still busy with this step after `step` returned (the sim engine's
    /// modelled time; zero for engines that compute synchronously).
    pub busy_for: Duration,
}

/// An iteration that could not be computed (the device failed, out of memory...): the
/// requests of its batch fail, the worker goes on.
#[derive(Debug, thiserror::Error)]
#[error("engine step failed: {0}")]
pub struct EngineError(pub String);

/// Computes iterations.
pub trait Engine: Send {
    /// Engine kind, as reported in heartbeats.
    fn kind(&self) -> &'static str;

    /// KV slots the engine has room for, when the engine decides it (the torch engine sizes
    /// its pool from memory); `None`: the configured capacity.
    fn kv_capacity(&self) -> Option<u32> {
        None
    }

    /// Runs one iteration over `batch`.
    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<StepOutput, EngineError>;

    /// Estimated milliseconds for an iteration of this shape (for load reports).
    fn estimate_ms(&self, batch: &[SeqWork]) -> f64;
}

/// The engine `config` asks for, loaded (for the torch engine: weights read, KV pool
/// allocated; this blocks, so call it off the async runtime).
pub fn build(config: &crate::config::Config) -> anyhow::Result<Box<dyn Engine>> {
    match &config.engine {
        crate::config::EngineChoice::Sim => {
            let never_generated: Vec<u32> = config
                .model
                .special_token_ids
                .iter()
                .chain(&config.model.partial_token_ids)
                .copied()
                .collect();
            Ok(Box::new(SimEngine::new(
                config.profile.clone(),
                config.time_scale,
                config.model.vocab_size,
                &never_generated,
            )))
        }
        #[cfg(feature = "torch")]
        crate::config::EngineChoice::Torch {
            device,
            dtype,
            kv_memory_fraction,
        } => {
            let options = torch::TorchOptions {
                device: device.clone(),
                dtype: dtype.clone(),
                kv_capacity_tokens: config
                    .kv_capacity_given
                    .then_some(config.kv_capacity_tokens),
                kv_memory_fraction: *kv_memory_fraction,
                profile: config.profile.clone(),
            };
            let engine = torch::TorchEngine::load(&config.model.dir, &options)?;
            Ok(Box::new(engine))
        }
        #[cfg(not(feature = "torch"))]
        crate::config::EngineChoice::Torch { .. } => {
            anyhow::bail!("this worker was built without the torch engine")
        }
    }
}
