//! Datasheet numbers of GPUs and shapes of models.

/// What a GPU can do at its peak.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSpec {
    /// Marketing name.
    pub name: &'static str,
    /// Dense BF16/FP16 tensor-core throughput with FP32 accumulation, TFLOP/s.
    pub peak_tflops: f64,
    /// HBM/GDDR bandwidth, GB/s (10^9 bytes).
    pub mem_bandwidth_gbs: f64,
    /// Memory size, GiB.
    pub memory_gib: f64,
}

impl GpuSpec {
    /// NVIDIA RTX A6000 (datasheet: 154.8 dense FP16 tensor TFLOP/s with FP32 accumulate,
    /// 768 GB/s GDDR6, 48 GB).
    pub const A6000: GpuSpec = GpuSpec {
        name: "A6000",
        peak_tflops: 154.8,
        mem_bandwidth_gbs: 768.0,
        memory_gib: 48.0,
    };

    /// NVIDIA H100 SXM5 80GB (datasheet: 989 dense BF16 tensor TFLOP/s, 3.35 TB/s HBM3).
    pub const H100: GpuSpec = GpuSpec {
        name: "H100",
        peak_tflops: 989.0,
        mem_bandwidth_gbs: 3350.0,
        memory_gib: 80.0,
    };

    /// NVIDIA A100 SXM4 80GB (datasheet: 312 dense BF16 tensor TFLOP/s, 2.04 TB/s HBM2e).
    pub const A100: GpuSpec = GpuSpec {
        name: "A100",
        peak_tflops: 312.0,
        mem_bandwidth_gbs: 2039.0,
        memory_gib: 80.0,
    };
}

/// The shape of a decoder-only transformer, enough to count its FLOPs and bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Name as served.
    pub name: &'static str,
    /// Parameters in the transformer blocks and LM head (what every token multiplies through).
    pub params: f64,
    /// Decoder layers.
    pub layers: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Bytes per weight and per KV element (2 for BF16/FP16).
    pub dtype_bytes: u32,
    /// Longest context the model accepts.
    pub context_len: u32,
}

impl ModelSpec {
    /// Mistral-7B-v0.1 (config.json: 32 layers, 32 heads, 8 KV heads, head dim 128, 7.24B
    /// parameters, 32k context; served at 8k like the paper).
    pub const MISTRAL_7B: ModelSpec = ModelSpec {
        name: "mistral-7b",
        params: 7.24e9,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        dtype_bytes: 2,
        context_len: 32768,
    };

    /// Llama-3-70B (config.json: 80 layers, 64 heads, 8 KV heads, head dim 128, 70.6B
    /// parameters, 8k context).
    pub const LLAMA3_70B: ModelSpec = ModelSpec {
        name: "llama-3-70b",
        params: 70.6e9,
        layers: 80,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        dtype_bytes: 2,
        context_len: 8192,
    };

    /// Bytes of KV cache one token occupies across all layers (K and V).
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }

    /// Bytes of weights.
    pub fn weight_bytes(&self) -> f64 {
        self.params * f64::from(self.dtype_bytes)
    }
}
