//! Drives a running stack with a workload, open loop (each request leaves at its arrival time
//! whatever the others are doing), over the OpenAI HTTP API with streaming or over the NATS
//! request API, and measures from the client side.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use preble_protocol::subjects::Subjects;
use preble_protocol::{ApiEvent, ApiEventBody, ApiRequest, PROTOCOL_VERSION, decode, encode};
use serde_json::{Value, json};

use crate::report::{RequestRecord, RunResult};
use crate::workload::Request;

/// How requests reach the stack.
#[derive(Clone, Debug)]
pub enum Transport {
    /// `POST /v1/completions` with `stream: true`.
    Http {
        /// Gateway base URL, e.g. `http://127.0.0.1:8000`.
        base_url: String,
        /// Bearer token, when the gateway wants one.
        api_key: Option<String>,
    },
    /// The gateway's NATS request API.
    Nats {
        /// NATS server URL.
        url: String,
        /// Subject prefix of the deployment.
        subject_prefix: String,
        /// NATS user and password (the deployment's `client` identity), if the server wants
        /// them.
        credentials: Option<(String, String)>,
        /// API key, when the gateway wants one (sent as an `Authorization` header).
        api_key: Option<String>,
    },
}

/// A live run's setup.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// How to send.
    pub transport: Transport,
    /// Served model name.
    pub model: String,
    /// A request still unfinished after this is abandoned and counted as timed out.
    pub request_timeout: Duration,
}

/// The first model the gateway at `base_url` lists.
pub async fn first_model(base_url: &str) -> Result<String> {
    let models: Value = reqwest::get(format!("{}/v1/models", base_url.trim_end_matches('/')))
        .await?
        .error_for_status()?
        .json()
        .await?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .context("the gateway lists no model")
}

/// What one request saw, relative to its own send time.
#[derive(Default)]
struct Outcome {
    first_token: Option<Duration>,
    end: Option<Duration>,
    cached_tokens: u32,
    output_tokens: u32,
    error: Option<String>,
}

enum Sender {
    Http {
        client: reqwest::Client,
        url: String,
        api_key: Option<String>,
    },
    Nats {
        client: async_nats::Client,
        subject: String,
        api_key: Option<String>,
    },
}

