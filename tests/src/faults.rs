//! The fault suite: each fault injected into a running stack under load, and what its clients
//! saw.
//!
//! Every fault runs on a fresh stack of its own: a NATS server and a Redis of its own, a
//! scheduler persisting to that Redis, sim workers and two gateways. Clients stream
//! completions spread over both gateways, and retry a request whose connection broke on the
//! next gateway, at most twice (as the official `openai` client retries connection errors).
//! Each request ends as one of:
//! - **completed**: the stream ended with `[DONE]` and the whole output (`ignore_eos`, so
//!   exactly `max_tokens`);
//! - **refused**: 429 or 503, answered at once with `Retry-After`;
//! - **failed**: any other error status or error event;
//! - **lost**: no end within the deadline, or broken on every attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{Options, RedisServer, TestCluster, free_port};

/// One fault the suite injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A worker is SIGKILLed.
    WorkerKill,
    /// The scheduler is SIGKILLed and started again a second later.
    SchedulerKill,
    /// Redis is killed and an empty one started 3 s later.
    RedisRestart,
    /// The NATS server is killed and started again 4 s later.
    NatsRestart,
    /// One of the two gateways is SIGKILLed.
    GatewayKill,
    /// Far more concurrent requests than the gateways admit, all at once.
    Overload,
}

impl Fault {
    /// Every fault, in the order the suite runs them.
    pub const ALL: [Fault; 6] = [
        Fault::WorkerKill,
        Fault::SchedulerKill,
        Fault::RedisRestart,
        Fault::NatsRestart,
        Fault::GatewayKill,
        Fault::Overload,
    ];

    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker-kill",
            Fault::SchedulerKill => "scheduler-kill",
            Fault::RedisRestart => "redis-restart",
            Fault::NatsRestart => "nats-restart",
            Fault::GatewayKill => "gateway-kill",
            Fault::Overload => "overload",
        }
    }

    /// The fault called `name`.
    pub fn parse(name: &str) -> Result<Fault> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .with_context(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault {name:?} (one of {})", names.join(", "))
            })
    }
}

/// The load and the stack each fault runs under.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// Streaming requests per fault (except the overload).
    pub requests: usize,
    /// Over how long they are sent, evenly; the fault strikes at 40% of it.
    pub spread: Duration,
    /// Tokens each request generates.
    pub max_tokens: u32,
    /// Sim workers.
    pub workers: usize,
    /// The sim workers' time multiplier (1: as fast as the modelled GPU).
    pub time_scale: f64,
    /// Requests sent at once by the overload.
    pub overload_requests: usize,
    /// Tokens each overload request generates.
    pub overload_max_tokens: u32,
    /// Requests each gateway admits at once during the overload (`PREBLE_MAX_IN_FLIGHT`).
    pub overload_limit: usize,
    /// How long a request may take before it counts as lost.
    pub deadline: Duration,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        Self {
            requests: 600,
            spread: Duration::from_secs(10),
            max_tokens: 64,
            workers: 4,
            time_scale: 1.0,
            overload_requests: 3000,
            overload_max_tokens: 256,
            overload_limit: 512,
            deadline: Duration::from_secs(60),
        }
    }
}

/// What the clients of one fault saw.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultReport {
    /// The fault.
    pub fault: Fault,
    /// Requests sent.
    pub sent: usize,
    /// Completed whole.
    pub completed: usize,
    /// Refused at once (429 or 503).
    pub refused: usize,
    /// Ended with an error.
    pub failed: usize,
    /// Never ended, or broken on every attempt.
    pub lost: usize,
    /// Attempts the clients made again on the other gateway after a broken connection.
    pub client_retries: usize,
    /// Requests the gateways queued again after losing their worker or stream (the live
    /// gateways' `preble:requests_resubmitted_total`).
    pub resubmitted: u64,
    /// Of those, streams that had shown output and resumed (`preble:streams_resumed_total`).
    pub resumed: u64,
    /// The longest a client waited for its answer to start (status and first event).
    pub slowest_answer: Duration,
    /// The slowest refusal.
    pub slowest_refusal: Duration,
    /// 99th percentile latency of the completed requests.
    pub p99_latency: Duration,
    /// From the fault to the first token of a request sent after it (`None`: no such
    /// request, or no fault struck at a moment).
    pub recovery: Option<Duration>,
    /// The gateways' largest resident memory seen during the run, MiB.
    pub gateway_rss_mib: f64,
    /// The first few failures and losses, for the reader.
    pub examples: Vec<String>,
}

