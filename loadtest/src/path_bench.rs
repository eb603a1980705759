//! The serving path's own overhead: `path-bench` starts its own stack (real binaries on the local NATS, simulated GPUs whose
//! iteration time is set to zero) and measures the serving path itself: time to first token
//! at 1 and at N concurrent streams, and requests per second with `max_tokens` 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use preble_tests::{Options, TestCluster};
use serde_json::json;
use tokio::sync::Mutex;

/// Starts a stack and measures its serving path (see the module docs).
pub async fn path_bench(workers: usize, concurrency: usize, requests: usize) -> Result<()> {
    let cluster = TestCluster::start(Options {
        workers,
        time_scale: 0.0,
        ..Options::default()
    })
    .await?;
    println!(
        "stack up: {workers} sim workers (iteration time 0), gateway {}",
        cluster.gateway
    );
    for c in [1, concurrency] {
        let n = if c == 1 { requests.min(500) } else { requests };
        let (ttft, elapsed) = run_phase(&cluster, c, n, true).await?;
        println!(
            "TTFT (path overhead) at {c:>3} concurrent streams over {n} requests: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.0} req/s)",
            ttft.value_at_quantile(0.5) as f64 / 1e3,
            ttft.value_at_quantile(0.99) as f64 / 1e3,
            ttft.max() as f64 / 1e3,
            n as f64 / elapsed.as_secs_f64()
        );
    }
    let (latency, elapsed) = run_phase(&cluster, concurrency, requests, false).await?;
    println!(
        "max_tokens=1, {concurrency} concurrent non-streaming clients: {:.0} req/s (latency p50 {:.2} ms, p99 {:.2} ms)",
        requests as f64 / elapsed.as_secs_f64(),
        latency.value_at_quantile(0.5) as f64 / 1e3,
        latency.value_at_quantile(0.99) as f64 / 1e3,
    );
    Ok(())
}

/// Runs `total` requests with `concurrency` clients; returns the TTFT (streaming) or latency
/// histogram in microseconds and the wall time.
async fn run_phase(
    cluster: &TestCluster,
    concurrency: usize,
    total: usize,
    streaming: bool,
) -> Result<(Histogram<u64>, Duration)> {
    let http = reqwest::Client::new();
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let bar = ProgressBar::new(total as u64);
    bar.set_style(ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    )?);
    bar.set_message(format!(
        "{} x{concurrency}",
        if streaming { "stream" } else { "plain" }
    ));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let clients = (0..concurrency).map(|_| {
        let (http, histogram, bar, next) = (http.clone(), histogram.clone(), bar.clone(), next.clone());
        let url = format!("{}/v1/completions", cluster.gateway);
        let model = cluster.model.clone();
        async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let body = json!({"model": model, "prompt": format!("benchmark request {i}"), "max_tokens": 1, "stream": streaming});
                let t0 = Instant::now();
                let response = http.post(&url).json(&body).send().await.context("request")?;
                if !response.status().is_success() {
                    bail!("status {}", response.status());
                }
                let measured = if streaming {
                    let mut bytes = response.bytes_stream();
                    let first = bytes.next().await.context("empty stream")??;
                    let at = t0.elapsed();
                    drop(first);
                    while bytes.next().await.is_some() {}
                    at
                } else {
                    response.bytes().await?;
                    t0.elapsed()
                };
                histogram.lock().await.record(measured.as_micros() as u64)?;
                bar.inc(1);
            }
        }
    });
    for result in futures::future::join_all(clients).await {
        result?;
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let h = histogram.lock().await.clone();
    Ok((h, elapsed))
}

