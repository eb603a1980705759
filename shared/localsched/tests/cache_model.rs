//! The radix cache against a naive model (the set of every cached prefix, with the slot of its
//! last token) under random operations; plus slot accounting, pin safety, and the mirror that
//! replays the cache's events.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use preble_localsched::{CacheEvent, CacheSpan, NodeId, RadixCache, Slot};
use preble_prefix::{ROOT_HASH, path_hash};
use proptest::prelude::*;

const CAPACITY: u32 = 48;

#[derive(Clone, Debug)]
enum Op {
    /// Match, allocate the rest, insert (what a finishing request does).
    Insert(Vec<u32>),
    Match(Vec<u32>),
    Pin(Vec<u32>),
    Unpin(usize),
    Evict(u64),
}

fn path() -> impl Strategy<Value = Vec<u32>> {
    proptest::collection::vec(0u32..3, 1..14)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => path().prop_map(Op::Insert),
        2 => path().prop_map(Op::Match),
        2 => path().prop_map(Op::Pin),
        2 => (0usize..8).prop_map(Op::Unpin),
        1 => (1u64..20).prop_map(Op::Evict),
    ]
}

/// Every cached prefix (non-empty) with the slot of its last token.
type Naive = BTreeMap<Vec<u32>, Slot>;

/// A mirror built only from events: the set of cached prefixes, found by hash.
#[derive(Default)]
struct Mirror {
    prefixes: BTreeSet<Vec<u32>>,
    by_hash: HashMap<u64, Vec<u32>>,
}

impl Mirror {
    fn add_path(&mut self, path: &[u32]) {
        for end in 1..=path.len() {
            let p = path[..end].to_vec();
            self.by_hash.insert(path_hash(&p), p.clone());
            self.prefixes.insert(p);
        }
    }

    fn apply(&mut self, event: &CacheEvent) {
        match event {
            CacheEvent::Inserted(span) => self.insert(span),
            CacheEvent::Evicted { hash, num_tokens } => {
                let path = self
                    .by_hash
                    .get(hash)
                    .cloned()
                    .expect("evicted path is known");
                let n = *num_tokens as usize;
                assert!(n >= 1 && n <= path.len());
                assert!(
                    !self
                        .prefixes
                        .iter()
                        .any(|p| p.len() > path.len() && p.starts_with(&path)),
                    "evicted span is not a leaf"
                );
                for end in path.len() - n + 1..=path.len() {
                    assert!(
                        self.prefixes.remove(&path[..end]),
                        "evicted tokens were cached"
                    );
                }
            }
        }
    }

    fn insert(&mut self, span: &CacheSpan) {
        let base = if span.parent_hash == ROOT_HASH {
            Vec::new()
        } else {
            self.by_hash
                .get(&span.parent_hash)
                .cloned()
                .expect("parent is known")
        };
        assert!(
            base.is_empty() || self.prefixes.contains(&base),
            "parent is cached"
        );
        let mut full = base;
        full.extend_from_slice(&span.tokens);
        assert_eq!(path_hash(&full), span.hash, "span hash");
        self.add_path(&full);
    }
}

fn check_slots(cache: &RadixCache, held: &[Slot]) {
    let mut all: Vec<Slot> = cache.tree_slots();
    all.extend_from_slice(cache.free_slot_list());
    all.extend_from_slice(held);
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "a slot is held twice");
    assert_eq!(
        all,
        (0..CAPACITY).collect::<Vec<_>>(),
        "slots lost or invented"
    );
}

