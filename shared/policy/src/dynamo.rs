//! NVIDIA Dynamo's KV router as a baseline, run on its own code (crate `dynamo-kv-router`
//! 1.6.1, the router core of Dynamo's `lib/kv-router`): its radix tree of chained block hashes
//! (`RadixTree`, fed `Stored`/`Removed`/`Cleared` events), its hashing of the prompt into
//! blocks, its active-sequence load tracking (`ActiveSequencesMultiWorker`) and its default
//! worker selector (`DefaultWorkerSelector`, cost `prefill_load_scale x max(prefill blocks -
//! overlap credit, 0) + decode blocks`, argmin at temperature 0). This module only maps our
//! cluster events onto theirs:
//! - **Blocks**: 16 tokens (vLLM's default block size, which Dynamo's router takes from the
//!   engine). Our workers' span events become block events in [`crate::dynamo_blocks`]: a
//!   block is stored once all its tokens are cached, removed when the span holding its last
//!   token is evicted; a cache reset is Dynamo's `Cleared`, a dead worker `remove_worker`.
//! - **Load**: each routed request is added to Dynamo's active sequences on its worker (its
//!   block sequence, and as prefill load the tokens it misses there) and freed when the
//!   scheduler releases it (finish, error, cancel, worker loss). Dynamo marks a request's
//!   prefill done at its first token, which its router sees on the response path; preble's
//!   scheduler is not on that path, so the prefill load carries the expected prefill duration
//!   from our cost model (Dynamo's `PrefillLoadEstimator` hook), over which Dynamo's tracker
//!   decays the worker's prefill backlog. The workers' own load reports are not used (Dynamo's
//!   default router does not use them either).
//! - **Defaults**: `KvRouterConfig::default()` of the crate (overlap credit 1, prefill load
//!   scale 1, temperature 0, prefill tokens tracked); ties broken by the selector's seeded
//!   random choice.
//!
//! Like Dynamo's router, what a worker holds comes only from its KV events: the policy never
//! records where it routed.

use std::collections::HashMap;
use std::time::Duration;

use dynamo_kv_router::indexer::TieredMatchDetails;
use dynamo_kv_router::protocols::{
    BlockHashOptions, PrefillLoadHint, RoutingConstraints, WorkerWithDpRank,
    compute_block_hash_for_seq, compute_seq_hash_for_block,
};
use dynamo_kv_router::scheduling::{OverlapAnalysis, ScheduleMode};
use dynamo_kv_router::sequences::topology::WorkerDpRange;
use dynamo_kv_router::test_utils::SimpleWorkerConfig;
use dynamo_kv_router::{
    ActiveSequencesMultiWorker, DefaultWorkerSelector, KvRouterConfig, NoopSequencePublisher,
    RadixTree, SchedulingRequest, SequenceRequest, WorkerId, WorkerSelectionInput, WorkerSelector,
};
use preble_costmodel::Profile;

use crate::dynamo_blocks::BlockLedger;
use crate::tree::TreeError;
use crate::{ClusterEvent, ClusterView, Decision, DecisionKind, Policy, RouteError, RouteRequest};

/// Knobs of [`Dynamo`].
#[derive(Clone, Debug)]
pub struct DynamoConfig {
    /// Tokens per KV block (16: vLLM's default).
    pub block_size: u32,
    /// The router's settings (Dynamo's defaults).
    pub router: KvRouterConfig,
    /// Cost profile that predicts each request's prefill duration.
    pub profile: Profile,
    /// Seed of the selector's random tie-breaks.
    pub seed: u64,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            router: KvRouterConfig::default(),
            profile: Profile::a6000_mistral_7b(),
            seed: 0,
        }
    }
}

// `KvRouterConfig` has no `PartialEq`; its `Debug` output lists every field, so equal
// settings print equally.
impl PartialEq for DynamoConfig {
    fn eq(&self, other: &Self) -> bool {
        self.block_size == other.block_size
            && self.seed == other.seed
            && self.profile == other.profile
            && format!("{:?}", self.router) == format!("{:?}", other.router)
    }
}

/// Dynamo's radix tree, owned by one policy.
struct OwnedRadixTree(RadixTree);

// SAFETY: `RadixTree` is not `Send` only because its nodes are `Rc<RefCell<_>>`. Every `Rc`
// it creates stays inside it: the methods called here (`apply_event`, `find_match_details`,
// `remove_worker`, `current_size`) take and return plain owned data, never a node handle, so
// all reference counts move with the tree. The wrapper is not `Sync`, so the tree is used
// from one thread at a time (as Dynamo's own indexer uses it, on one thread).
unsafe impl Send for OwnedRadixTree {}

