//! The global prefix tree: which worker holds (or was sent) which token prefix.
//!
//! A token-level radix tree with compressed edges, one per model. Each node records the workers
//! whose KV cache holds it (from the workers' own cache events: `holders`), the workers requests
//! for it were routed to (`routed`, so a burst of requests sharing a new prefix sees the first
//! one's assignment before the worker reports its cache), and its last access. Node ends are named by path hashes (`preble_prefix`), the same
//! names the workers use in their events, so events apply without shipping whole paths.
//!
//! Each node also keeps every worker's use of it ([`WorkerUse`]: requests in the load window,
//! requests running now, last use), and each worker's held nodes are indexed in its cache's
//! eviction order, so the cost of what a request would make a worker evict is a short walk.
//!
//! Memory is bounded: past `max_tokens`, least recently used leaves that no worker holds and no
//! request is running through are pruned, and single-child chains that no worker holds are
//! merged.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use preble_prefix::{ROOT_HASH, common_prefix_len, extend};
use rustc_hash::FxHashMap;

use crate::usage::WorkerUse;
use crate::workers::{WorkerIdx, WorkerSet};

/// Index of a node.
pub type NodeIdx = u32;

const ROOT: NodeIdx = 0;

/// Why a worker's cache event could not be applied (the tree and the worker disagree; the
/// caller should ask the worker for a digest).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The event follows a path the tree does not know.
    #[error("unknown parent path {0:#x}")]
    UnknownParent(u64),
    /// The event names a path the tree does not know.
    #[error("unknown path {0:#x}")]
    UnknownPath(u64),
    /// The event's path hash is not the hash of its parent path and tokens (a lying event).
    #[error("path hash {claimed:#x} does not match its tokens (expected {expected:#x})")]
    HashMismatch {
        /// The hash the event claimed.
        claimed: u64,
        /// The hash of its parent path and tokens.
        expected: u64,
    },
}

/// Default load window of the per-node request counts, milliseconds (the paper's H).
pub const DEFAULT_WINDOW_MS: u64 = 180_000;

#[derive(Clone, Debug, Default)]
struct Node {
    tokens: Vec<u32>,
    parent: NodeIdx,
    children: u32,
    hash: u64,
    /// Tokens from the root through the node's last token.
    end: u32,
    holders: WorkerSet,
    routed: WorkerSet,
    last_access_ms: u64,
    uses: Vec<WorkerUse>,
}

impl Node {
    fn use_of(&self, w: WorkerIdx) -> Option<&WorkerUse> {
        self.uses.iter().find(|u| u.worker == w)
    }

    fn running(&self) -> bool {
        self.uses.iter().any(|u| u.active > 0)
    }
}

/// Position of a held node in its worker's eviction order: least recently used first, deeper
/// first among equals (a child is evicted before its parent).
type LruKey = (u64, Reverse<u32>, NodeIdx);

/// A node a worker's cache would give up for a request (see [`GlobalTree::eviction_victims`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Victim {
    /// Its tokens.
    pub tokens: u32,
    /// Tokens before it on its path (the context its recomputation would attend to).
    pub context: u32,
    /// The worker's requests through it in the load window.
    pub requests: f64,
}

/// What recording a routed request returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutedPath {
    /// The prompt's key portion.
    pub key: Option<PrefixKey>,
    /// The hash naming the end of the prompt's path (to mark the request running and done).
    pub end_hash: u64,
}

/// The two worker sets of a node.
#[derive(Clone, Copy, Debug)]
enum Mark {
    /// Workers whose cache holds the node.
    Holder,
    /// Workers requests for the node were sent to.
    Routed,
}

/// What a walk down the tree found for a prompt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeMatch {
    /// For each worker that holds or was sent a prefix of the prompt: the length of that
    /// prefix (contiguous from the root).
    pub per_worker: Vec<(WorkerIdx, u32)>,
    /// The longest prefix known at all (held by someone or not).
    pub known: u32,
    /// The key portion of the known prefix (see [`PrefixKey`]).
    pub key: Option<PrefixKey>,
    /// The nodes the prompt walked through, root first (the last one maybe only in part).
    pub path: Vec<NodeIdx>,
}

/// A prompt's key portion (the paper's unit of load accounting and of rebalancing): the
/// deepest node on its path that is longer than all its ancestors together, such as a tool's
/// description below a shared system prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixKey {
    /// The path hash naming the node's end.
    pub hash: u64,
    /// Tokens from the root to the node's end.
    pub tokens: u32,
}

/// Tracks the key portion along a walk down a path, node by node.
#[derive(Default)]
struct KeyTracker {
    before: u32,
    key: Option<PrefixKey>,
}

