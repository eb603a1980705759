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
}

/// One live worker that may receive the request.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// Its load.
    pub load: WorkerLoad,
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
}
