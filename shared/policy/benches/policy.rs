//! Decision throughput and latency of the policies on a ToolBench-like stream (1,000 tool
//! prefixes of 1,400 tokens, each request a prefix plus a 435-token query: the paper's 1,835
//! mean prompt with 76% key portion), 50,000 requests routed back to back on one core, at 8,
//! 64 and 256 workers, each released 100 requests later; the same with every worker caching
//! what it is sent in a real radix cache (its events feeding the policy, so E2's eviction walk
//! runs and Dynamo's tree fills), E2 against the peers' own routers (`dynamo`, `sglang`), with
//! each policy's memory per cached token (live heap bytes, counted by a global allocator); and
//! the global tree's memory per distinct token.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use preble_localsched::{CacheEvent, RadixCache};
use preble_policy::{
    ClusterEvent, ClusterView, E2, E2Config, Policy, PolicyKind, PolicySettings, RouteRequest,
    WorkerLoad, WorkerView,
};
use preble_prefix::mix64;

/// Counts live heap bytes, so a policy's memory is what it holds after a run.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

const PREFIXES: u64 = 1_000;
const PREFIX_TOKENS: u64 = 1_400;
const QUERY_TOKENS: u64 = 435;
const REQUESTS: u64 = 50_000;
/// Requests routed and not yet released at any time.
const IN_FLIGHT: usize = 100;
/// KV capacity of a worker (Mistral-7B on an A6000, from the paper's code).
const KV_CAPACITY: u32 = 198_516;

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
            kv_capacity_tokens: u64::from(KV_CAPACITY),
        })
        .collect()
}

/// Each worker's real radix cache, fed with what the policy sends it; its events go back to
/// the policy as the scheduler would pass them on.
struct Caches(Vec<RadixCache>);

impl Caches {
    fn new(n: usize) -> Self {
        Self((0..n).map(|_| RadixCache::new(KV_CAPACITY)).collect())
    }

    /// Tokens cached over all workers (a prefix cached on two workers counts twice).
    fn cached_tokens(&self) -> u64 {
        self.0.iter().map(RadixCache::cached_tokens).sum()
    }

    fn serve(&mut self, policy: &mut dyn Policy, worker: &str, prompt: &[u32], now_ms: u64) {
        let Some(w) = worker
            .strip_prefix("gpu-")
            .and_then(|i| i.parse::<usize>().ok())
        else {
            return;
        };
        let cache = &mut self.0[w];
        let m = cache.match_prefix(prompt, prompt.len());
        cache.pin(m.node);
        if let Some(own) = cache.alloc(prompt.len() - m.len) {
            let mut slots = m.slots;
            slots.extend(own);
            cache.insert(prompt, &mut slots);
        }
        cache.unpin(m.node);
        for event in cache.take_events() {
            let _ = match &event {
                CacheEvent::Inserted(span) => policy.observe(&ClusterEvent::CacheInserted {
                    worker,
                    parent_hash: span.parent_hash,
                    hash: span.hash,
                    tokens: &span.tokens,
                    now_ms,
                }),
                CacheEvent::Evicted { hash, num_tokens } => {
                    policy.observe(&ClusterEvent::CacheEvicted {
                        worker,
                        hash: *hash,
                        num_tokens: *num_tokens,
                    })
                }
            };
        }
    }
}