/// The path's overhead while `streams` token streams are in flight, below saturation: a stack
/// of real-time simulated GPUs, open-loop Poisson arrivals of streaming requests long enough
/// that `streams` are open at once, and for each request its time to first token at the client
/// minus the worker's own (queueing and prefill, from the worker's `Finished` event).
pub async fn open_loop_overhead(workers: usize, streams: usize, requests: usize) -> Result<()> {
    use preble_protocol::{Subjects, WorkerEventBody, decode};
    use std::collections::HashMap;

    const OUTPUT_TOKENS: u32 = 128;
    let cluster = TestCluster::start(Options {
        workers,
        time_scale: 1.0,
        ..Options::default()
    })
    .await?;
    // Watch the requests, dispatch and event subjects: when each request passed by, and each
    // worker's own TTFT.
    let nats = async_nats::connect(preble_tests::NATS_URL).await?;
    let subjects = Subjects::new(&cluster.prefix);
    let mut events = nats.subscribe(subjects.all_events()).await?;
    let mut published = nats.subscribe(subjects.requests()).await?;
    let mut dispatched = nats.subscribe(subjects.all_workers()).await?;
    nats.flush().await?;
    // When each request was seen on the requests subject and on a worker's dispatch subject.
    let seen = Arc::new(Mutex::new(HashMap::<
        String,
        (Option<Instant>, Option<Instant>),
    >::new()));
    let snoop_published = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = published.next().await {
                if let Ok(r) = decode::<preble_protocol::GenerateRequest>(&message.payload) {
                    seen.lock().await.entry(r.request_id).or_default().0 = Some(Instant::now());
                }
            }
        })
    };
    let snoop_dispatched = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = dispatched.next().await {
                if let Ok(d) = decode::<preble_protocol::Dispatch>(&message.payload) {
                    let mut seen = seen.lock().await;
                    let entry = seen.entry(d.request.request_id).or_default();
                    entry.1.get_or_insert(Instant::now());
                }
            }
        })
    };
    let worker_ttft = Arc::new(Mutex::new(HashMap::<String, f64>::new()));
    let collector = {
        let worker_ttft = worker_ttft.clone();
        tokio::spawn(async move {
            while let Some(message) = events.next().await {
                if let Ok(event) = decode::<preble_protocol::WorkerEvent>(&message.payload)
                    && let WorkerEventBody::Finished(f) = event.body
                {
                    worker_ttft.lock().await.insert(f.request_id, f.ttft_ms);
                }
            }
        })
    };
    let http = reqwest::Client::new();
    let url = format!("{}/v1/completions", cluster.gateway);
    let one = |i: usize| {
        let (http, url, model) = (http.clone(), url.clone(), cluster.model.clone());
        async move {
            let body = json!({"model": model, "prompt": format!("open loop request {i}"),
                "max_tokens": OUTPUT_TOKENS, "ignore_eos": true, "stream": true});
            let sent = Instant::now();
            let response = http
                .post(&url)
                .json(&body)
                .send()
                .await
                .context("request")?;
            if !response.status().is_success() {
                bail!("status {}", response.status());
            }
            let mut bytes = response.bytes_stream();
            let first = bytes.next().await.context("empty stream")??;
            let first_at = Instant::now();
            let text = String::from_utf8_lossy(&first);
            let id = text
                .split("\"id\":\"cmpl-")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .context("first chunk has no id")?
                .to_string();
            while bytes.next().await.is_some() {}
            Ok::<_, anyhow::Error>(Probe {
                id,
                sent,
                first_at,
                done_at: Instant::now(),
            })
        }
    };
    let alone = one(0).await?;
    let stream_time = alone.done_at - alone.sent;
    // Streams slow down as batches grow, so correct the rate once from a short calibration run.
    let mut rate = streams as f64 / stream_time.as_secs_f64();
    let calibration = (requests / 4).max(100);
    let (_, open_seen, _) = arrivals(rate, calibration, 1, &one).await?;
    let settled = &open_seen[calibration / 2..];
    let mean_open = mean(settled);
    if mean_open > 0.0 {
        rate *= streams as f64 / mean_open;
    }
    println!(
        "open loop: one {OUTPUT_TOKENS}-token stream alone takes {:.2} s; {rate:.1} req/s keeps about {streams} open",
        stream_time.as_secs_f64()
    );
    let (probes, samples_open, peak) = arrivals(rate, requests, calibration + 1, &one).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for task in [collector, snoop_published, snoop_dispatched] {
        task.abort();
    }
    let worker_ttft = worker_ttft.lock().await;
    let seen = seen.lock().await;
    let mut overhead = Histogram::<u64>::new(3)?;
    let mut ttft = Histogram::<u64>::new(3)?;
    let (mut inbound, mut routing, mut outbound) = (
        Histogram::<u64>::new(3)?,
        Histogram::<u64>::new(3)?,
        Histogram::<u64>::new(3)?,
    );
    let us = |d: Duration| d.as_micros() as u64;
    // The first half of the arrivals ramps the load up: measure the second half.
    for probe in probes.iter().skip(requests / 2) {
        let engine = Duration::from_secs_f64(
            worker_ttft
                .get(&probe.id)
                .with_context(|| format!("no Finished event for {}", probe.id))?
                / 1e3,
        );
        let client = probe.first_at - probe.sent;
        ttft.record(us(client))?;
        overhead.record(us(client.saturating_sub(engine)))?;
        if let Some((Some(published), Some(dispatched))) = seen.get(&probe.id) {
            inbound.record(us(published.saturating_duration_since(probe.sent)))?;
            routing.record(us(dispatched.saturating_duration_since(*published)))?;
            outbound.record(us(probe
                .first_at
                .saturating_duration_since(*dispatched + engine)))?;
        }
    }
    let measured = &samples_open[requests / 2..];
    let mean_open = mean(measured);
    println!(
        "open loop at {rate:.1} req/s, {mean_open:.0} streams open on average when a measured request arrived (peak {peak}): client TTFT p50 {:.2} ms p99 {:.2} ms; path overhead (client TTFT - worker TTFT) p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} requests",
        ttft.value_at_quantile(0.5) as f64 / 1e3,
        ttft.value_at_quantile(0.99) as f64 / 1e3,
        overhead.value_at_quantile(0.5) as f64 / 1e3,
        overhead.value_at_quantile(0.99) as f64 / 1e3,
        overhead.max() as f64 / 1e3,
        overhead.len(),
    );
    let line = |name: &str, h: &Histogram<u64>| {
        println!(
            "  {name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.max() as f64 / 1e3
        )
    };
    println!("  where it goes (seen by snooping the requests and dispatch subjects):");
    line("client -> gateway -> requests subject", &inbound);
    line(
        "requests subject -> JetStream -> scheduler -> dispatch",
        &routing,
    );
    line(
        "worker's first token -> NATS -> gateway -> client",
        &outbound,
    );
    Ok(())
}

