//! The preble global scheduler: consumes requests from JetStream, picks a worker with the
//! configured policy, forwards the request and acknowledges it once a worker accepted.
//!
//! Layout:
//! - [`config`]: flags and the validated configuration.
//! - [`cluster`]: the scheduler's view of the workers: liveness, load charged at dispatch and
//!   released on every ending, reported load. No I/O.
//! - [`service`]: the NATS side: the requests stream and consumer, the routing actor,
//!   dispatch with request-reply, worker events.
//! - [`persist`]: the prefix tree's snapshot and op log in Redis.
//! - [`startup`]: a restarted scheduler's bounded wait for the workers it knew.
//! - [`metrics`]: Prometheus metrics.

pub mod cluster;
pub mod config;
pub mod metrics;
pub mod persist;
pub mod service;
pub mod startup;

pub use config::{Args, Config};
pub use service::run;
