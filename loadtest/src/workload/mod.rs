//! Workloads: the requests a run sends, independent of how they are sent.
//!
//! A prompt is a list of [`Segment`]s, each a deterministic run of token ids named by a seed,
//! so requests that share a prefix share the seeds of its segments. This keeps a workload of a
//! million long prompts small (in memory and on disk) while every mode (simulator, live HTTP,
//! live NATS) sees exactly the same token ids.
//!
//! Layout:
//! - [`synth`]: generators of Preble's five workloads (paper Table 1) and their mix.
//! - [`arrivals`]: arrival processes (Poisson, or the timestamps of a trace).
//! - [`trace`]: public trace formats (Azure LLM inference CSV, Mooncake JSON lines).
//! - [`stats`]: what a workload looks like (to check a generator against the paper).

pub mod arrivals;
pub mod stats;
pub mod synth;
pub mod trace;

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Lowest token id a prompt uses (ids below are special tokens in the sim model's vocabulary).
pub const FIRST_PROMPT_TOKEN: u32 = 5;
/// One past the highest token id a prompt uses: the vocabulary of the model `make model`
/// generates, so workloads drive the live stack as well as the simulator.
pub const PROMPT_VOCAB: u32 = 578;

/// A run of `len` tokens named by `seed`: equal seeds mean equal tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// Names the tokens (kept below 2^53 so any JSON reader keeps it exact).
    pub seed: u64,
    /// Number of tokens.
    pub len: u32,
}

impl Segment {
    /// The `i`-th token of this segment.
    pub fn token(&self, i: u32) -> u32 {
        let span = u64::from(PROMPT_VOCAB - FIRST_PROMPT_TOKEN);
        let h = preble_prefix::mix64(self.seed ^ preble_prefix::mix64(u64::from(i) + 1));
        FIRST_PROMPT_TOKEN + (h % span) as u32
    }

    /// Appends this segment's tokens to `out`.
    pub fn write_tokens(&self, out: &mut Vec<u32>) {
        out.extend((0..self.len).map(|i| self.token(i)));
    }
}

/// Keeps a seed exact in JSON (below 2^53).
pub fn json_safe_seed(x: u64) -> u64 {
    x & ((1u64 << 53) - 1)
}

/// One request of a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Position in the workload (unique).
    pub id: u64,
    /// Arrival time, milliseconds from the start of the run.
    pub at_ms: f64,
    /// The prompt, as segments.
    pub segments: Vec<Segment>,
    /// Tokens to generate (sent as `max_tokens`, with end-of-sequence ignored).
    pub output_tokens: u32,
    /// Which workload it comes from (`toolbench`, `loogle`, a trace name...).
    pub kind: String,
    /// The prefix this request shares with others (its key portion), for reports.
    #[serde(default)]
    pub key: u64,
}

impl Request {
    /// Prompt length in tokens.
    pub fn prompt_len(&self) -> u32 {
        self.segments
            .iter()
            .fold(0u32, |total, s| total.saturating_add(s.len))
    }

    /// The prompt's token ids.
    pub fn prompt(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.prompt_len() as usize);
        for s in &self.segments {
            s.write_tokens(&mut out);
        }
        out
    }
}

/// Why a workload file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// A line is not a request.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// A list of requests in arrival order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workload {
    /// The requests, sorted by `at_ms`.
    pub requests: Vec<Request>,
}

impl Workload {
    /// A workload of `requests`, sorted by arrival.
    pub fn new(mut requests: Vec<Request>) -> Self {
        requests.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms).then(a.id.cmp(&b.id)));
        Self { requests }
    }

    /// Time of the last arrival, milliseconds.
    pub fn span_ms(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.at_ms)
    }

    /// Keeps the first `n` requests.
    pub fn truncate(&mut self, n: usize) {
        self.requests.truncate(n);
    }

    /// Writes one JSON object per line.
    pub fn save(&self, path: &Path) -> Result<(), WorkloadError> {
        let io = |source| WorkloadError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut out = BufWriter::new(std::fs::File::create(path).map_err(io)?);
        for r in &self.requests {
            serde_json::to_writer(&mut out, r).map_err(|e| io(e.into()))?;
            out.write_all(b"\n").map_err(io)?;
        }
        out.flush().map_err(io)
    }

    /// Reads a file written by [`Workload::save`] (blank lines are skipped).
    pub fn load(path: &Path) -> Result<Self, WorkloadError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| WorkloadError::Io {
            path: name.clone(),
            source,
        })?;
        let mut requests = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| WorkloadError::Io {
                path: name.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let request: Request =
                serde_json::from_str(&line).map_err(|e| WorkloadError::Parse {
                    path: name.clone(),
                    line: i + 1,
                    message: e.to_string(),
                })?;
            if request.segments.is_empty() || request.prompt_len() == 0 {
                return Err(WorkloadError::Parse {
                    path: name,
                    line: i + 1,
                    message: "empty prompt".into(),
                });
            }
            requests.push(request);
        }
        Ok(Self::new(requests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_seeds_give_equal_tokens_within_the_vocabulary() {
        let a = Segment { seed: 7, len: 300 };
        let mut x = Vec::new();
        a.write_tokens(&mut x);
        let mut y = Vec::new();
        a.write_tokens(&mut y);
        assert_eq!(x, y);
        assert!(
            x.iter()
                .all(|t| (FIRST_PROMPT_TOKEN..PROMPT_VOCAB).contains(t))
        );
        let mut z = Vec::new();
        Segment { seed: 8, len: 300 }.write_tokens(&mut z);
        assert!(x.iter().zip(&z).filter(|(a, b)| a == b).count() < 10);
    }

    #[test]
    fn files_round_trip_and_bad_lines_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.jsonl");
        let w = Workload::new(vec![
            Request {
                id: 1,
                at_ms: 5.0,
                segments: vec![Segment { seed: 1, len: 3 }],
                output_tokens: 2,
                kind: "t".into(),
                key: 1,
            },
            Request {
                id: 0,
                at_ms: 1.0,
                segments: vec![Segment { seed: 2, len: 4 }],
                output_tokens: 1,
                kind: "t".into(),
                key: 2,
            },
        ]);
        assert_eq!(w.requests[0].id, 0, "sorted by arrival");
        w.save(&path).unwrap();
        assert_eq!(Workload::load(&path).unwrap(), w);
        std::fs::write(&path, "{\"id\": 1}\n").unwrap();
        let err = Workload::load(&path).unwrap_err().to_string();
        assert!(err.contains(":1:"), "{err}");
    }
}
