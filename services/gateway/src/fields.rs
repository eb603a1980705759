//! Which request fields the gateway honours: every field of a request body is either honoured
//! or refused with a 400 that names it, never silently ignored.

use serde_json::Value;

use crate::error::ApiError;

/// Fields of both endpoints that the gateway honours (parsed into `CommonParams`).
pub const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
];

/// Fields only chat requests have.
pub const CHAT: &[&str] = &["messages"];

/// Fields only completion requests have.
pub const COMPLETIONS: &[&str] = &["prompt"];

/// A field OpenAI (or vLLM) defines that the gateway does not implement, and the values of it
/// that ask for nothing (the defaults), which are accepted.
struct Unsupported {
    name: &'static str,
    accepts: fn(&Value) -> bool,
    why: &'static str,
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn is_one(v: &Value) -> bool {
    v.as_f64() == Some(1.0)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn is_text_format(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("text")
}

fn is_text_only(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

fn is_default_tier(v: &Value) -> bool {
    matches!(v.as_str(), Some("auto" | "default"))
}

fn never(_: &Value) -> bool {
    false
}

const TOOLS: &str = "tool and function calling is not supported";

const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        name: "tools",
        accepts: is_empty,
        why: TOOLS,
    },
    Unsupported {
        name: "tool_choice",
        accepts: |v| v.as_str() == Some("none"),
        why: TOOLS,
    },
    Unsupported {
        name: "parallel_tool_calls",
        accepts: never,
        why: TOOLS,
    },
    Unsupported {
        name: "functions",
        accepts: is_empty,
        why: TOOLS,
    },
    Unsupported {
        name: "function_call",
        accepts: |v| v.as_str() == Some("none"),
        why: TOOLS,
    },
    Unsupported {
        name: "response_format",
        accepts: is_text_format,
        why: "structured output is not supported; only {\"type\": \"text\"}",
    },
    Unsupported {
        name: "best_of",
        accepts: is_one,
        why: "best_of above 1 is not supported",
    },
    Unsupported {
        name: "echo",
        accepts: is_false,
        why: "echo is not supported",
    },
    Unsupported {
        name: "suffix",
        accepts: is_empty,
        why: "suffix (insertion) is not supported",
    },
    Unsupported {
        name: "logit_bias",
        accepts: is_empty,
        why: "logit_bias is not supported",
    },
    Unsupported {
        name: "presence_penalty",
        accepts: is_zero,
        why: "presence_penalty is not supported; only 0",
    },
    Unsupported {
        name: "frequency_penalty",
        accepts: is_zero,
        why: "frequency_penalty is not supported; only 0",
    },
    Unsupported {
        name: "repetition_penalty",
        accepts: is_one,
        why: "repetition_penalty is not supported; only 1",
    },
    Unsupported {
        name: "store",
        accepts: is_false,
        why: "stored completions are not supported",
    },
    Unsupported {
        name: "metadata",
        accepts: is_empty,
        why: "metadata is only for stored completions, which are not supported",
    },
    Unsupported {
        name: "service_tier",
        accepts: is_default_tier,
        why: "service tiers are not supported; only \"auto\" or \"default\"",
    },
    Unsupported {
        name: "modalities",
        accepts: is_text_only,
        why: "only text output is supported",
    },
    Unsupported {
        name: "audio",
        accepts: never,
        why: "audio output is not supported",
    },
    Unsupported {
        name: "prediction",
        accepts: never,
        why: "predicted outputs are not supported",
    },
    Unsupported {
        name: "reasoning_effort",
        accepts: never,
        why: "reasoning_effort is not supported",
    },
    Unsupported {
        name: "web_search_options",
        accepts: never,
        why: "web search is not supported",
    },
];

/// Checks every top-level field of a request body: honoured fields (`COMMON` and `own`) pass;
/// known but unsupported fields pass only with a value that asks for nothing (null counts as
/// absent); any other field is refused by name.
pub fn check(body: &Value, own: &[&str]) -> Result<(), ApiError> {
    let Some(fields) = body.as_object() else {
        return Err(ApiError::invalid(
            "body",
            "the request body must be a JSON object",
        ));
    };
    for (name, value) in fields {
        if COMMON.contains(&name.as_str()) || own.contains(&name.as_str()) {
            continue;
        }
        if value.is_null() {
            continue;
        }
        match UNSUPPORTED.iter().find(|u| u.name == name) {
            Some(u) if (u.accepts)(value) => {}
            Some(u) => return Err(ApiError::invalid(name.clone(), u.why)),
            None => {
                return Err(ApiError::invalid(
                    name.clone(),
                    format!("unrecognized request argument supplied: {name}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(body: Value, own: &[&str]) -> Option<String> {
        check(&body, own).err().and_then(|e| e.param)
    }

    #[test]
    fn every_unsupported_field_is_refused_by_name_and_its_default_accepted() {
        for field in [
            "tools",
            "functions",
            "response_format",
            "best_of",
            "echo",
            "suffix",
            "logit_bias",
            "presence_penalty",
        ] {
            let asks = match field {
                "tools" | "functions" => json!([{"type": "function"}]),
                "response_format" => json!({"type": "json_object"}),
                "echo" => json!(true),
                "best_of" => json!(3),
                "suffix" => json!("tail"),
                "logit_bias" => json!({"50256": -100}),
                _ => json!(0.5),
            };
            assert_eq!(
                refused(json!({ field: asks }), CHAT).as_deref(),
                Some(field)
            );
        }
        for ok in [
            json!({"logprobs": false, "echo": false, "tools": [], "presence_penalty": 0}),
            json!({"response_format": {"type": "text"}, "best_of": 1, "suffix": null}),
            json!({"store": false, "modalities": ["text"], "service_tier": "auto"}),
        ] {
            assert_eq!(refused(ok.clone(), CHAT), None, "{ok}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_and_own_fields_pass() {
        assert_eq!(
            refused(json!({"max_token": 5}), CHAT).as_deref(),
            Some("max_token")
        );
        assert_eq!(
            refused(json!({"prompt": "x"}), CHAT).as_deref(),
            Some("prompt")
        );
        assert_eq!(refused(json!({"prompt": "x"}), COMPLETIONS), None);
        assert_eq!(refused(json!([1, 2]), COMPLETIONS).as_deref(), Some("body"));
    }
}
