//! The batch builder: chunked prefill with decodes first, prefix reuse, fairness between
//! priority groups, exact slots under preemption.

use std::collections::BTreeMap;

use preble_localsched::{AdmitError, LocalScheduler, SchedulerConfig, WaitOrder};
use preble_prefix::{mix64, path_hash};
use proptest::prelude::*;

fn config(kv_capacity: u32, prefill_budget: u32, max_running: usize) -> SchedulerConfig {
    SchedulerConfig {
        kv_capacity,
        prefill_budget,
        max_running,
        priority_groups: 10,
        decode_reserve: 0.0,
        wait_order: WaitOrder::Priority,
    }
}

/// The deterministic "model": the token at output `index` of a prompt.
fn model_token(prompt: &[u32], index: usize) -> u32 {
    (mix64(path_hash(prompt) ^ index as u64) % 1000) as u32
}

/// Checks that every slot is held exactly once (cache, free list or a running request).
fn check_slots<T>(s: &LocalScheduler<T>) {
    let cache = s.cache();
    let mut all = cache.tree_slots();
    all.extend_from_slice(cache.free_slot_list());
    all.extend(s.own_slots());
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(n, all.len(), "a slot is held twice");
    assert_eq!(all.len() as u32, cache.capacity(), "slots lost");
    cache.check_invariants();
    for seq in s.running() {
        assert!(seq.slots().len() >= seq.computed() as usize);
    }
}

/// Runs everything to completion; returns each payload's generated tokens, and the number of
/// iterations and preemptions.
fn run_all(s: &mut LocalScheduler<usize>) -> (BTreeMap<usize, Vec<u32>>, usize, usize) {
    let mut out = BTreeMap::new();
    let (mut iterations, mut preemptions) = (0, 0);
    while !s.is_idle() {
        let plan = s.plan();
        preemptions += plan.preempted.len();
        assert!(!plan.is_empty(), "work is waiting but nothing was planned");
        check_slots(s);
        let sampled: Vec<Option<u32>> = plan
            .items
            .iter()
            .map(|item| {
                let seq = &s.running()[item.index];
                assert!(seq.slots().len() >= (item.start + item.extend) as usize);
                item.samples
                    .then(|| model_token(seq.prompt(), seq.generated().len()))
            })
            .collect();
        let got = s.commit(&plan, &sampled);
        let mut done: Vec<usize> = got
            .iter()
            .filter(|(i, _)| {
                let seq = &s.running()[*i];
                seq.generated().len() as u32 >= seq.max_new_tokens()
            })
            .map(|(i, _)| *i)
            .collect();
        done.sort_unstable_by(|a, b| b.cmp(a));
        for i in done {
            let seq = s.finish(i);
            out.insert(seq.payload, seq.generated().to_vec());
        }
        check_slots(s);
        iterations += 1;
        assert!(iterations < 100_000, "no progress");
    }
    (out, iterations, preemptions)
}

#[test]
fn long_prompts_are_chunked_and_decodes_go_first() {
    let mut s = LocalScheduler::new(config(10_000, 512, 8));
    s.enqueue(0usize, vec![7; 1200], 4).unwrap();
    let p = s.plan();
    assert_eq!(
        (p.items.len(), p.items[0].start, p.items[0].extend),
        (1, 0, 512)
    );
    assert!(!p.items[0].samples);
    s.commit(&p, &[None]);
    s.enqueue(1, (0..100).collect(), 4).unwrap();
    let p = s.plan();
    assert_eq!(p.items.len(), 1, "the budget is spent on the first request");
    assert_eq!((p.items[0].start, p.items[0].extend), (512, 512));
    s.commit(&p, &[None]);
    let p = s.plan();
    assert_eq!(p.items.len(), 2);
    assert_eq!((p.items[0].extend, p.items[0].samples), (176, true));
    assert_eq!((p.items[1].start, p.items[1].extend), (0, 100));
    s.commit(&p, &[Some(5), Some(6)]);
    let p = s.plan();
    assert!(
        p.items.iter().all(|x| x.extend == 1 && x.samples),
        "both decode"
    );
    assert_eq!(p.items[0].start, 1200);
}

