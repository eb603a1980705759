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
