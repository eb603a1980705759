//! The per-iteration batch builder of one worker.
//!
//! Each iteration: every running request that is decoding steps once (decodes first); then
//! prompt chunks of running requests under the prefill token budget (chunked prefill, mixed
//! with the decodes); then new requests are admitted in the configured [`WaitOrder`] (the
//! priority groups by default, first come first served, or SGLang's longest prefix match)
//! while the budget, the running cap and the KV slots allow. Slots are exact: a request holds
//! one slot per token whose KV is computed or about to be; when decodes cannot get slots even
//! after eviction, the most recently admitted requests are preempted (their own slots freed,
//! their prefix unpinned) and queued again to be recomputed.
//!
//! Lifecycle: [`LocalScheduler::enqueue`], then per iteration [`LocalScheduler::plan`], run the
//! engine over the plan, [`LocalScheduler::commit`] the sampled tokens, and
//! [`LocalScheduler::finish`] requests that stopped.

use crate::cache::{CacheEvent, NodeId, RadixCache, Slot};
use crate::queue::{LPM_MAX_SORTED, PriorityQueue, WaitOrder};

/// Identifies a request inside one scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Knobs of the local scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// KV slots (tokens) of the device.
    pub kv_capacity: u32,
    /// Prompt tokens computed per iteration at most (the chunked-prefill budget).
    pub prefill_budget: u32,
    /// Requests in the running batch at most.
    pub max_running: usize,
    /// Number of priority groups by cache-hit ratio (with [`WaitOrder::Priority`]).
    pub priority_groups: usize,
    /// The order in which waiting requests are admitted.
    pub wait_order: WaitOrder,
    /// Fraction of the running requests' remaining output tokens kept free when admitting,
    /// so decodes rarely need preemption (0 admits whenever the prompt fits).
    pub decode_reserve: f64,
}

impl Default for SchedulerConfig {
    /// The paper's defaults: 512-token chunks, 10 priority groups.
    fn default() -> Self {
        Self {
            kv_capacity: 200_000,
            prefill_budget: 512,
            max_running: 256,
            priority_groups: 10,
            wait_order: WaitOrder::Priority,
            decode_reserve: 0.25,
        }
    }
}

/// Why a request cannot be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// Its prompt plus output would need more KV slots than the device has.
    #[error("request needs {need} KV slots but this worker has {capacity}")]
    NeverFits {
        /// Slots needed.
        need: u64,
        /// Slots in total.
        capacity: u64,
    },
    /// It has no prompt.
    #[error("empty prompt")]
    EmptyPrompt,
}

/// A request in the scheduler, with the caller's `payload`.
#[derive(Clone, Debug)]
pub struct Sequence<T> {
    id: SeqId,
    /// What the caller attached (its request, stream state, timings).
    pub payload: T,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: u32,
    max_new_tokens: u32,
    /// Tokens whose KV is computed; their slots are `slots[..computed]`.
    computed: u32,
    /// KV slots: `slots[..in_tree]` belong to the cache (kept by `pin`), the rest to this
    /// request.
    slots: Vec<Slot>,
    in_tree: u32,
    pin: Option<NodeId>,
    /// Prompt tokens found in the cache at first admission.
    cached_prompt: Option<u32>,
    /// Hit ratio when last queued.
    hit_ratio: f64,
    preemptions: u32,
}

impl<T> Sequence<T> {
    /// Its id.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Prompt then generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The prompt.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len as usize]
    }

    /// Prompt length.
    pub fn prompt_len(&self) -> u32 {
        self.prompt_len
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len as usize..]
    }

    /// Most tokens it may generate.
    pub fn max_new_tokens(&self) -> u32 {
        self.max_new_tokens
    }

    /// Tokens whose KV is computed.
    pub fn computed(&self) -> u32 {
        self.computed
    }

    /// KV slots, one per computed (or planned) token, in token order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Prompt tokens reused from the cache at its first admission (0 before admission).
    pub fn cached_prompt_tokens(&self) -> u32 {
        self.cached_prompt.unwrap_or(0)
    }

    /// Cache-hit ratio when it was last queued.
    pub fn hit_ratio(&self) -> f64 {
        self.hit_ratio
    }

    /// Times it was preempted.
    pub fn preemptions(&self) -> u32 {
        self.preemptions
    }

    /// Whether it has started generating (every prompt token computed once).
    pub fn is_decoding(&self) -> bool {
        self.computed as usize + 1 == self.tokens.len()
            && self.tokens.len() > self.prompt_len as usize
    }

    fn remaining_output(&self) -> u32 {
        self.max_new_tokens
            .saturating_sub(self.tokens.len() as u32 - self.prompt_len)
    }
}

