//! What a policy sees.

/// A worker's load as the scheduler knows it: its own dispatch bookkeeping plus the worker's
/// latest report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkerLoad {
    /// Requests dispatched to it and not finished yet (charged at dispatch, released on every
    /// ending: finish, error, cancel, worker death).
    pub outstanding: u32,
    /// Prompt tokens of the outstanding requests.
    pub outstanding_prompt_tokens: u64,
    /// Prompt tokens still to prefill, from the worker's last load report.
    pub reported_prefill_tokens: u64,
    /// The worker's own estimate of the time to drain its queue, milliseconds.
    pub reported_drain_ms: f64,
    /// Context tokens of its decoding requests, from its last load report.
    pub reported_decode_tokens: u64,
}

/// One live worker that may receive the request.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// Its load.
    pub load: WorkerLoad,
    /// Its KV-cache capacity in tokens (0 when not reported yet).
    pub kv_capacity_tokens: u64,
}

/// The workers eligible for one request (alive, serving its model, not already tried).
#[derive(Clone, Copy, Debug)]
pub struct ClusterView<'a> {
    /// Eligible workers, in a stable order.
    pub workers: &'a [WorkerView],
}

/// The request being routed.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    /// Unique id (part of the tie-break seed, so a decision is reproducible).
    pub request_id: &'a str,
    /// Prompt token ids.
    pub prompt: &'a [u32],
    /// Most tokens it may generate.
    pub max_tokens: u32,
    /// The time now, in milliseconds since any fixed origin (policies keep no clock).
    pub now_ms: u64,
}

/// Something that happened in the cluster, for policies that learn from it.
#[derive(Clone, Copy, Debug)]
pub enum ClusterEvent<'a> {
    /// A worker's cache now holds `tokens` after the path named `parent_hash`, with a boundary
    /// named `hash` after them.
    CacheInserted {
        /// The worker.
        worker: &'a str,
        /// Hash of the path the span follows.
        parent_hash: u64,
        /// Hash of the path through the span.
        hash: u64,
        /// The span.
        tokens: &'a [u32],
        /// When.
        now_ms: u64,
    },
    /// A worker's cache dropped the last `num_tokens` tokens of the path named `hash`.
    CacheEvicted {
        /// The worker.
        worker: &'a str,
        /// Hash of the path through the dropped span.
        hash: u64,
        /// Length of the dropped span.
        num_tokens: u32,
    },
    /// Forget what a worker's cache holds (a digest of its full contents follows as inserts).
    CacheReset {
        /// The worker.
        worker: &'a str,
    },
    /// A worker is gone (dead or left): forget it.
    WorkerGone {
        /// The worker.
        worker: &'a str,
    },
    /// A request routed to a worker ended there, however it ended (finished, failed,
    /// cancelled, refused at dispatch): what the policy charged for it can be released.
    Released {
        /// The worker it was routed to.
        worker: &'a str,
        /// The request's id, as routed.
        request_id: &'a str,
    },
    /// A request finished on a worker.
    Finished {
        /// The worker.
        worker: &'a str,
        /// Tokens it generated.
        output_tokens: u32,
        /// Its time to first token on the worker, milliseconds.
        ttft_ms: f64,
        /// Its mean time per output token, milliseconds (0 for one token).
        tpot_ms: f64,
        /// When.
        now_ms: u64,
    },
}