/// One open-loop request as the client saw it.
struct Probe {
    /// Its request id (from the response's `id`).
    id: String,
    /// When it was sent.
    sent: Instant,
    /// When its first chunk arrived.
    first_at: Instant,
    /// When its stream ended.
    done_at: Instant,
}

/// Sends `n` requests (numbered from `first`) with Poisson arrivals at `rate`; returns their
/// results in order, how many streams were open as each arrived, and the most open at once.
async fn arrivals<F, Fut>(
    rate: f64,
    n: usize,
    first: usize,
    one: &F,
) -> Result<(Vec<Probe>, Vec<usize>, usize)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Probe>> + Send + 'static,
{
    use rand::SeedableRng;
    use rand_distr::{Distribution, Exp};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let open = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let bar = ProgressBar::new(n as u64);
    bar.set_style(ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} eta {eta}",
    )?);
    bar.set_message(format!("open loop {rate:.0}/s"));
    let gaps = Exp::new(rate)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(first as u64);
    let mut tasks = Vec::with_capacity(n);
    let mut open_seen = Vec::with_capacity(n);
    for i in first..first + n {
        tokio::time::sleep(Duration::from_secs_f64(gaps.sample(&mut rng))).await;
        open_seen.push(open.load(Ordering::Relaxed));
        let (open, peak, bar, request) = (open.clone(), peak.clone(), bar.clone(), one(i));
        tasks.push(tokio::spawn(async move {
            let now = open.fetch_add(1, Ordering::Relaxed) + 1;
            peak.fetch_max(now, Ordering::Relaxed);
            let result = request.await;
            open.fetch_sub(1, Ordering::Relaxed);
            bar.inc(1);
            result
        }));
    }
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await??);
    }
    bar.finish_and_clear();
    Ok((results, open_seen, peak.load(Ordering::Relaxed)))
}

/// The mean of counts (0 for none).
fn mean(counts: &[usize]) -> f64 {
    counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64
}

