//! Reading a checkpoint in Hugging Face layout: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; checked against the configuration before anything is used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::engine::llama_config::{LlamaConfig, ModelError};

/// A checkpoint's tensors by name, checked against a configuration.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    kind: Kind,
    device: Device,
}

impl Weights {
    /// Reads every shard of `dir`, checks names and shapes against `config`, and prepares to
    /// hand tensors out as `kind` on `device`.
    pub fn load(
        dir: &Path,
        config: &LlamaConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Weights, ModelError> {
        let mut tensors = HashMap::new();
        for file in shard_files(dir)? {
            let named = Tensor::read_safetensors(&file).map_err(|e| ModelError::Config {
                path: file.display().to_string(),
                message: e.to_string(),
            })?;
            tensors.extend(named);
        }
        let shapes: HashMap<&str, Vec<i64>> = tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.size()))
            .collect();
        config.check_tensors(|name| shapes.get(name).map(Vec::as_slice))?;
        Ok(Weights {
            tensors,
            kind,
            device,
        })
    }

    /// Takes the tensor `name`, converted to the model's element type and device.
    pub fn take(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        Ok(tensor.f_to_kind(self.kind)?.f_to_device(self.device)?)
    }
}

/// The safetensors files of a model directory.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.display().to_string(),
            source,
        })?;
        let bad = |message: &str| ModelError::Config {
            path: index.display().to_string(),
            message: message.to_string(),
        };
        let value: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let file = file
                .as_str()
                .ok_or_else(|| bad("`weight_map` values must be file names"))?;
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        for file in &files {
            if !file.exists() {
                return Err(ModelError::Io {
                    path: file.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "a shard listed in model.safetensors.index.json is missing",
                    ),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Io {
        path: single.display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors or model.safetensors.index.json in the model directory",
        ),
    })
}
