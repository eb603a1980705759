//! A model directory in the Hugging Face layout (`config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, weights), as the gateway and the workers read it: the name a model
//! is served under, and its JSON files with errors that name the file.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a model directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// A file is not valid JSON.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// The directory path ends in no name (such as `/`).
    #[error("model directory {0} has no name")]
    Unnamed(PathBuf),
}

/// The name a model directory is served under: its own name, symbolic links resolved (so
/// `models/current -> llama-3-8b` serves `llama-3-8b`).
pub fn served_name(dir: &Path) -> Result<String, ModelDirError> {
    dir.canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ModelDirError::Unnamed(dir.to_path_buf()))
}

/// A JSON file of the directory, parsed.
pub fn read_json(path: &Path) -> Result<Value, ModelDirError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelDirError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelDirError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_links_and_errors_name_the_file() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("llama-3-8b");
        std::fs::create_dir(&model).unwrap();
        let link = root.path().join("current");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        assert_eq!(served_name(&link).unwrap(), "llama-3-8b");
        assert!(matches!(
            served_name(Path::new("/")),
            Err(ModelDirError::Unnamed(_))
        ));

        let config = model.join("config.json");
        let missing = read_json(&config).unwrap_err();
        assert!(missing.to_string().contains("config.json"), "{missing}");
        std::fs::write(&config, "{\"vocab_size\": 32}").unwrap();
        assert_eq!(read_json(&config).unwrap()["vocab_size"], 32);
        std::fs::write(&config, "{vocab_size").unwrap();
        let bad = read_json(&config).unwrap_err();
        assert!(
            matches!(bad, ModelDirError::Parse { .. }) && bad.to_string().contains("config.json"),
            "{bad}"
        );
    }
}
