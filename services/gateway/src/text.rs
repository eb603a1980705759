//! Text on top of a token stream: incremental detokenisation (never splitting a multi-byte
//! character) and stop strings (never emitting text past one, nor a partial one too early).

use std::sync::Arc;

use preble_protocol::{ErrorCode, FinishReason, TokenLogprob, Usage};

use crate::error::ApiError;
use crate::models::ServedModel;
use crate::openai::{LOGPROB_FLOOR, TokenChoice};
use crate::relay::{Generation, RelayEvent};

/// Turns token ids into text deltas as they arrive.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Adds tokens; returns the text they complete (possibly empty while a character is
    /// incomplete).
    pub fn push(&mut self, model: &ServedModel, new: &[u32]) -> Result<String, ApiError> {
        self.ids.extend_from_slice(new);
        let (prefix, full) = self.decode_window(model)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
        } else {
            Ok(String::new())
        }
    }

    /// Whatever text is still held back (at the end of the stream).
    pub fn finish(&mut self, model: &ServedModel) -> Result<String, ApiError> {
        let (prefix, full) = self.decode_window(model)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }

    fn decode_window(&self, model: &ServedModel) -> Result<(String, String), ApiError> {
        let decode = |ids: &[u32]| {
            model.tokenizer.decode(ids, true).map_err(|e| {
                ApiError::new(ErrorCode::Internal, format!("detokenisation failed: {e}"))
            })
        };
        Ok((
            decode(&self.ids[self.prefix_offset..self.read_offset])?,
            decode(&self.ids[self.prefix_offset..])?,
        ))
    }
}

/// Finds stop strings in streamed text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Adds text; returns the text safe to emit and whether a stop string was reached (the
    /// stop string itself and anything after it are never emitted).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that could still become a stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| {
                        self.held.is_char_boundary(self.held.len() - n)
                            && s.is_char_boundary(n)
                            && self.held.ends_with(&s[..n])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The held-back text, at the end of the stream.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// What a text generation yields.
#[derive(Clone, Debug, PartialEq)]
pub enum TextEvent {
    /// New text and the tokens it came from.
    Delta {
        /// The text (empty only for the last tokens of a stream that decode to nothing).
        text: String,
        /// The tokens.
        token_ids: Vec<u32>,
        /// Their log-probabilities, when the request asked for them.
        logprobs: Vec<TokenLogprob>,
    },
    /// The end.
    Done {
        /// Why it stopped.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
}

/// A generation seen as text.
pub struct TextGeneration {
    generation: Option<Generation>,
    model: Arc<ServedModel>,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    prompt_tokens: u32,
    completion_tokens: u32,
    done: bool,
    pending_done: Option<(FinishReason, Usage)>,
    unsent_ids: Vec<u32>,
    unsent_logprobs: Vec<TokenLogprob>,
}

impl TextGeneration {
    /// Wraps a submitted generation.
    pub fn new(
        generation: Generation,
        model: Arc<ServedModel>,
        stops: Vec<String>,
        prompt_tokens: u32,
    ) -> Self {
        Self {
            generation: Some(generation),
            model,
            detokenizer: Detokenizer::default(),
            stop: StopMatcher::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            done: false,
            pending_done: None,
            unsent_ids: Vec::new(),
            unsent_logprobs: Vec::new(),
        }
    }

