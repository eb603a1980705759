//! Local-scheduler costs: one batch-building iteration at scale, match + insert of a long
//! prompt into a full cache, and the tree's memory per cached token (counted by a global
//! allocator that tracks live bytes).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use preble_localsched::{LocalScheduler, RadixCache, SchedulerConfig, WaitOrder};
use preble_prefix::mix64;

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

const CACHE_TOKENS: u32 = 1 << 20;

/// A prompt of `shared` tokens from one of 16 system prompts, then `unique` tokens of its own.
fn prompt(i: u64, shared: usize, unique: usize) -> Vec<u32> {
    let family = i % 16;
    let mut p: Vec<u32> = (0..shared as u64)
        .map(|t| (mix64(family * 1_000_003 + t) % 32_000) as u32)
        .collect();
    p.extend((0..unique as u64).map(|t| (mix64((i + 1) << 32 | t) % 32_000) as u32));
    p
}

fn insert(cache: &mut RadixCache, tokens: &[u32]) {
    let m = cache.match_prefix(tokens, tokens.len());
    cache.pin(m.node);
    if let Some(own) = cache.alloc(tokens.len() - m.len) {
        let mut slots = m.slots;
        slots.extend(own);
        let node = cache.insert(tokens, &mut slots);
        cache.pin(node);
        cache.unpin(node);
    }
    cache.unpin(m.node);
    cache.take_events();
}

fn match_insert(c: &mut Criterion) {
    let prompts: Vec<Vec<u32>> = (0..512).map(|i| prompt(i, 4096, 4096)).collect();
    let mut cache = RadixCache::new(CACHE_TOKENS);
    for p in &prompts {
        insert(&mut cache, p);
    }
    let mut i = 0;
    c.bench_function(
        "match+insert 8192-token prompt, half cached, full 1M cache",
        |b| {
            b.iter(|| {
                i = (i + 1) % prompts.len();
                insert(&mut cache, black_box(&prompts[i]));
            })
        },
    );
    let hot = prompts[0].clone();
    insert(&mut cache, &hot);
    c.bench_function("match+insert 8192-token prompt, fully cached", |b| {
        b.iter(|| insert(&mut cache, black_box(&hot)))
    });
}

fn plan_iteration(c: &mut Criterion) {
    let mut s: LocalScheduler<u64> = LocalScheduler::new(SchedulerConfig {
        kv_capacity: CACHE_TOKENS,
        prefill_budget: 512,
        max_running: 512,
        priority_groups: 10,
        decode_reserve: 0.0,
        wait_order: WaitOrder::Priority,
    });
    // Fill the cache with other prompts, then get 256 requests running (decoding).
    for i in 0..96 {
        insert_via(&mut s, prompt(i, 2048, 2048));
    }
    for i in 0..256 {
        s.enqueue(i, prompt(i, 2048, 64), 1_000).expect("fits");
    }
    while s.running().len() < 256 || s.running().iter().any(|q| !q.is_decoding()) {
        step(&mut s);
    }
    for i in 256..768 {
        s.enqueue(i, prompt(i, 2048, 64), 1_000).expect("fits");
    }
    // Every measured iteration plans 256+ decodes plus admissions under the 512-token budget.
    assert_eq!(s.running().len(), 256);
    assert_eq!(s.load().waiting, 512);
    c.bench_function(
        "plan+commit one iteration: 256 running, 512 waiting, 1M cache",
        |b| {
            // Steady state: each fresh copy takes one untimed step (its vectors grow to their
            // working capacity), then a few timed ones.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let mut s = s.clone();
                    step(&mut s);
                    for _ in 0..(iters - done).min(8) {
                        let t = Instant::now();
                        step(&mut s);
                        total += t.elapsed();
                        done += 1;
                    }
                }
                total
            })
        },
    );
}

fn insert_via(s: &mut LocalScheduler<u64>, p: Vec<u32>) {
    s.enqueue(u64::MAX, p, 1).expect("fits");
    while !s.is_idle() {
        step(s);
    }
}

/// One iteration with fixed tokens; finishes what reached its output limit.
fn step(s: &mut LocalScheduler<u64>) {
    let plan = s.plan();
    let sampled: Vec<Option<u32>> = plan.items.iter().map(|i| i.samples.then_some(7)).collect();
    let got = s.commit(&plan, &sampled);
    for (i, _) in got.into_iter().rev() {
        let q = &s.running()[i];
        if q.generated().len() as u32 >= q.max_new_tokens() {
            s.finish(i);
        }
    }
    black_box(plan);
}

fn memory_per_token(_: &mut Criterion) {
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut cache = RadixCache::new(CACHE_TOKENS);
    for i in 0..2_000 {
        insert(&mut cache, &prompt(i, 2048, 1024 + (i as usize % 7) * 300));
    }
    let live = LIVE_BYTES.load(Ordering::Relaxed) - before;
    let cached = cache.cached_tokens();
    eprintln!(
        "memory: {} cached tokens in {} nodes; {} bytes live ({:.2} bytes per cached token; \
         {:.2} per slot of capacity); memory_bytes() says {:.2} per cached token",
        cached,
        cache.node_count(),
        live,
        live as f64 / cached as f64,
        live as f64 / f64::from(CACHE_TOKENS),
        cache.memory_bytes() as f64 / cached as f64,
    );
    black_box(cache);
}

criterion_group!(benches, memory_per_token, match_insert, plan_iteration);
criterion_main!(benches);
