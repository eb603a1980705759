//! E2 and the cache-aware baselines on scenarios built with the cost model.

use preble_policy::{
    CacheAware, CacheAwareConfig, ClusterEvent, ClusterView, DecisionKind, E2, E2Config, KvCost,
    KvCostConfig, Policy, RouteRequest, TreeError, WorkerView,
};
use preble_prefix::{ROOT_HASH, path_hash};
use proptest::prelude::*;

mod common;
use common::{cache, route, workers};

fn prompt(family: u32, shared: usize, unique: u32, len: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..shared as u32).map(|t| family * 100_000 + t).collect();
    p.extend((0..len as u32).map(|t| 50_000 + unique * 1000 + t));
    p
}

#[test]
fn a_repeated_prefix_is_exploited_and_a_new_one_explores_to_an_idle_worker() {
    let ws = workers(4);
    let mut e2 = E2::new(E2Config::default());
    let first = route(&mut e2, &ws, "a", &prompt(1, 2000, 0, 50), 0);
    assert_eq!(first.kind, DecisionKind::Explore);
    cache(&mut e2, &first.worker, &prompt(1, 2000, 0, 50), 1);
    for i in 1..5 {
        let d = route(
            &mut e2,
            &ws,
            &format!("a{i}"),
            &prompt(1, 2000, i, 50),
            10 * u64::from(i),
        );
        assert_eq!(d.kind, DecisionKind::Exploit, "{d:?}");
        assert_eq!(d.worker, first.worker);
        assert_eq!(d.cached_tokens, 2000);
    }
    // A new prefix goes where there is no load.
    let other = route(&mut e2, &ws, "b", &prompt(2, 2000, 0, 50), 100);
    assert_eq!(other.kind, DecisionKind::Explore);
    assert_ne!(other.worker, first.worker, "{other:?}");
}

#[test]
fn a_burst_sharing_a_new_prefix_follows_the_first_assignment_before_any_cache_event() {
    let ws = workers(4);
    let mut e2 = E2::new(E2Config::default());
    let first = route(&mut e2, &ws, "x0", &prompt(3, 3000, 0, 10), 0);
    for i in 1..4 {
        let d = route(&mut e2, &ws, &format!("x{i}"), &prompt(3, 3000, i, 10), 1);
        assert_eq!(d.worker, first.worker);
        assert_eq!(d.kind, DecisionKind::Exploit);
    }
}

#[test]
fn an_overloaded_holder_sheds_requests_after_the_warm_up() {
    let ws = workers(4);
    let mut e2 = E2::new(E2Config {
        warmup_requests: 10,
        ..E2Config::default()
    });
    let mut holders = std::collections::BTreeSet::new();
    let mut kinds = std::collections::BTreeMap::new();
    for i in 0..200u32 {
        let p = prompt(7, 1500, i, 30);
        let d = route(&mut e2, &ws, &format!("h{i}"), &p, u64::from(i) * 10);
        cache(&mut e2, &d.worker, &p, u64::from(i) * 10 + 1);
        holders.insert(d.worker.clone());
        *kinds.entry(d.kind).or_insert(0) += 1;
    }
    assert!(
        kinds.get(&DecisionKind::Rebalance).copied().unwrap_or(0) > 0,
        "{kinds:?}"
    );
    assert_eq!(
        holders.len(),
        4,
        "the hot prefix spread over every worker: {holders:?}"
    );
    assert!(
        kinds[&DecisionKind::Exploit] > 150,
        "most requests still reuse a cached copy: {kinds:?}"
    );
}

/// Routes one request after a holder's TTFT went from `before_ms` to `after_ms` over the window,
/// with `queues` prefill tokens queued on the holder and on the other worker.
fn route_after_ttft_change(
    before_ms: f64,
    after_ms: f64,
    queues: (u64, u64),
) -> (String, preble_policy::Decision) {
    route_after_ttft_changes(before_ms, after_ms, queues, None)
}

