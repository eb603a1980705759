//! A preble worker: one GPU (real or simulated), its local scheduler and its engine.
//!
//! Layout:
//! - [`config`]: flags and the validated configuration.
//! - [`model`]: what the worker knows about its model directory (vocabulary, context, stop ids).
//! - [`engine`]: the engine trait, the `sim` engine (cost-model time, deterministic tokens) and,
//!   with the cargo feature `torch`, the `torch` engine (Llama-architecture models on libtorch).
//! - [`engine_loop`]: the loop that owns the local scheduler (`preble-localsched`) and the
//!   engine, streams tokens and reports cache changes and load.
//! - [`service`]: the NATS side: dispatch, cancellation, token streams, events.
//! - [`presence`]: which gateways are alive, so requests whose gateway died are stopped.
//! - [`metrics`]: Prometheus metrics (served on `/metrics` with `/health`).

pub mod config;
pub mod engine;
pub mod engine_loop;
pub mod metrics;
pub mod model;
pub mod presence;
pub mod service;

pub use config::{Args, Config};
pub use service::run;