/// The Dynamo KV router policy.
pub struct Dynamo {
    config: DynamoConfig,
    tree: OwnedRadixTree,
    ledger: BlockLedger,
    sequences: ActiveSequencesMultiWorker<NoopSequencePublisher>,
    selector: DefaultWorkerSelector,
    ids: HashMap<String, WorkerId>,
    next_id: WorkerId,
    /// Monotonic origin of Dynamo's clock, and the `now_ms` it stands for.
    epoch: std::time::Instant,
    origin_ms: Option<u64>,
    /// The latest `now_ms` seen (events without a time use it).
    last_ms: u64,
}

impl Dynamo {
    /// A Dynamo-router policy.
    pub fn new(config: DynamoConfig) -> Self {
        let block_size = config.block_size.max(1);
        Self {
            tree: OwnedRadixTree(RadixTree::new()),
            ledger: BlockLedger::new(block_size),
            sequences: ActiveSequencesMultiWorker::new_without_expiry(
                NoopSequencePublisher,
                block_size as usize,
                HashMap::new(),
                false,
                0,
                "prefill",
            ),
            selector: DefaultWorkerSelector::new_seeded(
                Some(config.router.clone()),
                "prefill",
                config.seed,
            ),
            ids: HashMap::new(),
            next_id: 0,
            epoch: std::time::Instant::now(),
            origin_ms: None,
            last_ms: 0,
            config: DynamoConfig {
                block_size,
                ..config
            },
        }
    }

    /// Dynamo's id of worker `name`, registering a new worker with its load tracker.
    fn worker_id(&mut self, name: &str) -> WorkerId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(name.to_string(), id);
        // Registering a fresh id cannot conflict with a registered one.
        let _ = self.sequences.register_worker(WorkerDpRange::new(id, 0, 1));
        id
    }

    /// Dynamo's clock at `now_ms` (its load decay runs on `tokio::time::Instant`).
    fn instant(&mut self, now_ms: u64) -> tokio::time::Instant {
        let origin = *self.origin_ms.get_or_insert(now_ms);
        let since = Duration::from_millis(now_ms.saturating_sub(origin));
        tokio::time::Instant::from_std(self.epoch.checked_add(since).unwrap_or(self.epoch))
    }

    /// Applies the ledger's events for the path `hash` to Dynamo's tree.
    fn apply(
        &mut self,
        events: Vec<dynamo_kv_router::RouterEvent>,
        hash: u64,
    ) -> Result<(), TreeError> {
        for event in events {
            // The ledger only emits events the tree accepts; a refusal means the two are out
            // of step, which a digest repairs.
            self.tree
                .0
                .apply_event(event)
                .map_err(|_| TreeError::UnknownPath(hash))?;
        }
        Ok(())
    }

    fn request(
        &self,
        prompt_len: usize,
        seq: Vec<u64>,
        overlap: dynamo_kv_router::scheduling::OverlapSignals,
        worker_loads: rustc_hash::FxHashMap<
            WorkerWithDpRank,
            dynamo_kv_router::WorkerLoadProjection,
        >,
    ) -> SchedulingRequest {
        SchedulingRequest {
            mode: ScheduleMode::QueryOnly { request_id: None },
            token_seq: Some(seq),
            isl_tokens: prompt_len,
            lora_name: None,
            expected_output_tokens: None,
            affinity_target: None,
            pinned_worker: None,
            allowed_worker_ids: None,
            routing_constraints: RoutingConstraints::default(),
            router_config_override: None,
            track_prefill_tokens: self.config.router.router_track_prefill_tokens,
            priority_jump: 0.0,
            strict_priority: 0,
            policy_class: None,
            session_context: None,
            overlap,
            kv_transfer_candidates: None,
            retain_kv_transfer_chain: false,
            shared_cache_hits: None,
            worker_loads,
            resp_tx: None,
        }
    }
}