/// As [`route_after_ttft_change`]; `other_recent_ms`, if any, is the TTFT the other worker's
/// requests had lately.
fn route_after_ttft_changes(
    before_ms: f64,
    after_ms: f64,
    queues: (u64, u64),
    other_recent_ms: Option<f64>,
) -> (String, preble_policy::Decision) {
    let mut ws = workers(2);
    let mut e2 = E2::new(E2Config {
        warmup_requests: u64::MAX,
        window_ms: 60_000,
        ..E2Config::default()
    });
    let p = prompt(9, 2000, 0, 10);
    let d = route(&mut e2, &ws, "r0", &p, 0);
    cache(&mut e2, &d.worker, &p, 1);
    for w in &mut ws {
        w.load.reported_prefill_tokens = if w.id == d.worker { queues.0 } else { queues.1 };
    }
    for i in 0..20u64 {
        let ttft_ms = if i < 10 { before_ms } else { after_ms };
        e2.observe(&ClusterEvent::Finished {
            worker: &d.worker,
            output_tokens: 20,
            ttft_ms,
            tpot_ms: 20.0,
            now_ms: 1_000 + i * 3_000,
        })
        .unwrap();
        if let Some(ttft_ms) = other_recent_ms.filter(|_| i >= 10) {
            let other = ws.iter().find(|w| w.id != d.worker).unwrap();
            e2.observe(&ClusterEvent::Finished {
                worker: &other.id,
                output_tokens: 20,
                ttft_ms,
                tpot_ms: 20.0,
                now_ms: 1_000 + i * 3_000,
            })
            .unwrap();
        }
    }
    let next = route(&mut e2, &ws, "r1", &prompt(9, 2000, 1, 10), 60_500);
    (d.worker, next)
}

#[test]
fn a_holder_whose_ttft_doubles_gets_its_prefix_replicated() {
    let (holder, next) = route_after_ttft_change(100.0, 400.0, (8_000, 0));
    assert_eq!(next.kind, DecisionKind::Replicate, "{next:?}");
    assert_ne!(next.worker, holder);
}

#[test]
fn a_prefix_is_not_replicated_when_every_worker_slowed_down() {
    // The other worker's requests waited as long lately: the cluster is overloaded, not the
    // prefix hot; a replica would only add prefill work.
    let (holder, next) = route_after_ttft_changes(100.0, 400.0, (8_000, 0), Some(300.0));
    assert_eq!(next.kind, DecisionKind::Exploit, "{next:?}");
    assert_eq!(next.worker, holder);
    // Well above the others' it still is hot.
    let (holder, next) = route_after_ttft_changes(100.0, 400.0, (8_000, 0), Some(150.0));
    assert_eq!(next.kind, DecisionKind::Replicate, "{next:?}");
    assert_ne!(next.worker, holder);
}

#[test]
fn a_hot_prefix_is_not_replicated_onto_a_busier_worker() {
    let (holder, next) = route_after_ttft_change(100.0, 400.0, (8_000, 30_000));
    assert_eq!(next.kind, DecisionKind::Exploit, "{next:?}");
    assert_eq!(next.worker, holder);
}

#[test]
fn a_ttft_that_doubles_but_stays_below_the_prefill_time_is_not_replicated() {
    // 2,010 tokens take well over 40 ms to prefill on an A6000: waiting 40 ms for the cached
    // copy beats recomputing it elsewhere.
    let (holder, next) = route_after_ttft_change(10.0, 40.0, (8_000, 0));
    assert_eq!(next.kind, DecisionKind::Exploit, "{next:?}");
    assert_eq!(next.worker, holder);
}

#[test]
fn a_new_prefix_avoids_a_worker_with_a_long_queue() {
    let mut ws = workers(3);
    ws[1].load.reported_prefill_tokens = 40_000;
    for seed in 0..20 {
        let mut e2 = E2::new(E2Config {
            seed,
            ..E2Config::default()
        });
        let d = route(&mut e2, &ws, "q0", &prompt(11, 1000, 0, 10), 0);
        assert_eq!(d.kind, DecisionKind::Explore);
        assert_ne!(d.worker, "gpu-1", "seed {seed}: {d:?}");
    }
}