impl FaultReport {
    /// The report as JSON (times in seconds).
    pub fn to_json(&self) -> Value {
        json!({
            "fault": self.fault.name(),
            "sent": self.sent,
            "completed": self.completed,
            "refused": self.refused,
            "failed": self.failed,
            "lost": self.lost,
            "client_retries": self.client_retries,
            "resubmitted": self.resubmitted,
            "resumed": self.resumed,
            "slowest_answer_s": self.slowest_answer.as_secs_f64(),
            "slowest_refusal_s": self.slowest_refusal.as_secs_f64(),
            "p99_latency_s": self.p99_latency.as_secs_f64(),
            "recovery_s": self.recovery.map(|r| r.as_secs_f64()),
            "gateway_rss_mib": self.gateway_rss_mib,
            "examples": self.examples,
        })
    }
}

/// The suite's results as a Markdown table.
pub fn table(reports: &[FaultReport]) -> String {
    let mut out = String::from(
        "| fault | sent | completed | refused | failed | lost | client retries | resubmitted (resumed) | slowest answer (s) | slowest refusal (s) | p99 latency (s) | first token after the fault (s) | gateway RSS (MiB) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let recovery = r
            .recovery
            .map_or_else(|| "-".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {:.2} | {:.2} | {:.2} | {} | {:.0} |\n",
            r.fault.name(),
            r.sent,
            r.completed,
            r.refused,
            r.failed,
            r.lost,
            r.client_retries,
            r.resubmitted,
            r.resumed,
            r.slowest_answer.as_secs_f64(),
            r.slowest_refusal.as_secs_f64(),
            r.p99_latency.as_secs_f64(),
            recovery,
            r.gateway_rss_mib,
        ));
    }
    out
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq)]
enum End {
    Completed,
    Refused,
    Failed(String),
    Lost(String),
}

/// One request's story.
#[derive(Clone, Debug)]
struct Seen {
    end: End,
    sent_at: Instant,
    answered_after: Option<Duration>,
    first_token_at: Option<Instant>,
    finished_at: Instant,
    retries: usize,
}

/// One attempt's outcome.
enum Attempt {
    /// The request ended (well or not); no retry.
    Ended(End),
    /// The connection broke (no answer, or a stream cut short): worth another gateway.
    Broken(String),
}

