//! What a policy decides.

/// Why a worker was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecisionKind {
    /// Sent to a worker that holds a large part of the prompt.
    Exploit,
    /// Sent to the worker of least estimated cost.
    Explore,
    /// Sent elsewhere to even out load.
    Rebalance,
    /// Sent to a new replica of a hot prefix.
    Replicate,
    /// A load-only or rotation policy picked it.
    Load,
}

impl DecisionKind {
    /// Name for metrics and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Exploit => "exploit",
            DecisionKind::Explore => "explore",
            DecisionKind::Rebalance => "rebalance",
            DecisionKind::Replicate => "replicate",
            DecisionKind::Load => "load",
        }
    }
}

/// A routing decision with its reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The chosen worker's id.
    pub worker: String,
    /// Why.
    pub kind: DecisionKind,
    /// Prompt tokens the chosen worker is believed to hold.
    pub cached_tokens: u32,
    /// The terms that decided, human-readable (for traces and reports).
    pub reason: String,
}

/// Why no worker was picked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No worker is eligible.
    #[error("no eligible worker")]
    NoEligibleWorker,
    /// More workers than a policy's tree can track.
    #[error("more than {0} workers")]
    TooManyWorkers(usize),
}
