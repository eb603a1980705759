//! The global prefix tree: which worker holds (or was sent) which token prefix.
//!
//! A token-level radix tree with compressed edges, one per model. Each node records the workers
//! whose KV cache holds it (from the workers' own cache events: `holders`), the workers requests
//! for it were routed to (`routed`, so a burst of requests sharing a new prefix sees the first
//! one's assignment before the worker reports its cache), and its last access. Node ends are named by path hashes (`preble_prefix`), the same
//! names the workers use in their events, so events apply without shipping whole paths.
//!
//! Memory is bounded: past `max_tokens`, least recently used leaves that no worker holds are
//! pruned, and single-child chains that no worker holds are merged.

use preble_prefix::{ROOT_HASH, common_prefix_len, extend};
use rustc_hash::FxHashMap;

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
}

#[derive(Clone, Debug, Default)]
struct Node {
    tokens: Vec<u32>,
    parent: NodeIdx,
    children: u32,
    hash: u64,
    holders: WorkerSet,
    routed: WorkerSet,
    last_access_ms: u64,
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
    total_tokens: u64,
    max_tokens: u64,
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
            total_tokens: 0,
            max_tokens,
        }
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
                .map(|n| n.tokens.capacity() * 4)
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
        while pos < tokens.len() {
            let Some(c) = self.child(node, tokens[pos]) else {
                break;
            };
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
        }
    }

    /// Records that a request with this prompt was routed to `w` at `now_ms`: the path is
    /// inserted (if new), touched, and marked as sent to `w`. Returns the path's key portion.
    pub fn record_route(&mut self, tokens: &[u32], w: WorkerIdx, now_ms: u64) -> Option<PrefixKey> {
        if tokens.is_empty() {
            return None;
        }
        let mut key = KeyTracker::default();
        for id in self.insert_below(ROOT, tokens, now_ms) {
            self.mark(id, w, Mark::Routed, true);
            let node = &self.nodes[id as usize];
            key.node(node.hash, node.tokens.len() as u32);
        }
        self.enforce_bound();
        key.key
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
        let path = self.insert_below(parent, tokens, now_ms);
        if let Some(&last) = path.last() {
            debug_assert_eq!(self.nodes[last as usize].hash, hash, "path hash mismatch");
        }
        for id in path {
            self.mark(id, w, Mark::Holder, true);
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
        }
        if let Some(h) = self.held.get_mut(usize::from(w)) {
            *h = 0;
        }
        if let Some(r) = self.routed.get_mut(usize::from(w)) {
            *r = 0;
        }
        self.prune(0);
    }

    /// Adds (`present`) or removes worker `w` in one of node `id`'s sets, keeping that set's
    /// per-worker token count in step.
    fn mark(&mut self, id: NodeIdx, w: WorkerIdx, set: Mark, present: bool) {
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
            tokens,
            parent,
            hash,
            last_access_ms: now_ms,
            ..Node::default()
        };
        let id = self.store(node);
        self.children.insert((parent, first), id);
        self.by_hash.insert(hash, id);
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
                    holders: n.holders,
                    routed: n.routed,
                    last_access_ms: n.last_access_ms,
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
        self.by_hash.insert(hash, upper_id);
        self.nodes[id as usize].parent = upper_id;
        upper_id
    }

    /// Removes `id` and then its ancestors while each is a leaf nobody holds or was sent.
    fn remove_if_unused(&mut self, mut id: NodeIdx) {
        while id != ROOT {
            let n = &self.nodes[id as usize];
            if n.children > 0 || !n.holders.is_empty() || !n.routed.is_empty() {
                return;
            }
            let parent = n.parent;
            self.remove_leaf(id);
            id = parent;
        }
    }

    fn remove_leaf(&mut self, id: NodeIdx) {
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
            self.prune(target);
        }
    }

    /// Removes least recently used leaves that no worker holds (routed-only predictions
    /// included) until at most `target` tokens remain or nothing more can go, then merges the
    /// chains left behind.
    fn prune(&mut self, target: u64) {
        while self.total_tokens > target {
            let mut leaves: Vec<(u64, NodeIdx)> = (1..self.nodes.len() as NodeIdx)
                .filter(|&id| {
                    let n = &self.nodes[id as usize];
                    !n.tokens.is_empty() && n.children == 0 && n.holders.is_empty()
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
