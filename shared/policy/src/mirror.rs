//! The cache-aware policies' shared memory: the global tree plus the mapping from worker ids to
//! the tree's small worker indices, fed by cluster events.

use std::collections::HashMap;

use crate::tree::{GlobalTree, TreeError};
use crate::workers::{MAX_WORKERS, WorkerIdx};
use crate::{ClusterEvent, RouteError};

/// Default bound of the tree (tokens): about 1.5 GB of tree at most.
pub const DEFAULT_MAX_TREE_TOKENS: u64 = 50_000_000;

/// A span of the tree and the workers that hold it: replaying it as a
/// [`ClusterEvent::CacheInserted`] for each holder restores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedSpan {
    /// Hash of the path the span follows.
    pub parent_hash: u64,
    /// Hash of the path through the span.
    pub hash: u64,
    /// The span's tokens.
    pub tokens: Vec<u32>,
    /// Ids of the workers holding it.
    pub holders: Vec<String>,
}

/// The global tree and the worker index.
#[derive(Clone, Debug)]
pub struct Mirror {
    /// The tree.
    pub tree: GlobalTree,
    index: HashMap<String, WorkerIdx>,
    free: Vec<WorkerIdx>,
    next: usize,
}

impl Mirror {
    /// An empty mirror whose tree holds at most `max_tokens`.
    pub fn new(max_tokens: u64) -> Self {
        Self {
            tree: GlobalTree::new(max_tokens),
            index: HashMap::new(),
            free: Vec::new(),
            next: 0,
        }
    }

    /// The index of worker `id`, assigning one to a new worker.
    pub fn idx(&mut self, id: &str) -> Result<WorkerIdx, RouteError> {
        if let Some(&w) = self.index.get(id) {
            return Ok(w);
        }
        let w = match self.free.pop() {
            Some(w) => w,
            None if self.next < MAX_WORKERS => {
                self.next += 1;
                (self.next - 1) as WorkerIdx
            }
            None => return Err(RouteError::TooManyWorkers(MAX_WORKERS)),
        };
        self.index.insert(id.to_string(), w);
        Ok(w)
    }

    /// Nodes and tokens of the tree.
    pub fn size(&self) -> crate::TreeSize {
        crate::TreeSize {
            nodes: self.tree.node_count(),
            tokens: self.tree.total_tokens(),
            running_requests: 0,
        }
    }

    /// Everything the workers hold, parents first, by worker id (see [`ExportedSpan`]).
    pub fn export(&self) -> Vec<ExportedSpan> {
        let mut names: Vec<Option<&str>> = vec![None; self.next];
        for (id, &w) in &self.index {
            names[usize::from(w)] = Some(id.as_str());
        }
        self.tree
            .held_spans()
            .into_iter()
            .map(|(parent_hash, hash, tokens, holders)| ExportedSpan {
                parent_hash,
                hash,
                tokens,
                holders: holders
                    .into_iter()
                    .filter_map(|w| names.get(usize::from(w)).copied().flatten())
                    .map(str::to_string)
                    .collect(),
            })
            .collect()
    }

    /// The index of a known worker.
    pub fn known(&self, id: &str) -> Option<WorkerIdx> {
        self.index.get(id).copied()
    }

    /// Applies a cluster event to the tree. An error means the tree and the worker disagree:
    /// ask the worker for a digest.
    pub fn observe(&mut self, event: &ClusterEvent<'_>) -> Result<(), TreeError> {
        match *event {
            ClusterEvent::CacheInserted {
                worker,
                parent_hash,
                hash,
                tokens,
                now_ms,
            } => {
                let Ok(w) = self.idx(worker) else {
                    return Ok(());
                };
                self.tree
                    .apply_inserted(w, parent_hash, hash, tokens, now_ms)
            }
            ClusterEvent::CacheEvicted {
                worker,
                hash,
                num_tokens,
            } => match self.known(worker) {
                Some(w) => self.tree.apply_evicted(w, hash, num_tokens),
                None => Ok(()),
            },
            ClusterEvent::CacheReset { worker } => {
                if let Some(w) = self.known(worker) {
                    self.tree.clear_worker(w);
                }
                Ok(())
            }
            ClusterEvent::WorkerGone { worker } => {
                if let Some(w) = self.index.remove(worker) {
                    self.tree.clear_worker(w);
                    self.free.push(w);
                }
                Ok(())
            }
            ClusterEvent::Finished { .. } | ClusterEvent::Released { .. } => Ok(()),
        }
    }
}