#[test]
fn a_new_prefix_avoids_a_worker_with_many_requests_outstanding() {
    // Same history in the window, but one worker still decodes 30 requests: its load is what
    // is outstanding now, not what was routed minutes ago.
    let mut ws = workers(3);
    ws[2].load.outstanding = 30;
    for seed in 0..20 {
        let mut e2 = E2::new(E2Config {
            seed,
            ..E2Config::default()
        });
        let d = route(&mut e2, &ws, "o0", &prompt(12, 1000, 0, 10), 0);
        assert_eq!(d.kind, DecisionKind::Explore);
        assert_ne!(d.worker, "gpu-2", "seed {seed}: {d:?}");
    }
}

#[test]
fn evicted_prefixes_are_no_longer_exploited() {
    let ws = workers(2);
    let mut kv = KvCost::new(KvCostConfig::default());
    let p = prompt(4, 1000, 0, 10);
    let d = route(&mut kv, &ws, "k0", &p, 0);
    cache(&mut kv, &d.worker, &p, 1);
    let again = route(&mut kv, &ws, "k1", &p, 2);
    assert_eq!(
        (again.worker.as_str(), again.cached_tokens),
        (d.worker.as_str(), 1010)
    );
    kv.observe(&ClusterEvent::CacheEvicted {
        worker: &d.worker,
        hash: path_hash(&p),
        num_tokens: p.len() as u32,
    })
    .unwrap();
    let after = route(&mut kv, &ws, "k2", &p, 3);
    assert_eq!(after.cached_tokens, 0);
}

#[test]
fn cache_aware_follows_the_cache_until_the_cluster_is_unbalanced() {
    let mut ws = workers(2);
    let mut ca = CacheAware::new(CacheAwareConfig::default());
    let p = prompt(5, 1000, 0, 10);
    let d = route(&mut ca, &ws, "c0", &p, 0);
    let again = route(&mut ca, &ws, "c1", &prompt(5, 1000, 1, 10), 1);
    assert_eq!(
        (again.worker.clone(), again.kind),
        (d.worker.clone(), DecisionKind::Exploit)
    );
    for w in &mut ws {
        w.load.outstanding = if w.id == d.worker { 100 } else { 0 };
    }
    let shed = route(&mut ca, &ws, "c2", &prompt(5, 1000, 2, 10), 2);
    assert_eq!(shed.kind, DecisionKind::Load);
    assert_ne!(shed.worker, d.worker);
}

#[test]
fn a_gone_worker_is_forgotten() {
    let ws = workers(3);
    let mut e2 = E2::new(E2Config::default());
    let p = prompt(6, 1000, 0, 10);
    let d = route(&mut e2, &ws, "g0", &p, 0);
    cache(&mut e2, &d.worker, &p, 1);
    e2.observe(&ClusterEvent::WorkerGone { worker: &d.worker })
        .unwrap();
    let alive: Vec<WorkerView> = ws.iter().filter(|w| w.id != d.worker).cloned().collect();
    let next = route(&mut e2, &alive, "g1", &p, 2);
    assert_ne!(next.worker, d.worker);
    assert_eq!(
        e2.mirror().tree.held_tokens(0)
            + e2.mirror().tree.held_tokens(1)
            + e2.mirror().tree.held_tokens(2),
        0
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every decision names an eligible worker, and the same inputs give the same decisions.
    #[test]
    fn decisions_are_eligible_and_deterministic(
        steps in proptest::collection::vec((0u32..6, 0u32..1000, 1usize..5, 0u64..3), 1..60),
        seed in 0u64..1000,
    ) {
        let all = workers(5);
        let make = || -> Vec<Box<dyn Policy>> {
            vec![
                Box::new(E2::new(E2Config { seed, warmup_requests: 5, ..E2Config::default() })),
                Box::new(CacheAware::new(CacheAwareConfig { seed, ..CacheAwareConfig::default() })),
                Box::new(KvCost::new(KvCostConfig { seed, ..KvCostConfig::default() })),
            ]
        };
        let (mut a, mut b) = (make(), make());
        for (i, (family, unique, live, extra_load)) in steps.into_iter().enumerate() {
            let mut ws: Vec<WorkerView> = all[..live].to_vec();
            for w in &mut ws {
                w.load.outstanding = extra_load as u32;
            }
            let p = prompt(family, 300, unique, 20);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let dx = route(x.as_mut(), &ws, &format!("r{i}"), &p, i as u64 * 100);
                let dy = route(y.as_mut(), &ws, &format!("r{i}"), &p, i as u64 * 100);
                prop_assert!(ws.iter().any(|w| w.id == dx.worker), "{} named {}", x.name(), dx.worker);
                prop_assert_eq!(&dx, &dy);
                if i % 2 == 0 {
                    cache(x.as_mut(), &dx.worker, &p, i as u64 * 100 + 1);
                    cache(y.as_mut(), &dy.worker, &p, i as u64 * 100 + 1);
                }
            }
        }
    }
}