/// One sequence's part in an iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanItem {
    /// Index into [`LocalScheduler::running`].
    pub index: usize,
    /// The sequence.
    pub id: SeqId,
    /// Tokens already computed before this step (the step's context).
    pub start: u32,
    /// Tokens this step computes: `tokens[start..start + extend]`, into
    /// `slots[start..start + extend]`.
    pub extend: u32,
    /// Whether the step ends with a sampled token.
    pub samples: bool,
}

/// One iteration's work.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Work per running sequence, decodes first.
    pub items: Vec<PlanItem>,
    /// Sequences preempted while planning (back in the wait queue, to be recomputed).
    pub preempted: Vec<SeqId>,
    /// Sequences admitted while planning.
    pub admitted: Vec<SeqId>,
}

impl Plan {
    /// Whether there is nothing to compute.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Counts for load reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Requests in the running batch.
    pub running: u32,
    /// Requests waiting.
    pub waiting: u32,
    /// Prompt tokens still to compute (waiting ones counted without what they would reuse).
    pub queued_prefill_tokens: u64,
    /// Context tokens of decoding requests.
    pub running_decode_tokens: u64,
    /// Output tokens the running requests may still generate.
    pub remaining_decode_tokens: u64,
    /// Slots that could be had now (free plus unpinned cache).
    pub available_slots: u64,
    /// Slots nobody uses.
    pub free_slots: u64,
    /// Tokens in the cache.
    pub cached_tokens: u64,
}

/// The local scheduler of one worker.
#[derive(Clone, Debug)]
pub struct LocalScheduler<T> {
    config: SchedulerConfig,
    cache: RadixCache,
    waiting: PriorityQueue<Sequence<T>>,
    running: Vec<Sequence<T>>,
    next_id: u64,
}

impl<T> LocalScheduler<T> {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            cache: RadixCache::new(config.kv_capacity),
            waiting: PriorityQueue::new(match config.wait_order {
                WaitOrder::Priority => config.priority_groups,
                WaitOrder::Fcfs | WaitOrder::LongestPrefix => 1,
            }),
            running: Vec::new(),
            next_id: 0,
            config,
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The KV cache.
    pub fn cache(&self) -> &RadixCache {
        &self.cache
    }

    /// The running batch.
    pub fn running(&self) -> &[Sequence<T>] {
        &self.running
    }

    /// The running sequence at `index`, to update its payload.
    pub fn running_mut(&mut self, index: usize) -> &mut Sequence<T> {
        &mut self.running[index]
    }

    /// Whether nothing waits or runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Checks that a request of this shape could ever run here.
    pub fn check(&self, prompt_len: usize, max_new_tokens: u32) -> Result<(), AdmitError> {
        if prompt_len == 0 {
            return Err(AdmitError::EmptyPrompt);
        }
        let need = prompt_len as u64 + u64::from(max_new_tokens);
        let capacity = u64::from(self.config.kv_capacity);
        if need > capacity {
            return Err(AdmitError::NeverFits { need, capacity });
        }
        Ok(())
    }

    /// Queues a request for admission.
    pub fn enqueue(
        &mut self,
        payload: T,
        prompt: Vec<u32>,
        max_new_tokens: u32,
    ) -> Result<SeqId, AdmitError> {
        self.check(prompt.len(), max_new_tokens)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let hit = self.cache.peek_match_len(&prompt[..prompt.len() - 1]);
        let hit_ratio = hit as f64 / prompt.len() as f64;
        let seq = Sequence {
            id,
            payload,
            prompt_len: prompt.len() as u32,
            tokens: prompt,
            max_new_tokens,
            computed: 0,
            slots: Vec::new(),
            in_tree: 0,
            pin: None,
            cached_prompt: None,
            hit_ratio,
            preemptions: 0,
        };
        self.waiting.push(seq, hit_ratio);
        Ok(id)
    }

