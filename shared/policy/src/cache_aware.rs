//! Cache-aware routing with balance thresholds, in the style of the SGLang router: when the
//! cluster is balanced, send a request to the worker whose (approximate) tree matches most of
//! it if the match ratio exceeds a threshold, else to the worker with the smallest tree; when
//! unbalanced, send it to the least loaded worker. Like that router, its tree records where
//! requests were sent and ignores the workers' cache events (it never learns of evictions).
//!
//! Defaults (the router's): cache threshold 0.5, balance thresholds 32 requests absolute and
//! 1.0001 relative.

use crate::mirror::{DEFAULT_MAX_TREE_TOKENS, Mirror};
use crate::tiebreak;
use crate::tree::TreeError;
use crate::{ClusterEvent, ClusterView, Decision, DecisionKind, Policy, RouteError, RouteRequest};

/// Knobs of [`CacheAware`].
#[derive(Clone, Debug, PartialEq)]
pub struct CacheAwareConfig {
    /// Minimum matched fraction of the prompt to follow the cache.
    pub cache_threshold: f64,
    /// The cluster is unbalanced when the busiest worker has this many more outstanding
    /// requests than the idlest...
    pub balance_abs_threshold: u32,
    /// ...and more than this multiple of them.
    pub balance_rel_threshold: f64,
    /// Bound of the tree, tokens.
    pub max_tree_tokens: u64,
    /// Seed of random tie-breaks.
    pub seed: u64,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            cache_threshold: 0.5,
            balance_abs_threshold: 32,
            balance_rel_threshold: 1.0001,
            max_tree_tokens: DEFAULT_MAX_TREE_TOKENS,
            seed: 0,
        }
    }
}

/// The SGLang-router-style policy.
#[derive(Clone, Debug)]
pub struct CacheAware {
    config: CacheAwareConfig,
    mirror: Mirror,
}

impl CacheAware {
    /// A cache-aware policy.
    pub fn new(config: CacheAwareConfig) -> Self {
        Self {
            mirror: Mirror::new(config.max_tree_tokens),
            config,
        }
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache-aware"
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
        let mut idx = Vec::with_capacity(cluster.workers.len());
        for view in cluster.workers {
            idx.push(self.mirror.idx(&view.id)?);
        }
        let seed = self.config.seed;
        let choose = |keys: &[u64], want: u64| {
            let tied: Vec<usize> = (0..keys.len()).filter(|&i| keys[i] == want).collect();
            tiebreak::pick(&tied, seed, request.request_id).ok_or(RouteError::NoEligibleWorker)
        };
        let unbalanced = max - min > self.config.balance_abs_threshold
            && f64::from(max) > f64::from(min) * self.config.balance_rel_threshold;
        let matched = self.mirror.tree.match_prefix(request.prompt);
        let lens: Vec<u64> = idx.iter().map(|&w| u64::from(matched.len_for(w))).collect();
        let (chosen, kind, reason) = if unbalanced {
            let keys: Vec<u64> = loads.iter().map(|&l| u64::from(l)).collect();
            let i = choose(&keys, u64::from(min))?;
            (
                i,
                DecisionKind::Load,
                format!("unbalanced {max}/{min}: least loaded"),
            )
        } else {
            let best = lens.iter().copied().max().unwrap_or(0);
            let ratio = best as f64 / request.prompt.len().max(1) as f64;
            if ratio > self.config.cache_threshold {
                let i = choose(&lens, best)?;
                (i, DecisionKind::Exploit, format!("match ratio {ratio:.2}"))
            } else {
                let sizes: Vec<u64> = idx
                    .iter()
                    .map(|&w| self.mirror.tree.routed_tokens(w))
                    .collect();
                let smallest = sizes.iter().copied().min().unwrap_or(0);
                let i = choose(&sizes, smallest)?;
                (
                    i,
                    DecisionKind::Explore,
                    format!("match ratio {ratio:.2}: smallest tree"),
                )
            }
        };
        self.mirror
            .tree
            .record_route(request.prompt, idx[chosen], request.now_ms);
        Ok(Decision {
            worker: cluster.workers[chosen].id.clone(),
            kind,
            cached_tokens: lens[chosen] as u32,
            reason,
        })
    }

    fn tree_size(&self) -> Option<crate::TreeSize> {
        Some(self.mirror.size())
    }

    fn export(&self) -> Vec<crate::ExportedSpan> {
        self.mirror.export()
    }

    fn observe(&mut self, event: &ClusterEvent<'_>) -> Result<(), TreeError> {
        match event {
            ClusterEvent::WorkerGone { .. } => self.mirror.observe(event),
            _ => Ok(()),
        }
    }
}
