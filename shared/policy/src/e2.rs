//! E2, Preble's global scheduling algorithm (paper section 3.2-3.3): exploit a worker's cached
//! prefix when the hit is larger than the miss, otherwise explore for the worker of least
//! total cost; rebalance away from overloaded holders, replicate hot prefixes, and let
//! decode-heavy workers take prefill-heavy requests. Replication needs the holder's recent TTFT
//! to have doubled *and* to exceed the request's own full prefill time (so noise in small TTFTs
//! does not replicate), and the replica's total cost must be below the holder's (when every
//! worker is busy, recomputing the prefix elsewhere only adds work).
//!
//! Costs are milliseconds from `preble-costmodel`:
//! - L (load): the estimated prefill time of the requests routed to the worker in the window
//!   (default 3 minutes), plus the decode time (learned output length x time per output token)
//!   of the requests outstanding on it now, plus its queue: the larger of the prefill queued
//!   at its last load report and the prefill booked on it since and not yet drained at the
//!   cost model's speed. The paper sums the decode time of every request in the window
//!   instead. That sum counts requests that finished minutes ago and grows with the number of
//!   requests, not with how busy the worker is (decodes run batched). In simulation it stayed
//!   equal across workers while their queues differed six-fold, and E2 trailed cache-aware
//!   routing under overload (BENCHMARKS.md). The queue term matters with few, long requests:
//!   the window balances work over minutes, while a request waits behind what is queued now.
//! - An exploring request counts the window's prefill as a rate over its own expected lifetime
//!   (recent median TTFT plus its decode): the work that will arrive beside it, not the
//!   minutes of work already done. With long, uneven prompts (the Mooncake trace, loogle and
//!   videoqa at low rates) the whole window's sums differ between workers by long requests
//!   that finished minutes ago and swamp what is queued now. Holders, the overload tests and
//!   subtree moves keep the whole window: it is what keeps a hot prefix from flapping between
//!   workers near saturation.
//! - M (eviction), as in the paper: when the request's missed tokens do not fit beside what
//!   the worker holds, walk its cache in eviction order (least recently used first, skipping
//!   nodes a running request uses and the request's own path) until they fit; each node it
//!   would give up costs its prefill time times the share of the worker's requests in the
//!   window that went through it (evicting what nobody reuses costs nothing).
//! - P (prefill): the request's missed tokens on that worker. (The paper's public code leaves
//!   P out; we don't.)
//!
//! Replication (beyond the paper) also needs the holder's recent TTFT to be at least the same
//! ratio above the other workers' recent mean. Under overload TTFT grows everywhere; adding
//! replicas then only adds prefill work.
//!
//! Rebalancing works at two grains. Per request: a holder whose load exceeds the threshold
//! times the lightest worker's (plus the request's own full prefill) is passed over and the
//! request explores. Per prefix, as in the paper: at most once a second after the warm-up,
//! key portions the heaviest worker served at least twice in the window (the tree's per-node
//! counts) move to the lightest, cheapest first, until the loads would balance; a prefix whose
//! stream alone exceeds half the gap stays, since moving it whole would only make the light
//! worker the heavy one (in simulation that overshoot made skewed workloads 1.3-1.6x slower).
//!
//! Every routed request is marked running in the tree until the scheduler reports it released
//! ([`ClusterEvent::Released`]), so M never counts KV a running request pins.
//!
//! Output length and time per output token are learned online from finished requests (median
//! of the last 255); until then the prior is `min(max_tokens, prior_output_tokens)` tokens and
//! the profile's decode step at batch 16.

use std::collections::VecDeque;

use preble_costmodel::Profile;

use crate::mirror::{DEFAULT_MAX_TREE_TOKENS, Mirror};
use crate::tiebreak::{hash_str, mix64, softmax_pick};
use crate::tree::{PrefixKey, TreeError, TreeMatch};
use crate::workers::WorkerIdx;
use crate::{ClusterEvent, ClusterView, Decision, DecisionKind, Policy, RouteError, RouteRequest};
use rustc_hash::FxHashMap;

/// Longest TTFT or TPOT a finished request can plausibly report, ms (a day); longer values,
/// like NaN or negative ones, are dropped as lies.
const MAX_PLAUSIBLE_MS: f64 = 86_400_000.0;