/// E2's rules worked through by hand on small clusters: every cost term is recomputed here
/// from the cost model and checked against the decision and its reason.
mod worked_examples {
    use super::*;
    use preble_costmodel::Profile;

    /// Decode time E2 charges per outstanding request before any request finished: the prior
    /// output length (64 here, the requests' `max_tokens`) at the profile's batch-16 step.
    fn decode_per_request() -> f64 {
        64.0 * Profile::a6000_mistral_7b().decode_step_ms(16, 16 * 1024)
    }

    fn prefill(extend: u32, context: u32) -> f64 {
        Profile::a6000_mistral_7b().prefill_ms(extend, context)
    }

    fn with_outstanding(counts: &[u32]) -> Vec<WorkerView> {
        let mut ws = workers(counts.len());
        for (w, &n) in ws.iter_mut().zip(counts) {
            w.load.outstanding = n;
        }
        ws
    }

    #[test]
    fn a_hit_larger_than_the_miss_is_exploited_despite_the_holders_load() {
        // gpu-0 caches 800 of the prompt's 1,000 tokens and decodes 5 requests; gpu-1 is idle.
        // 800 cached > 200 missed: exploit, before the warm-up allows any rebalancing.
        let ws = with_outstanding(&[5, 0]);
        let mut e2 = E2::new(E2Config::default());
        let p = prompt(20, 800, 0, 200);
        cache(&mut e2, "gpu-0", &p[..800], 0);
        let d = route(&mut e2, &ws, "a", &p, 10);
        assert_eq!(
            (d.worker.as_str(), d.kind),
            ("gpu-0", DecisionKind::Exploit)
        );
        assert_eq!(d.cached_tokens, 800);
        // Its terms: 5 outstanding decodes, nothing evicted, the 200 missed tokens to prefill.
        let load = 5.0 * decode_per_request();
        assert_eq!(
            d.reason,
            format!(
                "cached=800/1000 L={load:.1}ms M=0.0ms P={:.1}ms",
                prefill(200, 800)
            )
        );
    }

    #[test]
    fn a_small_hit_explores_and_the_cheaper_total_wins() {
        // gpu-0 caches 400 of 1,000 tokens: 400 < 600 missed, so explore. Its total is
        // k x D + P(600 after 400); gpu-1's is j x D + P(1000): the decode load of one
        // request outweighs the 400 cached tokens.
        let p0 = prefill(600, 400);
        let p1 = prefill(1000, 0);
        let d = decode_per_request();
        assert!(d > p1 - p0 && p1 > p0, "D {d} P0 {p0} P1 {p1}");
        for (k, j, winner) in [
            (0, 0, "gpu-0"),
            (1, 0, "gpu-1"),
            (2, 2, "gpu-0"),
            (3, 2, "gpu-1"),
        ] {
            let ws = with_outstanding(&[k, j]);
            let mut e2 = E2::new(E2Config::default());
            let p = prompt(21, 400, 0, 600);
            cache(&mut e2, "gpu-0", &p[..400], 0);
            let decision = route(&mut e2, &ws, "b", &p, 10);
            assert_eq!(decision.kind, DecisionKind::Explore);
            assert_eq!(decision.worker, winner, "k={k} j={j}: {decision:?}");
            let (outstanding, cached, p) = if winner == "gpu-0" {
                (k, 400, p0)
            } else {
                (j, 0, p1)
            };
            let load = f64::from(outstanding) * d;
            assert_eq!(
                decision.reason,
                format!("cached={cached}/1000 L={load:.1}ms M=0.0ms P={p:.1}ms")
            );
        }
    }

