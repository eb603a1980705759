//! The global tree against the workers' real caches: random cache activity on several
//! `preble-localsched` caches, their events applied to one global tree, and each worker's view
//! in the tree compared with its cache's contents. Also the memory bound.

use std::collections::{BTreeSet, HashMap};

use preble_localsched::{CacheEvent, RadixCache};
use preble_policy::tree::GlobalTree;
use proptest::prelude::*;

mod common;
use common::serve;

#[derive(Clone, Debug)]
enum Op {
    Insert(usize, Vec<u32>),
    Match(usize, Vec<u32>),
    Evict(usize, u64),
    /// The scheduler routes a request to a fourth worker that never caches anything (the tree
    /// alone learns of it: its nodes split under the others').
    Route(Vec<u32>),
}

fn op(workers: usize) -> impl Strategy<Value = Op> {
    let path = proptest::collection::vec(0u32..3, 1..16);
    prop_oneof![
        4 => (0..workers, path.clone()).prop_map(|(w, p)| Op::Insert(w, p)),
        1 => (0..workers, path.clone()).prop_map(|(w, p)| Op::Match(w, p)),
        1 => path.prop_map(Op::Route),
        1 => (0..workers, 1u64..12).prop_map(|(w, n)| Op::Evict(w, n)),
    ]
}

/// A cache's contents (every cached prefix), rebuilt from its digest.
fn contents(cache: &RadixCache) -> BTreeSet<Vec<u32>> {
    let mut by_hash = HashMap::new();
    let mut out = BTreeSet::new();
    for span in cache.digest() {
        let mut path: Vec<u32> = if span.parent_hash == preble_prefix::ROOT_HASH {
            Vec::new()
        } else {
            by_hash
                .get(&span.parent_hash)
                .cloned()
                .expect("parent first")
        };
        for &t in &span.tokens {
            path.push(t);
            out.insert(path.clone());
        }
        by_hash.insert(span.hash, path);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_tree_mirrors_every_workers_cache(ops in proptest::collection::vec(op(3), 1..80)) {
        let mut caches: Vec<RadixCache> = (0..3).map(|_| RadixCache::new(40)).collect();
        let mut tree = GlobalTree::new(1_000_000);
        for (now, op) in ops.into_iter().enumerate() {
            let w = match &op {
                Op::Insert(w, _) | Op::Match(w, _) | Op::Evict(w, _) => *w,
                Op::Route(_) => 0,
            };
            let cache = &mut caches[w];
            match op {
                Op::Insert(_, tokens) => serve(cache, &tokens),
                Op::Match(_, tokens) => {
                    cache.match_prefix(&tokens, tokens.len());
                }
                Op::Evict(_, n) => {
                    cache.evict(n);
                }
                Op::Route(tokens) => {
                    tree.record_route(&tokens, 3, now as u64);
                }
            }
            for event in cache.take_events() {
                match event {
                    CacheEvent::Inserted(span) => tree
                        .apply_inserted(w as u16, span.parent_hash, span.hash, &span.tokens, now as u64)
                        .unwrap(),
                    CacheEvent::Evicted { hash, num_tokens } => {
                        tree.apply_evicted(w as u16, hash, num_tokens).unwrap()
                    }
                }
            }
            for (i, cache) in caches.iter().enumerate() {
                let want: Vec<Vec<u32>> = contents(cache).into_iter().collect();
                prop_assert_eq!(tree.held_prefixes(i as u16), want, "worker {}", i);
                prop_assert_eq!(tree.held_tokens(i as u16), cache.cached_tokens());
            }
            if let Err(e) = tree.check_eviction_order() {
                prop_assert!(false, "{}", e);
            }
        }
        // Matching: each worker's length is its longest cached prefix.
        let probe = [0u32, 1, 2, 0, 1, 2, 0, 0, 1, 1];
        tree.clear_worker(3);
        let m = tree.match_prefix(&probe);
        for (i, cache) in caches.iter().enumerate() {
            prop_assert_eq!(m.len_for(i as u16) as usize, cache.peek_match_len(&probe));
        }
        // A snapshot of the held spans replayed on an empty tree restores every worker.
        let mut restored = GlobalTree::new(1_000_000);
        for (parent_hash, hash, tokens, holders) in tree.held_spans() {
            for w in holders {
                restored.apply_inserted(w, parent_hash, hash, &tokens, 0).unwrap();
            }
        }
        for i in 0..3u16 {
            prop_assert_eq!(restored.held_prefixes(i), tree.held_prefixes(i));
        }
        // Dead workers leave nothing behind.
        for i in 0..3u16 {
            tree.clear_worker(i);
        }
        prop_assert_eq!(tree.total_tokens(), 0);
        prop_assert_eq!(tree.node_count(), 1);
    }

    #[test]
    fn routes_are_bounded_in_memory(prompts in proptest::collection::vec(
        proptest::collection::vec(0u32..50, 1..40), 1..200)) {
        let mut tree = GlobalTree::new(500);
        for (t, p) in prompts.iter().enumerate() {
            tree.record_route(p, (t % 4) as u16, t as u64);
            prop_assert!(tree.total_tokens() <= 500);
            prop_assert_eq!(tree.match_prefix(p).len_for((t % 4) as u16) as usize, p.len(),
                "the latest route is kept");
        }
    }
}
