//! GPU x model profiles and the time of one engine iteration.
//!
//! Two ways to cost an iteration:
//! - **Paper fit** (Mistral-7B on A6000): the piecewise fit profiled by the Preble authors,
//!   restated in `../shared/PAPER.md`. The recorded quadratic piece for 192..384 batched tokens
//!   turns negative near 384 (it cannot be what was measured), so we interpolate linearly
//!   between the flat piece (22 ms) and the linear piece at 384 instead.
//! - **Roofline**: an iteration takes the longer of its compute time (FLOPs over peak x MFU) and
//!   its memory time (weights plus KV read and written over bandwidth x MBU), plus a fixed
//!   per-iteration overhead (kernel launches, scheduling, tensor-parallel all-reduces).
//!   Efficiency factors: MFU 0.65 (prefill-heavy batches reach 60-70% on A100/H100 in the
//!   FlashAttention-2 and vLLM reports), MBU 0.7 (decode in vLLM/TensorRT-LLM reaches 60-80% of
//!   HBM bandwidth). Checked against the paper's Llama-3-70B TP2 H100 fit in the tests.

use crate::hardware::{GpuSpec, ModelSpec};

/// The work one sequence contributes to one iteration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqWork {
    /// Tokens computed in this iteration (a prefill chunk, or 1 for a decode step).
    pub extend: u32,
    /// Tokens of this sequence already in the KV cache before the iteration.
    pub context: u32,
}

impl SeqWork {
    /// One decode step of a sequence that has `context` tokens cached.
    pub fn decode(context: u32) -> Self {
        Self { extend: 1, context }
    }
}

/// Which formula a profile uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Formula {
    PaperMistralA6000,
    Roofline,
}

/// No profile has that name.
#[derive(Debug, thiserror::Error)]
#[error("unknown cost profile {name:?}; known profiles: {known}")]
pub struct UnknownProfile {
    /// The name asked for.
    pub name: String,
    /// The names that exist, comma-separated.
    pub known: String,
}

/// One serving unit (a GPU, or a tensor-parallel group of GPUs) running one model.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Profile name, e.g. `a6000-mistral-7b`.
    pub name: &'static str,
    /// The GPU.
    pub gpu: GpuSpec,
    /// The model.
    pub model: ModelSpec,
    /// Tensor-parallel degree (GPUs per serving unit).
    pub tensor_parallel: u32,
    /// KV-cache capacity of the unit, tokens.
    pub kv_capacity_tokens: u64,
    /// Model FLOP utilisation assumed by the roofline.
    pub mfu: f64,
    /// Memory bandwidth utilisation assumed by the roofline.
    pub mbu: f64,
    /// Fixed cost of one iteration, milliseconds.
    pub iteration_overhead_ms: f64,
    pub(crate) formula: Formula,
}

/// Names of all built-in profiles.
pub const PROFILE_NAMES: [&str; 4] = [
    "a6000-mistral-7b",
    "a100-mistral-7b",
    "h100-tp2-llama3-70b",
    "h100-tp4-llama3-70b",
];

impl Profile {
    /// Looks a built-in profile up by name.
    pub fn by_name(name: &str) -> Result<Profile, UnknownProfile> {
        match name {
            "a6000-mistral-7b" => Ok(Self::a6000_mistral_7b()),
            "a100-mistral-7b" => Ok(Self::roofline(
                "a100-mistral-7b",
                GpuSpec::A100,
                ModelSpec::MISTRAL_7B,
                1,
            )),
            "h100-tp2-llama3-70b" => Ok(Self::roofline(
                "h100-tp2-llama3-70b",
                GpuSpec::H100,
                ModelSpec::LLAMA3_70B,
                2,
            )),
            "h100-tp4-llama3-70b" => Ok(Self::roofline(
                "h100-tp4-llama3-70b",
                GpuSpec::H100,
                ModelSpec::LLAMA3_70B,
                4,
            )),
            _ => Err(UnknownProfile {
                name: name.to_string(),
                known: PROFILE_NAMES.join(", "),
            }),
        }
    }

    /// Mistral-7B on one A6000 with the paper's profiled fit and its KV capacity (198,516
    /// tokens at a 0.8 memory fraction).
    pub fn a6000_mistral_7b() -> Profile {
        Profile {
            name: "a6000-mistral-7b",
            gpu: GpuSpec::A6000,
            model: ModelSpec::MISTRAL_7B,
            tensor_parallel: 1,
            kv_capacity_tokens: 198_516,
            mfu: 0.65,
            mbu: 0.7,
            iteration_overhead_ms: 0.0,
            formula: Formula::PaperMistralA6000,
        }
    }