/// E2's knobs, with the paper's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct E2Config {
    /// Load window H, milliseconds (paper: 3 minutes).
    pub window_ms: u64,
    /// Rebalance when the chosen holder's load exceeds the lightest worker's by this factor
    /// (paper: 1.5).
    pub rebalance_threshold: f64,
    /// Requests routed before rebalancing may start.
    pub warmup_requests: u64,
    /// Replicate a holder's prefix when its mean TTFT in the second half of the window is at
    /// least this multiple of the first half's (paper: 2).
    pub replicate_ttft_ratio: f64,
    /// Finished requests needed in each half-window before replication is considered.
    pub replicate_min_samples: usize,
    /// Weight of a worker's decode load in the explore choice when the request is
    /// prefill-heavy there (its missed tokens' prefill outlasts its expected decoding) and the
    /// worker's load is mostly decoding: the paper's prefill/decode balance (1: none). Holders
    /// are compared, and overload judged, on their whole load.
    pub decode_discount: f64,
    /// Weight of the worker's queued prefill (from its last load report) in its load cost:
    /// the window alone says how busy it was, the queue how soon it can start this request
    /// (0: the paper's load cost).
    pub queue_weight: f64,
    /// Move the ownership of whole prefixes (key portions used at least twice in the window)
    /// from the most to the least loaded worker when their loads differ by more than
    /// `rebalance_threshold` (the paper's rebalancing), skipping a prefix whose stream alone
    /// would overshoot: a hot prefix moved whole would only make its new owner the heavy one.
    /// An owner that becomes overloaded itself is passed over like any holder.
    pub subtree_rebalance: bool,
    /// Least time between two ownership rebalancing steps, milliseconds.
    pub rebalance_interval_ms: u64,
    /// Softmax temperature over normalised costs; 0 picks the minimum (ties at random).
    pub temperature: f64,
    /// The rules where preble departs from the paper's public code ([`Rules::PREBLE`]), or
    /// that code's own ([`Rules::PAPER`], see [`E2Config::paper`]).
    pub rules: Rules,
    /// Bound of the global tree, tokens.
    pub max_tree_tokens: u64,
    /// Output length assumed before any request finished.
    pub prior_output_tokens: u32,
    /// Cost profile of the workers (GPU x model).
    pub profile: Profile,
    /// Seed of random choices.
    pub seed: u64,
}

impl Default for E2Config {
    fn default() -> Self {
        Self {
            window_ms: 180_000,
            rebalance_threshold: 1.5,
            warmup_requests: 50,
            replicate_ttft_ratio: 2.0,
            replicate_min_samples: 8,
            decode_discount: 0.5,
            queue_weight: 1.0,
            subtree_rebalance: true,
            rebalance_interval_ms: 1_000,
            temperature: 0.0,
            rules: Rules::PREBLE,
            max_tree_tokens: DEFAULT_MAX_TREE_TOKENS,
            prior_output_tokens: 128,
            profile: Profile::a6000_mistral_7b(),
            seed: 0,
        }
    }
}

/// L's decode part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeLoad {
    /// The decode time of the requests outstanding on the worker now (preble).
    Outstanding,
    /// The decode time of every request routed to it in the window (the paper's code).
    RoutedInWindow,
}

/// Each rule in which preble's E2 departs from the paper's public code, so that one E2 plays
/// either (the module documentation gives the reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// What L's decode part counts.
    pub decode_load: DecodeLoad,
    /// Explore weighs P, the request's own prefill on each worker (the paper's code leaves
    /// it out).
    pub explore_weighs_prefill: bool,
    /// Explore counts a worker's window prefill as a rate over the request's expected
    /// lifetime (recent median TTFT plus its own decode): the work that will arrive beside
    /// it while it runs, not the minutes of work already done (the paper's code counts the
    /// whole window everywhere). Holders, the overload tests and subtree moves keep the
    /// whole window.
    pub explore_window_as_rate: bool,
    /// The queue term is the larger of the prefill queued at the worker's last load report
    /// and the prefill booked on it since and not yet drained at the cost model's speed
    /// (the report is up to one period old, so a burst would otherwise herd onto one
    /// worker).
    pub booked_backlog: bool,
    /// A holder (or a moved prefix's owner) whose load exceeds the rebalance threshold times
    /// the lightest worker's, plus the request's own full prefill, is passed over request by
    /// request (the paper's code only moves subtrees).
    pub pass_over_overloaded: bool,
    /// Subtree rebalancing skips a prefix whose stream alone would overshoot.
    pub skip_overshooting_moves: bool,
    /// Replication also needs the holder's recent TTFT above the request's own full prefill
    /// and the replication ratio above the other workers' recent TTFT, and the replica's
    /// total cost below the holder's (the paper's code: the holder's own TTFT doubling).
    pub guarded_replication: bool,
    /// Equal costs are broken at random (the paper's code takes the first worker).
    pub random_ties: bool,
}