#[test]
fn requests_that_can_never_fit_are_refused() {
    let mut s: LocalScheduler<()> = LocalScheduler::new(config(1000, 512, 8));
    assert_eq!(
        s.enqueue((), vec![1; 990], 20),
        Err(AdmitError::NeverFits {
            need: 1010,
            capacity: 1000
        })
    );
    assert_eq!(s.enqueue((), vec![], 20), Err(AdmitError::EmptyPrompt));
    assert!(s.is_idle());
}

#[test]
fn a_repeated_prefix_is_reused_from_the_cache() {
    let mut s = LocalScheduler::new(config(10_000, 4096, 8));
    let shared: Vec<u32> = (0..1000).collect();
    let mut a = shared.clone();
    a.extend([5000, 5001]);
    s.enqueue(0usize, a, 3).unwrap();
    run_all(&mut s);
    let mut b = shared.clone();
    b.extend([6000, 6001, 6002]);
    s.enqueue(1, b, 3).unwrap();
    let p = s.plan();
    assert_eq!(
        p.items[0].start, 1000,
        "the shared prefix is not recomputed"
    );
    assert_eq!(p.items[0].extend, 3);
    assert_eq!(s.running()[0].cached_prompt_tokens(), 1000);
    // The whole prompt cached: all but its last token are reused.
    let mut s2 = LocalScheduler::new(config(10_000, 4096, 8));
    s2.enqueue(0usize, shared.clone(), 1).unwrap();
    run_all(&mut s2);
    s2.enqueue(1, shared, 1).unwrap();
    let p = s2.plan();
    assert_eq!((p.items[0].start, p.items[0].extend), (999, 1));
}

/// The payloads in the order they are admitted, one request at a time, each finishing after
/// one token.
fn admission_order(s: &mut LocalScheduler<usize>) -> Vec<usize> {
    let mut order = Vec::new();
    while !s.is_idle() {
        let plan = s.plan();
        let sampled: Vec<Option<u32>> = plan.items.iter().map(|i| i.samples.then_some(1)).collect();
        let got = s.commit(&plan, &sampled);
        for (i, _) in got.into_iter().rev() {
            order.push(s.finish(i).payload);
        }
    }
    order
}

#[test]
fn each_wait_order_admits_in_its_own_order() {
    let hot: Vec<u32> = (0..900).collect();
    let partial: Vec<u32> = (0..300).chain(20_000..20_600).collect();
    let full: Vec<u32> = (0..901).collect();
    let cold = |i: u32| -> Vec<u32> { (50_000 + 1000 * i..50_900 + 1000 * i).collect() };
    let order_of = |wait_order: WaitOrder| {
        let mut s = LocalScheduler::new(SchedulerConfig {
            wait_order,
            ..config(100_000, 4096, 1)
        });
        s.enqueue(usize::MAX, hot.clone(), 1).unwrap();
        run_all(&mut s);
        for (payload, prompt) in [
            (0, cold(0)),
            (1, partial.clone()),
            (2, full.clone()),
            (3, cold(1)),
        ] {
            s.enqueue(payload, prompt, 1).unwrap();
        }
        admission_order(&mut s)
    };
    assert_eq!(order_of(WaitOrder::Fcfs), [0, 1, 2, 3]);
    assert_eq!(order_of(WaitOrder::LongestPrefix), [2, 1, 0, 3]);
    assert_eq!(order_of(WaitOrder::Priority), [2, 1, 0, 3]);
}

#[test]
fn longest_prefix_keeps_arrival_order_past_sglangs_sorting_limit() {
    let hot: Vec<u32> = (0..900).collect();
    let hot_at = |waiting_cold: usize| {
        let mut s = LocalScheduler::new(SchedulerConfig {
            wait_order: WaitOrder::LongestPrefix,
            ..config(1_000_000, 4096, 1)
        });
        s.enqueue(usize::MAX, hot.clone(), 1).unwrap();
        run_all(&mut s);
        for i in 0..waiting_cold {
            let base = 100_000 + 1000 * i as u32;
            s.enqueue(i, (base..base + 500).collect(), 1).unwrap();
        }
        let mut again = hot.clone();
        again.push(7);
        s.enqueue(usize::MAX, again, 1).unwrap();
        admission_order(&mut s)
            .iter()
            .position(|&p| p == usize::MAX)
    };
    // 128 waiting in all: sorted, the hot one goes first.
    assert_eq!(hot_at(preble_localsched::LPM_MAX_SORTED - 1), Some(0));
    // 130 waiting: unsorted until the queue is down to 128, two admissions later.
    assert_eq!(hot_at(preble_localsched::LPM_MAX_SORTED + 1), Some(2));
}

