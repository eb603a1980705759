//! Overlap-minus-load routing in the style of NVIDIA Dynamo's KV router: for each worker,
//! cost = overlap weight x prefill blocks it would compute + decode blocks it has active;
//! the minimum wins (random ties, or a softmax over costs with a temperature). Like that
//! router, what a worker holds comes only from its KV events.
//!
//! Defaults: block size 16 tokens, overlap weight 1, temperature 0.

use crate::mirror::{DEFAULT_MAX_TREE_TOKENS, Mirror};
use crate::tiebreak::{self, hash_str, mix64};
use crate::tree::TreeError;
use crate::{ClusterEvent, ClusterView, Decision, DecisionKind, Policy, RouteError, RouteRequest};

/// Knobs of [`KvCost`].
#[derive(Clone, Debug, PartialEq)]
pub struct KvCostConfig {
    /// Tokens per KV block.
    pub block_size: u32,
    /// Weight of the prefill blocks against the decode blocks.
    pub overlap_weight: f64,
    /// Softmax temperature over normalised costs; 0 picks the minimum.
    pub temperature: f64,
    /// Bound of the tree, tokens.
    pub max_tree_tokens: u64,
    /// Seed of random choices.
    pub seed: u64,
}

impl Default for KvCostConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            overlap_weight: 1.0,
            temperature: 0.0,
            max_tree_tokens: DEFAULT_MAX_TREE_TOKENS,
            seed: 0,
        }
    }
}

/// The Dynamo-KV-router-style policy.
#[derive(Clone, Debug)]
pub struct KvCost {
    config: KvCostConfig,
    mirror: Mirror,
}

impl KvCost {
    /// A KV-cost policy.
    pub fn new(config: KvCostConfig) -> Self {
        Self {
            mirror: Mirror::new(config.max_tree_tokens),
            config,
        }
    }
}

impl Policy for KvCost {
    fn name(&self) -> &'static str {
        "kv-cost"
    }

    fn route(
        &mut self,
        cluster: &ClusterView<'_>,
        request: &RouteRequest<'_>,
    ) -> Result<Decision, RouteError> {
        if cluster.workers.is_empty() {
            return Err(RouteError::NoEligibleWorker);
        }
        let block = f64::from(self.config.block_size.max(1));
        let matched = self.mirror.tree.match_prefix(request.prompt);
        let request_blocks = (request.prompt.len() as f64 / block).ceil();
        let mut costs = Vec::with_capacity(cluster.workers.len());
        let mut cached = Vec::with_capacity(cluster.workers.len());
        for view in cluster.workers {
            let w = self.mirror.idx(&view.id)?;
            let overlap = matched.len_for(w);
            let prefill_blocks = request_blocks - (f64::from(overlap) / block).floor();
            let active = view.load.reported_decode_tokens as f64
                + view.load.outstanding_prompt_tokens as f64;
            costs.push(self.config.overlap_weight * prefill_blocks + active / block);
            cached.push(overlap);
        }
        let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
        let chosen = if self.config.temperature > 0.0 {
            let max = costs.iter().copied().fold(0.0, f64::max).max(1e-9);
            let draw = mix64(self.config.seed ^ hash_str(request.request_id));
            tiebreak::softmax_pick(&costs, max * self.config.temperature, draw)
        } else {
            let tied: Vec<usize> = (0..costs.len())
                .filter(|&i| costs[i] <= min + 1e-9)
                .collect();
            tiebreak::pick(&tied, self.config.seed, request.request_id)
                .ok_or(RouteError::NoEligibleWorker)?
        };
        Ok(Decision {
            worker: cluster.workers[chosen].id.clone(),
            kind: if cached[chosen] > 0 {
                DecisionKind::Exploit
            } else {
                DecisionKind::Load
            },
            cached_tokens: cached[chosen],
            reason: format!(
                "cost={:.1} blocks overlap={}",
                costs[chosen], cached[chosen]
            ),
        })
    }

    fn tree_size(&self) -> Option<crate::TreeSize> {
        Some(self.mirror.size())
    }

    fn export(&self) -> Vec<crate::ExportedSpan> {
        self.mirror.export()
    }

    fn observe(&mut self, event: &ClusterEvent<'_>) -> Result<(), TreeError> {
        self.mirror.observe(event)
    }
}
