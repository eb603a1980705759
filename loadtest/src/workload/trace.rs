//! Public trace formats, replayed as workloads.
//!
//! - **Azure LLM inference trace** (CSV with header `TIMESTAMP,ContextTokens,GeneratedTokens`;
//!   timestamps like `2023-11-16 18:15:46.6805900`, or plain seconds): arrival times and
//!   lengths only. The trace says nothing about content, so every prompt is unique; to give a
//!   synthetic workload the trace's timing instead, use its timestamps as arrivals.
//! - **Mooncake trace** (JSON lines: `timestamp` in ms, `input_length`, `output_length`,
//!   `hash_ids`): each hash id names one 512-token block and equal ids mean equal prefixes,
//!   so the replay keeps the trace's prefix sharing exactly.

use std::path::Path;

use serde::Deserialize;

use super::{Request, Segment, WorkloadError, json_safe_seed};

/// Tokens per Mooncake hash block.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

fn read(path: &Path) -> Result<String, WorkloadError> {
    std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn parse_error(source: &str, line: usize, message: impl Into<String>) -> WorkloadError {
    WorkloadError::Parse {
        path: source.to_string(),
        line,
        message: message.into(),
    }
}

/// Milliseconds of a timestamp `YYYY-MM-DD HH:MM:SS[.fraction]` since 1970, or of plain
/// seconds; `None` for anything else, a date out of range or a time that is not finite.
fn timestamp_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Some(seconds * 1e3).filter(|ms| ms.is_finite());
    }
    let (date, time) = text.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    if !(0..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.trim_end_matches('Z').split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let s = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (proleptic Gregorian).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days as f64 * 24.0 + h) * 60.0 + min) * 60e3 + s * 1e3).filter(|ms| ms.is_finite())
}

/// Reads an Azure LLM inference trace.
pub fn load_azure(path: &Path) -> Result<Vec<Request>, WorkloadError> {
    parse_azure(&read(path)?, &path.display().to_string())
}

/// Parses an Azure LLM inference trace's text; errors name `source` and the line.
pub fn parse_azure(text: &str, source: &str) -> Result<Vec<Request>, WorkloadError> {
    let path = source;
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| parse_error(path, 1, e.to_string()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
            .ok_or_else(|| parse_error(path, 1, format!("no {name} column")))
    };
    let (ts, ctx, generated) = (
        column("TIMESTAMP")?,
        column("ContextTokens")?,
        column("GeneratedTokens")?,
    );
    let mut requests = Vec::new();
    let mut origin = None;
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| parse_error(path, line, e.to_string()))?;
        let field = |c: usize| record.get(c).unwrap_or("");
        let at = timestamp_ms(field(ts))
            .ok_or_else(|| parse_error(path, line, format!("bad timestamp {:?}", field(ts))))?;
        let number = |c: usize, what: &str| {
            field(c)
                .parse::<u32>()
                .map_err(|_| parse_error(path, line, format!("bad {what} {:?}", field(c))))
        };
        let (prompt, output) = (
            number(ctx, "ContextTokens")?,
            number(generated, "GeneratedTokens")?,
        );
        let origin = *origin.get_or_insert(at);
        let id = requests.len() as u64;
        requests.push(Request {
            id,
            at_ms: at - origin,
            segments: vec![Segment {
                seed: json_safe_seed(preble_prefix::mix64(0xa2u64 << 56 | id)),
                len: prompt.max(1),
            }],
            output_tokens: output.max(1),
            kind: "azure".into(),
            key: id,
        });
    }
    Ok(requests)
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// Reads a Mooncake trace.
pub fn load_mooncake(path: &Path) -> Result<Vec<Request>, WorkloadError> {
    parse_mooncake(&read(path)?, &path.display().to_string())
}

/// Parses a Mooncake trace's text; errors name `source` and the line.
pub fn parse_mooncake(text: &str, source: &str) -> Result<Vec<Request>, WorkloadError> {
    let path = source;
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: MooncakeLine =
            serde_json::from_str(line).map_err(|e| parse_error(path, i + 1, e.to_string()))?;
        if !m.timestamp.is_finite() {
            return Err(parse_error(path, i + 1, "timestamp is not a finite number"));
        }
        if m.hash_ids.is_empty() || m.input_length == 0 {
            return Err(parse_error(path, i + 1, "no prompt blocks"));
        }
        let Some(blocks) = u32::try_from(m.hash_ids.len())
            .ok()
            .filter(|&b| b <= u32::MAX / MOONCAKE_BLOCK_TOKENS)
        else {
            return Err(parse_error(
                path,
                i + 1,
                "more prompt blocks than tokens fit",
            ));
        };
        let last = m
            .input_length
            .saturating_sub(MOONCAKE_BLOCK_TOKENS * (blocks - 1))
            .clamp(1, MOONCAKE_BLOCK_TOKENS);
        let segments = m
            .hash_ids
            .iter()
            .enumerate()
            .map(|(j, &h)| Segment {
                seed: json_safe_seed(preble_prefix::mix64(0x3cu64 << 56 ^ h)),
                len: if j as u32 + 1 == blocks {
                    last
                } else {
                    MOONCAKE_BLOCK_TOKENS
                },
            })
            .collect();
        let id = requests.len() as u64;
        requests.push(Request {
            id,
            at_ms: m.timestamp,
            segments,
            output_tokens: m.output_length.max(1),
            kind: "mooncake".into(),
            key: m.hash_ids[0],
        });
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_csv_gives_times_and_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("azure.csv");
        std::fs::write(
            &path,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:46.6805900,374,44\n\
             2023-11-16 18:15:50.9951690,396,109\n\
             2023-11-17 00:00:00.0,10,1\n",
        )
        .unwrap();
        let rs = load_azure(&path).unwrap();
        assert_eq!(rs.len(), 3);
        assert!((rs[1].at_ms - 4314.579).abs() < 0.01, "{}", rs[1].at_ms);
        assert_eq!(rs[1].prompt_len(), 396);
        assert_eq!(rs[1].output_tokens, 109);
        assert!(rs[2].at_ms > 5.0 * 3600e3, "crosses midnight");
        std::fs::write(&path, "TIMESTAMP,ContextTokens,GeneratedTokens\nnoon,1,1\n").unwrap();
        let err = load_azure(&path).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("timestamp"), "{err}");
        for bad in [
            "inf",
            "2023-9223372036854775807-01 00:00:00",
            "-9223372036854775808-01-01 00:00:00",
            "2023-11-16 1e308:00:00",
        ] {
            let text = format!("TIMESTAMP,ContextTokens,GeneratedTokens\n{bad},1,1\n");
            let err = parse_azure(&text, "t.csv").unwrap_err().to_string();
            assert!(
                err.contains("t.csv:2:") && err.contains("timestamp"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn mooncake_blocks_share_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(
            &path,
            "{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 5, \"hash_ids\": [1, 2, 3]}\n\
             {\"timestamp\": 40, \"input_length\": 700, \"output_length\": 9, \"hash_ids\": [1, 4]}\n",
        )
        .unwrap();
        let rs = load_mooncake(&path).unwrap();
        assert_eq!(rs[0].prompt_len(), 1100);
        assert_eq!(rs[1].prompt_len(), 700);
        let (a, b) = (rs[0].prompt(), rs[1].prompt());
        assert_eq!(preble_prefix::common_prefix_len(&a, &b), 512);
        std::fs::write(&path, "{\"timestamp\": 0}\n").unwrap();
        assert!(load_mooncake(&path).is_err());
    }
}