impl Rules {
    /// Preble's E2.
    pub const PREBLE: Rules = Rules {
        decode_load: DecodeLoad::Outstanding,
        explore_weighs_prefill: true,
        explore_window_as_rate: true,
        booked_backlog: true,
        pass_over_overloaded: true,
        skip_overshooting_moves: true,
        guarded_replication: true,
        random_ties: true,
    };

    /// The paper's public code.
    pub const PAPER: Rules = Rules {
        decode_load: DecodeLoad::RoutedInWindow,
        explore_weighs_prefill: false,
        explore_window_as_rate: false,
        booked_backlog: false,
        pass_over_overloaded: false,
        skip_overshooting_moves: false,
        guarded_replication: false,
        random_ties: false,
    };
}

impl E2Config {
    /// The paper's public code as closely as this policy can play it (the `e2-paper`
    /// policy): [`Rules::PAPER`], no queue term, no prefill/decode preference (the code's
    /// hit-ratio rule is not reproduced), subtree rebalancing on. Everything else (window,
    /// thresholds, the tree, M, the cost model) as in `self`.
    pub fn paper(self) -> Self {
        Self {
            rules: Rules::PAPER,
            queue_weight: 0.0,
            decode_discount: 1.0,
            subtree_rebalance: true,
            ..self
        }
    }
}

/// One request routed to a worker, as its load counts it.
#[derive(Clone, Copy, Debug)]
struct Routed {
    at_ms: u64,
    prefill_ms: f64,
    key: Option<PrefixKey>,
}

/// A worker's recent history.
#[derive(Clone, Debug, Default)]
struct WorkerWindow {
    routed: VecDeque<Routed>,
    prefill_ms: f64,
    ttft: VecDeque<(u64, f64)>,
    /// When the prefill booked here would be done if the worker did nothing else, ms.
    booked_until_ms: f64,
}

impl WorkerWindow {
    fn expire(&mut self, now_ms: u64, window_ms: u64) {
        let since = now_ms.saturating_sub(window_ms);
        while self.routed.front().is_some_and(|r| r.at_ms < since) {
            if let Some(r) = self.routed.pop_front() {
                self.prefill_ms -= r.prefill_ms;
            }
        }
        if self.routed.is_empty() {
            self.prefill_ms = 0.0;
        }
        while self.ttft.front().is_some_and(|(at, _)| *at < since) {
            self.ttft.pop_front();
        }
    }

    /// Mean TTFT in the second half of the window, if any request finished there.
    fn recent_ttft(&self, now_ms: u64, window_ms: u64) -> Option<f64> {
        let middle = now_ms.saturating_sub(window_ms / 2);
        let (mut sum, mut n) = (0.0, 0usize);
        for &(_, ttft) in self.ttft.iter().filter(|(at, _)| *at >= middle) {
            sum += ttft;
            n += 1;
        }
        (n > 0).then(|| sum / n as f64)
    }

    fn push(&mut self, r: Routed) {
        self.prefill_ms += r.prefill_ms;
        self.routed.push_back(r);
    }

    /// Whether TTFT grew: the second half-window's mean at least `ratio` x the first's and at
    /// least `floor_ms` (so that noise in small TTFTs does not look like a hot prefix).
    fn ttft_growing(
        &self,
        now_ms: u64,
        window_ms: u64,
        ratio: f64,
        min: usize,
        floor_ms: f64,
    ) -> bool {
        let middle = now_ms.saturating_sub(window_ms / 2);
        let (mut a, mut na, mut b, mut nb) = (0.0, 0usize, 0.0, 0usize);
        for &(at, ttft) in &self.ttft {
            if at < middle {
                a += ttft;
                na += 1;
            } else {
                b += ttft;
                nb += 1;
            }
        }
        if na < min || nb < min {
            return false;
        }
        let recent = b / nb as f64;
        recent >= floor_ms && recent >= ratio * (a / na as f64).max(1e-9)
    }
}

/// Medians of recent observations, recomputed every few updates.
#[derive(Clone, Debug, Default)]
struct RecentMedian {
    values: VecDeque<f64>,
    median: Option<f64>,
    updates: u32,
}

impl RecentMedian {
    const KEEP: usize = 255;

