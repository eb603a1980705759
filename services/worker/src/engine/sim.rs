//! The `sim` engine: no model, just time. Each iteration takes what the cost model says a real
//! GPU would take, and emits tokens that are a deterministic function of (prompt, seed, index),
//! so one laptop can run a cluster of "GPUs" whose outputs tests can predict.

use std::time::Duration;

use preble_costmodel::{Profile, SeqWork};
use preble_prefix::mix64;
use preble_protocol::TokenLogprob;

use super::{Engine, EngineError, StepOutput, StepSeq};

/// A simulated GPU.
#[derive(Debug)]
pub struct SimEngine {
    profile: Profile,
    time_scale: f64,
    vocab: Vec<u32>,
}

impl SimEngine {
    /// A sim engine imitating `profile`, with every iteration's time multiplied by
    /// `time_scale`, generating tokens from `0..vocab_size` except `excluded` (special tokens,
    /// pieces of characters).
    pub fn new(profile: Profile, time_scale: f64, vocab_size: u32, excluded: &[u32]) -> Self {
        let excluded: std::collections::HashSet<u32> = excluded.iter().copied().collect();
        let mut vocab: Vec<u32> = (0..vocab_size).filter(|t| !excluded.contains(t)).collect();
        if vocab.is_empty() {
            vocab.push(0);
        }
        Self {
            profile,
            time_scale,
            vocab,
        }
    }
}

impl SimEngine {
    /// The log-probabilities of the distribution the sim draws the token at vocabulary place
    /// `at` from: a hash picks uniformly among its vocabulary, so every token has probability
    /// 1 / vocabulary; the `top` are that token and the ones after it in the vocabulary (all
    /// equally likely).
    pub fn logprobs(&self, at: usize, top: u32) -> TokenLogprob {
        let logprob = -(self.vocab.len() as f32).ln();
        let top = (0..(top as usize).min(self.vocab.len()))
            .filter_map(|i| self.vocab.get((at + i) % self.vocab.len()))
            .map(|&t| (t, logprob))
            .collect();
        TokenLogprob { logprob, top }
    }

    /// The place in the vocabulary of the token the sim generates at `index` for a prompt
    /// hash and seed.
    fn draw(&self, prompt_hash: u64, seed: u64, index: u32) -> usize {
        let h = mix64(prompt_hash ^ mix64(seed) ^ mix64(u64::from(index) + 1));
        (h % self.vocab.len() as u64) as usize
    }

    /// The token the sim generates at `index` for a prompt hash and seed.
    pub fn token(&self, prompt_hash: u64, seed: u64, index: u32) -> u32 {
        self.vocab[self.draw(prompt_hash, seed, index)]
    }
}

impl Engine for SimEngine {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<StepOutput, EngineError> {
        let work: Vec<SeqWork> = batch.iter().map(|s| s.work).collect();
        let ms = self.profile.iteration_ms(&work) * self.time_scale;
        let draws: Vec<Option<usize>> = batch
            .iter()
            .map(|s| {
                // Without a seed of its own a request's tokens depend on its prompt only, so
                // tests can predict them.
                let seed = s.sampling.seed.unwrap_or(0);
                s.samples
                    .then(|| self.draw(s.prompt_hash, seed, s.output_index))
            })
            .collect();
        let tokens = draws.iter().map(|d| Some(self.vocab[(*d)?])).collect();
        let logprobs = batch
            .iter()
            .zip(&draws)
            .map(|(s, at)| Some(self.logprobs((*at)?, s.sampling.logprobs?)))
            .collect();
        Ok(StepOutput {
            tokens,
            logprobs,
            busy_for: Duration::from_secs_f64(ms / 1e3),
        })
    }

    fn estimate_ms(&self, batch: &[SeqWork]) -> f64 {
        self.profile.iteration_ms(batch) * self.time_scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_deterministic_and_avoid_special_ids() {
        let e = SimEngine::new(Profile::a6000_mistral_7b(), 1.0, 50, &[0, 1, 2]);
        let h = preble_prefix::path_hash(&[5, 6, 7]);
        let a: Vec<u32> = (0..100).map(|i| e.token(h, 3, i)).collect();
        let b: Vec<u32> = (0..100).map(|i| e.token(h, 3, i)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|t| (3..50).contains(t)));
        let c: Vec<u32> = (0..100).map(|i| e.token(h, 4, i)).collect();
        assert_ne!(a, c, "the seed changes the output");
    }

    #[test]
    fn step_takes_the_cost_models_time() {
        let p = Profile::a6000_mistral_7b();
        let expected = p.prefill_ms(100, 0) * 0.5;
        let mut e = SimEngine::new(p, 0.5, 50, &[]);
        let prompt = [1u32; 100];
        let out = e
            .step(&[StepSeq {
                tokens: &prompt,
                slots: &[0; 100],
                prompt_hash: 1,
                sampling: &preble_protocol::SamplingParams::default(),
                seed: 0,
                output_index: 0,
                work: SeqWork {
                    extend: 100,
                    context: 0,
                },
                samples: true,
            }])
            .unwrap();
        assert!((out.busy_for.as_secs_f64() * 1e3 - expected).abs() < 1e-6);
        assert!(out.tokens[0].is_some());
    }
}