impl KeyTracker {
    fn node(&mut self, hash: u64, len: u32) {
        if len > self.before {
            self.key = Some(PrefixKey {
                hash,
                tokens: self.before + len,
            });
        }
        self.before += len;
    }
}

impl TreeMatch {
    /// The matched length for worker `w` (0 if none).
    pub fn len_for(&self, w: WorkerIdx) -> u32 {
        self.per_worker
            .iter()
            .find(|(x, _)| *x == w)
            .map_or(0, |(_, n)| *n)
    }
}

/// The global prefix tree.
#[derive(Clone, Debug)]
pub struct GlobalTree {
    nodes: Vec<Node>,
    free: Vec<NodeIdx>,
    children: FxHashMap<(NodeIdx, u32), NodeIdx>,
    by_hash: FxHashMap<u64, NodeIdx>,
    /// Tokens each worker holds, by worker index.
    held: Vec<u64>,
    /// Tokens of the nodes each worker was sent requests for, by worker index.
    routed: Vec<u64>,
    /// Each worker's held nodes in its eviction order, by worker index.
    lru: Vec<BTreeSet<LruKey>>,
    total_tokens: u64,
    max_tokens: u64,
    window_ms: u64,
    /// When stale routed marks were last expired.
    expired_at_ms: u64,
}

impl GlobalTree {
    /// An empty tree holding at most `max_tokens` tokens (beyond that it prunes what no worker
    /// holds).
    pub fn new(max_tokens: u64) -> Self {
        let mut by_hash = FxHashMap::default();
        by_hash.insert(ROOT_HASH, ROOT);
        Self {
            nodes: vec![Node {
                hash: ROOT_HASH,
                ..Node::default()
            }],
            free: Vec::new(),
            children: FxHashMap::default(),
            by_hash,
            held: Vec::new(),
            routed: Vec::new(),
            lru: Vec::new(),
            total_tokens: 0,
            max_tokens,
            window_ms: DEFAULT_WINDOW_MS,
            expired_at_ms: 0,
        }
    }

    /// Counts requests per node over a window of `window_ms` from now on.
    pub fn set_window(&mut self, window_ms: u64) {
        self.window_ms = window_ms.max(1);
    }

    /// Tokens in the tree.
    pub fn total_tokens(&self) -> u64 {
        self.total_tokens
    }

    /// Nodes in the tree, the root included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    /// Tokens worker `w` holds in its cache (by its events).
    pub fn held_tokens(&self, w: WorkerIdx) -> u64 {
        self.held.get(usize::from(w)).copied().unwrap_or(0)
    }

    /// Tokens of the nodes worker `w` was sent requests for (and that it did not evict).
    pub fn routed_tokens(&self, w: WorkerIdx) -> u64 {
        self.routed.get(usize::from(w)).copied().unwrap_or(0)
    }

