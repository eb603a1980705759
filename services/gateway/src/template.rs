//! Where a model directory's chat template lives, as transformers reads it: `chat_template.jinja`
//! (what transformers writes since 4.43, and the only place in 5.x), `chat_template.json`
//! (`{"chat_template": ...}`), then `tokenizer_config.json`'s `chat_template` (a string, or a
//! list of named templates of which `default` is the chat one). A directory with none serves
//! completions only; a template that cannot be read is an error at start, never a silent
//! substitute.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A chat template and the file it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// Where it was found (for logs and errors).
    pub from: String,
}

/// The chat template of the model directory `dir`, whose `tokenizer_config.json` (or `null`)
/// is `tokenizer_config`; `None` when the directory has none.
pub fn find(dir: &Path, tokenizer_config: &Value) -> Result<Option<ChatTemplate>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let source = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(Some(ChatTemplate {
            source,
            from: "chat_template.jinja".into(),
        }));
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        let value = preble_modeldir::read_json(&json)?;
        return match value.get("chat_template") {
            Some(Value::String(source)) => Ok(Some(ChatTemplate {
                source: source.clone(),
                from: "chat_template.json".into(),
            })),
            _ => bail!("{} has no string `chat_template`", json.display()),
        };
    }
    match tokenizer_config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(ChatTemplate {
            source: source.clone(),
            from: "tokenizer_config.json".into(),
        })),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
            };
            match named("default") {
                Some(source) => Ok(Some(ChatTemplate {
                    source: source.to_string(),
                    from: "tokenizer_config.json (the template named \"default\")".into(),
                })),
                None => {
                    bail!("tokenizer_config.json lists chat templates but none named \"default\"")
                }
            }
        }
        Some(other) => {
            bail!("tokenizer_config.json's chat_template is neither text nor a list: {other}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_place_transformers_writes_a_template_is_read_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"chat_template": "from-config"});
        assert_eq!(
            find(dir.path(), &config).unwrap().unwrap().source,
            "from-config"
        );
        std::fs::write(
            dir.path().join("chat_template.json"),
            r#"{"chat_template": "from-json"}"#,
        )
        .unwrap();
        assert_eq!(
            find(dir.path(), &config).unwrap().unwrap().source,
            "from-json"
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "from-jinja").unwrap();
        let found = find(dir.path(), &config).unwrap().unwrap();
        assert_eq!(
            (found.source.as_str(), found.from.as_str()),
            ("from-jinja", "chat_template.jinja")
        );
    }

    #[test]
    fn named_lists_missing_templates_and_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let listed = json!({"chat_template": [
            {"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
        assert_eq!(find(dir.path(), &listed).unwrap().unwrap().source, "d");
        let no_default = json!({"chat_template": [{"name": "tool_use", "template": "t"}]});
        assert!(find(dir.path(), &no_default).is_err());
        assert!(find(dir.path(), &json!({"chat_template": 3})).is_err());
        assert_eq!(find(dir.path(), &json!({})).unwrap(), None);
        assert_eq!(find(dir.path(), &Value::Null).unwrap(), None);
    }
}