/// Routes `REQUESTS` requests, releasing each `IN_FLIGHT` requests later (and caching it on
/// its worker first, with `caches`); returns per-decision latencies and how many decisions
/// charged the chosen worker an eviction cost.
fn run(
    policy: &mut dyn Policy,
    ws: &[WorkerView],
    mut caches: Option<&mut Caches>,
) -> (Vec<Duration>, usize) {
    let mut evicting = 0;
    let mut prompt = Vec::new();
    let mut latencies = Vec::with_capacity(REQUESTS as usize);
    let mut in_flight = VecDeque::new();
    for i in 0..REQUESTS {
        toolbench_prompt(i, &mut prompt);
        let id = format!("r{i}");
        let now_ms = i / 10;
        let started = Instant::now();
        let d = policy.route(
            &ClusterView { workers: ws },
            &RouteRequest {
                request_id: &id,
                prompt: &prompt,
                max_tokens: 43,
                now_ms,
            },
        );
        latencies.push(started.elapsed());
        let Ok(d) = black_box(d) else {
            continue;
        };
        if d.reason.contains(" M=") && !d.reason.contains(" M=0.0ms") {
            evicting += 1;
        }
        if let Some(caches) = caches.as_deref_mut() {
            caches.serve(policy, &d.worker, &prompt, now_ms);
        }
        in_flight.push_back((id, d.worker));
        if in_flight.len() > IN_FLIGHT
            && let Some((request_id, worker)) = in_flight.pop_front()
        {
            let _ = policy.observe(&ClusterEvent::Released {
                worker: &worker,
                request_id: &request_id,
            });
        }
    }
    (latencies, evicting)
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
        for kind in [
            PolicyKind::E2,
            PolicyKind::Sglang,
            PolicyKind::CacheAware,
            PolicyKind::KvCost,
        ] {
            if n != 8 && !matches!(kind, PolicyKind::E2 | PolicyKind::Sglang) {
                continue;
            }
            let mut policy = kind.build(&PolicySettings::default());
            let (latencies, _) = run(policy.as_mut(), &ws, None);
            report(policy.name(), n, latencies);
        }
    }
}

/// The same stream with every worker caching what it is sent: the tree holds real cache
/// contents, full caches make E2 walk eviction orders, and Dynamo's tree learns from the
/// caches' events as it would from vLLM's. After each run: the policy's live heap bytes per
/// token cached over all workers.
fn throughput_with_caches(_: &mut Criterion) {
    for n in [8, 64, 256] {
        let ws = workers(n);
        for kind in [
            PolicyKind::E2,
            PolicyKind::Dynamo,
            PolicyKind::Sglang,
            PolicyKind::CacheAware,
            PolicyKind::KvCost,
        ] {
            if n != 8
                && !matches!(
                    kind,
                    PolicyKind::E2 | PolicyKind::Dynamo | PolicyKind::Sglang
                )
            {
                continue;
            }
            let before = live_bytes();
            let mut policy = kind.build(&PolicySettings::default());
            let mut caches = Caches::new(n);
            let (latencies, evicting) = run(policy.as_mut(), &ws, Some(&mut caches));
            report(&format!("{}+caches", policy.name()), n, latencies);
            let cached = caches.cached_tokens();
            drop(caches);
            let policy_bytes = live_bytes() - before;
            let tree = policy.tree_size().unwrap_or_default();
            eprintln!(
                "{:>16} memory: {:.1} MB, {:.1} bytes per cached token ({} tokens cached on the \
                 workers; the policy's tree counts {})",
                "",
                policy_bytes as f64 / 1e6,
                policy_bytes as f64 / cached.max(1) as f64,
                cached,
                tree.tokens
            );
            if kind == PolicyKind::E2 {
                eprintln!(
                    "{:>16} decisions charged an eviction cost (M > 0)",
                    evicting
                );
                let started = Instant::now();
                let spans = policy.export();
                let tokens: usize = spans.iter().map(|s| s.tokens.len()).sum();
                eprintln!(
                    "{:>16} snapshot export: {} spans, {} held tokens, {:.1} ms",
                    "",
                    spans.len(),
                    tokens,
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
        }
    }
}

fn tree_memory(_: &mut Criterion) {
    let ws = workers(8);
    let mut e2 = E2::new(E2Config::default());
    run(&mut e2, &ws, None);
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

criterion_group!(
    benches,
    throughput,
    throughput_with_caches,
    tree_memory,
    day_of_unique_prompts
);
criterion_main!(benches);