    /// Plans the next iteration (see the module documentation).
    pub fn plan(&mut self) -> Plan {
        let mut plan = Plan::default();
        self.make_room_for_decodes(&mut plan);
        let mut budget = self.config.prefill_budget;
        for index in 0..self.running.len() {
            let seq = &self.running[index];
            if seq.is_decoding() {
                let start = seq.computed;
                self.grow_slots(index, 1);
                plan.items.push(PlanItem {
                    index,
                    id: self.running[index].id,
                    start,
                    extend: 1,
                    samples: true,
                });
            }
        }
        for index in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            if !self.running[index].is_decoding() {
                plan.items.push(self.prefill_chunk(index, &mut budget));
            }
        }
        if budget > 0 && self.running.len() < self.config.max_running {
            self.order_waiting();
        }
        while budget > 0 && self.running.len() < self.config.max_running {
            if !self.admit_next() {
                break;
            }
            let index = self.running.len() - 1;
            plan.admitted.push(self.running[index].id);
            plan.items.push(self.prefill_chunk(index, &mut budget));
        }
        plan
    }

    /// With [`WaitOrder::LongestPrefix`], sorts the waiting requests by how much of each the
    /// cache holds now (unless more than [`LPM_MAX_SORTED`] wait), refreshing their hit
    /// ratios.
    fn order_waiting(&mut self) {
        if self.config.wait_order != WaitOrder::LongestPrefix || self.waiting.len() > LPM_MAX_SORTED
        {
            return;
        }
        let cache = &self.cache;
        self.waiting.sort_by_key_descending(|seq| {
            let limit = seq.tokens.len() - 1;
            let hit = cache.peek_match_len(&seq.tokens[..limit]);
            seq.hit_ratio = hit as f64 / seq.tokens.len() as f64;
            hit as u64
        });
    }

    /// Preempts the most recently admitted requests until every decode can get its slot.
    fn make_room_for_decodes(&mut self, plan: &mut Plan) {
        loop {
            let decodes = self
                .running
                .iter()
                .filter(|s| s.is_decoding() && s.slots.len() <= s.computed as usize)
                .count() as u64;
            if decodes <= self.cache.available_slots() {
                return;
            }
            let Some(victim) = self.running.pop() else {
                return;
            };
            plan.preempted.push(victim.id);
            self.requeue(victim);
        }
    }

    /// Frees a request's own slots and unpins its prefix, and queues it (first in its group)
    /// to be recomputed.
    fn requeue(&mut self, mut seq: Sequence<T>) {
        self.cache.free(&seq.slots[seq.in_tree as usize..]);
        if let Some(pin) = seq.pin.take() {
            self.cache.unpin(pin);
        }
        seq.slots.clear();
        seq.computed = 0;
        seq.in_tree = 0;
        seq.preemptions += 1;
        let limit = seq.tokens.len() - 1;
        let hit = self.cache.peek_match_len(&seq.tokens[..limit]);
        seq.hit_ratio = hit as f64 / seq.tokens.len() as f64;
        let ratio = seq.hit_ratio;
        self.waiting.push_front(seq, ratio);
    }

    /// Makes sure running request `index` has slots for `extra` tokens beyond its computed
    /// ones. Callers have checked that the slots can be had.
    fn grow_slots(&mut self, index: usize, extra: u32) {
        let seq = &self.running[index];
        let want = (seq.computed + extra) as usize;
        if seq.slots.len() >= want {
            return;
        }
        let missing = want - seq.slots.len();
        let got = self
            .cache
            .alloc_into(missing, &mut self.running[index].slots);
        debug_assert!(got, "slots were checked before allocating");
    }

    fn prefill_chunk(&self, index: usize, budget: &mut u32) -> PlanItem {
        let seq = &self.running[index];
        let remaining = seq.tokens.len() as u32 - seq.computed;
        let extend = remaining.min(*budget);
        *budget -= extend;
        PlanItem {
            index,
            id: seq.id,
            start: seq.computed,
            extend,
            samples: extend == remaining,
        }
    }

    /// Admits the request whose turn it is, if its slots can be had; reserves slots for all of
    /// its uncached tokens.
    fn admit_next(&mut self) -> bool {
        let reserve = (self.config.decode_reserve
            * self
                .running
                .iter()
                .map(|s| f64::from(s.remaining_output()))
                .sum::<f64>())
        .ceil() as u64;
        let Some(next) = self.waiting.peek_next() else {
            return false;
        };
        let limit = next.tokens.len() - 1;
        let m = self.cache.match_prefix(&next.tokens, limit);
        self.cache.pin(m.node);
        let need = (next.tokens.len() - m.len) as u64;
        if need + reserve > self.cache.available_slots() && !self.running.is_empty() {
            self.cache.unpin(m.node);
            return false;
        }
        let Some(own) = self.cache.alloc(need as usize) else {
            self.cache.unpin(m.node);
            return false;
        };
        let Some(mut seq) = self.waiting.pop_next() else {
            self.cache.unpin(m.node);
            self.cache.free(&own);
            return false;
        };
        seq.slots = m.slots;
        seq.slots.extend(own);
        seq.computed = m.len as u32;
        seq.in_tree = m.len as u32;
        seq.pin = Some(m.node);
        seq.cached_prompt
            .get_or_insert(m.len.min(seq.prompt_len as usize) as u32);
        self.running.push(seq);
        true
    }

    /// Applies an iteration's results: `sampled[i]` is the token item `i` of `plan` sampled
    /// (if it sampled). Computed prompt chunks are put in the cache for other requests to
    /// reuse. Returns the indices (into [`LocalScheduler::running`]) of the sequences that got
    /// a token, with the token.
    pub fn commit(&mut self, plan: &Plan, sampled: &[Option<u32>]) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (item, token) in plan.items.iter().zip(sampled) {
            let seq = &mut self.running[item.index];
            debug_assert_eq!(seq.id, item.id, "plan applied to a changed batch");
            seq.computed = item.start + item.extend;
            let was_prefill = item.extend > 1 || !item.samples || item.start < seq.prompt_len;
            if let (true, Some(token)) = (item.samples, token) {
                seq.tokens.push(*token);
                out.push((item.index, *token));
            }
            if was_prefill {
                self.cache_computed(item.index);
            }
        }
        out
    }

    /// Puts running request `index`'s computed tokens in the cache and moves its pin there.
    fn cache_computed(&mut self, index: usize) {
        let seq = &mut self.running[index];
        let n = seq.computed as usize;
        if n == 0 || n <= seq.in_tree as usize {
            return;
        }
        let node = self.cache.insert(&seq.tokens[..n], &mut seq.slots[..n]);
        self.cache.pin(node);
        if let Some(old) = seq.pin.replace(node) {
            self.cache.unpin(old);
        }
        seq.in_tree = n as u32;
    }

    /// Removes running request `index` (it stopped): its computed tokens stay in the cache
    /// for later requests, everything else it held is freed. Later requests' indices shift
    /// down by one, so finish several in descending index order.
    pub fn finish(&mut self, index: usize) -> Sequence<T> {
        let mut seq = self.running.remove(index);
        self.release(&mut seq);
        seq
    }

    fn release(&mut self, seq: &mut Sequence<T>) {
        let n = seq.computed as usize;
        if n > seq.in_tree as usize {
            let node = self.cache.insert(&seq.tokens[..n], &mut seq.slots[..n]);
            self.cache.pin(node);
            if let Some(old) = seq.pin.replace(node) {
                self.cache.unpin(old);
            }
            seq.in_tree = n as u32;
        }
        self.cache.free(&seq.slots[seq.in_tree as usize..]);
        if let Some(pin) = seq.pin.take() {
            self.cache.unpin(pin);
        }
        seq.slots.clear();
        seq.in_tree = 0;
    }

    /// Removes a request wherever it is (cancelled).
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence<T>> {
        if let Some(index) = self.running.iter().position(|s| s.id == id) {
            return Some(self.finish(index));
        }
        self.waiting.remove_first(|s| s.id == id)
    }

    /// Removes every request (shutdown).
    pub fn drain(&mut self) -> Vec<Sequence<T>> {
        let mut all = Vec::new();
        while let Some(mut seq) = self.running.pop() {
            self.release(&mut seq);
            all.push(seq);
        }
        all.extend(self.waiting.drain());
        all
    }

    /// Takes the cache events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        self.cache.take_events()
    }

    /// The current load.
    pub fn load(&self) -> Load {
        let waiting_prefill: u64 = self
            .waiting
            .iter()
            .map(|s| ((1.0 - s.hit_ratio) * s.tokens.len() as f64).round() as u64)
            .sum();
        let running_prefill: u64 = self
            .running
            .iter()
            .filter(|s| !s.is_decoding())
            .map(|s| (s.tokens.len() as u64).saturating_sub(u64::from(s.computed)))
            .sum();
        let running_decode_tokens = self
            .running
            .iter()
            .filter(|s| s.is_decoding())
            .map(|s| s.tokens.len() as u64)
            .sum();
        Load {
            running: self.running.len() as u32,
            waiting: self.waiting.len() as u32,
            queued_prefill_tokens: waiting_prefill + running_prefill,
            running_decode_tokens,
            remaining_decode_tokens: self
                .running
                .iter()
                .map(|s| u64::from(s.remaining_output()))
                .sum(),
            available_slots: self.cache.available_slots(),
            free_slots: self.cache.free_slots(),
            cached_tokens: self.cache.cached_tokens(),
        }
    }

    /// Every slot held by running requests and not by the cache (tests check slots).
    #[doc(hidden)]
    pub fn own_slots(&self) -> Vec<Slot> {
        self.running
            .iter()
            .flat_map(|s| s.slots[s.in_tree as usize..].iter().copied())
            .collect()
    }
}