/// Sends `requests` at their arrival times and waits for all of them; `progress` gets the
/// number ended so far.
pub async fn run(
    requests: &[Request],
    config: &LiveConfig,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<RunResult> {
    let sender = Arc::new(match &config.transport {
        Transport::Http { base_url, api_key } => Sender::Http {
            client: reqwest::Client::new(),
            url: format!("{}/v1/completions", base_url.trim_end_matches('/')),
            api_key: api_key.clone(),
        },
        Transport::Nats {
            url,
            subject_prefix,
            credentials,
            api_key,
        } => Sender::Nats {
            client: match credentials {
                Some((user, password)) => async_nats::ConnectOptions::with_user_and_password(
                    user.clone(),
                    password.clone(),
                ),
                None => async_nats::ConnectOptions::new(),
            }
            .connect(url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?,
            subject: Subjects::new(subject_prefix.clone()).api_generate(),
            api_key: api_key.clone(),
        },
    });
    let started = Instant::now();
    let ended = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(requests.len());
    for request in requests {
        tokio::time::sleep_until((started + Duration::from_secs_f64(request.at_ms / 1e3)).into())
            .await;
        progress(ended.load(Ordering::Relaxed));
        let (sender, ended) = (sender.clone(), ended.clone());
        let (prompt, max_tokens) = (request.prompt(), request.output_tokens);
        let (model, timeout) = (config.model.clone(), config.request_timeout);
        tasks.push(tokio::spawn(async move {
            let sent = started.elapsed();
            let t0 = Instant::now();
            let outcome =
                match tokio::time::timeout(timeout, send(&sender, &model, prompt, max_tokens, t0))
                    .await
                {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(e)) => Outcome {
                        end: Some(t0.elapsed()),
                        error: Some(format!("{e:#}")),
                        ..Outcome::default()
                    },
                    Err(_) => Outcome {
                        error: Some(format!("timeout after {} s", timeout.as_secs())),
                        ..Outcome::default()
                    },
                };
            ended.fetch_add(1, Ordering::Relaxed);
            (sent, outcome)
        }));
    }
    let mut records = Vec::with_capacity(requests.len());
    let mut waiting = futures::future::join_all(tasks);
    let results = loop {
        tokio::select! {
            results = &mut waiting => break results,
            _ = tokio::time::sleep(Duration::from_millis(200)) => progress(ended.load(Ordering::Relaxed)),
        }
    };
    progress(ended.load(Ordering::Relaxed));
    for (request, result) in requests.iter().zip(results) {
        let (sent, outcome) = result.context("a request task panicked")?;
        let at = |d: Duration| (sent + d).as_secs_f64() * 1e3;
        records.push(RequestRecord {
            id: request.id,
            sent_ms: sent.as_secs_f64() * 1e3,
            first_token_ms: outcome.first_token.map(at),
            end_ms: outcome.end.map(at),
            prompt_tokens: request.prompt_len(),
            cached_tokens: outcome.cached_tokens,
            output_tokens: outcome.output_tokens,
            worker: None,
            decision: None,
            error: outcome.error,
            lower_bound_ms: None,
        });
    }
    Ok(RunResult {
        mode: match config.transport {
            Transport::Http { .. } => "live-http".into(),
            Transport::Nats { .. } => "live-nats".into(),
        },
        records,
        wall_s: started.elapsed().as_secs_f64(),
        ..RunResult::default()
    })
}

async fn send(
    sender: &Sender,
    model: &str,
    prompt: Vec<u32>,
    max_tokens: u32,
    t0: Instant,
) -> Result<Outcome> {
    match sender {
        Sender::Http {
            client,
            url,
            api_key,
        } => {
            let body = json!({
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
                "ignore_eos": true,
            });
            let mut builder = client.post(url).json(&body);
            if let Some(key) = api_key {
                builder = builder.bearer_auth(key);
            }
            let response = builder.send().await.context("sending")?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                bail!("HTTP {status}: {text}");
            }
            read_sse(response, t0).await
        }
        Sender::Nats {
            client,
            subject,
            api_key,
        } => {
            let mut request = ApiRequest::completion(model, "");
            request.v = PROTOCOL_VERSION;
            request.prompt = None;
            request.prompt_tokens = Some(prompt);
            request.max_tokens = Some(max_tokens);
            request.ignore_eos = true;
            let inbox = client.new_inbox();
            let mut replies = client.subscribe(inbox.clone()).await?;
            let mut headers = async_nats::HeaderMap::new();
            if let Some(key) = api_key {
                headers.insert("Authorization", format!("Bearer {key}").as_str());
            }
            client
                .publish_with_reply_and_headers(
                    subject.clone(),
                    inbox,
                    headers,
                    encode(&request).into(),
                )
                .await?;
            let mut outcome = Outcome::default();
            while let Some(message) = replies.next().await {
                let event: ApiEvent = decode(&message.payload).context("malformed API event")?;
                match event.body {
                    ApiEventBody::Delta { .. } => {
                        outcome.first_token.get_or_insert_with(|| t0.elapsed());
                    }
                    ApiEventBody::Done { usage, .. } => {
                        outcome.end = Some(t0.elapsed());
                        outcome.cached_tokens = usage.cached_tokens;
                        outcome.output_tokens = usage.completion_tokens;
                        return Ok(outcome);
                    }
                    ApiEventBody::Error { code, message } => {
                        bail!("{}: {message}", code.as_str())
                    }
                }
            }
            bail!("the reply subscription ended before the request did")
        }
    }
}

/// Reads an OpenAI completion SSE stream to its end.
async fn read_sse(response: reqwest::Response, t0: Instant) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut stream = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        buffer.extend_from_slice(&chunk.context("reading the stream")?);
        while let Some(pos) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..pos + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    outcome.end = Some(t0.elapsed());
                    return Ok(outcome);
                }
                let value: Value = serde_json::from_str(data).context("malformed SSE chunk")?;
                if let Some(error) = value.get("error") {
                    bail!("stream error: {error}");
                }
                let has_token = value["choices"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["finish_reason"].is_null()));
                if has_token {
                    outcome.first_token.get_or_insert_with(|| t0.elapsed());
                }
                if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
                    outcome.output_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as u32;
                    outcome.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0) as u32;
                }
            }
        }
    }
    bail!("the stream ended without [DONE]")
}