    #[test]
    fn after_the_warm_up_an_overloaded_holder_is_passed_over() {
        // The holder's load must exceed 1.5 x the lightest load plus the prompt's own full
        // prefill time: 5 x D > 1.5 x 0 + P(1000) rebalances; 5 x D > 1.5 x 4 x D does not.
        for (light, kind, worker) in [
            (0, DecisionKind::Rebalance, "gpu-1"),
            (4, DecisionKind::Exploit, "gpu-0"),
        ] {
            let ws = with_outstanding(&[5, light]);
            let mut e2 = E2::new(E2Config {
                warmup_requests: 0,
                ..E2Config::default()
            });
            let p = prompt(22, 800, 0, 200);
            cache(&mut e2, "gpu-0", &p[..800], 0);
            let d = route(&mut e2, &ws, "c", &p, 10);
            assert_eq!((d.worker.as_str(), d.kind), (worker, kind), "{d:?}");
        }
    }

    #[test]
    fn a_prefill_heavy_request_explores_to_the_worker_that_is_mostly_decoding() {
        // gpu-0 decodes 4 requests (L = 4 x D, D = 4 tokens x the prior TPOT); gpu-1 has a
        // prefill queue of q tokens, P(q) between 2 x D and 4 x D. A new 2,000-token prompt
        // (its prefill above D: prefill-heavy) costs less on gpu-1 by whole load, but with
        // the paper's prefill/decode balance gpu-0's decoding counts half (decode_discount
        // 0.5) and it goes there.
        let profile = Profile::a6000_mistral_7b();
        let d = 4.0 * profile.decode_step_ms(16, 16 * 1024);
        assert!(prefill(2000, 0) > d, "the request is prefill-heavy");
        let q = (100..20_000u32)
            .step_by(50)
            .find(|&q| prefill(q, 0) > 3.0 * d)
            .expect("a queue length");
        assert!(prefill(q, 0) < 4.0 * d && prefill(q, 0) > 2.0 * d);
        for (discount, winner) in [(0.5, "gpu-0"), (1.0, "gpu-1")] {
            let mut ws = with_outstanding(&[4, 0]);
            ws[1].load.reported_prefill_tokens = u64::from(q);
            let mut e2 = E2::new(E2Config {
                decode_discount: discount,
                ..E2Config::default()
            });
            let p = prompt(40, 0, 0, 2000);
            let decision = e2
                .route(
                    &ClusterView { workers: &ws },
                    &RouteRequest {
                        request_id: "pd",
                        prompt: &p,
                        max_tokens: 4,
                        now_ms: 0,
                    },
                )
                .expect("a decision");
            assert_eq!(decision.kind, DecisionKind::Explore);
            assert_eq!(decision.worker, winner, "discount {discount}: {decision:?}");
        }
    }

    /// Routes `id` and releases it at once unless `keep_running`; returns where it went.
    fn serve(
        e2: &mut E2,
        ws: &[WorkerView],
        id: &str,
        prompt: &[u32],
        now_ms: u64,
        keep_running: bool,
    ) -> String {
        let d = route(e2, ws, id, prompt, now_ms);
        if !keep_running {
            e2.observe(&ClusterEvent::Released {
                worker: &d.worker,
                request_id: id,
            })
            .expect("applies");
        }
        d.worker
    }

