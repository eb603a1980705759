//! The radix KV cache of one worker: which token paths have their KV computed, and in which
//! slots.
//!
//! A token-level radix tree with compressed edges. Every cached token owns one KV slot (page
//! size 1); the engine reads and writes KV at those slot indices, so the bookkeeping is exact.
//! In-flight requests pin the path they read ([`RadixCache::pin`]); unpinned leaves are evicted
//! least recently used first when slots run out. Every insert and eviction is recorded as a
//! [`CacheEvent`] for the scheduler's mirror, and [`RadixCache::digest`] lists the whole tree in
//! the same form.

use std::collections::BTreeSet;

use preble_prefix::{ROOT_HASH, common_prefix_len, extend};
use rustc_hash::FxHashMap;

/// Index of one KV slot (one token's keys and values in every layer).
pub type Slot = u32;

/// A node of the tree. Stays valid while the node is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    /// The root: the empty path, never evicted.
    pub const ROOT: NodeId = NodeId(0);
}

/// A cached span of tokens: `tokens` follow the path named `parent_hash`, and the path through
/// them is named `hash` (hashes from [`preble_prefix`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheSpan {
    /// Hash of the path the span follows ([`ROOT_HASH`] for the root).
    pub parent_hash: u64,
    /// Hash of the path through the span's last token.
    pub hash: u64,
    /// The span's tokens.
    pub tokens: Vec<u32>,
}

/// A change to the cache's contents, for the scheduler's mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEvent {
    /// The cache now holds this span, and a node boundary after it. The span may have been
    /// cached already (an edge split in two announces its upper part), so replaying an insert
    /// is idempotent for contents.
    Inserted(CacheSpan),
    /// The cache dropped the last `num_tokens` tokens of the path named `hash`.
    Evicted {
        /// Hash of the path through the evicted span's last token.
        hash: u64,
        /// Length of the evicted span.
        num_tokens: u32,
    },
}

/// The longest cached prefix of a token sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// The node holding the prefix's last token (the root for an empty match); pin it to keep
    /// the prefix cached.
    pub node: NodeId,
    /// Matched tokens.
    pub len: usize,
    /// The slots of the matched tokens, in order.
    pub slots: Vec<Slot>,
}

#[derive(Clone, Debug, Default)]
struct Node {
    tokens: Vec<u32>,
    slots: Vec<Slot>,
    parent: u32,
    children: u32,
    /// Pins of this node and of its descendants.
    refs: u32,
    last_access: u64,
    /// Hash of the path through this node's last token.
    hash: u64,
    /// The key it is filed under in the eviction order, when it is an unpinned leaf.
    lru_key: Option<u64>,
}

/// The radix KV cache.
#[derive(Clone, Debug)]
pub struct RadixCache {
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    /// (parent, first token of the edge) -> child.
    children: FxHashMap<(u32, u32), u32>,
    free_slots: Vec<Slot>,
    capacity: u32,
    /// Unpinned leaves by last access: the eviction order.
    lru: BTreeSet<(u64, u32)>,
    clock: u64,
    cached_tokens: u64,
    unpinned_tokens: u64,
    events: Vec<CacheEvent>,
}

impl RadixCache {
    /// An empty cache of `capacity` slots.
    pub fn new(capacity: u32) -> Self {
        Self {
            nodes: vec![Node {
                hash: ROOT_HASH,
                ..Node::default()
            }],
            free_nodes: Vec::new(),
            children: FxHashMap::default(),
            free_slots: (0..capacity).rev().collect(),
            capacity,
            lru: BTreeSet::new(),
            clock: 0,
            cached_tokens: 0,
            unpinned_tokens: 0,
            events: Vec::new(),
        }
    }

    /// Slots in total.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Slots nobody uses.
    pub fn free_slots(&self) -> u64 {
        self.free_slots.len() as u64
    }

    /// Tokens held by the tree.
    pub fn cached_tokens(&self) -> u64 {
        self.cached_tokens
    }

    /// Slots that could be had now: free ones plus every cached token no request pins.
    pub fn available_slots(&self) -> u64 {
        self.free_slots() + self.unpinned_tokens
    }

