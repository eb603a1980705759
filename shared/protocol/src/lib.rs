//! The wire protocol of preble: the one place where message types, subject names, the codec and
//! the error codes live.
//!
//! Layout:
//! - [`subjects`]: every NATS subject and JetStream name, built from a configurable prefix so that
//!   tests (and several clusters on one NATS) stay isolated.
//! - [`messages`]: the payloads: generate requests, dispatch and accept/reject, token-stream
//!   messages, cancellation, worker events and the NATS client API.
//! - [`roles`]: what each identity (gateway, scheduler, worker `<id>`, API client) may publish
//!   and subscribe to, for the NATS server's permissions.
//! - [`codec`]: MessagePack encoding with named fields and a version check; decoding never panics.
//! - [`errors`]: the error codes a client can see, with their HTTP status and OpenAI error type.

pub mod codec;
pub mod errors;
pub mod messages;
pub mod roles;
pub mod subjects;

pub use codec::{DecodeError, decode, encode};
pub use errors::ErrorCode;
pub use messages::*;
pub use subjects::Subjects;

/// Version of the payload format carried in every message's `v` field.
pub const PROTOCOL_VERSION: u16 = 2;
