//! A lower bound on any schedule's latency for one request.
//!
//! [`Profile::latency_lower_bound_ms`] bounds the time from a request's arrival to its last
//! token, over every way a cluster of this profile could have served it, given `cached`: the
//! most of its prompt whose KV could already exist when it arrives. The argument:
//! 1. A request runs on one serving unit, whose iterations run one after another; each
//!    iteration's time is at least the time of an iteration holding only part of its work.
//!    Both formulas are sums of non-negative per-sequence terms and non-decreasing functions
//!    of the batch's token count (plus, for the roofline, a maximum of two such sums and a
//!    constant), so adding sequences never shortens an iteration.
//! 2. Between its arrival and its end, that unit computes every prompt token not cached at
//!    its arrival, `m = prompt - cached` tokens or more: for this request, or for another whose
//!    KV it then reuses. The engine always computes the last prompt token, so
//!    `cached <= prompt - 1`. An iteration computes at most `chunk_tokens` prefill tokens in
//!    all, so there are at least `k = ceil(m / chunk_tokens)` such iterations. Preemption only
//!    adds work.
//! 3. Whatever the chunks:
//!    - Paper fit: each iteration's linear part is at least 22 ms and at least
//!      `0.10842571 x` its tokens (its slope bounds `linear(n) / n` from below at every `n`);
//!      each sequence's attention part is at least 0.32 ms. So those iterations take at least
//!      `(max(22 k, 0.10842571 m) + 0.32 k) / 0.9`.
//!    - Roofline: `sum(max(compute, memory)) >= max(sum compute, sum memory)`. The compute adds
//!      up to `2 params m` for the weights. For attention, a token at position `p` attends to
//!      `p` keys, so the positions `cached..prompt` cost `(prompt^2 - cached^2) / 2` pairs,
//!      however they are split into chunks or between requests. Memory is at least the
//!      weights' bytes per iteration, and every iteration pays the fixed overhead.
//! 4. The first output token comes with the last prefill iteration. Each of the other
//!    `output - 1` tokens takes one more iteration after it, at least a decode step of this
//!    sequence alone at its context then.
//!
//! Queueing, batching, misses and preemption can only add to this. So no policy's run of a
//! request can beat it, and a policy's latency over the bound (its headroom) says how much any
//! better scheduling could still gain.

use crate::profile::{
    Formula, PAPER_ATTENTION_FLOOR_MS, PAPER_EFFICIENCY, PAPER_LINEAR_FLOOR_MS,
    PAPER_LINEAR_SLOPE_MS,
};
use crate::{Profile, SeqWork};

impl Profile {
    /// The least time from arrival to last token any schedule could take for a request of
    /// `prompt` tokens, at most `cached` of them cached when it arrives, generating `output`
    /// tokens with prefill chunks of at most `chunk_tokens` (see the module documentation for
    /// why it is a true lower bound).
    pub fn latency_lower_bound_ms(
        &self,
        prompt: u32,
        cached: u32,
        output: u32,
        chunk_tokens: u32,
    ) -> f64 {
        let prompt = prompt.max(1);
        let cached = cached.min(prompt - 1);
        let missed = prompt - cached;
        let chunks = missed.div_ceil(chunk_tokens.max(1));
        let prefill = match self.formula {
            Formula::PaperMistralA6000 => {
                let linear = (PAPER_LINEAR_FLOOR_MS * f64::from(chunks))
                    .max(PAPER_LINEAR_SLOPE_MS * f64::from(missed));
                (linear + PAPER_ATTENTION_FLOOR_MS * f64::from(chunks)) / PAPER_EFFICIENCY
            }
            Formula::Roofline => self.roofline_prefill_floor_ms(prompt, cached, chunks),
        };
        let decode: f64 = (1..output.max(1))
            .map(|t| self.iteration_ms(&[SeqWork::decode(prompt + t - 1)]))
            .sum();
        prefill + decode
    }

    /// Step 3 for the roofline: the chunks' compute together, or their weight reads, plus
    /// the overhead of each iteration.
    fn roofline_prefill_floor_ms(&self, prompt: u32, cached: u32, chunks: u32) -> f64 {
        let m = &self.model;
        let units = f64::from(self.tensor_parallel);
        let missed = f64::from(prompt - cached);
        let attention_pairs = (f64::from(prompt).powi(2) - f64::from(cached).powi(2)) / 2.0;
        let flops = 2.0 * m.params * missed
            + 4.0 * f64::from(m.layers) * f64::from(m.heads * m.head_dim) * attention_pairs;
        let compute_s = flops / (units * self.gpu.peak_tflops * 1e12 * self.mfu);
        let weights_s = f64::from(chunks) * m.weight_bytes()
            / (units * self.gpu.mem_bandwidth_gbs * 1e9 * self.mbu);
        compute_s.max(weights_s) * 1e3 + f64::from(chunks) * self.iteration_overhead_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::PROFILE_NAMES;
    use proptest::prelude::*;

    /// The request served alone in chunks `chunks` (the last one may be cut to fit), then
    /// decoded alone: one of the schedules the bound must not exceed.
    fn alone_ms(p: &Profile, prompt: u32, cached: u32, output: u32, chunks: &[u32]) -> f64 {
        let mut context = cached.min(prompt - 1);
        let mut total = 0.0;
        let mut sizes = chunks.iter().copied().cycle();
        while context < prompt {
            let e = sizes.next().unwrap_or(1).max(1).min(prompt - context);
            total += p.iteration_ms(&[SeqWork { extend: e, context }]);
            context += e;
        }
        for t in 1..output.max(1) {
            total += p.iteration_ms(&[SeqWork::decode(prompt + t - 1)]);
        }
        total
    }

    proptest! {
        #[test]
        fn no_chunking_beats_the_bound(
            profile in 0..PROFILE_NAMES.len(),
            prompt in 1u32..40_000,
            cached_share in 0.0f64..1.0,
            output in 1u32..300,
            chunk_tokens in 1u32..2_048,
            chunks in proptest::collection::vec(1u32..2_048, 1..6),
        ) {
            let p = Profile::by_name(PROFILE_NAMES[profile]).expect("a profile");
            let cached = (f64::from(prompt) * cached_share) as u32;
            let chunks: Vec<u32> = chunks.into_iter().map(|c| c.min(chunk_tokens)).collect();
            let bound = p.latency_lower_bound_ms(prompt, cached, output, chunk_tokens);
            let schedule = alone_ms(&p, prompt, cached, output, &chunks);
            prop_assert!(bound <= schedule * (1.0 + 1e-9), "{bound} > {schedule}");
            // More cached never raises the bound; the bound is positive.
            let more = p.latency_lower_bound_ms(prompt, prompt, output, chunk_tokens);
            prop_assert!(more <= bound * (1.0 + 1e-9) && more > 0.0);
        }
    }

    #[test]
    fn the_bound_is_close_to_the_best_schedule_for_short_prompts() {
        // One full chunk alone: the paper fit's slack is only the attention terms above the
        // floor, a few percent.
        let p = Profile::a6000_mistral_7b();
        let bound = p.latency_lower_bound_ms(512, 0, 1, 512);
        let alone = p.prefill_ms(512, 0);
        assert!(bound <= alone && bound > 0.9 * alone, "{bound} vs {alone}");
    }
}
