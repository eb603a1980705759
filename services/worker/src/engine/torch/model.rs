//! The Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a ragged batch whose
//! keys and values live in a [`KvPool`], addressed by slot.
//!
//! One forward pass takes every sequence's new tokens at once (prefill chunks and decode steps
//! mixed, as continuous batching needs): the projections and the MLP run on all rows together;
//! attention reads each sequence's context from the pool by its slot list.

use tch::{Device, Kind, Tensor};

use super::kv_pool::KvPool;
use super::weights::Weights;
use crate::engine::llama_config::{LlamaConfig, ModelError};

/// One sequence's part of a forward pass.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// The tokens to compute.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` (how many tokens of this sequence are already in the pool).
    pub start: usize,
    /// Slots of positions `0..start + tokens.len()`: the context's KV is read from the first
    /// `start`, the new tokens' KV is written to the rest.
    pub slots: &'a [u32],
}

/// Which rows' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsOf {
    /// The last new token of each sequence in `sample` (what serving needs).
    Last,
    /// Every new token of every sequence (what parity tests compare).
    All,
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn take(weights: &mut Weights, name: &str, with_bias: bool) -> Result<Self, ModelError> {
        Ok(Self {
            weight: weights.take(&format!("{name}.weight"))?,
            bias: if with_bias {
                Some(weights.take(&format!("{name}.bias"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }
}

/// A loaded Llama-architecture model.
pub struct Llama {
    config: LlamaConfig,
    device: Device,
    kind: Kind,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Tensor,
}

impl Llama {
    /// Builds the model from checked weights (already converted to `kind` on `device`).
    pub fn new(
        config: LlamaConfig,
        mut weights: Weights,
        device: Device,
        kind: Kind,
    ) -> Result<Self, ModelError> {
        let embed = weights.take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_layers as usize);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let (ab, mb) = (config.attention_bias, config.mlp_bias);
            layers.push(Layer {
                input_norm: weights.take(&format!("{p}.input_layernorm.weight"))?,
                q: Linear::take(&mut weights, &format!("{p}.self_attn.q_proj"), ab)?,
                k: Linear::take(&mut weights, &format!("{p}.self_attn.k_proj"), ab)?,
                v: Linear::take(&mut weights, &format!("{p}.self_attn.v_proj"), ab)?,
                o: Linear::take(&mut weights, &format!("{p}.self_attn.o_proj"), ab)?,
                post_norm: weights.take(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: Linear::take(&mut weights, &format!("{p}.mlp.gate_proj"), mb)?,
                up: Linear::take(&mut weights, &format!("{p}.mlp.up_proj"), mb)?,
                down: Linear::take(&mut weights, &format!("{p}.mlp.down_proj"), mb)?,
            });
        }
        let norm = weights.take("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            weights.take("lm_head.weight")?
        };
        // Frequencies in f32, as the reference implementation computes them.
        let inv_freq: Vec<f32> = config.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = Tensor::f_from_slice(&inv_freq)?.f_to_device(device)?;
        Ok(Self {
            config,
            device,
            kind,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The element type of weights and KV cache.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Runs the new tokens of `seqs` through the model, writing their keys and values into
    /// `pool`, and returns f32 logits `[rows, vocab]` for the rows `logits_of` names (for
    /// [`LogitsOf::Last`], one row per sequence whose `sample` flag is set, in order).
    pub fn forward(
        &self,
        pool: &mut KvPool,
        seqs: &[SeqInput<'_>],
        sample: &[bool],
        logits_of: LogitsOf,
    ) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let batch = Batch::new(seqs, self.device)?;
        let mut x = Tensor::f_embedding(&self.embed, &batch.ids, -1, false, false)?;
        let (cos, sin) = self.rope_tables(&batch.positions)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.input_norm)?;
            let attn = self.attention(layer, index, &h, &cos, &sin, pool, seqs, &batch)?;
            x = x.f_add(&layer.o.forward(&attn)?)?;
            let h = self.rms_norm(&x, &layer.post_norm)?;
            let gated = layer
                .gate
                .forward(&h)?
                .f_silu()?
                .f_mul(&layer.up.forward(&h)?)?;
            x = x.f_add(&layer.down.forward(&gated)?)?;
        }
        let rows = match logits_of {
            LogitsOf::All => x,
            LogitsOf::Last => {
                let last: Vec<i64> = batch
                    .row_starts
                    .iter()
                    .zip(seqs)
                    .zip(sample)
                    .filter(|(_, sample)| **sample)
                    .map(|((start, seq), _)| (start + seq.tokens.len() - 1) as i64)
                    .collect();
                x.f_index_select(0, &index_tensor(&last, self.device)?)?
            }
        };
        let normed = self.rms_norm(&rows, &self.norm)?;
        Ok(normed
            .f_linear(&self.lm_head, None::<&Tensor>)?
            .f_to_kind(Kind::Float)?)
    }

    /// RMSNorm. In bf16 or f16 it is computed as transformers' `LlamaRMSNorm` does: the mean
    /// square and the scaling in f32, rounded back before the weight.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor, ModelError> {
        if self.kind == Kind::Float {
            return Ok(x.f_rms_norm(
                [self.config.hidden_size],
                Some(weight),
                self.config.rms_norm_eps,
            )?);
        }
        let wide = x.f_to_kind(Kind::Float)?;
        let mean_square = wide.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let scaled = wide.f_mul(
            &mean_square
                .f_add_scalar(self.config.rms_norm_eps)?
                .f_rsqrt()?,
        )?;
        Ok(weight.f_mul(&scaled.f_to_kind(self.kind)?)?)
    }

    /// cos and sin tables `[rows, 1, head_dim]` for the rows' positions ("rotate half" layout).
    fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(1)?
            .f_mul(&self.inv_freq.f_unsqueeze(0)?)?;
        let angles = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        Ok((
            angles.f_cos()?.f_to_kind(self.kind)?,
            angles.f_sin()?.f_to_kind(self.kind)?,
        ))
    }

    /// Self-attention of one layer for every row; returns `[rows, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pool: &mut KvPool,
        seqs: &[SeqInput<'_>],
        batch: &Batch,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let rows = batch.rows as i64;
        let q = layer
            .q
            .forward(h)?
            .f_view([rows, c.num_heads, c.head_dim])?;
        let k = layer
            .k
            .forward(h)?
            .f_view([rows, c.num_kv_heads, c.head_dim])?;
        let v = layer
            .v
            .forward(h)?
            .f_view([rows, c.num_kv_heads, c.head_dim])?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        pool.write(index, &batch.new_slots, &k, &v)?;

        let mut out = Tensor::f_zeros([rows, c.num_heads, c.head_dim], (self.kind, self.device))?;
        // Single-token steps (decodes) share one padded attention call.
        if !batch.single.is_empty() {
            let (attended, rows_of) = self.attend_singles(index, &q, pool, seqs, batch)?;
            let _ = out.f_index_copy_(0, &rows_of, &attended)?;
        }
        for &i in &batch.multi {
            let seq = &seqs[i];
            let n = seq.tokens.len() as i64;
            let start = batch.row_starts[i] as i64;
            // [1, heads, n, head_dim]
            let q_seq = q.f_narrow(0, start, n)?.f_transpose(0, 1)?.f_unsqueeze(0)?;
            let attended = if seq.start == 0 {
                // A fresh prompt: its keys are this pass's own, in order; causal from the top.
                let k_seq = k.f_narrow(0, start, n)?.f_transpose(0, 1)?.f_unsqueeze(0)?;
                let v_seq = v.f_narrow(0, start, n)?.f_transpose(0, 1)?.f_unsqueeze(0)?;
                sdpa(&q_seq, &k_seq, &v_seq, None, true)?
            } else {
                let slots = index_tensor_u32(seq.slots, self.device)?;
                let (k_ctx, v_ctx) = pool.read(index, &slots)?;
                let k_ctx = k_ctx.f_transpose(0, 1)?.f_unsqueeze(0)?;
                let v_ctx = v_ctx.f_transpose(0, 1)?.f_unsqueeze(0)?;
                // Query i (at position start + i) sees keys 0..=start + i.
                let total = seq.slots.len() as i64;
                let key_pos =
                    Tensor::f_arange(total, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
                let limit = Tensor::f_arange(n, (Kind::Int64, self.device))?
                    .f_add_scalar(seq.start as i64)?
                    .f_unsqueeze(1)?;
                let mask = key_pos.f_le_tensor(&limit)?;
                sdpa(&q_seq, &k_ctx, &v_ctx, Some(&mask), false)?
            };
            let attended = attended.f_squeeze_dim(0)?.f_transpose(0, 1)?;
            let mut rows_of_seq = out.f_narrow(0, start, n)?;
            rows_of_seq.f_copy_(&attended)?;
        }
        Ok(out.f_view([rows, c.num_heads * c.head_dim])?)
    }

    /// Attention for every single-token sequence in one call: contexts gathered from the pool
    /// into a padded `[batch, kv_heads, longest, head_dim]`, padding masked out.
    fn attend_singles(
        &self,
        index: usize,
        q: &Tensor,
        pool: &KvPool,
        seqs: &[SeqInput<'_>],
        batch: &Batch,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let c = &self.config;
        let longest = batch
            .single
            .iter()
            .map(|&i| seqs[i].slots.len())
            .max()
            .unwrap_or(1);
        let count = batch.single.len() as i64;
        let mut slots = Vec::with_capacity(batch.single.len() * longest);
        let mut lengths = Vec::with_capacity(batch.single.len());
        let mut rows = Vec::with_capacity(batch.single.len());
        for &i in &batch.single {
            let seq = &seqs[i];
            slots.extend(seq.slots.iter().map(|&s| i64::from(s)));
            // Padding reads the sequence's own first slot; the mask hides it.
            slots.extend(std::iter::repeat_n(
                i64::from(seq.slots[0]),
                longest - seq.slots.len(),
            ));
            lengths.push(seq.slots.len() as i64);
            rows.push(batch.row_starts[i] as i64);
        }
        let (k_ctx, v_ctx) = pool.read(index, &index_tensor(&slots, self.device)?)?;
        let shape = [count, longest as i64, c.num_kv_heads, c.head_dim];
        let k_ctx = k_ctx.f_view(shape)?.f_transpose(1, 2)?;
        let v_ctx = v_ctx.f_view(shape)?.f_transpose(1, 2)?;
        let rows = index_tensor(&rows, self.device)?;
        let q_single = q.f_index_select(0, &rows)?.f_unsqueeze(2)?;
        let key_pos =
            Tensor::f_arange(longest as i64, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
        let lengths = index_tensor(&lengths, self.device)?.f_unsqueeze(1)?;
        let mask = key_pos
            .f_lt_tensor(&lengths)?
            .f_view([count, 1, 1, longest as i64])?;
        let attended = sdpa(&q_single, &k_ctx, &v_ctx, Some(&mask), false)?.f_squeeze_dim(2)?;
        Ok((attended, rows))
    }
}

/// The rows of one forward pass.
struct Batch {
    rows: usize,
    ids: Tensor,
    positions: Tensor,
    new_slots: Tensor,
    /// First row of each sequence.
    row_starts: Vec<usize>,
    /// Sequences with one new token.
    single: Vec<usize>,
    /// Sequences with several.
    multi: Vec<usize>,
}

impl Batch {
    fn new(seqs: &[SeqInput<'_>], device: Device) -> Result<Self, ModelError> {
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let mut ids = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        let mut new_slots = Vec::with_capacity(rows);
        let mut row_starts = Vec::with_capacity(seqs.len());
        let (mut single, mut multi) = (Vec::new(), Vec::new());
        for (i, seq) in seqs.iter().enumerate() {
            let end = seq.start + seq.tokens.len();
            if seq.tokens.is_empty() || seq.slots.len() != end {
                return Err(ModelError::Torch(format!(
                    "sequence {i}: {} new tokens at position {} need {end} slots, got {}",
                    seq.tokens.len(),
                    seq.start,
                    seq.slots.len()
                )));
            }
            row_starts.push(ids.len());
            ids.extend(seq.tokens.iter().map(|&t| i64::from(t)));
            positions.extend((seq.start..end).map(|p| p as i64));
            new_slots.extend(seq.slots[seq.start..].iter().map(|&s| i64::from(s)));
            if seq.tokens.len() == 1 {
                single.push(i);
            } else {
                multi.push(i);
            }
        }
        Ok(Self {
            rows,
            ids: index_tensor(&ids, device)?,
            positions: index_tensor(&positions, device)?,
            new_slots: index_tensor(&new_slots, device)?,
            row_starts,
            single,
            multi,
        })
    }
}

/// x * cos + rotate_half(x) * sin, for `x` of `[rows, heads, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, ModelError> {
    let half = x.size()[2] / 2;
    let first = x.f_narrow(2, 0, half)?;
    let second = x.f_narrow(2, half, half)?;
    let rotated = Tensor::f_cat(&[&second.f_neg()?, &first], 2)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}

fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor, ModelError> {
    Ok(Tensor::f_scaled_dot_product_attention(
        q, k, v, mask, 0.0, causal, None, true,
    )?)
}

/// An int64 index tensor on `device`.
pub fn index_tensor(values: &[i64], device: Device) -> Result<Tensor, ModelError> {
    Ok(Tensor::f_from_slice(values)?.f_to_device(device)?)
}

fn index_tensor_u32(values: &[u32], device: Device) -> Result<Tensor, ModelError> {
    let values: Vec<i64> = values.iter().map(|&v| i64::from(v)).collect();
    index_tensor(&values, device)
}

impl From<tch::TchError> for ModelError {
    fn from(e: tch::TchError) -> Self {
        ModelError::Torch(e.to_string())
    }
}