    fn push(&mut self, v: f64) {
        if self.values.len() == Self::KEEP {
            self.values.pop_front();
        }
        self.values.push_back(v);
        self.updates += 1;
        if self.median.is_none() || self.updates.is_multiple_of(16) {
            let mut sorted: Vec<f64> = self.values.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            self.median = Some(sorted[sorted.len() / 2]);
        }
    }
}

/// The E2 policy.
#[derive(Clone, Debug)]
pub struct E2 {
    config: E2Config,
    mirror: Mirror,
    windows: Vec<WorkerWindow>,
    tpot: RecentMedian,
    output: RecentMedian,
    ttft: RecentMedian,
    routed_total: u64,
    prior_tpot_ms: f64,
    /// Prefixes (by key-portion hash) whose requests go to a given worker since a rebalancing
    /// step moved them there, and when.
    owners: FxHashMap<u64, (WorkerIdx, u64)>,
    last_rebalance_ms: u64,
    /// Requests routed and not yet released (by request-id hash): their worker and path end,
    /// so their nodes stay pinned in the tree while they run.
    running: FxHashMap<u64, (WorkerIdx, u64)>,
}

/// One worker's terms for one request.
#[derive(Clone, Copy, Debug, Default)]
struct Terms {
    w: WorkerIdx,
    cached: u32,
    load: f64,
    /// What an exploring prefill-heavy request takes off L on a decode-dominated worker.
    decode_credit: f64,
    /// What an exploring request takes off L's window part
    /// ([`Rules::explore_window_as_rate`]).
    window_credit: f64,
    evict: f64,
    prefill: f64,
}

impl Terms {
    fn total(&self) -> f64 {
        self.load + self.evict + self.prefill
    }
}

/// What one request costs wherever it goes.
#[derive(Clone, Copy, Debug)]
struct RequestCost {
    prompt_len: u32,
    /// Expected decode time (learned output length x time per output token).
    decode_ms: f64,
    /// Prefill time of the whole prompt with nothing cached.
    full_prefill_ms: f64,
    /// Share of a worker's window prefill an exploring request counts
    /// ([`Rules::explore_window_as_rate`]).
    explore_window_share: f64,
}

/// The terms as an exploring request weighs them: a prefill-heavy request prefers a worker
/// whose load is mostly decoding (the paper's prefill/decode balance); holders are compared,
/// and overload judged, on their whole load. P is left out unless `weighs_prefill`.
fn explore_terms(terms: &[Terms], weighs_prefill: bool) -> Vec<Terms> {
    terms
        .iter()
        .map(|t| Terms {
            load: t.load - t.decode_credit - t.window_credit,
            prefill: if weighs_prefill { t.prefill } else { 0.0 },
            ..*t
        })
        .collect()
}

impl E2 {
    /// An E2 policy.
    pub fn new(config: E2Config) -> Self {
        let prior_tpot_ms = config.profile.decode_step_ms(16, 16 * 1024);
        let mut mirror = Mirror::new(config.max_tree_tokens);
        mirror.tree.set_window(config.window_ms);
        Self {
            mirror,
            config,
            windows: Vec::new(),
            tpot: RecentMedian::default(),
            output: RecentMedian::default(),
            ttft: RecentMedian::default(),
            routed_total: 0,
            prior_tpot_ms,
            owners: FxHashMap::default(),
            last_rebalance_ms: 0,
            running: FxHashMap::default(),
        }
    }

    /// The global tree (for tests, metrics and snapshots).
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    fn window(&mut self, w: WorkerIdx) -> &mut WorkerWindow {
        let i = usize::from(w);
        if self.windows.len() <= i {
            self.windows.resize_with(i + 1, WorkerWindow::default);
        }
        &mut self.windows[i]
    }

    fn estimates(&self, max_tokens: u32) -> (f64, f64) {
        let out = self
            .output
            .median
            .unwrap_or(f64::from(self.config.prior_output_tokens))
            .min(f64::from(max_tokens))
            .max(1.0);
        (out, self.tpot.median.unwrap_or(self.prior_tpot_ms))
    }

