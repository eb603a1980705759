//! The Llama-architecture facts of a Hugging Face `config.json`: sizes, RoPE frequencies and
//! the tensors a checkpoint must hold. Pure (no libtorch), so it is tested in every build.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

/// Architectures the torch engine runs (they share one decoder block).
pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "MistralForCausalLM"];

/// Why a model directory cannot be served.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A file is missing or unreadable.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` (or another JSON file) is not what a Llama model needs.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The architecture is not one of [`SUPPORTED_ARCHITECTURES`].
    #[error(
        "unsupported architecture {0:?}: the torch engine runs LlamaForCausalLM and MistralForCausalLM"
    )]
    UnsupportedArchitecture(String),
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("the checkpoint has no tensor `{0}`")]
    MissingTensor(String),
    /// A tensor has the wrong shape for this configuration.
    #[error("tensor `{name}` has shape {found:?}, but config.json implies {expected:?}")]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Its shape in the checkpoint.
        found: Vec<i64>,
        /// The shape the configuration implies.
        expected: Vec<i64>,
    },
    /// The device or dtype cannot be used.
    #[error("{0}")]
    Device(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(String),
}

/// How RoPE frequencies are scaled for long contexts (`rope_scaling`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// How much low frequencies are stretched.
        factor: f64,
        /// Wavelength bound (as a fraction of the original context) above which frequencies are scaled.
        low_freq_factor: f64,
        /// Wavelength bound below which frequencies are kept.
        high_freq_factor: f64,
        /// The context the model was pretrained with.
        original_max_position_embeddings: f64,
    },
}

