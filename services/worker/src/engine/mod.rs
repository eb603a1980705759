//! Engines: what computes an iteration. The worker's loop hands an engine one batch per
//! iteration and streams the tokens it returns.

pub mod sim;

use std::time::Duration;

use preble_costmodel::SeqWork;

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
    /// Sampling seed.
    pub seed: u64,
    /// Index of the token this step samples, if it samples one (0 for the first output token).
    pub output_index: u32,
    /// Tokens computed in this step and tokens already cached before it.
    pub work: SeqWork,
    /// Whether this step ends with a sampled token (last prefill chunk, or a decode step).
    pub samples: bool,
}

/// What one iteration produced.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// For each sequence of the batch, in order: the sampled token, if it sampled.
    pub tokens: Vec<Option<u32>>,
    /// Time the device is still busy with this step after `step` returned (the sim engine's
    /// modelled time; zero for engines that compute synchronously).
    pub busy_for: Duration,
}

/// Computes iterations.
pub trait Engine: Send {
    /// Engine kind, as reported in heartbeats.
    fn kind(&self) -> &'static str;

    /// Runs one iteration over `batch`.
    fn step(&mut self, batch: &[StepSeq<'_>]) -> StepOutput;

    /// Estimated milliseconds for an iteration of this shape (for load reports).
    fn estimate_ms(&self, batch: &[SeqWork]) -> f64;
}
