//! The preble gateway: the OpenAI-compatible HTTP API and the NATS request API. It tokenises,
//! publishes each request to the requests stream, and relays the token stream back as text.
//! It never picks a worker.
//!
//! Layout:
//! - [`config`]: flags and the validated configuration.
//! - [`admission`]: the in-flight limit and per-key rate limits, refused at once.
//! - [`models`]: served models: tokenizer, chat template, context length.
//! - [`template`]: where a model directory's chat template lives (every place transformers
//!   writes one).
//! - [`chat`]: conversations to prompt tokens, user content kept as data.
//! - [`fields`]: which request fields are honoured; the rest are refused by name.
//! - [`prepare`]: one request preparation (key, checks, defaults, tokenisation) for both doors.
//! - [`error`]: API errors and their OpenAI-shaped bodies.
//! - [`openai`]: the OpenAI request and response types.
//! - [`presence`]: the instance's beats, so workers stop the requests of a gateway that died.
//! - [`relay`]: submits a request over NATS and yields its ordered token stream; cancels the
//!   request everywhere when the consumer goes away.
//! - [`text`]: incremental detokenisation and stop strings on top of a relay.
//! - [`http`]: the axum routes; [`nats_api`]: the same over NATS.
//! - [`serve`]: HTTP/1.1 connections within limits (cap, header and body timeouts).
//! - [`metrics`]: Prometheus metrics.

pub mod admission;
pub mod chat;
pub mod config;
pub mod error;
pub mod fields;
pub mod http;
pub mod metrics;
pub mod models;
pub mod nats_api;
pub mod openai;
pub mod prepare;
pub mod presence;
pub mod relay;
pub mod serve;
pub mod template;
pub mod text;

pub use config::{Args, Config};
pub use http::run;
