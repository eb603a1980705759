//! Decision throughput and latency of the policies on a ToolBench-like stream (1,000 tool
//! prefixes of 1,400 tokens, each request a prefix plus a 435-token query: the paper's 1,835
//! mean prompt with 76% key portion), 50,000 requests routed back to back on one core, at 8,
//! 64 and 256 workers; and the global tree's memory per distinct token.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use preble_policy::{
    ClusterView, E2, E2Config, Policy, PolicyKind, PolicySettings, RouteRequest, WorkerLoad,
    WorkerView,
};
use preble_prefix::mix64;

const PREFIXES: u64 = 1_000;
const PREFIX_TOKENS: u64 = 1_400;
const QUERY_TOKENS: u64 = 435;
const REQUESTS: u64 = 50_000;

fn toolbench_prompt(i: u64, out: &mut Vec<u32>) {
    out.clear();
    let tool = mix64(i) % PREFIXES;
    out.extend((0..PREFIX_TOKENS).map(|t| (mix64(tool << 20 | t) % 32_000) as u32));
    out.extend((0..QUERY_TOKENS).map(|t| (mix64((i + 1) << 24 | t) % 32_000) as u32));
}

fn workers(n: usize) -> Vec<WorkerView> {
    (0..n)
        .map(|i| WorkerView {
            id: format!("gpu-{i}"),
            load: WorkerLoad::default(),
            kv_capacity_tokens: 198_516,
        })
        .collect()
}

/// Routes `REQUESTS` requests; returns per-decision latencies.
fn run(policy: &mut dyn Policy, ws: &[WorkerView]) -> Vec<Duration> {
    let mut prompt = Vec::new();
    let mut latencies = Vec::with_capacity(REQUESTS as usize);
    for i in 0..REQUESTS {
        toolbench_prompt(i, &mut prompt);
        let id = format!("r{i}");
        let started = Instant::now();
        let d = policy.route(
            &ClusterView { workers: ws },
            &RouteRequest {
                request_id: &id,
                prompt: &prompt,
                max_tokens: 43,
                now_ms: i / 10,
            },
        );
        latencies.push(started.elapsed());
        black_box(d.ok());
    }
    latencies
}

fn report(name: &str, n: usize, mut latencies: Vec<Duration>) {
    let total: Duration = latencies.iter().sum();
    latencies.sort();
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    eprintln!(
        "{name:>12} {n:>3} workers: {:>8.0} decisions/s, p50 {:>6.1} us, p99 {:>6.1} us, max {:>7.1} us",
        latencies.len() as f64 / total.as_secs_f64(),
        q(0.5).as_secs_f64() * 1e6,
        q(0.99).as_secs_f64() * 1e6,
        latencies[latencies.len() - 1].as_secs_f64() * 1e6,
    );
}

fn throughput(_: &mut Criterion) {
    for n in [8, 64, 256] {
        let ws = workers(n);
        for kind in [PolicyKind::E2, PolicyKind::CacheAware, PolicyKind::KvCost] {
            if n != 8 && kind != PolicyKind::E2 {
                continue;
            }
            let mut policy = kind.build(&PolicySettings::default());
            let latencies = run(policy.as_mut(), &ws);
            report(policy.name(), n, latencies);
        }
    }
}

fn tree_memory(_: &mut Criterion) {
    let ws = workers(8);
    let mut e2 = E2::new(E2Config::default());
    run(&mut e2, &ws);
    let tree = &e2.mirror().tree;
    eprintln!(
        "tree: {} distinct tokens in {} nodes, {:.1} bytes per token",
        tree.total_tokens(),
        tree.node_count(),
        tree.memory_bytes() as f64 / tree.total_tokens() as f64
    );
}

/// A day of unique prompts (one 1,000-token prompt per simulated second, nothing shared, no
/// worker ever reporting a cache) against a 5M-token bound: the bound must hold throughout.
fn day_of_unique_prompts(_: &mut Criterion) {
    const BOUND: u64 = 5_000_000;
    let ws = workers(8);
    let mut e2 = E2::new(E2Config {
        max_tree_tokens: BOUND,
        ..E2Config::default()
    });
    let started = Instant::now();
    let (mut peak_tokens, mut peak_bytes) = (0, 0);
    let mut prompt = Vec::with_capacity(1_000);
    for second in 0..86_400u64 {
        prompt.clear();
        prompt.extend((0..1_000u64).map(|t| (mix64(second << 16 | t) % 32_000) as u32));
        let id = format!("d{second}");
        let d = e2.route(
            &ClusterView { workers: &ws },
            &RouteRequest {
                request_id: &id,
                prompt: &prompt,
                max_tokens: 43,
                now_ms: second * 1_000,
            },
        );
        black_box(d.ok());
        let tree = &e2.mirror().tree;
        peak_tokens = peak_tokens.max(tree.total_tokens());
        if second % 1_000 == 0 {
            peak_bytes = peak_bytes.max(tree.memory_bytes());
        }
        assert!(
            tree.total_tokens() <= BOUND,
            "bound broken at second {second}"
        );
    }
    eprintln!(
        "24 h of unique prompts (86.4M tokens) under a {BOUND}-token bound: peak {peak_tokens} tokens, \
         peak {:.1} MB, {:.1} s",
        peak_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
}

criterion_group!(benches, throughput, tree_memory, day_of_unique_prompts);
criterion_main!(benches);