    /// A roofline profile; KV capacity is what is left of 90% of the unit's memory after the
    /// weights.
    pub fn roofline(name: &'static str, gpu: GpuSpec, model: ModelSpec, tp: u32) -> Profile {
        let memory = gpu.memory_gib * f64::from(tp) * (1u64 << 30) as f64 * 0.9;
        let free = (memory - model.weight_bytes()).max(0.0);
        let kv_capacity_tokens = (free / model.kv_bytes_per_token() as f64) as u64;
        // Two all-reduces per layer under tensor parallelism, ~8 us each on NVLink.
        let tp_ms = if tp > 1 {
            2.0 * f64::from(model.layers) * 0.008
        } else {
            0.0
        };
        Profile {
            name,
            gpu,
            model,
            tensor_parallel: tp,
            kv_capacity_tokens,
            mfu: 0.65,
            mbu: 0.7,
            iteration_overhead_ms: 1.5 + tp_ms,
            formula: Formula::Roofline,
        }
    }

    /// Milliseconds one engine iteration takes over `batch` (decodes and prefill chunks mixed).
    pub fn iteration_ms(&self, batch: &[SeqWork]) -> f64 {
        if batch.is_empty() {
            return 0.0;
        }
        match self.formula {
            Formula::PaperMistralA6000 => paper_mistral_a6000_ms(batch),
            Formula::Roofline => self.roofline_ms(batch),
        }
    }

    /// Milliseconds to prefill `extend` new tokens after `context` cached ones, alone.
    pub fn prefill_ms(&self, extend: u32, context: u32) -> f64 {
        self.iteration_ms(&[SeqWork { extend, context }])
    }

    /// Milliseconds of one decode step of `batch_size` sequences holding `total_context`
    /// tokens together (spread evenly).
    pub fn decode_step_ms(&self, batch_size: u32, total_context: u64) -> f64 {
        if batch_size == 0 {
            return 0.0;
        }
        let each = (total_context / u64::from(batch_size)).min(u64::from(u32::MAX)) as u32;
        let batch = vec![SeqWork::decode(each); batch_size as usize];
        self.iteration_ms(&batch)
    }

    fn roofline_ms(&self, batch: &[SeqWork]) -> f64 {
        let m = &self.model;
        let tokens: f64 = batch.iter().map(|s| f64::from(s.extend)).sum();
        let linear_flops = 2.0 * m.params * tokens;
        // QK^T and PV: 2 matmuls x 2 FLOPs x heads x head_dim per (query, key) pair; a query at
        // position p sees p keys, so a chunk sees context + extend/2 keys on average.
        let attn_flops: f64 = batch
            .iter()
            .map(|s| {
                let keys = f64::from(s.context) + f64::from(s.extend) / 2.0;
                4.0 * f64::from(m.layers)
                    * f64::from(m.heads * m.head_dim)
                    * f64::from(s.extend)
                    * keys
            })
            .sum();
        let units = f64::from(self.tensor_parallel);
        let compute_s =
            (linear_flops + attn_flops) / (units * self.gpu.peak_tflops * 1e12 * self.mfu);
        let kv_tokens: f64 = batch
            .iter()
            .map(|s| f64::from(s.context) + f64::from(s.extend))
            .sum();
        let bytes = m.weight_bytes() + kv_tokens * m.kv_bytes_per_token() as f64;
        let memory_s = bytes / (units * self.gpu.mem_bandwidth_gbs * 1e9 * self.mbu);
        compute_s.max(memory_s) * 1e3 + self.iteration_overhead_ms
    }
}

/// The paper fit's cost per token of an iteration's linear layers, ms (its slope).
pub(crate) const PAPER_LINEAR_SLOPE_MS: f64 = 0.108_425_71;
/// The least an iteration's linear layers take in the paper fit, ms.
pub(crate) const PAPER_LINEAR_FLOOR_MS: f64 = 22.0;
/// The least a sequence's attention takes in the paper fit, ms.
pub(crate) const PAPER_ATTENTION_FLOOR_MS: f64 = 0.32;
/// The paper fit's efficiency divisor.
pub(crate) const PAPER_EFFICIENCY: f64 = 0.9;