fn naive_match(naive: &Naive, tokens: &[u32]) -> (usize, Vec<Slot>) {
    let mut slots = Vec::new();
    for end in 1..=tokens.len() {
        match naive.get(&tokens[..end]) {
            Some(&s) => slots.push(s),
            None => break,
        }
    }
    (slots.len(), slots)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn cache_matches_the_naive_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut cache = RadixCache::new(CAPACITY);
        let mut naive = Naive::new();
        let mut mirror = Mirror::default();
        let mut pins: Vec<(NodeId, Vec<u32>)> = Vec::new();
        for op in ops {
            match op {
                Op::Insert(tokens) => {
                    let m = cache.match_prefix(&tokens, tokens.len());
                    cache.pin(m.node);
                    let Some(own) = cache.alloc(tokens.len() - m.len) else {
                        cache.unpin(m.node);
                        // Allocation failed only if not enough could be had.
                        prop_assert!(((tokens.len() - m.len) as u64) > cache.available_slots());
                        continue;
                    };
                    let mut slots = m.slots.clone();
                    slots.extend(own);
                    apply_events(&mut cache, &mut naive, &mut mirror, &pins);
                    let before = slots.clone();
                    let node = cache.insert(&tokens, &mut slots);
                    cache.pin(node);
                    cache.unpin(m.node);
                    for end in 1..=tokens.len() {
                        let slot = *naive.entry(tokens[..end].to_vec()).or_insert(before[end - 1]);
                        prop_assert_eq!(slot, slots[end - 1], "the tree's slot wins");
                    }
                    cache.unpin(node);
                }
                Op::Match(tokens) => {
                    let m = cache.match_prefix(&tokens, tokens.len());
                    let (len, slots) = naive_match(&naive, &tokens);
                    prop_assert_eq!(m.len, len);
                    prop_assert_eq!(m.slots, slots);
                }
                Op::Pin(tokens) => {
                    let m = cache.match_prefix(&tokens, tokens.len());
                    cache.pin(m.node);
                    pins.push((m.node, tokens[..m.len].to_vec()));
                }
                Op::Unpin(i) => {
                    if !pins.is_empty() {
                        let (node, _) = pins.remove(i % pins.len());
                        cache.unpin(node);
                    }
                }
                Op::Evict(n) => {
                    let evictable = cache.available_slots() - cache.free_slots();
                    let freed = cache.evict(n);
                    prop_assert!(freed >= n.min(evictable) && freed <= evictable);
                }
            }
            apply_events(&mut cache, &mut naive, &mut mirror, &pins);
            cache.check_invariants();
            check_slots(&cache, &[]);
            let contents: BTreeSet<Vec<u32>> = naive.keys().cloned().collect();
            prop_assert_eq!(&mirror.prefixes, &contents, "mirror replayed from events");
            prop_assert_eq!(cache.cached_tokens(), contents.len() as u64);
        }
        // A digest replayed on an empty mirror rebuilds the same contents.
        let mut fresh = Mirror::default();
        for span in cache.digest() {
            fresh.insert(&span);
        }
        let contents: BTreeSet<Vec<u32>> = naive.keys().cloned().collect();
        prop_assert_eq!(fresh.prefixes, contents);
    }
}

/// Replays new events on the mirror and applies evictions to the naive model, checking that
/// nothing pinned was evicted.
fn apply_events(
    cache: &mut RadixCache,
    naive: &mut Naive,
    mirror: &mut Mirror,
    pins: &[(NodeId, Vec<u32>)],
) {
    for event in cache.take_events() {
        mirror.apply(&event);
        if let CacheEvent::Evicted { hash, num_tokens } = event {
            let path = naive
                .keys()
                .find(|p| path_hash(p) == hash)
                .cloned()
                .expect("the evicted path was cached");
            for end in path.len() - num_tokens as usize + 1..=path.len() {
                let gone = &path[..end];
                assert!(
                    !pins.iter().any(|(_, p)| p.starts_with(gone)),
                    "a pinned prefix was evicted"
                );
                naive.remove(gone);
            }
        }
    }
}

#[test]
fn lru_evicts_the_least_recently_used_leaf_first() {
    let mut cache = RadixCache::new(10);
    for path in [[1u32, 2, 3], [4, 5, 6], [7, 8, 9]] {
        let mut slots = cache.alloc(3).unwrap();
        cache.insert(&path, &mut slots);
    }
    cache.match_prefix(&[1, 2, 3], 3);
    cache.take_events();
    let slots = cache.alloc(3).unwrap();
    assert_eq!(slots.len(), 3);
    let events = cache.take_events();
    assert_eq!(
        events,
        vec![CacheEvent::Evicted {
            hash: path_hash(&[4, 5, 6]),
            num_tokens: 3
        }]
    );
    assert_eq!(cache.peek_match_len(&[1, 2, 3]), 3);
    assert_eq!(cache.peek_match_len(&[7, 8, 9]), 3);
}

#[test]
fn splits_announce_their_boundary_and_a_partial_match_pins_only_what_matched() {
    let mut cache = RadixCache::new(8);
    let mut slots = cache.alloc(4).unwrap();
    cache.insert(&[1, 2, 3, 4], &mut slots);
    cache.take_events();
    let m = cache.match_prefix(&[1, 2, 9], 3);
    assert_eq!(m.len, 2);
    assert_eq!(
        cache.take_events(),
        vec![CacheEvent::Inserted(CacheSpan {
            parent_hash: ROOT_HASH,
            hash: path_hash(&[1, 2]),
            tokens: vec![1, 2],
        })]
    );
    cache.pin(m.node);
    assert_eq!(cache.available_slots(), 4 + 2, "[3 4] stays evictable");
    let mut slots = m.slots.clone();
    slots.extend(cache.alloc(1).unwrap());
    cache.insert(&[1, 2, 9], &mut slots);
    assert_eq!(
        cache.take_events(),
        vec![CacheEvent::Inserted(CacheSpan {
            parent_hash: path_hash(&[1, 2]),
            hash: path_hash(&[1, 2, 9]),
            tokens: vec![9],
        })]
    );
    cache.check_invariants();
    assert_eq!(cache.node_count(), 4, "root, [1 2], [3 4], [9]");
}
