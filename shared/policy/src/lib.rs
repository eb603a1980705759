//! Global routing policies: which worker serves a request. Pure: no I/O, no clock, no async;
//! the scheduler service feeds in a view of the cluster and gets a decision with its reason.
//!
//! Layout:
//! - [`view`]: the domain types a policy sees (workers and their load, the request, cluster
//!   events).
//! - [`decision`]: what a policy returns (worker, kind, reason) and its errors.
//! - [`tree`]: the global prefix tree mirroring the workers' caches; [`usage`]: a worker's use
//!   of a node (windowed and running requests, last use); [`workers`]: worker sets;
//!   [`mirror`]: the tree plus worker indices, fed by cluster events.
//! - [`tiebreak`]: seeded random choice among equally good workers.
//! - Policies: [`e2`] (Preble's); the peers' own routing code as baselines, [`dynamo`] (NVIDIA
//!   Dynamo's KV router, crate `dynamo-kv-router`, fed by [`dynamo_blocks`]) and [`sglang`]
//!   (the SGLang model gateway's cache-aware policy on crate `kv-index`'s tree); our cheaper
//!   imitations of them, [`cache_aware`] and [`kv_cost`]; and [`least_load`],
//!   [`round_robin`]. [`PolicyKind`] names them for flags.

pub mod cache_aware;
pub mod decision;
pub mod dynamo;
pub mod dynamo_blocks;
pub mod e2;
pub mod kv_cost;
pub mod least_load;
pub mod mirror;
pub mod round_robin;
pub mod sglang;
pub mod tiebreak;
pub mod tree;
pub mod usage;
pub mod view;
pub mod workers;

pub use cache_aware::{CacheAware, CacheAwareConfig};
pub use decision::{Decision, DecisionKind, RouteError};
pub use dynamo::{Dynamo, DynamoConfig};
pub use e2::{E2, E2Config};
pub use kv_cost::{KvCost, KvCostConfig};
pub use least_load::LeastLoad;
pub use mirror::ExportedSpan;
pub use round_robin::RoundRobin;
pub use sglang::{Sglang, SglangConfig};
pub use tree::TreeError;
pub use view::{ClusterEvent, ClusterView, RouteRequest, WorkerLoad, WorkerView};

/// A routing policy: picks a worker for each request.
pub trait Policy: Send {
    /// Short name, as used on the command line and in traces.
    fn name(&self) -> &'static str;

    /// Picks a worker among `cluster.workers` for `request`. Deterministic for the same state,
    /// request and seed.
    fn route(
        &mut self,
        cluster: &ClusterView<'_>,
        request: &RouteRequest<'_>,
    ) -> Result<Decision, RouteError>;

    /// Learns from a cluster event (cache changes, finished requests, workers leaving). An
    /// error means the policy's picture of a worker's cache is out of step: the caller should
    /// ask that worker for a digest.
    fn observe(&mut self, event: &ClusterEvent<'_>) -> Result<(), TreeError> {
        let _ = event;
        Ok(())
    }

    /// What the policy knows the workers' caches hold, for persistence (empty for policies
    /// that keep no tree). Replay it through [`Policy::observe`] to restore it.
    fn export(&self) -> Vec<ExportedSpan> {
        Vec::new()
    }

    /// Size of the policy's prefix tree, for metrics (`None` for policies without one).
    fn tree_size(&self) -> Option<TreeSize> {
        None
    }
}

/// How big a policy's prefix tree is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSize {
    /// Nodes.
    pub nodes: usize,
    /// Tokens on all edges.
    pub tokens: u64,
    /// Requests the policy counts as running (routed and not yet released); their paths
    /// are pinned in the tree. 0 for policies that do not track them.
    pub running_requests: usize,
}

/// The policies a scheduler can run, by command-line name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// [`E2`], Preble's.
    E2,
    /// [`E2`] as the paper's public code plays it ([`E2Config::paper`]), for comparisons.
    E2Paper,
    /// [`Dynamo`]: NVIDIA Dynamo's KV router, on its own code.
    Dynamo,
    /// [`Sglang`]: the SGLang model gateway's cache-aware policy, on its own tree.
    Sglang,
    /// [`CacheAware`].
    CacheAware,
    /// [`KvCost`].
    KvCost,
    /// [`LeastLoad`].
    LeastLoad,
    /// [`RoundRobin`].
    RoundRobin,
}

/// Every policy's settings, for [`PolicyKind::build`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySettings {
    /// E2's (its cost profile also predicts prefill durations for [`Dynamo`]).
    pub e2: E2Config,
    /// Dynamo's router's.
    pub dynamo: DynamoConfig,
    /// The SGLang gateway's.
    pub sglang: SglangConfig,
    /// The cache-aware baseline's.
    pub cache_aware: CacheAwareConfig,
    /// The KV-cost baseline's.
    pub kv_cost: KvCostConfig,
    /// Seed of every random choice.
    pub seed: u64,
}

impl PolicyKind {
    /// Every policy name, for `--help` and error messages.
    pub const NAMES: [&'static str; 8] = [
        "e2",
        "e2-paper",
        "dynamo",
        "sglang",
        "cache-aware",
        "kv-cost",
        "least-load",
        "round-robin",
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::E2 => "e2",
            PolicyKind::E2Paper => "e2-paper",
            PolicyKind::Dynamo => "dynamo",
            PolicyKind::Sglang => "sglang",
            PolicyKind::CacheAware => "cache-aware",
            PolicyKind::KvCost => "kv-cost",
            PolicyKind::LeastLoad => "least-load",
            PolicyKind::RoundRobin => "round-robin",
        }
    }

    /// Builds the policy with `settings`.
    pub fn build(self, settings: &PolicySettings) -> Box<dyn Policy> {
        match self {
            PolicyKind::E2 => Box::new(E2::new(E2Config {
                seed: settings.seed,
                ..settings.e2.clone()
            })),
            PolicyKind::E2Paper => Box::new(E2::new(
                E2Config {
                    seed: settings.seed,
                    ..settings.e2.clone()
                }
                .paper(),
            )),
            PolicyKind::Dynamo => Box::new(Dynamo::new(DynamoConfig {
                profile: settings.e2.profile.clone(),
                seed: settings.seed,
                ..settings.dynamo.clone()
            })),
            PolicyKind::Sglang => Box::new(Sglang::new(SglangConfig {
                seed: settings.seed,
                ..settings.sglang.clone()
            })),
            PolicyKind::CacheAware => Box::new(CacheAware::new(CacheAwareConfig {
                seed: settings.seed,
                ..settings.cache_aware.clone()
            })),
            PolicyKind::KvCost => Box::new(KvCost::new(KvCostConfig {
                seed: settings.seed,
                ..settings.kv_cost.clone()
            })),
            PolicyKind::LeastLoad => Box::new(LeastLoad::new(settings.seed)),
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            PolicyKind::E2,
            PolicyKind::E2Paper,
            PolicyKind::Dynamo,
            PolicyKind::Sglang,
            PolicyKind::CacheAware,
            PolicyKind::KvCost,
            PolicyKind::LeastLoad,
            PolicyKind::RoundRobin,
        ]
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            format!(
                "unknown policy {s:?}; known: {}",
                PolicyKind::NAMES.join(", ")
            )
        })
    }
}