/// The orders in which the tracing comparison runs its three configurations.
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [1, 2, 0],
    [2, 0, 1],
    [0, 2, 1],
    [2, 1, 0],
    [1, 0, 2],
];

/// Throughput cost of tracing: the saturated `max_tokens` 1 phase on a stack with span export
/// off, one exporting every request's spans over OTLP (HTTP/protobuf, as to Jaeger) to a sink
/// in this process, and one sampling a tenth of the requests
/// (`parentbased_traceidratio` 0.1), in `rounds` rounds that go through every order of the
/// three (use a multiple of 6) so drift hits all alike.
pub async fn tracing_overhead(
    workers: usize,
    concurrency: usize,
    requests: usize,
    rounds: usize,
) -> Result<()> {
    let (endpoint, exported_bytes) = start_otlp_sink().await?;
    let export = |sampler: &str, ratio: &str| {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_SAMPLER", sampler),
            ("OTEL_TRACES_SAMPLER_ARG", ratio),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec()
    };
    let configurations = [
        ("tracing off", Vec::new()),
        ("every request traced", export("parentbased_always_on", "1")),
        (
            "10% of requests traced",
            export("parentbased_traceidratio", "0.1"),
        ),
    ];
    let mut rates = vec![Vec::new(); configurations.len()];
    for round in 0..rounds {
        // Every order in turn, so that each configuration follows each other one equally
        // often (a stack runs beside what its predecessor left: JetStream state, exported
        // spans still arriving at the sink), with a pause for the machine to settle.
        for &index in &ORDERS[round % ORDERS.len()] {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (name, env) = &configurations[index];
            let cluster = TestCluster::start(Options {
                workers,
                time_scale: 0.0,
                env: env.clone(),
                ..Options::default()
            })
            .await?;
            // Warm the connections and caches first.
            run_phase(&cluster, concurrency, concurrency * 2, false).await?;
            let mut pids = cluster.pids();
            pids.extend(process_named("nats-server").map(|pid| ("nats".to_string(), pid)));
            let cpu_before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
            let (_, elapsed) = run_phase(&cluster, concurrency, requests, false).await?;
            let rate = requests as f64 / elapsed.as_secs_f64();
            let mut per_role = std::collections::BTreeMap::<String, f64>::new();
            for ((role, pid), before) in pids.iter().zip(cpu_before) {
                let role = if role.starts_with("gpu-") {
                    "workers"
                } else {
                    role
                };
                *per_role.entry(role.to_string()).or_default() +=
                    (cpu_seconds(*pid) - before) * 1e6 / requests as f64;
            }
            let cpu: Vec<String> = per_role
                .iter()
                .map(|(role, us)| format!("{role} {us:.0}"))
                .collect();
            println!(
                "round {}: {name}: {rate:.0} req/s; CPU µs per request: {}",
                round + 1,
                cpu.join(", ")
            );
            rates[index].push(rate);
        }
    }
    let medians: Vec<f64> = rates
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    println!("medians over {rounds} rounds:");
    for ((name, _), rate) in configurations.iter().zip(&medians) {
        println!(
            "  {name}: {rate:.0} req/s, {:.1}% throughput lost",
            (1.0 - rate / medians[0]) * 100.0
        );
    }
    let exported = exported_bytes.load(std::sync::atomic::Ordering::Relaxed);
    println!("{} KiB of spans exported", exported / 1024);
    if exported == 0 {
        bail!("no span reached the OTLP sink: tracing was not on");
    }
    Ok(())
}

/// An OTLP/HTTP endpoint on loopback that accepts and drops spans, counting their bytes.
async fn start_otlp_sink() -> Result<(String, Arc<std::sync::atomic::AtomicU64>)> {
    use axum::{Router, body::Bytes, extract::State, routing::post};
    let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(count): State<Arc<std::sync::atomic::AtomicU64>>, body: Bytes| async move {
                    count.fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    ""
                },
            ),
        )
        .with_state(bytes.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{address}"), bytes))
}

/// CPU time (user + system) a process has used, in seconds (0 if it cannot be read).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; here (after pid and comm) 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// The id of a running process whose command name is `name` (the first found).
fn process_named(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == name).then_some(pid)
        })
}