    #[test]
    fn eviction_cost_walks_the_lru_order_weighting_each_prefix_by_its_requests() {
        // gpu-0's 1,000-token cache holds prefix a (500 tokens, 3 requests in the window)
        // and then b (500 tokens, 1 request, used last). A new 500-token prompt must evict
        // 500 tokens: the least recently used, a, so M = P(500) x 3/4. While a request still
        // runs through a, a cannot go and b is the victim: M = P(500) x 1/4. gpu-1 is kept
        // busy so gpu-0 is chosen and its terms show in the reason.
        for (a_running, share) in [(false, 0.75), (true, 0.25)] {
            let mut ws = with_outstanding(&[0, 50]);
            ws[0].kv_capacity_tokens = 1_000;
            let mut e2 = E2::new(E2Config::default());
            let a = prompt(23, 500, 0, 0);
            let b = prompt(24, 500, 0, 0);
            assert_eq!(serve(&mut e2, &ws, "a1", &a, 0, false), "gpu-0");
            cache(&mut e2, "gpu-0", &a, 1);
            assert_eq!(serve(&mut e2, &ws, "a2", &a, 2, false), "gpu-0");
            assert_eq!(serve(&mut e2, &ws, "a3", &a, 3, a_running), "gpu-0");
            assert_eq!(serve(&mut e2, &ws, "b1", &b, 4, false), "gpu-0");
            cache(&mut e2, "gpu-0", &b, 5);
            let y = prompt(25, 500, 0, 0);
            let d = route(&mut e2, &ws, "y", &y, 10);
            assert_eq!(
                (d.worker.as_str(), d.kind),
                ("gpu-0", DecisionKind::Explore)
            );
            // L is the explore-weighted load (the queue of prefill booked at 0..4 ms and still
            // draining, plus the window as a rate); this test is about M.
            let evict = prefill(500, 0) * share;
            let terms = format!(" M={evict:.1}ms P={:.1}ms", prefill(500, 0));
            assert!(
                d.reason.starts_with("cached=0/500 L=") && d.reason.ends_with(&terms),
                "a running: {a_running}: {} should end with {terms}",
                d.reason
            );
        }
    }