/// Runs `fault` under load on a fresh stack; `progress` hears a line now and then.
pub async fn run_fault(
    fault: Fault,
    options: &SuiteOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<FaultReport> {
    let mut redis = RedisServer::start(free_port());
    let overload = fault == Fault::Overload;
    let mut gateway_env = Vec::new();
    if overload {
        gateway_env.push((
            "PREBLE_MAX_IN_FLIGHT".to_string(),
            options.overload_limit.to_string(),
        ));
    }
    let mut cluster = TestCluster::start(Options {
        workers: options.workers,
        time_scale: options.time_scale,
        auth: true,
        scheduler_args: ["--ack-wait-s", "2", "--redis-url", &redis.url()]
            .map(String::from)
            .to_vec(),
        gateway_env,
        ..Options::default()
    })
    .await?;
    let second = cluster.start_gateway().await?;
    let gateways = Arc::new(vec![cluster.gateway.clone(), second]);
    let (requests, spread, max_tokens) = if overload {
        (
            options.overload_requests,
            Duration::ZERO,
            options.overload_max_tokens,
        )
    } else {
        (options.requests, options.spread, options.max_tokens)
    };
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(requests);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    for i in 0..requests {
        let at = started + spread.mul_f64(i as f64 / requests.max(1) as f64);
        let body = json!({
            "model": cluster.model,
            "prompt": format!("Request {i} of the fault suite: tell a story about a {} cluster.", fault.name()),
            "max_tokens": max_tokens,
            "ignore_eos": true,
            "seed": i,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let gateways = gateways.clone();
        let http = http.clone();
        let done = done.clone();
        let deadline = options.deadline;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let seen = send(&http, &gateways, i, &body, max_tokens, deadline).await;
            done.fetch_add(1, Ordering::Relaxed);
            seen
        }));
    }
    let fault_at = started + spread.mul_f64(0.4);
    let mut rss_mib: f64 = 0.0;
    let mut injected = overload;
    let mut last_progress = Instant::now();
    while done.load(Ordering::Relaxed) < requests {
        if !injected && Instant::now() >= fault_at {
            progress(&format!("{}: striking", fault.name()));
            inject(fault, &mut cluster, &mut redis).await?;
            injected = true;
        }
        rss_mib = rss_mib.max(gateway_rss_mib(&cluster));
        if last_progress.elapsed() >= Duration::from_secs(2) {
            progress(&format!(
                "{}: {:.0} s, {} of {requests} requests ended",
                fault.name(),
                started.elapsed().as_secs_f64(),
                done.load(Ordering::Relaxed)
            ));
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > spread + options.deadline * 4 {
            bail!("{}: the load never ended", fault.name());
        }
    }
    let mut seen = Vec::with_capacity(requests);
    for task in tasks {
        seen.push(task.await.context("a client task")?);
    }
    let fault_moment = (!overload).then_some(fault_at);
    let mut report = summarise(fault, &seen, fault_moment, rss_mib);
    for gateway in gateways.iter() {
        let metrics = format!("{gateway}/metrics");
        // A killed gateway's counts are gone with it.
        let resubmitted = crate::scrape(&metrics, "preble:requests_resubmitted_total").await;
        let resumed = crate::scrape(&metrics, "preble:streams_resumed_total").await;
        report.resubmitted += resubmitted.unwrap_or(0.0) as u64;
        report.resumed += resumed.unwrap_or(0.0) as u64;
    }
    Ok(report)
}

/// Strikes.
async fn inject(fault: Fault, cluster: &mut TestCluster, redis: &mut RedisServer) -> Result<()> {
    match fault {
        Fault::WorkerKill => {
            if let Some(worker) = cluster.workers.first_mut() {
                worker.kill();
            }
        }
        Fault::SchedulerKill => {
            cluster.kill_scheduler();
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.start_scheduler()?;
        }
        Fault::RedisRestart => redis.restart(Duration::from_secs(3)).await,
        Fault::NatsRestart => {
            let nats = cluster
                .nats
                .as_mut()
                .context("the suite's stack has a NATS server of its own")?;
            nats.restart(Duration::from_secs(4)).await?;
        }
        Fault::GatewayKill => cluster.kill_gateway(),
        Fault::Overload => {}
    }
    Ok(())
}

/// Sends one request, on gateway `i % n` first and the next ones after a broken connection.
async fn send(
    http: &reqwest::Client,
    gateways: &[String],
    i: usize,
    body: &Value,
    max_tokens: u32,
    deadline: Duration,
) -> Seen {
    let sent_at = Instant::now();
    let mut seen = Seen {
        end: End::Lost("never tried".into()),
        sent_at,
        answered_after: None,
        first_token_at: None,
        finished_at: sent_at,
        retries: 0,
    };
    let attempts = gateways.len().max(1) + 1;
    for attempt in 0..attempts {
        let gateway = &gateways[(i + attempt) % gateways.len().max(1)];
        let left = deadline.saturating_sub(sent_at.elapsed());
        let outcome = tokio::time::timeout(
            left,
            stream_once(http, gateway, body, max_tokens, &mut seen),
        )
        .await;
        match outcome {
            Err(_) => {
                seen.end = End::Lost(format!("no end within {} s", deadline.as_secs()));
                break;
            }
            Ok(Attempt::Ended(end)) => {
                seen.end = end;
                break;
            }
            Ok(Attempt::Broken(why)) => {
                seen.end = End::Lost(format!("broken on every attempt: {why}"));
                if attempt + 1 < attempts {
                    seen.retries += 1;
                }
            }
        }
    }
    seen.finished_at = Instant::now();
    seen
}

/// One attempt at `gateway`.
async fn stream_once(
    http: &reqwest::Client,
    gateway: &str,
    body: &Value,
    max_tokens: u32,
    seen: &mut Seen,
) -> Attempt {
    let response = match http
        .post(format!("{gateway}/v1/completions"))
        .json(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Attempt::Broken(format!("connecting: {e}")),
    };
    let status = response.status().as_u16();
    seen.answered_after.get_or_insert(seen.sent_at.elapsed());
    if status == 429 || status == 503 {
        let retry_after = response.headers().contains_key("retry-after");
        return Attempt::Ended(if retry_after {
            End::Refused
        } else {
            End::Failed(format!("{status} without Retry-After"))
        });
    }
    if status != 200 {
        let text = response.text().await.unwrap_or_default();
        return Attempt::Ended(End::Failed(format!("{status}: {text}")));
    }
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let mut completion_tokens = None;
    while let Some(chunk) = bytes.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Attempt::Broken(format!("stream cut: {e}")),
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            else {
                continue;
            };
            if data == "[DONE]" {
                return Attempt::Ended(match completion_tokens {
                    Some(n) if n == u64::from(max_tokens) => End::Completed,
                    n => End::Failed(format!("ended with {n:?} of {max_tokens} tokens")),
                });
            }
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                return Attempt::Ended(End::Failed(format!("not JSON: {data}")));
            };
            if value.get("error").is_some() {
                return Attempt::Ended(End::Failed(value["error"].to_string()));
            }
            if value["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                seen.first_token_at.get_or_insert_with(Instant::now);
            }
            if let Some(n) = value["usage"]["completion_tokens"].as_u64() {
                completion_tokens = Some(n);
            }
        }
    }
    Attempt::Broken("stream ended without [DONE]".into())
}