/// The Preble authors' fit for Mistral-7B on an A6000 (see the module docs).
fn paper_mistral_a6000_ms(batch: &[SeqWork]) -> f64 {
    let n: f64 = batch.iter().map(|s| f64::from(s.extend)).sum();
    let linear_at = |n: f64| PAPER_LINEAR_SLOPE_MS * n + 4.2098;
    let linear = if n >= 384.0 {
        linear_at(n)
    } else if n >= 192.0 {
        PAPER_LINEAR_FLOOR_MS + (linear_at(384.0) - PAPER_LINEAR_FLOOR_MS) * (n - 192.0) / 192.0
    } else {
        PAPER_LINEAR_FLOOR_MS
    };
    let attention: f64 = batch
        .iter()
        .map(|s| {
            let e = f64::from(s.extend);
            let seq = f64::from(s.context) + e;
            let base = if seq <= 1024.0 {
                PAPER_ATTENTION_FLOOR_MS
            } else {
                1.86e-4 * seq + 0.159
            };
            let correction = if e * seq > 1024.0 * 1024.0 {
                1.13e-3 * e + 1.75e-3 * seq + 2.19e-6 * e * seq
            } else {
                0.0
            };
            base + correction
        })
        .sum();
    (linear + attention) / PAPER_EFFICIENCY
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_named_profile_resolves() {
        for name in PROFILE_NAMES {
            let p = Profile::by_name(name).unwrap();
            assert_eq!(p.name, name);
            assert!(
                p.kv_capacity_tokens > 10_000,
                "{name}: {}",
                p.kv_capacity_tokens
            );
        }
        assert!(Profile::by_name("tpu").is_err());
    }

    #[test]
    fn paper_fit_reproduces_its_linear_piece() {
        // 4096 tokens from scratch: linear 448.3 + attention 0.92 + correction 51.0, / 0.9.
        let p = Profile::a6000_mistral_7b();
        let ms = p.prefill_ms(4096, 0);
        let expected = (0.108_425_71 * 4096.0
            + 4.2098
            + (1.86e-4 * 4096.0 + 0.159)
            + (1.13e-3 * 4096.0 + 1.75e-3 * 4096.0 + 2.19e-6 * 4096.0 * 4096.0))
            / 0.9;
        assert!((ms - expected).abs() < 1e-9, "{ms} vs {expected}");
    }

    #[test]
    fn roofline_agrees_with_the_papers_70b_fit() {
        // The paper's Llama-3-70B TP2 H100 per-request fit for a 2048-token prefill.
        let (e, s) = (2048.0, 2048.0);
        let fit = 18.667 + 0.079879 * e + 2.6853e-3 * s + 7.4434e-7 * e * s;
        let ours = Profile::by_name("h100-tp2-llama3-70b")
            .unwrap()
            .prefill_ms(2048, 0);
        let ratio = ours / fit;
        assert!(
            (0.7..1.4).contains(&ratio),
            "roofline {ours} ms vs fit {fit} ms"
        );
    }

    #[test]
    fn decode_is_memory_bound_and_cheap_per_token() {
        let p = Profile::by_name("h100-tp4-llama3-70b").unwrap();
        let one = p.decode_step_ms(1, 2000);
        let many = p.decode_step_ms(64, 64 * 2000);
        assert!(
            many < 4.0 * one,
            "batching decode must amortise weights: {one} vs {many}"
        );
        assert!(many / 64.0 < one / 10.0);
    }

    #[test]
    fn cached_prefix_makes_prefill_cheaper() {
        for name in PROFILE_NAMES {
            let p = Profile::by_name(name).unwrap();
            assert!(p.prefill_ms(256, 3840) < p.prefill_ms(4096, 0), "{name}");
        }
    }

    proptest! {
        #[test]
        fn more_work_never_costs_less(extend in 1u32..20_000, context in 0u32..20_000, more in 1u32..4096) {
            for name in PROFILE_NAMES {
                let p = Profile::by_name(name).unwrap();
                let base = p.prefill_ms(extend, context);
                prop_assert!(base > 0.0 && base.is_finite());
                prop_assert!(p.prefill_ms(extend + more, context) >= base);
                prop_assert!(p.prefill_ms(extend, context + more) >= base);
            }
        }
    }
}