    /// The paper's rebalancing: at most once per interval after the warm-up, when the most
    /// loaded worker's L exceeds the threshold times the least loaded one's, the prefixes
    /// (key portions) used at least twice on the heavy worker in the window move to the light
    /// one, cheapest to recompute first, until the loads they carry would balance. Later
    /// requests for a moved prefix go to its new owner.
    fn rebalance_subtrees(&mut self, terms: &[Terms], now_ms: u64) {
        if !self.config.subtree_rebalance || terms.len() < 2 {
            return;
        }
        let warmup = (self.config.warmup_requests).saturating_mul(terms.len() as u64);
        if self.routed_total < warmup
            || now_ms
                < self
                    .last_rebalance_ms
                    .saturating_add(self.config.rebalance_interval_ms)
        {
            return;
        }
        self.last_rebalance_ms = now_ms;
        let window = self.config.window_ms;
        self.owners.retain(|_, (owner, at)| {
            now_ms.saturating_sub(*at) < window && terms.iter().any(|t| t.w == *owner)
        });
        let by_load = |a: &&Terms, b: &&Terms| a.load.total_cmp(&b.load);
        let (Some(heavy), Some(light)) =
            (terms.iter().max_by(by_load), terms.iter().min_by(by_load))
        else {
            return;
        };
        let threshold = self.config.rebalance_threshold;
        if heavy.load <= threshold * light.load || heavy.w == light.w {
            return;
        }
        let Some(win) = self.windows.get(usize::from(heavy.w)) else {
            return;
        };
        // Each key portion the heavy worker served in the window, with its requests there
        // (the tree's count: it also counts requests from before the key's node was split
        // off a longer prompt).
        let mut keys: FxHashMap<u64, u32> = FxHashMap::default();
        for key in win.routed.iter().filter_map(|r| r.key) {
            keys.insert(key.hash, key.tokens);
        }
        let per_request = heavy.load / win.routed.len().max(1) as f64;
        let tree = &self.mirror.tree;
        let mut candidates: Vec<(u64, f64, u32)> = keys
            .into_iter()
            .map(|(hash, tokens)| (hash, tree.window_requests(hash, heavy.w, now_ms), tokens))
            .filter(|&(hash, count, _)| {
                count >= 2.0 && self.owners.get(&hash).is_none_or(|(o, _)| *o == heavy.w)
            })
            .collect();
        candidates.sort_unstable_by_key(|&(hash, _, tokens)| (tokens, hash));
        let mut moved = 0.0;
        for (hash, count, _) in candidates {
            if heavy.load - moved < threshold * (light.load + moved) {
                break;
            }
            // A prefix whose stream alone exceeds half the gap would only make the light
            // worker the heavy one.
            let carried = count * per_request;
            if self.config.rules.skip_overshooting_moves
                && light.load + moved + carried > heavy.load - moved - carried
            {
                continue;
            }
            self.owners.insert(hash, (light.w, now_ms));
            moved += carried;
        }
    }

    /// Whether worker `w`'s recent TTFT is at least the replication ratio above the mean of
    /// the other workers' (true when none of them has finished a request lately): a hot
    /// prefix, not an overloaded cluster.
    fn hotter_than_the_rest(&self, w: WorkerIdx, terms: &[Terms], now_ms: u64) -> bool {
        let window = self.config.window_ms;
        let recent = |w: WorkerIdx| {
            self.windows
                .get(usize::from(w))
                .and_then(|win| win.recent_ttft(now_ms, window))
        };
        let rest: Vec<f64> = terms
            .iter()
            .filter(|t| t.w != w)
            .filter_map(|t| recent(t.w))
            .collect();
        if rest.is_empty() {
            return true;
        }
        let mean_rest = rest.iter().sum::<f64>() / rest.len() as f64;
        recent(w).unwrap_or(0.0) >= self.config.replicate_ttft_ratio * mean_rest
    }

    /// M: the cost of recomputing what `w` would evict to free `need` tokens, each node at
    /// its prefill time weighted by the share of `w`'s `window_requests` that used it.
    fn eviction_cost(
        &self,
        w: WorkerIdx,
        need: u64,
        window_requests: usize,
        keep: &[crate::tree::NodeIdx],
        now_ms: u64,
    ) -> f64 {
        if need == 0 || window_requests == 0 {
            return 0.0;
        }
        let mut cost = 0.0;
        let profile = &self.config.profile;
        self.mirror
            .tree
            .eviction_victims(w, need, keep, now_ms, |victim| {
                let share = (victim.requests / window_requests as f64).min(1.0);
                if share > 0.0 {
                    cost += profile.prefill_ms(victim.tokens.max(1), victim.context) * share;
                }
            });
        cost
    }