    /// Nodes in the tree, the root included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free_nodes.len()
    }

    fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize]
    }

    fn node_mut(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    fn child(&self, parent: u32, token: u32) -> Option<u32> {
        self.children.get(&(parent, token)).copied()
    }

    /// Length of the longest cached prefix of `tokens`, without touching anything.
    pub fn peek_match_len(&self, tokens: &[u32]) -> usize {
        let mut node = 0;
        let mut pos = 0;
        while pos < tokens.len() {
            let Some(c) = self.child(node, tokens[pos]) else {
                break;
            };
            let n = common_prefix_len(&self.node(c).tokens, &tokens[pos..]);
            pos += n;
            if n < self.node(c).tokens.len() {
                break;
            }
            node = c;
        }
        pos
    }

    /// The longest cached prefix of `tokens[..limit]`; marks it used now. A match that ends
    /// inside an edge splits it, so that pinning the match pins exactly the matched tokens.
    pub fn match_prefix(&mut self, tokens: &[u32], limit: usize) -> PrefixMatch {
        let tokens = &tokens[..limit.min(tokens.len())];
        self.clock += 1;
        let mut node = 0;
        let mut pos = 0;
        let mut slots = Vec::new();
        while pos < tokens.len() {
            let Some(c) = self.child(node, tokens[pos]) else {
                break;
            };
            let n = common_prefix_len(&self.node(c).tokens, &tokens[pos..]);
            slots.extend_from_slice(&self.node(c).slots[..n]);
            self.touch(c);
            pos += n;
            if n < self.node(c).tokens.len() {
                node = self.split(c, n);
                self.touch(node);
                break;
            }
            node = c;
        }
        PrefixMatch {
            node: NodeId(node),
            len: pos,
            slots,
        }
    }

    /// Keeps `node` and its ancestors from eviction until [`RadixCache::unpin`].
    pub fn pin(&mut self, node: NodeId) {
        let mut id = node.0;
        while id != 0 {
            let n = self.node_mut(id);
            n.refs += 1;
            let (first, len, parent) = (n.refs == 1, n.tokens.len() as u64, n.parent);
            if first {
                self.unpinned_tokens -= len;
                self.refresh(id);
            }
            id = parent;
        }
    }

    /// Undoes one [`RadixCache::pin`] of `node`.
    pub fn unpin(&mut self, node: NodeId) {
        let mut id = node.0;
        while id != 0 {
            let n = self.node_mut(id);
            debug_assert!(n.refs > 0, "unpin of an unpinned node");
            n.refs = n.refs.saturating_sub(1);
            let (last, len, parent) = (n.refs == 0, n.tokens.len() as u64, n.parent);
            if last {
                self.unpinned_tokens += len;
                self.refresh(id);
            }
            id = parent;
        }
    }

    /// Takes `n` slots, evicting unpinned leaves if needed; `None` (and nothing taken) when
    /// fewer than `n` can be had.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<Slot>> {
        let mut out = Vec::with_capacity(n);
        self.alloc_into(n, &mut out).then_some(out)
    }

    /// Appends `n` slots to `out`, evicting unpinned leaves if needed; false (and nothing
    /// taken) when fewer than `n` can be had.
    pub fn alloc_into(&mut self, n: usize, out: &mut Vec<Slot>) -> bool {
        if (n as u64) > self.available_slots() {
            return false;
        }
        if self.free_slots.len() < n {
            self.evict((n - self.free_slots.len()) as u64);
        }
        if self.free_slots.len() < n {
            return false;
        }
        let at = self.free_slots.len() - n;
        out.extend(self.free_slots.drain(at..));
        true
    }

    /// Returns slots that are not in the tree (a request's own, unshared KV).
    pub fn free(&mut self, slots: &[Slot]) {
        self.free_slots.extend_from_slice(slots);
    }

    /// Evicts least recently used unpinned leaves until at least `n` slots were freed or
    /// nothing more can be; returns the number freed.
    pub fn evict(&mut self, n: u64) -> u64 {
        let mut freed = 0;
        while freed < n {
            let Some(&(_, id)) = self.lru.first() else {
                break;
            };
            freed += self.remove_leaf(id);
        }
        freed
    }

    /// Caches `tokens`, whose KV sits in `slots` (one per token). Where the tree already holds
    /// a token, the tree's slot wins: the caller's duplicate slot is freed and replaced in
    /// `slots` by the tree's. Every slot in `slots` belongs to the tree afterwards. Returns the
    /// node holding the last token (pin it to keep the path).
    pub fn insert(&mut self, tokens: &[u32], slots: &mut [Slot]) -> NodeId {
        assert_eq!(tokens.len(), slots.len(), "one slot per token");
        self.clock += 1;
        let mut node = 0;
        let mut pos = 0;
        loop {
            if pos == tokens.len() {
                return NodeId(node);
            }
            let Some(c) = self.child(node, tokens[pos]) else {
                let parent_hash = self.node(node).hash;
                let leaf = self.add_leaf(node, &tokens[pos..], &slots[pos..]);
                let hash = self.node(leaf).hash;
                self.events.push(CacheEvent::Inserted(CacheSpan {
                    parent_hash,
                    hash,
                    tokens: tokens[pos..].to_vec(),
                }));
                return NodeId(leaf);
            };
            let common = common_prefix_len(&self.node(c).tokens, &tokens[pos..]);
            let theirs = &self.nodes[c as usize].slots[..common];
            let mine = &mut slots[pos..pos + common];
            if mine != theirs {
                for (mine, theirs) in mine.iter_mut().zip(theirs) {
                    if *mine != *theirs {
                        self.free_slots.push(*mine);
                        *mine = *theirs;
                    }
                }
            }
            self.touch(c);
            if common == self.node(c).tokens.len() {
                node = c;
                pos += common;
                continue;
            }
            if pos + common == tokens.len() {
                return NodeId(c);
            }
            node = self.split(c, common);
            pos += common;
        }
    }

    /// Takes the events recorded since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        std::mem::take(&mut self.events)
    }

    /// The whole tree as spans, every span after the span it follows (replaying them as
    /// inserts on an empty mirror rebuilds the tree).
    pub fn digest(&self) -> Vec<CacheSpan> {
        let mut kids: FxHashMap<u32, Vec<u32>> = FxHashMap::default();
        for (&(parent, _), &child) in &self.children {
            kids.entry(parent).or_default().push(child);
        }
        let mut spans = Vec::with_capacity(self.node_count().saturating_sub(1));
        let mut stack = vec![0u32];
        while let Some(id) = stack.pop() {
            let Some(children) = kids.get_mut(&id) else {
                continue;
            };
            children.sort_unstable();
            for &c in children.iter() {
                let n = self.node(c);
                spans.push(CacheSpan {
                    parent_hash: self.node(id).hash,
                    hash: n.hash,
                    tokens: n.tokens.clone(),
                });
                stack.push(c);
            }
        }
        spans
    }

    /// Bytes of memory the tree's structures hold (for the memory benchmark and metrics).
    pub fn memory_bytes(&self) -> usize {
        let nodes = self.nodes.capacity() * std::mem::size_of::<Node>();
        let edges: usize = self
            .nodes
            .iter()
            .map(|n| (n.tokens.capacity() + n.slots.capacity()) * 4)
            .sum();
        let children = self.children.capacity() * (std::mem::size_of::<((u32, u32), u32)>() + 1);
        let lru = self.lru.len() * std::mem::size_of::<(u64, u32)>() * 2;
        nodes + edges + children + lru + self.free_slots.capacity() * 4
    }

    fn touch(&mut self, id: u32) {
        self.node_mut(id).last_access = self.clock;
        if self.node(id).lru_key.is_some() {
            self.refresh(id);
        }
    }

    /// Files `id` in the eviction order if it is an unpinned leaf, and out of it otherwise.
    fn refresh(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        let n = &mut self.nodes[id as usize];
        let evictable = n.refs == 0 && n.children == 0;
        let wanted = evictable.then_some(n.last_access);
        if n.lru_key == wanted {
            return;
        }
        if let Some(key) = n.lru_key.take() {
            self.lru.remove(&(key, id));
        }
        if let Some(key) = wanted {
            self.lru.insert((key, id));
        }
        self.nodes[id as usize].lru_key = wanted;
    }

    /// Files `node` in a free slot of the node table; returns its index.
    fn store(&mut self, node: Node) -> u32 {
        match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn add_leaf(&mut self, parent: u32, tokens: &[u32], slots: &[Slot]) -> u32 {
        let hash = extend(self.node(parent).hash, tokens);
        let node = Node {
            tokens: tokens.to_vec(),
            slots: slots.to_vec(),
            parent,
            children: 0,
            refs: 0,
            last_access: self.clock,
            hash,
            lru_key: None,
        };
        let id = self.store(node);
        self.children.insert((parent, tokens[0]), id);
        self.node_mut(parent).children += 1;
        self.refresh(parent);
        self.cached_tokens += tokens.len() as u64;
        self.unpinned_tokens += tokens.len() as u64;
        self.refresh(id);
        id
    }

    /// Splits node `id` after its first `at` tokens. The upper part becomes a new node; `id`
    /// keeps the lower part (so pins on it stay right). Returns the upper node. The new
    /// boundary is announced as an insert of the upper part (already cached, so mirrors only
    /// learn the boundary's name).
    fn split(&mut self, id: u32, at: usize) -> u32 {
        let (parent, first, refs, last_access, upper_tokens, upper_slots) = {
            let n = &mut self.nodes[id as usize];
            let upper_tokens: Vec<u32> = n.tokens.drain(..at).collect();
            let upper_slots: Vec<Slot> = n.slots.drain(..at).collect();
            (
                n.parent,
                upper_tokens[0],
                n.refs,
                n.last_access,
                upper_tokens,
                upper_slots,
            )
        };
        let hash = extend(self.node(parent).hash, &upper_tokens);
        let lower_first = self.node(id).tokens[0];
        let upper = Node {
            tokens: upper_tokens,
            slots: upper_slots,
            parent,
            children: 1,
            refs,
            last_access,
            hash,
            lru_key: None,
        };
        let upper_id = self.store(upper);
        self.children.insert((parent, first), upper_id);
        self.children.insert((upper_id, lower_first), id);
        self.node_mut(id).parent = upper_id;
        let announced = CacheSpan {
            parent_hash: self.node(parent).hash,
            hash,
            tokens: self.node(upper_id).tokens.clone(),
        };
        self.events.push(CacheEvent::Inserted(announced));
        upper_id
    }

    /// Removes an unpinned leaf; returns the slots freed.
    fn remove_leaf(&mut self, id: u32) -> u64 {
        let n = std::mem::take(&mut self.nodes[id as usize]);
        debug_assert!(
            n.refs == 0 && n.children == 0,
            "evicting a pinned or inner node"
        );
        if let Some(key) = n.lru_key {
            self.lru.remove(&(key, id));
        }
        let len = n.tokens.len() as u64;
        self.free_slots.extend_from_slice(&n.slots);
        self.cached_tokens -= len;
        self.unpinned_tokens -= len;
        self.children.remove(&(n.parent, n.tokens[0]));
        self.node_mut(n.parent).children -= 1;
        self.refresh(n.parent);
        self.free_nodes.push(id);
        self.events.push(CacheEvent::Evicted {
            hash: n.hash,
            num_tokens: len as u32,
        });
        len
    }

    /// Every slot the tree holds (tests check slots are never shared or lost).
    #[doc(hidden)]
    pub fn tree_slots(&self) -> Vec<Slot> {
        let mut live = vec![true; self.nodes.len()];
        for &f in &self.free_nodes {
            live[f as usize] = false;
        }
        self.nodes
            .iter()
            .zip(live)
            .filter(|(_, l)| *l)
            .flat_map(|(n, _)| n.slots.iter().copied())
            .collect()
    }

    /// The free slots (tests check slots are never shared or lost).
    #[doc(hidden)]
    pub fn free_slot_list(&self) -> &[Slot] {
        &self.free_slots
    }

    /// Checks the internal bookkeeping; panics with what is wrong (for tests).
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let mut live = vec![true; self.nodes.len()];
        for &f in &self.free_nodes {
            live[f as usize] = false;
        }
        let mut children = vec![0u32; self.nodes.len()];
        let mut refs_from_children = vec![0u32; self.nodes.len()];
        let (mut cached, mut unpinned) = (0u64, 0u64);
        for (id, n) in self.nodes.iter().enumerate().skip(1) {
            if !live[id] {
                continue;
            }
            assert!(!n.tokens.is_empty(), "empty node {id}");
            assert_eq!(n.tokens.len(), n.slots.len(), "node {id} slot count");
            assert!(live[n.parent as usize], "node {id} has a dead parent");
            assert_eq!(
                self.child(n.parent, n.tokens[0]),
                Some(id as u32),
                "node {id} missing from its parent's edges"
            );
            assert_eq!(
                n.hash,
                extend(self.node(n.parent).hash, &n.tokens),
                "node {id} hash"
            );
            children[n.parent as usize] += 1;
            refs_from_children[n.parent as usize] += n.refs;
            cached += n.tokens.len() as u64;
            if n.refs == 0 {
                unpinned += n.tokens.len() as u64;
            }
            let evictable = n.refs == 0 && n.children == 0;
            assert_eq!(n.lru_key.is_some(), evictable, "node {id} eviction filing");
            if let Some(key) = n.lru_key {
                assert!(self.lru.contains(&(key, id as u32)));
            }
        }
        for (id, n) in self.nodes.iter().enumerate() {
            if live[id] {
                assert_eq!(n.children, children[id], "node {id} child count");
                if id != 0 {
                    assert!(
                        n.refs >= refs_from_children[id],
                        "node {id} refs below its children's"
                    );
                }
            }
        }
        assert_eq!(self.children.len() as u32, children.iter().sum::<u32>());
        assert_eq!(cached, self.cached_tokens, "cached token count");
        assert_eq!(unpinned, self.unpinned_tokens, "unpinned token count");
        assert_eq!(
            self.lru.len(),
            self.nodes
                .iter()
                .enumerate()
                .filter(|(i, n)| live[*i] && n.lru_key.is_some())
                .count()
        );
    }
}
