//! Our cache events as Dynamo's KV events.
//!
//! A preble worker announces cached *spans* (the tokens after a path, named by the hash of the
//! whole path, split wherever its radix tree splits) and evicts whole leaf spans. A Dynamo
//! worker (vLLM's KV events) announces fixed-size *blocks*: `Stored` for complete blocks, each
//! named by its chained sequence hash and matched by the hash of its own tokens, and `Removed`
//! by sequence hash. This ledger turns the first into the second, per worker:
//! - a block exists once every one of its tokens is cached (a partial last block is not
//!   announced, as in vLLM);
//! - each block belongs to the span its last token lies in; a span that splits hands the blocks
//!   ending in its upper part to the upper span, so evicting a leaf removes exactly the blocks
//!   that are no longer complete;
//! - token hashes and sequence hashes are Dynamo's own (`compute_block_hash_for_seq`,
//!   `compute_next_seq_hash`), so the router's hashes of a prompt meet the stored ones.

use dynamo_kv_router::protocols::{
    BlockHashOptions, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData,
    KvCacheStoreData, KvCacheStoredBlockData, RouterEvent, WorkerId, compute_block_hash_for_seq,
    compute_next_seq_hash,
};
use preble_prefix::{ROOT_HASH, extend};
use rustc_hash::FxHashMap;

use crate::tree::TreeError;

/// One span end a worker announced.
#[derive(Clone, Debug, Default)]
struct SpanEnd {
    /// Tokens after the last block boundary at or before the end (fewer than a block).
    tail: Vec<u32>,
    /// Sequence hash of the last complete block at or before the end.
    last_block: Option<u64>,
    /// Sequence hashes of the blocks completed inside the span, when it was announced.
    blocks: Vec<u64>,
}

/// One worker's spans and blocks.
#[derive(Clone, Debug, Default)]
struct WorkerBlocks {
    ends: FxHashMap<u64, SpanEnd>,
    /// Each stored block's owning span end.
    owner: FxHashMap<u64, u64>,
}

/// The per-worker translation of span events into block events.
#[derive(Clone, Debug)]
pub struct BlockLedger {
    block_size: u32,
    workers: FxHashMap<WorkerId, WorkerBlocks>,
    next_event_id: u64,
}