    /// Picks among `terms` (never empty) by total cost: the minimum with random ties, or a
    /// softmax draw.
    fn pick(&self, terms: &[Terms], request_id: &str, salt: u64) -> Terms {
        let min = terms.iter().map(Terms::total).fold(f64::INFINITY, f64::min);
        let draw = mix64(self.config.seed ^ hash_str(request_id) ^ salt);
        if self.config.temperature > 0.0 {
            let costs: Vec<f64> = terms.iter().map(Terms::total).collect();
            let mean = costs.iter().sum::<f64>() / costs.len() as f64;
            let scale = self.config.temperature * mean.max(1e-9);
            return terms[softmax_pick(&costs, scale, draw)];
        }
        let tied: Vec<&Terms> = terms
            .iter()
            .filter(|t| t.total() <= min + 1e-9 * min.abs().max(1.0))
            .collect();
        // No finite total at all (a cost term was poisoned): fall back to the first worker
        // rather than fail the request.
        let Some(&&first) = tied.first() else {
            return terms[0];
        };
        if !self.config.rules.random_ties {
            return first;
        }
        tied.get((draw % tied.len() as u64) as usize)
            .map_or(first, |t| **t)
    }
}

impl E2 {
    /// What the request costs wherever it goes: its expected decode and its full prefill.
    fn request_cost(&self, request: &RouteRequest<'_>) -> RequestCost {
        let prompt_len = request.prompt.len() as u32;
        let (out_tokens, tpot) = self.estimates(request.max_tokens);
        let decode_ms = out_tokens * tpot;
        let full_prefill_ms = self.config.profile.prefill_ms(prompt_len.max(1), 0);
        let explore_window_share = if self.config.rules.explore_window_as_rate {
            let lifetime = self.ttft.median.unwrap_or(full_prefill_ms) + decode_ms;
            (lifetime / self.config.window_ms.max(1) as f64).min(1.0)
        } else {
            1.0
        };
        RequestCost {
            prompt_len,
            decode_ms,
            full_prefill_ms,
            explore_window_share,
        }
    }