    /// The next event; `None` after the end.
    pub async fn next(&mut self) -> Option<Result<TextEvent, ApiError>> {
        if let Some((finish_reason, usage)) = self.pending_done.take() {
            return Some(Ok(TextEvent::Done {
                finish_reason,
                usage,
            }));
        }
        loop {
            if self.done {
                return None;
            }
            let generation = self.generation.as_mut()?;
            let event = match generation.next().await? {
                Ok(event) => event,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            match event {
                RelayEvent::Tokens(ids, logprobs) => {
                    self.completion_tokens =
                        self.completion_tokens.saturating_add(ids.len() as u32);
                    self.unsent_ids.extend_from_slice(&ids);
                    self.unsent_logprobs.extend(logprobs);
                    let text = match self.detokenizer.push(&self.model, &ids) {
                        Ok(t) => t,
                        Err(e) => return Some(Err(e)),
                    };
                    let (text, stopped) = self.stop.push(&text);
                    if stopped {
                        // Dropping the generation cancels the rest on the worker.
                        self.generation = None;
                        self.done = true;
                        let usage = Usage {
                            prompt_tokens: self.prompt_tokens,
                            cached_tokens: 0,
                            completion_tokens: self.completion_tokens,
                        };
                        return Some(Ok(self.with_text(text, FinishReason::Stop, usage)));
                    }
                    if !text.is_empty() {
                        return Some(Ok(TextEvent::Delta {
                            text,
                            token_ids: std::mem::take(&mut self.unsent_ids),
                            logprobs: std::mem::take(&mut self.unsent_logprobs),
                        }));
                    }
                }
                // `cancelled` is not an OpenAI finish reason: a request stopped before its end
                // ends with the `cancelled` error instead.
                RelayEvent::Final {
                    finish_reason: FinishReason::Cancelled,
                    ..
                } => {
                    self.done = true;
                    return Some(Err(ApiError::new(
                        ErrorCode::Cancelled,
                        "the request was cancelled before it finished",
                    )));
                }
                RelayEvent::Final {
                    finish_reason,
                    usage,
                } => {
                    self.done = true;
                    let mut tail = match self.detokenizer.finish(&self.model) {
                        Ok(t) => self.stop.push(&t).0,
                        Err(e) => return Some(Err(e)),
                    };
                    tail.push_str(&self.stop.finish());
                    return Some(Ok(self.with_text(tail, finish_reason, usage)));
                }
            }
        }
    }

    /// A final event, preceded by leftover text (and the tokens not yet sent) when there is
    /// some.
    fn with_text(&mut self, text: String, finish_reason: FinishReason, usage: Usage) -> TextEvent {
        let token_ids = std::mem::take(&mut self.unsent_ids);
        let logprobs = std::mem::take(&mut self.unsent_logprobs);
        if text.is_empty() && token_ids.is_empty() {
            TextEvent::Done {
                finish_reason,
                usage,
            }
        } else {
            self.pending_done = Some((finish_reason, usage));
            TextEvent::Delta {
                text,
                token_ids,
                logprobs,
            }
        }
    }
}

/// The tokens of a delta with their log-probabilities, every id decoded to text.
pub fn token_choices(
    model: &ServedModel,
    token_ids: &[u32],
    logprobs: &[TokenLogprob],
) -> Result<Vec<TokenChoice>, ApiError> {
    let text_of = |id: u32| {
        model
            .tokenizer
            .decode(&[id], false)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("detokenisation failed: {e}")))
    };
    let floor = |lp: f32| {
        if lp.is_nan() {
            LOGPROB_FLOOR
        } else {
            lp.max(LOGPROB_FLOOR)
        }
    };
    token_ids
        .iter()
        .zip(logprobs)
        .map(|(&id, lp)| {
            Ok(TokenChoice {
                text: text_of(id)?,
                logprob: floor(lp.logprob),
                top: lp
                    .top
                    .iter()
                    .map(|&(alt, alt_lp)| Ok((text_of(alt)?, floor(alt_lp))))
                    .collect::<Result<_, ApiError>>()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back_partial_matches() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("hello ST"), ("hello ".to_string(), false));
        assert_eq!(m.push("OPPED"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xa"), ("x".to_string(), false));
        assert_eq!(m.push("c"), ("ac".to_string(), false));
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.finish(), "a");
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("café"), ("caf".to_string(), false));
        assert_eq!(m.push("?"), ("é?".to_string(), false));
    }
}