/// A Llama-architecture configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Architecture name from `architectures`.
    pub architecture: String,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Model width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Decoder blocks.
    pub num_layers: i64,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_kv_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context.
    pub max_position_embeddings: i64,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// Whether the MLP projections have biases.
    pub mlp_bias: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: i64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<LlamaConfig, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
            .map_err(|message| ModelError::Config {
                path: path.display().to_string(),
                message,
            })
            .and_then(|c| c.check_architecture())
    }

    /// Parses the text of a `config.json` (architecture not checked).
    pub fn parse(text: &str) -> Result<LlamaConfig, String> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let raw: RawConfig =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|e| e.to_string())?;
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(format!(
                "hidden_act {act:?} is not supported (Llama uses silu)"
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let positive = [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("num_key_value_heads", num_kv_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(format!("`{name}` must be positive"));
        }
        if raw.num_attention_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            ));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(format!(
                "head_dim must be positive and even, not {head_dim}"
            ));
        }
        // Newer configs nest RoPE settings in `rope_parameters`; older ones use `rope_theta`
        // and `rope_scaling`.
        let theta_from_parameters = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64);
        let rope_theta = raw.rope_theta.or(theta_from_parameters).unwrap_or(10_000.0);
        let scaling = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref());
        let rope_scaling = parse_rope_scaling(scaling)?;
        let architecture = raw
            .architectures
            .first()
            .cloned()
            .unwrap_or_else(|| "LlamaForCausalLM".to_string());
        Ok(LlamaConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
        })
    }

    fn check_architecture(self) -> Result<LlamaConfig, ModelError> {
        if SUPPORTED_ARCHITECTURES.contains(&self.architecture.as_str()) {
            Ok(self)
        } else {
            Err(ModelError::UnsupportedArchitecture(self.architecture))
        }
    }

    /// RoPE inverse frequencies, one per pair of head dimensions, scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_context,
            } => {
                let low_freq_wavelen = old_context / low_freq_factor;
                let high_freq_wavelen = old_context / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_context / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }

    /// Bytes of KV cache one token takes at `bytes_per_element`.
    pub fn kv_bytes_per_token(&self, bytes_per_element: i64) -> i64 {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element
    }

    /// Every tensor the checkpoint must hold, with its shape, by Hugging Face name.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<i64>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for layer in 0..self.num_layers {
            let p = format!("model.layers.{layer}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (name, rows, cols) in [
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ] {
                out.push((format!("{p}.self_attn.{name}.weight"), vec![rows, cols]));
                if self.attention_bias {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (name, rows, cols) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
            {
                out.push((format!("{p}.mlp.{name}.weight"), vec![rows, cols]));
                if self.mlp_bias {
                    out.push((format!("{p}.mlp.{name}.bias"), vec![rows]));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Checks a checkpoint's tensor names and shapes against [`Self::expected_tensors`].
    pub fn check_tensors<'a>(
        &self,
        mut shape_of: impl FnMut(&str) -> Option<&'a [i64]>,
    ) -> Result<(), ModelError> {
        for (name, expected) in self.expected_tensors() {
            match shape_of(&name) {
                None => return Err(ModelError::MissingTensor(name)),
                Some(found) if found != expected.as_slice() => {
                    return Err(ModelError::WrongShape {
                        name,
                        found: found.to_vec(),
                        expected,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

fn parse_rope_scaling(value: Option<&Value>) -> Result<RopeScaling, String> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_f64)
            .filter(|n| n.is_finite() && *n > 0.0)
            .ok_or_else(|| format!("rope_scaling of type {kind:?} needs a positive `{name}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => {
            let scaling = RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = scaling
                && high_freq_factor <= low_freq_factor
            {
                return Err("rope_scaling needs high_freq_factor > low_freq_factor".to_string());
            }
            Ok(scaling)
        }
        other => Err(format!(
            "rope_scaling type {other:?} is not supported (default, linear and llama3 are)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":512,
        "hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"max_position_embeddings":2048,"rms_norm_eps":1e-5,
        "rope_theta":10000.0,"tie_word_embeddings":true,"hidden_act":"silu"}"#;

    #[test]
    fn parses_a_tiny_llama_and_lists_its_tensors() {
        let c = LlamaConfig::parse(TINY).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads), (16, 2));
        let tensors = c.expected_tensors();
        // embed + 2 x (2 norms + 4 attention + 3 mlp) + final norm; tied: no lm_head.
        assert_eq!(tensors.len(), 1 + 2 * 9 + 1);
        let k = tensors
            .iter()
            .find(|t| t.0 == "model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(k.1, vec![32, 64]);
        assert_eq!(c.kv_bytes_per_token(4), 2 * 2 * 2 * 16 * 4);
    }

    #[test]
    fn tensor_check_names_the_missing_or_misshaped_tensor() {
        let c = LlamaConfig::parse(TINY).unwrap();
        let shapes: std::collections::HashMap<String, Vec<i64>> =
            c.expected_tensors().into_iter().collect();
        c.check_tensors(|n| shapes.get(n).map(Vec::as_slice))
            .unwrap();
        let mut missing = shapes.clone();
        missing.remove("model.norm.weight");
        let e = c
            .check_tensors(|n| missing.get(n).map(Vec::as_slice))
            .unwrap_err();
        assert!(e.to_string().contains("model.norm.weight"), "{e}");
        let mut wrong = shapes.clone();
        wrong.insert("model.layers.0.mlp.up_proj.weight".into(), vec![64, 64]);
        let e = c
            .check_tensors(|n| wrong.get(n).map(Vec::as_slice))
            .unwrap_err();
        assert!(
            matches!(&e, ModelError::WrongShape { name, .. } if name == "model.layers.0.mlp.up_proj.weight"),
            "{e}"
        );
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let bad_heads = TINY.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#);
        assert!(
            LlamaConfig::parse(&bad_heads)
                .unwrap_err()
                .contains("multiple")
        );
        let gelu = TINY.replace("silu", "gelu");
        assert!(LlamaConfig::parse(&gelu).unwrap_err().contains("gelu"));
        let missing = TINY.replace(r#""hidden_size":64,"#, "");
        assert!(
            LlamaConfig::parse(&missing)
                .unwrap_err()
                .contains("hidden_size")
        );
        let yarn = TINY.replace(
            r#""tie_word_embeddings""#,
            r#""rope_scaling":{"rope_type":"yarn","factor":4},"tie_word_embeddings""#,
        );
        assert!(LlamaConfig::parse(&yarn).unwrap_err().contains("yarn"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            TINY.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
        )
        .unwrap();
        let e = LlamaConfig::load(dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::UnsupportedArchitecture(_)), "{e}");
        let e = LlamaConfig::load(&dir.path().join("absent")).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_stretches_low_frequencies() {
        // Llama 3.1 8B's values.
        let text = TINY
            .replace(r#""rope_theta":10000.0"#, r#""rope_theta":500000.0"#)
            .replace(
                r#""tie_word_embeddings""#,
                r#""rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
                "high_freq_factor":4.0,"original_max_position_embeddings":8192},"tie_word_embeddings""#,
            );
        let scaled = LlamaConfig::parse(&text).unwrap();
        let mut plain = scaled.clone();
        plain.rope_scaling = RopeScaling::None;
        let (s, p) = (scaled.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(s.len(), 8);
        assert_eq!(s[0], p[0], "the highest frequency is kept");
        let last = s.len() - 1;
        assert!(
            (s[last] - p[last] / 8.0).abs() < 1e-15,
            "the lowest is divided by the factor"
        );
        assert!(s.iter().zip(&p).all(|(s, p)| s <= p && *s >= p / 8.0));
        // `rope_parameters` (newer configs) carries theta as well.
        let nested = TINY
            .replace(r#""rope_theta":10000.0,"#, "")
            .replace(
                r#""tie_word_embeddings""#,
                r#""rope_parameters":{"rope_type":"default","rope_theta":1000.0},"tie_word_embeddings""#,
            );
        assert_eq!(LlamaConfig::parse(&nested).unwrap().rope_theta, 1000.0);
    }
}