    /// Step 1, the cost terms of every eligible worker (with its id): L (queued prefill,
    /// the window's prefill, the decode part the rules name), M and P.
    fn cost_terms<'v>(
        &mut self,
        cluster: &ClusterView<'v>,
        request: &RouteRequest<'_>,
        matched: &TreeMatch,
        cost: &RequestCost,
    ) -> Result<(Vec<Terms>, Vec<&'v str>), RouteError> {
        let now = request.now_ms;
        let mut terms = Vec::with_capacity(cluster.workers.len());
        let mut ids = Vec::with_capacity(cluster.workers.len());
        for view in cluster.workers {
            let w = self.mirror.idx(&view.id)?;
            let held = self.mirror.tree.held_tokens(w);
            let queued = view.load.reported_prefill_tokens.min(u64::from(u32::MAX)) as u32;
            let queue_ms = if queued == 0 {
                0.0
            } else {
                self.config.profile.prefill_ms(queued, 0)
            };
            let window_ms = self.config.window_ms;
            let booked_backlog = self.config.rules.booked_backlog;
            let win = self.window(w);
            win.expire(now, window_ms);
            let queue_ms = if booked_backlog {
                queue_ms.max(win.booked_until_ms - now as f64)
            } else {
                queue_ms
            };
            let prefill_load = win.prefill_ms.max(0.0);
            let window_credit = prefill_load * (1.0 - cost.explore_window_share);
            let window_requests = win.routed.len();
            let cached = matched.len_for(w).min(cost.prompt_len.saturating_sub(1));
            let missed = cost.prompt_len - cached;
            let decode_load = match self.config.rules.decode_load {
                DecodeLoad::Outstanding => f64::from(view.load.outstanding) * cost.decode_ms,
                DecodeLoad::RoutedInWindow => window_requests as f64 * cost.decode_ms,
            };
            let load = self.config.queue_weight * queue_ms + prefill_load + decode_load;
            let prefill = self.config.profile.prefill_ms(missed.max(1), cached);
            // Prefill-heavy on this worker: what it would compute outweighs the decoding.
            let decode_credit = if prefill > cost.decode_ms && decode_load > prefill_load {
                (1.0 - self.config.decode_discount) * decode_load
            } else {
                0.0
            };
            let evict_tokens = if view.kv_capacity_tokens == 0 {
                0
            } else {
                (held + u64::from(missed)).saturating_sub(view.kv_capacity_tokens)
            };
            let evict = self.eviction_cost(w, evict_tokens, window_requests, &matched.path, now);
            terms.push(Terms {
                w,
                cached,
                load,
                decode_credit,
                window_credit,
                evict,
                prefill,
            });
            ids.push(view.id.as_str());
        }
        Ok((terms, ids))
    }

    /// Step 2, exploit or explore: exploit when the largest cached prefix is longer than the
    /// rest of the prompt (going to a moved prefix's owner, else a holder, a replica or,
    /// past an overloaded holder, an explore), otherwise explore.
    fn choose(
        &self,
        terms: &[Terms],
        matched: &TreeMatch,
        request: &RouteRequest<'_>,
        cost: &RequestCost,
    ) -> (Terms, DecisionKind) {
        let best_cached = terms.iter().map(|t| t.cached).max().unwrap_or(0);
        if best_cached <= cost.prompt_len - best_cached {
            return (self.explore(terms, request, 4), DecisionKind::Explore);
        }
        if let Some(owner) = self.moved_owner(terms, matched, cost) {
            let kind = if owner.cached == best_cached {
                DecisionKind::Exploit
            } else {
                DecisionKind::Rebalance
            };
            return (owner, kind);
        }
        self.exploit(terms, best_cached, request, cost)
    }

    /// The worker a rebalancing step moved the request's prefix to, unless it is overloaded
    /// now.
    fn moved_owner(
        &self,
        terms: &[Terms],
        matched: &TreeMatch,
        cost: &RequestCost,
    ) -> Option<Terms> {
        matched
            .key
            .and_then(|key| self.owners.get(&key.hash))
            .and_then(|(owner, _)| terms.iter().find(|t| t.w == *owner))
            .copied()
            .filter(|owner| !self.overloaded(owner, terms, cost))
    }

    /// Step 3, among the holders of the largest cached prefix: the least loaded one; an
    /// explore instead when it is overloaded (per-request rebalancing); a replica when its
    /// prefix is hot.
    fn exploit(
        &self,
        terms: &[Terms],
        best_cached: u32,
        request: &RouteRequest<'_>,
        cost: &RequestCost,
    ) -> (Terms, DecisionKind) {
        let holders: Vec<Terms> = terms
            .iter()
            .filter(|t| t.cached == best_cached)
            .map(|t| Terms {
                evict: 0.0,
                prefill: 0.0,
                ..*t
            })
            .collect();
        let holder = self.pick(&holders, request.request_id, 1);
        if self.overloaded(&holder, terms, cost) {
            return (self.explore(terms, request, 2), DecisionKind::Rebalance);
        }
        let full = terms
            .iter()
            .find(|t| t.w == holder.w)
            .copied()
            .unwrap_or(holder);
        match self.replica(&full, terms, best_cached, request, cost) {
            Some(replica) => (replica, DecisionKind::Replicate),
            None => (full, DecisionKind::Exploit),
        }
    }

    /// Step 4, replication: a worker without the prefix, when the holder's prefix is hot (its
    /// TTFT doubled over the window, and under [`Rules::guarded_replication`] also above the
    /// request's own prefill and the other workers' TTFT, with the replica cheaper than
    /// waiting at the holder: when every worker is busy, recomputing elsewhere only adds
    /// work).
    fn replica(
        &self,
        holder: &Terms,
        terms: &[Terms],
        best_cached: u32,
        request: &RouteRequest<'_>,
        cost: &RequestCost,
    ) -> Option<Terms> {
        let guarded = self.config.rules.guarded_replication;
        let hot = self.windows.get(usize::from(holder.w)).is_some_and(|win| {
            win.ttft_growing(
                request.now_ms,
                self.config.window_ms,
                self.config.replicate_ttft_ratio,
                self.config.replicate_min_samples,
                if guarded { cost.full_prefill_ms } else { 0.0 },
            )
        }) && (!guarded || self.hotter_than_the_rest(holder.w, terms, request.now_ms));
        let others: Vec<Terms> = terms
            .iter()
            .filter(|t| t.cached < best_cached)
            .copied()
            .collect();
        (hot && !others.is_empty())
            .then(|| self.pick(&others, request.request_id, 3))
            .filter(|r| !guarded || r.total() < holder.total())
    }

    /// Explore: the worker of least L + M (+ P, under [`Rules::explore_weighs_prefill`]),
    /// a prefill-heavy request crediting decode-heavy workers.
    fn explore(&self, terms: &[Terms], request: &RouteRequest<'_>, salt: u64) -> Terms {
        let weighed = explore_terms(terms, self.config.rules.explore_weighs_prefill);
        self.pick(&weighed, request.request_id, salt)
    }

    /// Whether worker terms `t` are past the per-request rebalancing threshold (never before
    /// the warm-up, nor without [`Rules::pass_over_overloaded`]).
    fn overloaded(&self, t: &Terms, terms: &[Terms], cost: &RequestCost) -> bool {
        let lightest = terms.iter().map(|t| t.load).fold(f64::INFINITY, f64::min);
        self.config.rules.pass_over_overloaded
            && self.routed_total >= self.config.warmup_requests
            && t.load > self.config.rebalance_threshold * lightest + cost.full_prefill_ms
    }

    /// Step 5, record: the route in the tree, the request as running on its path (so M
    /// never counts what it pins), and its prefill in the worker's window.
    fn record(&mut self, request: &RouteRequest<'_>, chosen: &Terms) {
        let now = request.now_ms;
        let path = self.mirror.tree.record_route(request.prompt, chosen.w, now);
        let request_hash = hash_str(request.request_id);
        if let Some((w, end)) = self.running.remove(&request_hash) {
            // Routed again (its first worker did not take it).
            self.mirror.tree.end_request(end, w);
        }
        if let Some(path) = path {
            self.mirror.tree.begin_request(path.end_hash, chosen.w);
            self.running.insert(request_hash, (chosen.w, path.end_hash));
        }
        let win = self.window(chosen.w);
        win.booked_until_ms = win.booked_until_ms.max(now as f64) + chosen.prefill;
        win.push(Routed {
            at_ms: now,
            prefill_ms: chosen.prefill,
            key: path.and_then(|p| p.key),
        });
        self.routed_total += 1;
    }
}