    #[test]
    fn an_exploring_request_goes_where_the_work_is_now_not_where_it_was_minutes_ago() {
        // gpu-0 prefilled ten long prompts two minutes ago, all finished; gpu-1 was given one
        // a moment ago and is still prefilling it. A new unrelated prompt explores to the idle
        // gpu-0. The paper's code, counting the whole window's work, queues it behind gpu-1.
        let ws = workers(2);
        for (config, want) in [
            (E2Config::default(), "gpu-0"),
            (E2Config::default().paper(), "gpu-1"),
        ] {
            let mut e2 = E2::new(config);
            for i in 0..10u32 {
                let old = prompt(60 + i, 4_000, 0, 0);
                serve(
                    &mut e2,
                    &ws[..1],
                    &format!("old{i}"),
                    &old,
                    u64::from(i) * 100,
                    false,
                );
            }
            serve(
                &mut e2,
                &ws[1..],
                "busy",
                &prompt(80, 4_000, 0, 0),
                120_000,
                true,
            );
            let d = route(&mut e2, &ws, "new", &prompt(81, 4_000, 0, 0), 120_010);
            assert_eq!(
                (d.worker.as_str(), d.kind),
                (want, DecisionKind::Explore),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_burst_spreads_before_the_next_load_report_arrives() {
        // At the last load report gpu-0 was idle and the others had 1,000 tokens queued. Two
        // long unrelated prompts arrive in the same millisecond: the first goes to gpu-0, and
        // the prefill booked there keeps the second off it, though the report still says idle.
        let mut ws = workers(4);
        for w in &mut ws[1..] {
            w.load.reported_prefill_tokens = 1_000;
        }
        let mut e2 = E2::new(E2Config::default());
        let first = route(&mut e2, &ws, "b0", &prompt(90, 4_000, 0, 0), 5);
        let second = route(&mut e2, &ws, "b1", &prompt(91, 4_000, 0, 0), 5);
        assert_eq!(first.worker, "gpu-0", "{first:?}");
        assert_ne!(second.worker, "gpu-0", "{second:?}");
    }

    #[test]
    fn a_cache_nobody_reused_in_the_window_costs_nothing_to_evict() {
        // The same cache, but a and b were used before the window (H = 1 s) began.
        let mut ws = with_outstanding(&[0, 50]);
        ws[0].kv_capacity_tokens = 1_000;
        let mut e2 = E2::new(E2Config {
            window_ms: 1_000,
            ..E2Config::default()
        });
        let a = prompt(26, 500, 0, 0);
        let b = prompt(27, 500, 0, 0);
        serve(&mut e2, &ws, "a1", &a, 0, false);
        cache(&mut e2, "gpu-0", &a, 1);
        serve(&mut e2, &ws, "b1", &b, 2, false);
        cache(&mut e2, "gpu-0", &b, 3);
        serve(&mut e2, &ws, "c1", &prompt(28, 10, 0, 0), 5_000, false);
        let d = route(&mut e2, &ws, "y", &prompt(29, 500, 0, 0), 5_001);
        assert_eq!(d.worker, "gpu-0");
        assert!(d.reason.contains(" M=0.0ms "), "{}", d.reason);
    }
}

/// Routes a hot prefix (4 requests) and a warm one (2 requests, shorter) to one worker,
/// overloads that worker, and returns where a request for the warm prefix goes right after
/// (at 1 s), then once the other worker is the busier one, and where the hot prefix goes then.
fn route_around_a_rebalance(subtree_rebalance: bool) -> (String, [preble_policy::Decision; 3]) {
    let mut ws = workers(2);
    let mut e2 = E2::new(E2Config {
        warmup_requests: 0,
        subtree_rebalance,
        ..E2Config::default()
    });
    let hot = |i: u32| prompt(30, 1500, i, 30);
    let warm = |i: u32| prompt(31, 1200, i, 30);
    let holder = route(&mut e2, &ws, "h0", &hot(0), 0).worker;
    let (h, other) = if holder == "gpu-0" { (0, 1) } else { (1, 0) };
    // One request decoding on the other worker keeps the holder from shedding early.
    ws[other].load.outstanding = 1;
    for i in 1..4u32 {
        let d = route(&mut e2, &ws, &format!("h{i}"), &hot(i), u64::from(i));
        assert_eq!(d.worker, holder, "{d:?}");
    }
    for i in 0..2u32 {
        let d = route(&mut e2, &ws, &format!("w{i}"), &warm(i), u64::from(10 + i));
        assert_eq!(d.worker, holder, "{d:?}");
    }
    ws[h].load.outstanding = 10;
    let moved = route(&mut e2, &ws, "w2", &warm(2), 1_000);
    ws[h].load.outstanding = 2;
    ws[other].load.outstanding = 3;
    let after = route(&mut e2, &ws, "w3", &warm(3), 1_100);
    let hot_after = route(&mut e2, &ws, "h4", &hot(4), 1_200);
    (holder, [moved, after, hot_after])
}

#[test]
fn subtree_rebalancing_moves_a_prefix_to_a_new_owner_that_keeps_it() {
    let (holder, [moved, after, hot_after]) = route_around_a_rebalance(true);
    assert_eq!(moved.kind, DecisionKind::Rebalance, "{moved:?}");
    assert_ne!(moved.worker, holder);
    // The warm prefix now belongs to the other worker, though it is the busier one now.
    assert_eq!(after.worker, moved.worker, "{after:?}");
    // The hot prefix stayed: its stream alone would have made the other worker the heavy one.
    assert_eq!(hot_after.worker, holder, "{hot_after:?}");
    // Without it, the request after goes back to the less loaded copy.
    let (holder, [moved, after, _]) = route_around_a_rebalance(false);
    assert_ne!(moved.worker, holder);
    assert_eq!(after.worker, holder, "{after:?}");
}

/// `e2-paper`: the paper's public code as E2 plays it, next to E2 on the same scenarios.
mod paper_code {
    use super::*;
    use preble_policy::{PolicyKind, PolicySettings};

    #[test]
    fn explore_leaves_the_requests_own_prefill_out_and_ties_go_to_the_first_worker() {
        // gpu-1 caches 400 of 1,000 tokens (too few to exploit); both workers are idle. E2
        // explores to gpu-1, where P is smaller; the paper's code weighs L + M only, a tie,
        // which goes to the first worker.
        let ws = workers(2);
        let p = prompt(50, 400, 0, 600);
        for (kind, worker) in [(PolicyKind::E2, "gpu-1"), (PolicyKind::E2Paper, "gpu-0")] {
            let mut policy = kind.build(&PolicySettings::default());
            cache(policy.as_mut(), "gpu-1", &p[..400], 0);
            let d = route(policy.as_mut(), &ws, "p", &p, 10);
            assert_eq!(d.kind, DecisionKind::Explore);
            assert_eq!(d.worker, worker, "{}: {d:?}", policy.name());
        }
    }

    #[test]
    fn an_overloaded_holder_keeps_its_requests_and_decodes_count_over_the_window() {
        // The worked example above: 5 decodes on the holder, none on the other worker, after
        // the warm-up. E2 passes the holder over; the paper's code only moves subtrees, so the
        // request stays. Its L counts the request routed in the window, not what is
        // outstanding.
        let mut ws = workers(2);
        ws[0].load.outstanding = 5;
        let p = prompt(51, 800, 0, 200);
        for (kind, worker) in [(PolicyKind::E2, "gpu-1"), (PolicyKind::E2Paper, "gpu-0")] {
            let settings = PolicySettings {
                e2: E2Config {
                    warmup_requests: 0,
                    ..E2Config::default()
                },
                ..PolicySettings::default()
            };
            let mut policy = kind.build(&settings);
            cache(policy.as_mut(), "gpu-0", &p[..800], 0);
            let d = route(policy.as_mut(), &ws, "o", &p, 10);
            assert_eq!(d.worker, worker, "{}: {d:?}", policy.name());
            if kind == PolicyKind::E2Paper {
                assert_eq!(d.kind, DecisionKind::Exploit);
                assert!(d.reason.contains(" L=0.0ms "), "nothing routed yet: {d:?}");
            }
        }
    }
}

// Policy inputs come from the network: lying cache events and impossible timings are refused
// or dropped, and the policies keep routing.

fn policies() -> Vec<Box<dyn Policy>> {
    vec![
        Box::new(E2::new(E2Config::default())),
        Box::new(E2::new(E2Config::default().paper())),
    ]
}

#[test]
fn a_cache_event_whose_hash_does_not_match_its_tokens_is_refused() {
    for mut policy in policies() {
        let tokens: Vec<u32> = (0..100).collect();
        let lie = policy.observe(&ClusterEvent::CacheInserted {
            worker: "gpu-0",
            parent_hash: ROOT_HASH,
            hash: path_hash(&tokens) ^ 1,
            tokens: &tokens,
            now_ms: 0,
        });
        assert!(
            matches!(lie, Err(TreeError::HashMismatch { .. })),
            "{lie:?}"
        );
        // Nothing of the lie was kept, and the policy routes on.
        let ws = workers(2);
        route(policy.as_mut(), &ws, "r", &tokens, 1);
        policy
            .observe(&ClusterEvent::CacheInserted {
                worker: "gpu-0",
                parent_hash: ROOT_HASH,
                hash: path_hash(&tokens),
                tokens: &tokens,
                now_ms: 2,
            })
            .expect("the truth applies");
    }
}

#[test]
fn impossible_timings_never_poison_routing() {
    for mut policy in policies() {
        let ws = workers(3);
        for (i, (ttft, tpot)) in [
            (f64::NAN, f64::INFINITY),
            (f64::INFINITY, f64::NAN),
            (-5.0, f64::MAX),
            (1e300, -1.0),
        ]
        .into_iter()
        .cycle()
        .take(400)
        .enumerate()
        {
            policy
                .observe(&ClusterEvent::Finished {
                    worker: &ws[i % 3].id,
                    output_tokens: u32::MAX,
                    ttft_ms: ttft,
                    tpot_ms: tpot,
                    now_ms: i as u64,
                })
                .expect("a finish applies");
        }
        // Idle workers and poisoned estimates: every request still gets a worker.
        for i in 0..20u32 {
            let prompt: Vec<u32> = (0..50).map(|t| t + i * 1000).collect();
            route(policy.as_mut(), &ws, &format!("r{i}"), &prompt, 1_000);
        }
    }
}