impl Policy for Dynamo {
    fn name(&self) -> &'static str {
        "dynamo"
    }

    fn route(
        &mut self,
        cluster: &ClusterView<'_>,
        request: &RouteRequest<'_>,
    ) -> Result<Decision, RouteError> {
        if cluster.workers.is_empty() {
            return Err(RouteError::NoEligibleWorker);
        }
        let block_size = self.config.block_size;
        let mut workers = HashMap::with_capacity(cluster.workers.len());
        let mut names = HashMap::with_capacity(cluster.workers.len());
        for view in cluster.workers {
            let id = self.worker_id(&view.id);
            let total_kv_blocks = (view.kv_capacity_tokens > 0)
                .then(|| view.kv_capacity_tokens / u64::from(block_size));
            workers.insert(
                id,
                SimpleWorkerConfig {
                    total_kv_blocks,
                    ..SimpleWorkerConfig::default()
                },
            );
            names.insert(id, view.id.as_str());
        }
        let local =
            compute_block_hash_for_seq(request.prompt, block_size, BlockHashOptions::default());
        let seq = compute_seq_hash_for_block(&local);
        let tiered = TieredMatchDetails {
            device: self.tree.0.find_match_details(local, false),
            lower_tier: HashMap::new(),
        };
        let overlap = OverlapAnalysis::new(&self.config.router, block_size, &tiered).signals();
        self.last_ms = self.last_ms.max(request.now_ms);
        let now = self.instant(request.now_ms);
        let loads = self.sequences.project_worker_loads(Some(&seq), now);
        let scheduling = self.request(request.prompt.len(), seq, overlap, loads);
        let selection = self
            .selector
            .select_worker(WorkerSelectionInput::configured(
                &workers,
                &scheduling,
                scheduling.eligibility(),
                block_size,
            ))
            .map_err(|_| RouteError::NoEligibleWorker)?;
        let chosen = selection.worker;
        let worker = names
            .get(&chosen.worker_id)
            .ok_or(RouteError::NoEligibleWorker)?
            .to_string();
        let cached = selection.cached_tokens.min(request.prompt.len());
        let missed = request.prompt.len() - cached;
        let prefill_ms = self
            .config
            .profile
            .prefill_ms(missed.max(1) as u32, cached as u32);
        let request_id = request.request_id.to_string();
        // Routed again (its first worker did not take it): its earlier booking goes.
        let _ = self.sequences.free(&request_id, now);
        // The worker was registered above, and the id was just freed: booking cannot fail
        // in a way routing could act on.
        let _ = self.sequences.add_request(
            SequenceRequest {
                request_id,
                token_sequence: scheduling.token_seq,
                track_prefill_tokens: self.config.router.router_track_prefill_tokens,
                expected_output_tokens: None,
                prefill_load_hint: Some(PrefillLoadHint {
                    initial_effective_prefill_tokens: missed,
                    expected_prefill_duration: Some(
                        Duration::try_from_secs_f64(prefill_ms / 1000.0).unwrap_or(Duration::ZERO),
                    ),
                }),
                worker: chosen,
                lora_name: None,
            },
            now,
        );
        Ok(Decision {
            worker,
            kind: if cached > 0 {
                DecisionKind::Exploit
            } else {
                DecisionKind::Load
            },
            cached_tokens: cached as u32,
            reason: format!(
                "overlap={:.0}/{} blocks",
                selection.effective_overlap_blocks, selection.required_blocks
            ),
        })
    }

    fn observe(&mut self, event: &ClusterEvent<'_>) -> Result<(), TreeError> {
        match *event {
            ClusterEvent::CacheInserted {
                worker,
                parent_hash,
                hash,
                tokens,
                ..
            } => {
                let id = self.worker_id(worker);
                let events = self.ledger.insert(id, parent_hash, hash, tokens)?;
                self.apply(events, hash)
            }
            ClusterEvent::CacheEvicted { worker, hash, .. } => {
                let id = self.worker_id(worker);
                let events = self.ledger.evict(id, hash)?;
                self.apply(events, hash)
            }
            ClusterEvent::CacheReset { worker } => {
                let id = self.worker_id(worker);
                let cleared = self.ledger.clear(id);
                self.apply(vec![cleared], preble_prefix::ROOT_HASH)
            }
            ClusterEvent::WorkerGone { worker } => {
                if let Some(id) = self.ids.remove(worker) {
                    self.ledger.clear(id);
                    self.tree.0.remove_worker(id);
                    let _ = self.sequences.unregister_worker(id);
                }
                Ok(())
            }
            ClusterEvent::Released { request_id, .. } => {
                let now = self.instant(self.last_ms);
                let _ = self.sequences.free(&request_id.to_string(), now);
                Ok(())
            }
            ClusterEvent::Finished { now_ms, .. } => {
                self.last_ms = self.last_ms.max(now_ms);
                Ok(())
            }
        }
    }

    fn tree_size(&self) -> Option<crate::TreeSize> {
        let blocks = self.tree.0.current_size();
        Some(crate::TreeSize {
            nodes: blocks,
            tokens: blocks as u64 * u64::from(self.config.block_size),
            running_requests: 0,
        })
    }
}
