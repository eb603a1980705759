//! Global routing policies: which worker serves a request. Pure: no I/O, no clock, no async;
//! the scheduler service feeds in a view of the cluster and gets a decision with its reason.
//!
//! Layout:
//! - [`view`]: the domain types a policy sees (workers and their load, the request).
//! - [`decision`]: what a policy returns (worker, kind, reason) and its errors.
//! - [`tiebreak`]: seeded random choice among equally good workers.
//! - [`least_load`], [`round_robin`]: policies; [`PolicyKind`] names them for flags.

pub mod decision;
pub mod least_load;
pub mod round_robin;
pub mod tiebreak;
pub mod tree;
pub mod view;
pub mod workers;

pub use decision::{Decision, DecisionKind, RouteError};
pub use least_load::LeastLoad;
pub use round_robin::RoundRobin;
pub use view::{ClusterView, RouteRequest, WorkerLoad, WorkerView};

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
}

/// The policies a scheduler can run, by command-line name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// [`LeastLoad`].
    LeastLoad,
    /// [`RoundRobin`].
    RoundRobin,
}

impl PolicyKind {
    /// Every policy name, for `--help` and error messages.
    pub const NAMES: [&'static str; 2] = ["least-load", "round-robin"];

    /// Builds the policy with its documented defaults and a tie-break seed.
    pub fn build(self, seed: u64) -> Box<dyn Policy> {
        match self {
            PolicyKind::LeastLoad => Box::new(LeastLoad::new(seed)),
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "least-load" => Ok(PolicyKind::LeastLoad),
            "round-robin" => Ok(PolicyKind::RoundRobin),
            other => Err(format!(
                "unknown policy {other:?}; known: {}",
                PolicyKind::NAMES.join(", ")
            )),
        }
    }
}
