//! The SGLang model gateway's cache-aware routing (smg, formerly sgl-router) as a baseline, on
//! its own prefix tree: `kv_index::TokenTree` (crate `kv-index` 2.0.0, from smg), the
//! approximate per-worker tree that policy keeps of where it sent each prompt. The rule itself
//! lives in the `smg` crate, too heavy to build here; it is taken from smg's documentation
//! (`docs/concepts/routing/cache-aware.md`) with its command-line defaults:
//! - **imbalanced** when the busiest and idlest workers differ by more than
//!   `balance_abs_threshold` = 64 requests *and* the busiest has more than
//!   `balance_rel_threshold` = 1.5 x the idlest's: the least loaded worker;
//! - otherwise, if the tree's longest match covers more than `cache_threshold` = 0.3 of the
//!   prompt (matched tokens / prompt tokens): a worker holding that match (the least loaded of
//!   them, as smg picks among the match's tenants); else the least loaded worker;
//! - either way the prompt is inserted into the tree for the chosen worker;
//! - every `eviction_interval` = 120 s the tree is cut to `max_tree_size` = 67,108,864
//!   tokens (`evict_tenant_by_size`, least recently used first).
//!
//! Load is smg's: the worker's requests in flight (counted at dispatch, released when the
//! request ends), here the scheduler's `outstanding`. Like smg, the tree learns only from its
//! own routing, never from the workers' cache events. Matches on workers that are not
//! eligible for this request count as no match.

use kv_index::TokenTree;

use crate::tiebreak;
use crate::tree::TreeError;
use crate::{ClusterEvent, ClusterView, Decision, DecisionKind, Policy, RouteError, RouteRequest};

/// Knobs of [`Sglang`], smg's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SglangConfig {
    /// Least matched fraction of the prompt that follows the cache (smg: 0.3).
    pub cache_threshold: f64,
    /// Imbalanced when busiest minus idlest exceeds this many requests (smg: 64)...
    pub balance_abs_threshold: u32,
    /// ...and busiest exceeds this multiple of idlest (smg: 1.5).
    pub balance_rel_threshold: f64,
    /// How often the tree is cut to its size, milliseconds (smg: 120 s).
    pub eviction_interval_ms: u64,
    /// Tokens the tree keeps at an eviction (smg: 67,108,864).
    pub max_tree_size: usize,
    /// Seed of random tie-breaks.
    pub seed: u64,
}

impl Default for SglangConfig {
    fn default() -> Self {
        Self {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            eviction_interval_ms: 120_000,
            max_tree_size: 67_108_864,
            seed: 0,
        }
    }
}

/// The SGLang-model-gateway cache-aware policy.
pub struct Sglang {
    config: SglangConfig,
    tree: TokenTree,
    next_eviction_ms: Option<u64>,
}

impl Sglang {
    /// An SGLang-gateway policy.
    pub fn new(config: SglangConfig) -> Self {
        Self {
            config,
            tree: TokenTree::new(),
            next_eviction_ms: None,
        }
    }

    /// Cuts the tree to its size once per eviction interval.
    fn evict_when_due(&mut self, now_ms: u64) {
        let due = *self
            .next_eviction_ms
            .get_or_insert(now_ms.saturating_add(self.config.eviction_interval_ms));
        if now_ms >= due {
            self.tree.evict_tenant_by_size(self.config.max_tree_size);
            self.next_eviction_ms = Some(now_ms.saturating_add(self.config.eviction_interval_ms));
        }
    }
}

impl Policy for Sglang {
    fn name(&self) -> &'static str {
        "sglang"
    }

    fn route(
        &mut self,
        cluster: &ClusterView<'_>,
        request: &RouteRequest<'_>,
    ) -> Result<Decision, RouteError> {
        let loads: Vec<u32> = cluster.workers.iter().map(|w| w.load.outstanding).collect();
        let (Some(&max), Some(&min)) = (loads.iter().max(), loads.iter().min()) else {
            return Err(RouteError::NoEligibleWorker);
        };
        self.evict_when_due(request.now_ms);
        let seed = self.config.seed;
        let least_loaded_of = |candidates: &[usize]| {
            let least = candidates.iter().map(|&i| loads[i]).min()?;
            let tied: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&i| loads[i] == least)
                .collect();
            tiebreak::pick(&tied, seed, request.request_id)
        };
        let everyone: Vec<usize> = (0..loads.len()).collect();
        let imbalanced = max - min > self.config.balance_abs_threshold
            && f64::from(max) > self.config.balance_rel_threshold * f64::from(min);
        let matched = self.tree.match_prefix_with_counts(request.prompt);
        let holders: Vec<usize> = (0..cluster.workers.len())
            .filter(|&i| {
                matched
                    .matched_tenants
                    .iter()
                    .any(|t| t.as_ref() == cluster.workers[i].id)
            })
            .collect();
        let matched_tokens = if holders.is_empty() {
            0
        } else {
            matched.matched_token_count
        };
        let rate = matched_tokens as f64 / request.prompt.len().max(1) as f64;
        let (chosen, kind, reason) = if imbalanced {
            (
                least_loaded_of(&everyone),
                DecisionKind::Load,
                format!("imbalanced {max}/{min}: least loaded"),
            )
        } else if rate > self.config.cache_threshold {
            (
                least_loaded_of(&holders),
                DecisionKind::Exploit,
                format!("match rate {rate:.2}"),
            )
        } else {
            (
                least_loaded_of(&everyone),
                DecisionKind::Explore,
                format!("match rate {rate:.2}: least loaded"),
            )
        };
        let chosen = chosen.ok_or(RouteError::NoEligibleWorker)?;
        let worker = &cluster.workers[chosen].id;
        self.tree.insert_tokens(request.prompt, worker);
        Ok(Decision {
            worker: worker.clone(),
            kind,
            cached_tokens: if holders.contains(&chosen) {
                matched_tokens as u32
            } else {
                0
            },
            reason,
        })
    }

    fn observe(&mut self, event: &ClusterEvent<'_>) -> Result<(), TreeError> {
        if let ClusterEvent::WorkerGone { worker } = *event {
            self.tree
                .remove_tenant_all(&kv_index::TenantId::from(worker));
        }
        Ok(())
    }

    fn tree_size(&self) -> Option<crate::TreeSize> {
        Some(crate::TreeSize {
            nodes: 0,
            tokens: self.tree.total_token_size() as u64,
            running_requests: 0,
        })
    }
}