#[test]
fn a_low_hit_request_is_not_starved_by_a_stream_of_high_hit_ones() {
    // One admission per iteration (max_running 1 keeps the batch to one request at a time).
    let mut s = LocalScheduler::new(config(100_000, 4096, 1));
    let hot: Vec<u32> = (0..900).collect();
    s.enqueue(usize::MAX, hot.clone(), 1).unwrap();
    run_all(&mut s);
    let high = |i: usize| {
        let mut p = hot.clone();
        p.push(10_000 + i as u32);
        p
    };
    // A backlog of high-hit requests, then the low-hit one, then more high-hit ones keep coming.
    for i in 0..100 {
        s.enqueue(i, high(i), 1).unwrap();
    }
    let low_id = s.enqueue(1_000_000, (50_000..50_900).collect(), 1).unwrap();
    let mut admitted_at = None;
    let mut high_admitted_after_low_queued = 0;
    for iteration in 0..400 {
        s.enqueue(100 + iteration, high(100 + iteration), 1)
            .unwrap();
        let plan = s.plan();
        if plan.admitted.contains(&low_id) {
            admitted_at = Some(iteration);
            break;
        }
        high_admitted_after_low_queued += plan.admitted.len();
        let sampled: Vec<Option<u32>> = plan.items.iter().map(|i| i.samples.then_some(1)).collect();
        let got = s.commit(&plan, &sampled);
        for (i, _) in got.into_iter().rev() {
            s.finish(i);
        }
    }
    let at = admitted_at.expect("the low-hit request was never admitted");
    assert!(at <= 60, "admitted only after {at} iterations");
    assert!(
        high_admitted_after_low_queued >= 9,
        "higher groups go first ({high_admitted_after_low_queued} before it)"
    );
}

#[test]
fn overcommitted_batches_preempt_and_still_produce_the_same_tokens() {
    let requests: Vec<(Vec<u32>, u32)> = (0..24u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..(40 + i * 7))
                .map(|t| (t * 31 + i * 101) % 997)
                .collect();
            (prompt, 30 + i % 20)
        })
        .collect();
    let run = |capacity: u32| {
        let mut s = LocalScheduler::new(config(capacity, 256, 64));
        for (i, (prompt, max)) in requests.iter().enumerate() {
            s.enqueue(i, prompt.clone(), *max).unwrap();
        }
        run_all(&mut s)
    };
    let (roomy, _, roomy_preemptions) = run(100_000);
    let (tight, _, tight_preemptions) = run(400);
    assert_eq!(roomy_preemptions, 0);
    assert!(tight_preemptions > 0, "the tight run must preempt");
    assert_eq!(roomy.len(), requests.len());
    assert_eq!(roomy, tight, "preemption changed the output");
    for (i, (prompt, max)) in requests.iter().enumerate() {
        let expected: Vec<u32> = (0..*max as usize).map(|k| model_token(prompt, k)).collect();
        assert_eq!(roomy[&i], expected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(60))]

    /// Any workload over any capacity finishes every request with the model's tokens, slots
    /// stay exact at every step (checked inside `run_all`).
    #[test]
    fn random_workloads_finish_with_exact_slots(
        capacity in 64u32..600,
        budget in 1u32..300,
        max_running in 1usize..16,
        reqs in proptest::collection::vec(
            (proptest::collection::vec(0u32..4, 1..50), 1u32..20), 1..20),
    ) {
        let mut s = LocalScheduler::new(SchedulerConfig {
            kv_capacity: capacity,
            prefill_budget: budget,
            max_running,
            priority_groups: 10,
            decode_reserve: 0.25,
            wait_order: WaitOrder::Priority,
        });
        let mut expected = BTreeMap::new();
        for (i, (prompt, max)) in reqs.iter().enumerate() {
            if s.enqueue(i, prompt.clone(), *max).is_ok() {
                expected.insert(i, (0..*max as usize).map(|k| model_token(prompt, k)).collect::<Vec<_>>());
            }
        }
        let (out, _, _) = run_all(&mut s);
        prop_assert_eq!(out, expected);
    }
}