    /// Bytes the tree's structures hold.
    pub fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self
                .nodes
                .iter()
                .map(|n| {
                    n.tokens.capacity() * 4 + n.uses.capacity() * std::mem::size_of::<WorkerUse>()
                })
                .sum::<usize>()
            + self
                .lru
                .iter()
                .map(|set| set.len() * (std::mem::size_of::<LruKey>() + 8))
                .sum::<usize>()
            + self.children.capacity() * (std::mem::size_of::<((u32, u32), u32)>() + 1)
            + self.by_hash.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
    }

    fn child(&self, parent: NodeIdx, token: u32) -> Option<NodeIdx> {
        self.children.get(&(parent, token)).copied()
    }

    /// Walks the prompt: per worker, the longest prefix it holds or was sent.
    pub fn match_prefix(&self, tokens: &[u32]) -> TreeMatch {
        let mut lens: FxHashMap<WorkerIdx, u32> = FxHashMap::default();
        let mut key = KeyTracker::default();
        let mut node = ROOT;
        let mut pos = 0usize;
        let mut path = Vec::new();
        while pos < tokens.len() {
            let Some(c) = self.child(node, tokens[pos]) else {
                break;
            };
            path.push(c);
            let n = common_prefix_len(&self.nodes[c as usize].tokens, &tokens[pos..]);
            let set = self.nodes[c as usize]
                .holders
                .union(&self.nodes[c as usize].routed);
            for w in set.iter() {
                let len = lens.entry(w).or_insert(0);
                if *len as usize == pos {
                    *len = (pos + n) as u32;
                }
            }
            pos += n;
            if n < self.nodes[c as usize].tokens.len() {
                break;
            }
            key.node(self.nodes[c as usize].hash, n as u32);
            node = c;
        }
        let mut per_worker: Vec<(WorkerIdx, u32)> =
            lens.into_iter().filter(|(_, n)| *n > 0).collect();
        per_worker.sort_unstable();
        TreeMatch {
            per_worker,
            known: pos as u32,
            key: key.key,
            path,
        }
    }

    /// Records that a request with this prompt was routed to `w` at `now_ms`: the path is
    /// inserted (if new), touched, marked as sent to `w` and counted as `w`'s request. Returns
    /// the path's key portion and end (`None` for an empty prompt).
    pub fn record_route(
        &mut self,
        tokens: &[u32],
        w: WorkerIdx,
        now_ms: u64,
    ) -> Option<RoutedPath> {
        if tokens.is_empty() {
            return None;
        }
        let mut key = KeyTracker::default();
        let path = self.insert_below(ROOT, tokens, now_ms);
        let end_hash = path.last().map(|&id| self.nodes[id as usize].hash)?;
        let window = self.window_ms;
        for id in path {
            self.mark(id, w, Mark::Routed, true);
            self.touch(id, w, now_ms);
            self.use_mut(id, w).record(now_ms, window);
            let node = &self.nodes[id as usize];
            key.node(node.hash, node.tokens.len() as u32);
        }
        if now_ms >= self.expired_at_ms.saturating_add(self.window_ms / 8) {
            self.expire_routed(now_ms);
        }
        self.enforce_bound();
        Some(RoutedPath {
            key: key.key,
            end_hash,
        })
    }

    /// Forgets stale predictions: a worker's routed mark on a node it does not hold, when no
    /// request through the node was sent to it for a whole window and none runs there (its
    /// cache never took the prefix, or the request failed first); then prunes the leaves
    /// nobody holds, was sent or runs. [`GlobalTree::record_route`] calls it every eighth of
    /// a window.
    pub fn expire_routed(&mut self, now_ms: u64) {
        self.expired_at_ms = now_ms;
        let since = now_ms.saturating_sub(self.window_ms);
        let mut leaves = Vec::new();
        for id in 1..self.nodes.len() as NodeIdx {
            let n = &self.nodes[id as usize];
            if n.tokens.is_empty() {
                continue;
            }
            let stale: Vec<WorkerIdx> = n
                .routed
                .iter()
                .filter(|&w| {
                    !n.holders.contains(w)
                        && n.use_of(w)
                            .is_none_or(|u| u.last_ms < since && u.active == 0)
                })
                .collect();
            for w in stale {
                self.mark(id, w, Mark::Routed, false);
            }
            if self.nodes[id as usize].children == 0 {
                leaves.push(id);
            }
        }
        for id in leaves {
            self.remove_if_unused(id);
        }
        self.merge_chains();
    }

    /// Marks a request through the path ending at `end_hash` as running on `w`: its nodes are
    /// not evictable there and not pruned until [`GlobalTree::end_request`].
    pub fn begin_request(&mut self, end_hash: u64, w: WorkerIdx) {
        let Some(&end) = self.by_hash.get(&end_hash) else {
            return;
        };
        let mut id = end;
        while id != ROOT {
            let u = self.use_mut(id, w);
            u.active = u.active.saturating_add(1);
            id = self.nodes[id as usize].parent;
        }
    }

    /// Ends what [`GlobalTree::begin_request`] began (nothing if the path or the worker's
    /// record is gone).
    pub fn end_request(&mut self, end_hash: u64, w: WorkerIdx) {
        let Some(&end) = self.by_hash.get(&end_hash) else {
            return;
        };
        let mut id = end;
        while id != ROOT {
            let node = &mut self.nodes[id as usize];
            if let Some(u) = node.uses.iter_mut().find(|u| u.worker == w) {
                u.active = u.active.saturating_sub(1);
            }
            id = node.parent;
        }
        self.remove_if_unused(end);
    }

    /// Worker `w`'s requests through the prefix named `hash` in the load window ending at
    /// `now_ms` (0 for an unknown prefix).
    pub fn window_requests(&self, hash: u64, w: WorkerIdx, now_ms: u64) -> f64 {
        self.by_hash
            .get(&hash)
            .and_then(|&id| self.nodes[id as usize].use_of(w))
            .map_or(0.0, |u| u.requests(now_ms, self.window_ms))
    }

    /// Requests running on `w` through the prefix named `hash`.
    pub fn active_requests(&self, hash: u64, w: WorkerIdx) -> u32 {
        self.by_hash
            .get(&hash)
            .and_then(|&id| self.nodes[id as usize].use_of(w))
            .map_or(0, |u| u.active)
    }

    /// Walks worker `w`'s cache in its eviction order (least recently used first, children
    /// before parents) and hands `visit` each node it would give up to free `need` tokens,
    /// skipping nodes a request is running through on `w` and the nodes in `keep` (the new
    /// request's own path). Stops when `need` tokens are found or nothing is left.
    pub fn eviction_victims(
        &self,
        w: WorkerIdx,
        need: u64,
        keep: &[NodeIdx],
        now_ms: u64,
        mut visit: impl FnMut(Victim),
    ) {
        let Some(order) = self.lru.get(usize::from(w)) else {
            return;
        };
        let mut found = 0u64;
        for &(_, _, id) in order {
            if found >= need {
                break;
            }
            let node = &self.nodes[id as usize];
            let Some(u) = node.use_of(w) else {
                continue;
            };
            if u.active > 0 || keep.contains(&id) {
                continue;
            }
            let tokens = node.tokens.len() as u32;
            found += u64::from(tokens);
            visit(Victim {
                tokens,
                context: node.end - tokens,
                requests: u.requests(now_ms, self.window_ms),
            });
        }
    }

    /// Worker `w`'s record of node `id`, made if it has none.
    fn use_mut(&mut self, id: NodeIdx, w: WorkerIdx) -> &mut WorkerUse {
        let node = &mut self.nodes[id as usize];
        let i = match node.uses.iter().position(|u| u.worker == w) {
            Some(i) => i,
            None => {
                node.uses.push(WorkerUse::new(w, node.last_access_ms));
                node.uses.len() - 1
            }
        };
        &mut node.uses[i]
    }

    fn lru_of(&mut self, w: WorkerIdx) -> &mut BTreeSet<LruKey> {
        let i = usize::from(w);
        if self.lru.len() <= i {
            self.lru.resize_with(i + 1, BTreeSet::new);
        }
        &mut self.lru[i]
    }

    /// Where node `id` stands in `w`'s eviction order (if `w` has a record of it).
    fn lru_key(&self, id: NodeIdx, w: WorkerIdx) -> Option<LruKey> {
        let node = &self.nodes[id as usize];
        node.use_of(w).map(|u| (u.last_ms, Reverse(node.end), id))
    }

    /// Records that `w` used node `id` at `now_ms`, moving it in `w`'s eviction order.
    fn touch(&mut self, id: NodeIdx, w: WorkerIdx, now_ms: u64) {
        let held = self.nodes[id as usize].holders.contains(w);
        if held && let Some(old) = self.lru_key(id, w) {
            self.lru_of(w).remove(&old);
        }
        let u = self.use_mut(id, w);
        u.last_ms = u.last_ms.max(now_ms);
        if held && let Some(new) = self.lru_key(id, w) {
            self.lru_of(w).insert(new);
        }
    }

    /// Applies a worker's insert event: `tokens` after the path named `parent_hash`, with a
    /// boundary after them named `hash`.
    pub fn apply_inserted(
        &mut self,
        w: WorkerIdx,
        parent_hash: u64,
        hash: u64,
        tokens: &[u32],
        now_ms: u64,
    ) -> Result<(), TreeError> {
        let &parent = self
            .by_hash
            .get(&parent_hash)
            .ok_or(TreeError::UnknownParent(parent_hash))?;
        if tokens.is_empty() {
            return Ok(());
        }
        let expected = extend(parent_hash, tokens);
        if expected != hash {
            return Err(TreeError::HashMismatch {
                claimed: hash,
                expected,
            });
        }
        let path = self.insert_below(parent, tokens, now_ms);
        for &id in &path {
            self.mark(id, w, Mark::Holder, true);
        }
        // The worker just used the whole path from the root: its ancestors too, so that no
        // parent looks older to its cache than its child.
        let mut id = path.last().copied().unwrap_or(parent);
        while id != ROOT {
            self.touch(id, w, now_ms);
            id = self.nodes[id as usize].parent;
        }
        self.enforce_bound();
        Ok(())
    }

    /// Applies a worker's eviction event: it dropped the last `num_tokens` tokens of the path
    /// named `hash`.
    pub fn apply_evicted(
        &mut self,
        w: WorkerIdx,
        hash: u64,
        num_tokens: u32,
    ) -> Result<(), TreeError> {
        let &end = self
            .by_hash
            .get(&hash)
            .ok_or(TreeError::UnknownPath(hash))?;
        let mut left = u64::from(num_tokens);
        let mut id = end;
        while left > 0 && id != ROOT {
            self.mark(id, w, Mark::Holder, false);
            self.mark(id, w, Mark::Routed, false);
            left = left.saturating_sub(self.nodes[id as usize].tokens.len() as u64);
            id = self.nodes[id as usize].parent;
        }
        self.remove_if_unused(end);
        Ok(())
    }

    /// Forgets everything about worker `w` (it died, or a digest will replace its state).
    pub fn clear_worker(&mut self, w: WorkerIdx) {
        for id in 1..self.nodes.len() {
            let n = &mut self.nodes[id];
            n.holders.remove(w);
            n.routed.remove(w);
            n.uses.retain(|u| u.worker != w);
        }
        if let Some(order) = self.lru.get_mut(usize::from(w)) {
            order.clear();
        }
        if let Some(h) = self.held.get_mut(usize::from(w)) {
            *h = 0;
        }
        if let Some(r) = self.routed.get_mut(usize::from(w)) {
            *r = 0;
        }
        self.prune(0, false);
    }

    /// Adds (`present`) or removes worker `w` in one of node `id`'s sets, keeping that set's
    /// per-worker token count in step.
    fn mark(&mut self, id: NodeIdx, w: WorkerIdx, set: Mark, present: bool) {
        if matches!(set, Mark::Holder) && self.nodes[id as usize].holders.contains(w) != present {
            if present {
                self.use_mut(id, w);
                if let Some(key) = self.lru_key(id, w) {
                    self.lru_of(w).insert(key);
                }
            } else if let Some(key) = self.lru_key(id, w) {
                self.lru_of(w).remove(&key);
            }
        }
        let n = &mut self.nodes[id as usize];
        let (members, counts) = match set {
            Mark::Holder => (&mut n.holders, &mut self.held),
            Mark::Routed => (&mut n.routed, &mut self.routed),
        };
        if members.contains(w) == present {
            return;
        }
        let len = n.tokens.len() as u64;
        let i = usize::from(w);
        if counts.len() <= i {
            counts.resize(i + 1, 0);
        }
        if present {
            members.insert(w);
            counts[i] += len;
        } else {
            members.remove(w);
            counts[i] = counts[i].saturating_sub(len);
        }
    }

    /// Files `node` in a free slot of the node table; returns its index.
    fn store(&mut self, node: Node) -> NodeIdx {
        match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as NodeIdx
            }
        }
    }

    /// Inserts `tokens` below `start`, splitting edges so that a node ends exactly after the
    /// last token; returns the nodes covering `tokens`, in order, all touched at `now_ms`.
    fn insert_below(&mut self, start: NodeIdx, tokens: &[u32], now_ms: u64) -> Vec<NodeIdx> {
        let mut path = Vec::new();
        let mut node = start;
        let mut pos = 0;
        while pos < tokens.len() {
            let Some(c) = self.child(node, tokens[pos]) else {
                let leaf = self.add_node(node, tokens[pos..].to_vec(), now_ms);
                path.push(leaf);
                return path;
            };
            let common = common_prefix_len(&self.nodes[c as usize].tokens, &tokens[pos..]);
            let c = if common < self.nodes[c as usize].tokens.len() {
                self.split(c, common)
            } else {
                c
            };
            self.nodes[c as usize].last_access_ms = now_ms;
            path.push(c);
            pos += common;
            node = c;
        }
        path
    }

    fn add_node(&mut self, parent: NodeIdx, tokens: Vec<u32>, now_ms: u64) -> NodeIdx {
        let hash = extend(self.nodes[parent as usize].hash, &tokens);
        let first = tokens[0];
        self.total_tokens += tokens.len() as u64;
        let node = Node {
            end: self.nodes[parent as usize].end + tokens.len() as u32,
            tokens,
            parent,
            hash,
            last_access_ms: now_ms,
            ..Node::default()
        };
        let id = self.store(node);
        self.children.insert((parent, first), id);
        // A colliding hash (forged or not) never takes over another node's name, the root's
        // above all: the new node is then reachable by its tokens only.
        self.by_hash.entry(hash).or_insert(id);
        self.nodes[parent as usize].children += 1;
        id
    }

    /// Splits node `id` after `at` tokens; the new upper node keeps every record of the old
    /// one; `id` keeps the lower part. Returns the upper node.
    fn split(&mut self, id: NodeIdx, at: usize) -> NodeIdx {
        let (parent, upper_tokens, template) = {
            let n = &mut self.nodes[id as usize];
            let upper_tokens: Vec<u32> = n.tokens.drain(..at).collect();
            (
                n.parent,
                upper_tokens,
                Node {
                    end: n.end - n.tokens.len() as u32,
                    holders: n.holders,
                    routed: n.routed,
                    last_access_ms: n.last_access_ms,
                    uses: n.uses.clone(),
                    ..Node::default()
                },
            )
        };
        let first = upper_tokens[0];
        let lower_first = self.nodes[id as usize].tokens[0];
        let hash = extend(self.nodes[parent as usize].hash, &upper_tokens);
        let upper = Node {
            tokens: upper_tokens,
            parent,
            children: 1,
            hash,
            ..template
        };
        let upper_id = self.store(upper);
        self.children.insert((parent, first), upper_id);
        self.children.insert((upper_id, lower_first), id);
        self.by_hash.entry(hash).or_insert(upper_id);
        self.nodes[id as usize].parent = upper_id;
        let holders = self.nodes[upper_id as usize].holders;
        for w in holders.iter() {
            if let Some(key) = self.lru_key(upper_id, w) {
                self.lru_of(w).insert(key);
            }
        }
        upper_id
    }

    /// Removes `id` and then its ancestors while each is a leaf nobody holds or was sent.
    fn remove_if_unused(&mut self, mut id: NodeIdx) {
        while id != ROOT {
            let n = &self.nodes[id as usize];
            if n.children > 0 || !n.holders.is_empty() || !n.routed.is_empty() || n.running() {
                return;
            }
            let parent = n.parent;
            self.remove_leaf(id);
            id = parent;
        }
    }

    fn remove_leaf(&mut self, id: NodeIdx) {
        let holders = self.nodes[id as usize].holders;
        for w in holders.iter() {
            if let Some(key) = self.lru_key(id, w) {
                self.lru_of(w).remove(&key);
            }
        }
        let n = std::mem::take(&mut self.nodes[id as usize]);
        self.children.remove(&(n.parent, n.tokens[0]));
        if self.by_hash.get(&n.hash) == Some(&id) {
            self.by_hash.remove(&n.hash);
        }
        self.total_tokens -= n.tokens.len() as u64;
        for w in n.holders.iter() {
            if let Some(h) = self.held.get_mut(usize::from(w)) {
                *h = h.saturating_sub(n.tokens.len() as u64);
            }
        }
        for w in n.routed.iter() {
            if let Some(r) = self.routed.get_mut(usize::from(w)) {
                *r = r.saturating_sub(n.tokens.len() as u64);
            }
        }
        self.nodes[n.parent as usize].children -= 1;
        self.free.push(id);
    }

    /// Merges `id` into its only child `child` when no worker holds either (no worker can
    /// name the boundary between them, so it is not needed) and they were sent to the same
    /// workers.
    fn merge_into_child(&mut self, id: NodeIdx, child: NodeIdx) {
        let (n, c) = (&self.nodes[id as usize], &self.nodes[child as usize]);
        if id == ROOT
            || n.children != 1
            || c.parent != id
            || !n.holders.is_empty()
            || !c.holders.is_empty()
            || c.routed != n.routed
            || n.running()
            || c.running()
        {
            return;
        }
        let upper = std::mem::take(&mut self.nodes[id as usize]);
        let lower_first = self.nodes[child as usize].tokens[0];
        self.children.remove(&(id, lower_first));
        self.children.insert((upper.parent, upper.tokens[0]), child);
        if self.by_hash.get(&upper.hash) == Some(&id) {
            self.by_hash.remove(&upper.hash);
        }
        let c = &mut self.nodes[child as usize];
        let mut tokens = upper.tokens;
        tokens.extend_from_slice(&c.tokens);
        c.tokens = tokens;
        c.parent = upper.parent;
        c.last_access_ms = c.last_access_ms.max(upper.last_access_ms);
        for u in &upper.uses {
            match c.uses.iter_mut().find(|x| x.worker == u.worker) {
                Some(x) => x.absorb(u),
                None => c.uses.push(*u),
            }
        }
        self.free.push(id);
    }

    /// Merges every single-child chain that no worker holds.
    fn merge_chains(&mut self) {
        let mut only_child: FxHashMap<NodeIdx, NodeIdx> = FxHashMap::default();
        for id in 1..self.nodes.len() as NodeIdx {
            let n = &self.nodes[id as usize];
            if !n.tokens.is_empty() && self.nodes[n.parent as usize].children == 1 {
                only_child.insert(n.parent, id);
            }
        }
        for (parent, child) in only_child {
            self.merge_into_child(parent, child);
        }
    }

    fn enforce_bound(&mut self) {
        if self.total_tokens > self.max_tokens {
            let target = self.max_tokens - self.max_tokens / 10;
            self.prune(target, true);
        }
    }

    /// Removes least recently used leaves that no worker holds (routed-only predictions
    /// included) until at most `target` tokens remain or nothing more can go, then merges the
    /// chains left behind. Leaves a request is running through go last, and only when
    /// `hard` (the memory bound holds even if requests are never reported done).
    fn prune(&mut self, target: u64, hard: bool) {
        for spare_running in [true, false] {
            if !spare_running && !hard {
                break;
            }
            while self.total_tokens > target {
                let mut leaves: Vec<(u64, NodeIdx)> = (1..self.nodes.len() as NodeIdx)
                    .filter(|&id| {
                        let n = &self.nodes[id as usize];
                        !n.tokens.is_empty()
                            && n.children == 0
                            && n.holders.is_empty()
                            && !(spare_running && n.running())
                    })
                    .map(|id| (self.nodes[id as usize].last_access_ms, id))
                    .collect();
                if leaves.is_empty() {
                    break;
                }
                leaves.sort_unstable();
                for (_, id) in leaves {
                    if self.total_tokens <= target {
                        break;
                    }
                    self.remove_leaf(id);
                }
            }
        }
        self.merge_chains();
    }

    /// Every node some worker holds, parents first, with the indices of its holders (for
    /// snapshots: replaying them as each holder's inserts rebuilds what the workers hold).
    pub fn held_spans(&self) -> Vec<(u64, u64, Vec<u32>, Vec<WorkerIdx>)> {
        let mut kids: FxHashMap<NodeIdx, Vec<NodeIdx>> = FxHashMap::default();
        for (&(parent, _), &child) in &self.children {
            kids.entry(parent).or_default().push(child);
        }
        let mut out = Vec::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            let Some(children) = kids.get_mut(&id) else {
                continue;
            };
            children.sort_unstable();
            for &c in children.iter() {
                let n = &self.nodes[c as usize];
                if n.holders.is_empty() {
                    continue;
                }
                out.push((
                    self.nodes[id as usize].hash,
                    n.hash,
                    n.tokens.clone(),
                    n.holders.iter().collect(),
                ));
                stack.push(c);
            }
        }
        out
    }

    /// Checks that every worker's eviction order lists exactly the nodes it holds, at their
    /// current positions (for tests); returns what is wrong.
    #[doc(hidden)]
    pub fn check_eviction_order(&self) -> Result<(), String> {
        let workers = self.lru.len().max(self.held.len());
        for w in 0..workers as WorkerIdx {
            let mut expected = BTreeSet::new();
            for id in 1..self.nodes.len() as NodeIdx {
                let n = &self.nodes[id as usize];
                if n.tokens.is_empty() || !n.holders.contains(w) {
                    continue;
                }
                let key = self
                    .lru_key(id, w)
                    .ok_or_else(|| format!("worker {w} holds node {id} without a record"))?;
                expected.insert(key);
            }
            let actual = self.lru.get(usize::from(w)).cloned().unwrap_or_default();
            if actual != expected {
                return Err(format!(
                    "worker {w}: eviction order {actual:?}, held nodes {expected:?}"
                ));
            }
        }
        Ok(())
    }

    /// Every worker's held prefixes as root-to-node paths (for tests).
    #[doc(hidden)]
    pub fn held_prefixes(&self, w: WorkerIdx) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        for id in 1..self.nodes.len() as NodeIdx {
            let n = &self.nodes[id as usize];
            if n.tokens.is_empty() || !n.holders.contains(w) {
                continue;
            }
            let mut path = Vec::new();
            let mut x = id;
            while x != ROOT {
                let node = &self.nodes[x as usize];
                let mut t = node.tokens.clone();
                t.extend_from_slice(&path);
                path = t;
                x = node.parent;
            }
            for end in path.len() - n.tokens.len() + 1..=path.len() {
                out.push(path[..end].to_vec());
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use preble_prefix::path_hash;

    fn hold(tree: &mut GlobalTree, w: WorkerIdx, path: &[u32], now_ms: u64) {
        tree.apply_inserted(w, ROOT_HASH, path_hash(path), path, now_ms)
            .expect("applies");
    }

    /// The sizes of the nodes `w` would give up to free `need` tokens, in order.
    fn victims(tree: &GlobalTree, w: WorkerIdx, need: u64, keep: &[NodeIdx]) -> Vec<u32> {
        let mut out = Vec::new();
        tree.eviction_victims(w, need, keep, 100, |v| out.push(v.tokens));
        out
    }

    #[test]
    fn victims_come_least_recently_used_first_and_children_before_parents() {
        let mut tree = GlobalTree::new(1_000);
        let a: Vec<u32> = (0..3).collect();
        let b: Vec<u32> = (10..15).collect();
        let c: Vec<u32> = (20..27).collect();
        hold(&mut tree, 0, &a, 1);
        hold(&mut tree, 0, &b, 2);
        hold(&mut tree, 0, &c, 3);
        assert_eq!(victims(&tree, 0, 1, &[]), vec![3]);
        assert_eq!(victims(&tree, 0, 4, &[]), vec![3, 5]);
        assert_eq!(victims(&tree, 0, 100, &[]), vec![3, 5, 7]);
        // Using a again makes it the newest.
        tree.record_route(&a, 0, 4);
        assert_eq!(victims(&tree, 0, 100, &[]), vec![5, 7, 3]);
        // c extended by its own worker: the extension goes before c itself.
        let mut c2 = c.clone();
        c2.extend([90, 91]);
        tree.apply_inserted(0, path_hash(&c), path_hash(&c2), &c2[7..], 5)
            .expect("applies");
        assert_eq!(victims(&tree, 0, 100, &[]), vec![5, 3, 2, 7]);
        // Another worker's cache is its own order.
        assert!(victims(&tree, 1, 100, &[]).is_empty());
        tree.check_eviction_order().expect("consistent");
    }

    #[test]
    fn running_requests_and_the_new_requests_path_are_not_victims() {
        let mut tree = GlobalTree::new(1_000);
        let a: Vec<u32> = (0..3).collect();
        let b: Vec<u32> = (10..15).collect();
        hold(&mut tree, 0, &a, 1);
        hold(&mut tree, 0, &b, 2);
        let routed = tree.record_route(&a, 0, 3).expect("a path");
        tree.begin_request(routed.end_hash, 0);
        assert_eq!(tree.active_requests(routed.end_hash, 0), 1);
        // a is running, and the least recently used is now b... which is on the path kept.
        assert_eq!(victims(&tree, 0, 100, &[]), vec![5]);
        let keep = tree.match_prefix(&b).path;
        assert!(victims(&tree, 0, 100, &keep).is_empty());
        tree.end_request(routed.end_hash, 0);
        assert_eq!(tree.active_requests(routed.end_hash, 0), 0);
        assert_eq!(victims(&tree, 0, 100, &[]), vec![5, 3]);
    }

    #[test]
    fn requests_are_counted_per_node_and_worker_through_splits() {
        let mut tree = GlobalTree::new(1_000);
        let long: Vec<u32> = (0..10).collect();
        tree.record_route(&long, 0, 1);
        let mut other = long[..6].to_vec();
        other.push(99);
        // The second prompt splits the first one's node after 6 tokens: the upper part has
        // seen both requests, the rest only the first.
        tree.record_route(&other, 0, 2);
        tree.record_route(&other, 1, 3);
        let upper = path_hash(&long[..6]);
        assert_eq!(tree.window_requests(upper, 0, 10), 2.0);
        assert_eq!(tree.window_requests(upper, 1, 10), 1.0);
        assert_eq!(tree.window_requests(path_hash(&long), 0, 10), 1.0);
        assert_eq!(tree.window_requests(path_hash(&other), 1, 10), 1.0);
        // Three windows on, they have all gone.
        assert_eq!(tree.window_requests(upper, 0, 3 * DEFAULT_WINDOW_MS), 0.0);
    }

    #[test]
    fn predictions_no_worker_confirmed_expire_after_a_window() {
        let mut tree = GlobalTree::new(1_000);
        tree.set_window(1_000);
        let held: Vec<u32> = (0..10).collect();
        let guessed: Vec<u32> = (100..110).collect();
        // gpu-1 caches `held` (and was sent it); gpu-0 was sent both but never cached either.
        tree.record_route(&held, 1, 0);
        hold(&mut tree, 1, &held, 1);
        tree.record_route(&held, 0, 2);
        tree.record_route(&guessed, 0, 3);
        assert_eq!(tree.match_prefix(&guessed).len_for(0), 10);
        // Within the window nothing expires.
        tree.expire_routed(900);
        assert_eq!(tree.match_prefix(&held).len_for(0), 10);
        // A window on, gpu-0's marks are gone, the node it alone was sent with them; what
        // gpu-1 holds stays.
        tree.expire_routed(1_500);
        assert_eq!(tree.match_prefix(&guessed).known, 0);
        let m = tree.match_prefix(&held);
        assert_eq!((m.len_for(0), m.len_for(1)), (0, 10));
        assert_eq!(tree.total_tokens(), 10);
        // A request still running keeps its worker's mark however old.
        let r = tree.record_route(&guessed, 0, 2_000).expect("a path");
        tree.begin_request(r.end_hash, 0);
        tree.expire_routed(10_000);
        assert_eq!(tree.match_prefix(&guessed).len_for(0), 10);
        tree.check_eviction_order().expect("consistent");
    }

    #[test]
    fn a_node_with_a_running_request_is_not_pruned() {
        let mut tree = GlobalTree::new(20);
        let first: Vec<u32> = (0..10).collect();
        let routed = tree.record_route(&first, 0, 1).expect("a path");
        tree.begin_request(routed.end_hash, 0);
        for i in 0..10u32 {
            let p: Vec<u32> = (100 * (i + 1)..100 * (i + 1) + 10).collect();
            tree.record_route(&p, 1, u64::from(2 + i));
        }
        assert_eq!(
            tree.match_prefix(&first).len_for(0),
            10,
            "kept while running"
        );
        tree.end_request(routed.end_hash, 0);
        for i in 0..3u32 {
            let p: Vec<u32> = (5_000 + 10 * i..5_010 + 10 * i).collect();
            tree.record_route(&p, 1, u64::from(20 + i));
        }
        assert_eq!(tree.match_prefix(&first).len_for(0), 0, "pruned once done");
    }
}