impl Policy for E2 {
    fn name(&self) -> &'static str {
        if self.config.rules == Rules::PAPER {
            "e2-paper"
        } else {
            "e2"
        }
    }

    fn route(
        &mut self,
        cluster: &ClusterView<'_>,
        request: &RouteRequest<'_>,
    ) -> Result<Decision, RouteError> {
        if cluster.workers.is_empty() {
            return Err(RouteError::NoEligibleWorker);
        }
        let matched = self.mirror.tree.match_prefix(request.prompt);
        let cost = self.request_cost(request);
        let (terms, ids) = self.cost_terms(cluster, request, &matched, &cost)?;
        self.rebalance_subtrees(&terms, request.now_ms);
        let (chosen, kind) = self.choose(&terms, &matched, request, &cost);
        let position = terms
            .iter()
            .position(|t| t.w == chosen.w)
            .ok_or(RouteError::NoEligibleWorker)?;
        // What the request will really prefill there (an explore without P weighed it as 0).
        let chosen = Terms {
            prefill: terms[position].prefill,
            ..chosen
        };
        self.record(request, &chosen);
        Ok(Decision {
            worker: ids[position].to_string(),
            kind,
            cached_tokens: chosen.cached,
            reason: format!(
                "cached={}/{} L={:.1}ms M={:.1}ms P={:.1}ms",
                chosen.cached, cost.prompt_len, chosen.load, chosen.evict, chosen.prefill
            ),
        })
    }

    fn tree_size(&self) -> Option<crate::TreeSize> {
        Some(crate::TreeSize {
            running_requests: self.running.len(),
            ..self.mirror.size()
        })
    }

    fn export(&self) -> Vec<crate::ExportedSpan> {
        self.mirror.export()
    }

    fn observe(&mut self, event: &ClusterEvent<'_>) -> Result<(), TreeError> {
        if let ClusterEvent::Finished {
            worker,
            output_tokens,
            ttft_ms,
            tpot_ms,
            now_ms,
        } = *event
        {
            // Timings come from the network: a value no real request has (NaN, infinite,
            // negative, longer than a day) is dropped rather than let into the estimates.
            let plausible = |ms: f64| ms.is_finite() && (0.0..=MAX_PLAUSIBLE_MS).contains(&ms);
            self.output.push(f64::from(output_tokens));
            if tpot_ms > 0.0 && plausible(tpot_ms) {
                self.tpot.push(tpot_ms);
            }
            if plausible(ttft_ms) {
                self.ttft.push(ttft_ms);
            }
            if plausible(ttft_ms)
                && let Some(w) = self.mirror.known(worker)
            {
                let window_ms = self.config.window_ms;
                let win = self.window(w);
                win.ttft.push_back((now_ms, ttft_ms));
                win.expire(now_ms, window_ms);
            }
        }
        if let ClusterEvent::Released { request_id, .. } = *event
            && let Some((w, end)) = self.running.remove(&hash_str(request_id))
        {
            self.mirror.tree.end_request(end, w);
        }
        if let ClusterEvent::WorkerGone { worker } = *event
            && let Some(w) = self.mirror.known(worker)
        {
            *self.window(w) = WorkerWindow::default();
            self.running.retain(|_, (x, _)| *x != w);
        }
        self.mirror.observe(event)
    }
}