impl BlockLedger {
    /// A ledger for blocks of `block_size` tokens (at least 1).
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size: block_size.max(1),
            workers: FxHashMap::default(),
            next_event_id: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Worker `worker` cached `tokens` after the path `parent_hash`, ending at the path
    /// `hash`: the `Stored` events of the blocks this completes (none when they were stored
    /// already, as when a span splits).
    pub fn insert(
        &mut self,
        worker: WorkerId,
        parent_hash: u64,
        hash: u64,
        tokens: &[u32],
    ) -> Result<Vec<RouterEvent>, TreeError> {
        let expected = extend(parent_hash, tokens);
        if expected != hash {
            return Err(TreeError::HashMismatch {
                claimed: hash,
                expected,
            });
        }
        let block_size = self.block_size as usize;
        let state = self.workers.entry(worker).or_default();
        let parent = if parent_hash == ROOT_HASH {
            SpanEnd::default()
        } else {
            state
                .ends
                .get(&parent_hash)
                .cloned()
                .ok_or(TreeError::UnknownParent(parent_hash))?
        };
        let mut combined = parent.tail;
        combined.extend_from_slice(tokens);
        let complete = combined.len() / block_size * block_size;
        let local = compute_block_hash_for_seq(
            &combined[..complete],
            self.block_size,
            BlockHashOptions::default(),
        );
        let mut previous = parent.last_block;
        let mut blocks = Vec::with_capacity(local.len());
        let mut runs: Vec<KvCacheStoreData> = Vec::new();
        let mut open_run = false;
        for token_hash in local {
            let seq = previous.map_or(token_hash.0, |p| compute_next_seq_hash(p, token_hash));
            let fresh = state.owner.insert(seq, hash).is_none();
            if fresh {
                if !open_run {
                    runs.push(KvCacheStoreData {
                        parent_hash: previous.map(ExternalSequenceBlockHash),
                        start_position: None,
                        blocks: Vec::new(),
                    });
                }
                if let Some(run) = runs.last_mut() {
                    run.blocks.push(KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(seq),
                        tokens_hash: token_hash,
                        mm_extra_info: None,
                    });
                }
            }
            open_run = fresh;
            blocks.push(seq);
            previous = Some(seq);
        }
        state.ends.insert(
            hash,
            SpanEnd {
                tail: combined[complete..].to_vec(),
                last_block: previous,
                blocks,
            },
        );
        Ok(runs
            .into_iter()
            .map(|run| self.event(worker, KvCacheEventData::Stored(run)))
            .collect())
    }

    /// Worker `worker` evicted the leaf span ending at the path `hash`: the `Removed` event of
    /// the blocks that were complete only through it (none when there were none).
    pub fn evict(&mut self, worker: WorkerId, hash: u64) -> Result<Vec<RouterEvent>, TreeError> {
        let state = self
            .workers
            .get_mut(&worker)
            .ok_or(TreeError::UnknownPath(hash))?;
        let end = state
            .ends
            .remove(&hash)
            .ok_or(TreeError::UnknownPath(hash))?;
        let mut removed = Vec::new();
        for seq in end.blocks {
            if state.owner.get(&seq) == Some(&hash) {
                state.owner.remove(&seq);
                removed.push(ExternalSequenceBlockHash(seq));
            }
        }
        if removed.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![self.event(
            worker,
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: removed,
            }),
        )])
    }

    /// Forgets what `worker` holds: the `Cleared` event Dynamo's tree takes for it.
    pub fn clear(&mut self, worker: WorkerId) -> RouterEvent {
        self.workers.remove(&worker);
        self.event(worker, KvCacheEventData::Cleared)
    }

    /// Blocks stored over all workers.
    pub fn stored_blocks(&self) -> usize {
        self.workers.values().map(|w| w.owner.len()).sum()
    }

    fn event(&mut self, worker: WorkerId, data: KvCacheEventData) -> RouterEvent {
        self.next_event_id += 1;
        RouterEvent::new(
            worker,
            KvCacheEvent {
                event_id: self.next_event_id,
                data,
                dp_rank: 0,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_kv_router::RadixTree;
    use dynamo_kv_router::protocols::compute_seq_hash_for_block;
    use preble_prefix::path_hash;

    fn stored_blocks(events: &[RouterEvent]) -> usize {
        events
            .iter()
            .map(|e| match &e.event.data {
                KvCacheEventData::Stored(s) => s.blocks.len(),
                _ => 0,
            })
            .sum()
    }

    fn overlap(tree: &RadixTree, prompt: &[u32], block_size: u32, worker: WorkerId) -> u32 {
        let local = compute_block_hash_for_seq(prompt, block_size, BlockHashOptions::default());
        let scores = tree.find_matches(local, false).scores;
        scores
            .iter()
            .find(|(w, _)| w.worker_id == worker)
            .map_or(0, |(_, s)| *s)
    }

    fn apply(tree: &mut RadixTree, events: Vec<RouterEvent>) {
        for e in events {
            tree.apply_event(e)
                .expect("the tree takes the ledger's events");
        }
    }

    #[test]
    fn spans_become_complete_blocks_with_dynamos_hashes() {
        let mut ledger = BlockLedger::new(4);
        let prompt: Vec<u32> = (0..10).collect();
        let events = ledger
            .insert(7, ROOT_HASH, path_hash(&prompt), &prompt)
            .expect("insert");
        assert_eq!(
            stored_blocks(&events),
            2,
            "10 tokens hold two complete blocks"
        );
        let KvCacheEventData::Stored(store) = &events[0].event.data else {
            panic!("a stored event");
        };
        let local = compute_block_hash_for_seq(&prompt, 4, BlockHashOptions::default());
        let seq = compute_seq_hash_for_block(&local);
        assert_eq!(
            store.blocks[1].block_hash,
            ExternalSequenceBlockHash(seq[1])
        );
        assert_eq!(store.blocks[1].tokens_hash, local[1]);
    }

    #[test]
    fn a_child_span_completes_the_block_its_parent_left_open() {
        let mut ledger = BlockLedger::new(4);
        let mut tree = RadixTree::new();
        let prompt: Vec<u32> = (0..14).collect();
        let (a, b) = prompt.split_at(6);
        let ha = path_hash(a);
        apply(&mut tree, ledger.insert(1, ROOT_HASH, ha, a).expect("a"));
        assert_eq!(overlap(&tree, &prompt, 4, 1), 1);
        apply(
            &mut tree,
            ledger.insert(1, ha, path_hash(&prompt), b).expect("b"),
        );
        assert_eq!(
            overlap(&tree, &prompt, 4, 1),
            3,
            "blocks 0..12 are complete"
        );
    }

    #[test]
    fn a_split_stores_nothing_and_eviction_removes_only_the_lower_blocks() {
        let mut ledger = BlockLedger::new(4);
        let mut tree = RadixTree::new();
        let prompt: Vec<u32> = (0..16).collect();
        let whole = path_hash(&prompt);
        apply(
            &mut tree,
            ledger.insert(1, ROOT_HASH, whole, &prompt).expect("whole"),
        );
        // The worker splits its edge at 9 (a request diverged there) and announces the upper
        // part: the blocks are stored already.
        let upper = path_hash(&prompt[..9]);
        let split = ledger
            .insert(1, ROOT_HASH, upper, &prompt[..9])
            .expect("upper");
        assert!(split.is_empty(), "{split:?}");
        // Evicting the lower part (9..16) drops the blocks ending after 9: 8..12 and 12..16.
        apply(&mut tree, ledger.evict(1, whole).expect("evict lower"));
        assert_eq!(overlap(&tree, &prompt, 4, 1), 2);
        apply(&mut tree, ledger.evict(1, upper).expect("evict upper"));
        assert_eq!(overlap(&tree, &prompt, 4, 1), 0);
        assert_eq!(ledger.stored_blocks(), 0);
    }

    #[test]
    fn lies_and_unknown_paths_are_refused() {
        let mut ledger = BlockLedger::new(4);
        let tokens = [1, 2, 3];
        assert!(matches!(
            ledger.insert(1, ROOT_HASH, 12345, &tokens),
            Err(TreeError::HashMismatch { .. })
        ));
        assert_eq!(
            ledger.insert(1, 99, extend(99, &tokens), &tokens).err(),
            Some(TreeError::UnknownParent(99))
        );
        assert_eq!(ledger.evict(1, 5).err(), Some(TreeError::UnknownPath(5)));
    }

    #[test]
    fn clearing_a_worker_forgets_its_spans() {
        let mut ledger = BlockLedger::new(4);
        let prompt: Vec<u32> = (0..8).collect();
        let hash = path_hash(&prompt);
        ledger.insert(3, ROOT_HASH, hash, &prompt).expect("insert");
        let cleared = ledger.clear(3);
        assert!(matches!(cleared.event.data, KvCacheEventData::Cleared));
        assert_eq!(
            ledger.evict(3, hash).err(),
            Some(TreeError::UnknownPath(hash))
        );
    }
}
