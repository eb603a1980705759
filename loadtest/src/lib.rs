//! `preble-loadtest`: Preble's workloads, a discrete-event simulator of a preble cluster, live
//! drivers of a running stack, and the reports that compare scheduling policies.
//!
//! Layout:
//! - [`workload`]: requests (generators, traces, arrivals, files);
//! - [`sim`]: the simulator (same policy, local scheduler and cost model as the services);
//! - [`live`]: drives a running stack over HTTP (OpenAI API, streaming) or NATS;
//! - [`report`]: summaries, tables, JSON/CSV and plots;
//! - [`compare`]: several policies over a sweep of rates on the same requests.

pub mod compare;
pub mod live;
pub mod paper;
pub mod path_bench;
pub mod report;
pub mod sim;
pub mod workload;