/// The gateways' total resident memory now, MiB (0 where it cannot be read).
fn gateway_rss_mib(cluster: &TestCluster) -> f64 {
    cluster
        .pids()
        .into_iter()
        .filter(|(role, _)| role == "gateway")
        .filter_map(|(_, pid)| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .sum()
}

/// Counts the stories.
fn summarise(
    fault: Fault,
    seen: &[Seen],
    fault_at: Option<Instant>,
    gateway_rss_mib: f64,
) -> FaultReport {
    let count = |f: fn(&End) -> bool| seen.iter().filter(|s| f(&s.end)).count();
    let mut latencies: Vec<Duration> = seen
        .iter()
        .filter(|s| s.end == End::Completed)
        .map(|s| s.finished_at - s.sent_at)
        .collect();
    latencies.sort();
    let p99_latency = latencies
        .get((latencies.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default();
    let recovery = fault_at.and_then(|at| {
        seen.iter()
            .filter(|s| s.sent_at >= at)
            .filter_map(|s| s.first_token_at)
            .min()
            .map(|first| first - at)
    });
    let examples = seen
        .iter()
        .filter_map(|s| match &s.end {
            End::Failed(why) => Some(format!("failed: {why}")),
            End::Lost(why) => Some(format!("lost: {why}")),
            _ => None,
        })
        .take(5)
        .collect();
    FaultReport {
        fault,
        sent: seen.len(),
        completed: count(|e| *e == End::Completed),
        refused: count(|e| *e == End::Refused),
        failed: count(|e| matches!(e, End::Failed(_))),
        lost: count(|e| matches!(e, End::Lost(_))),
        client_retries: seen.iter().map(|s| s.retries).sum(),
        resubmitted: 0,
        resumed: 0,
        slowest_answer: seen
            .iter()
            .filter_map(|s| s.answered_after)
            .max()
            .unwrap_or_default(),
        slowest_refusal: seen
            .iter()
            .filter(|s| s.end == End::Refused)
            .filter_map(|s| s.answered_after)
            .max()
            .unwrap_or_default(),
        p99_latency,
        recovery,
        gateway_rss_mib,
        examples,
    }
}
