//! The KV cache as a pool of token slots: per layer one `[slots, kv_heads, head_dim]` tensor
//! for keys and one for values. The local scheduler's radix cache hands out slot ids (page
//! size 1), so a cached prefix is just a list of slots a new request reads.

use tch::{Device, Kind, Tensor};

use crate::engine::llama_config::{LlamaConfig, ModelError};

/// Preallocated keys and values of every layer.
pub struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    capacity: u32,
}

impl KvPool {
    /// A pool of `capacity` token slots for `config`'s layers, zeroed.
    pub fn new(
        config: &LlamaConfig,
        capacity: u32,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        let shape = [i64::from(capacity), config.num_kv_heads, config.head_dim];
        let mut keys = Vec::with_capacity(config.num_layers as usize);
        let mut values = Vec::with_capacity(config.num_layers as usize);
        for _ in 0..config.num_layers {
            keys.push(Tensor::f_zeros(shape, (kind, device))?);
            values.push(Tensor::f_zeros(shape, (kind, device))?);
        }
        Ok(Self {
            keys,
            values,
            capacity,
        })
    }

    /// Token slots in the pool.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Stores rows of `keys` and `values` (`[rows, kv_heads, head_dim]`) of `layer` at `slots`.
    pub fn write(
        &mut self,
        layer: usize,
        slots: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(), ModelError> {
        let _ = self.keys[layer].f_index_copy_(0, slots, keys)?;
        let _ = self.values[layer].f_index_copy_(0, slots, values)?;
        Ok(())
    }

    /// Keys and values of `layer` at `slots`, `[slots, kv_heads, head_dim]` each.
    pub fn read(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        Ok((
            self.keys[layer].f_index_select(0, slots)?,
            self.values[layer].f_index_select(0, slots)?,
        ))
    }
}
