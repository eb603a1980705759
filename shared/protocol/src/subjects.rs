//! Subject names. No other crate writes a subject as a string literal.
//!
//! Who publishes a message is told by its subject, never by its body: each worker publishes
//! only under its own id (`events.<id>`, `stream.<id>.<key>`), and the NATS server's
//! permissions ([`crate::roles`]) let each identity publish only there.

/// The default subject prefix of a preble deployment.
pub const DEFAULT_PREFIX: &str = "preble.v2";

/// The origin token of stream messages the scheduler sends (a lost worker, a failed dispatch);
/// worker ids cannot start with `_`, so no worker can take it.
pub const SCHEDULER_ORIGIN: &str = "_scheduler";

/// The inbox prefix of a NATS identity: its replies arrive under `<prefix>.>`, which only it
/// may subscribe to, so no other client can read them.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{}", sanitize(user))
}

/// The inbox prefix of NATS API clients (the client libraries' default).
pub const CLIENT_INBOX_PREFIX: &str = "_INBOX";

/// Whether `id` can name a worker: one NATS token of ASCII letters, digits, `-` and `_`, not
/// starting with `_` (reserved for [`SCHEDULER_ORIGIN`]), at most 64 bytes.
pub fn valid_worker_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('_')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Builds every subject and JetStream name of one deployment from its prefix.
///
/// The prefix defaults to `preble.v2`; tests and side-by-side deployments pick their own
/// (for example `t3f9a.preble.v2`) so that nothing they publish reaches anyone else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Subjects {
    /// Subjects under `prefix` (dot-separated NATS tokens, no wildcards, no trailing dot).
    pub fn new(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        Self {
            prefix: prefix.trim_end_matches('.').to_string(),
        }
    }

    /// The prefix these subjects share.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the gateway publishes generate requests (captured by the requests stream).
    pub fn requests(&self) -> String {
        format!("{}.requests", self.prefix)
    }

    /// Name of the JetStream stream (work-queue retention) that holds requests until a worker
    /// accepted them. Stream names may not contain dots, so they become underscores.
    pub fn requests_stream(&self) -> String {
        format!("{}_REQUESTS", sanitize(&self.prefix)).to_uppercase()
    }

    /// Durable name of the scheduler's pull consumer on the requests stream.
    pub fn scheduler_consumer(&self) -> String {
        "scheduler".to_string()
    }

    /// The dispatch subject of one worker (request-reply: the worker answers accept or reject).
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}.worker.{}", self.prefix, sanitize(worker_id))
    }

    /// Every worker's dispatch subject (a wildcard, for tools that watch the traffic).
    pub fn all_workers(&self) -> String {
        format!("{}.worker.*", self.prefix)
    }

    /// Where cancellations are broadcast; every worker listens and drops the named request.
    pub fn cancel(&self) -> String {
        format!("{}.cancel", self.prefix)
    }

    /// Where `origin` (a worker id, or [`SCHEDULER_ORIGIN`]) publishes the token stream of
    /// the request whose stream key is `key`, for the gateway that owns the client connection.
    pub fn stream_from(&self, origin: &str, key: &str) -> String {
        format!(
            "{}.stream.{}.{}",
            self.prefix,
            sanitize(origin),
            sanitize(key)
        )
    }

    /// The stream of one request from whichever origin (what the gateway subscribes to).
    pub fn stream_of(&self, key: &str) -> String {
        format!("{}.stream.*.{}", self.prefix, sanitize(key))
    }

    /// Every stream `origin` may publish.
    pub fn streams_from(&self, origin: &str) -> String {
        format!("{}.stream.{}.>", self.prefix, sanitize(origin))
    }

    /// Every request's token stream (a wildcard, for tools that watch the traffic).
    pub fn all_streams(&self) -> String {
        format!("{}.stream.>", self.prefix)
    }

    /// Events of one worker: heartbeats, load reports, KV-cache changes, finished requests.
    pub fn events(&self, worker_id: &str) -> String {
        format!("{}.events.{}", self.prefix, sanitize(worker_id))
    }

    /// Wildcard matching the events of every worker.
    pub fn all_events(&self) -> String {
        format!("{}.events.*", self.prefix)
    }

    /// The worker whose events subject `subject` is (the publisher the server vouches for).
    pub fn events_worker<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".events.")
            .filter(|id| !id.contains('.'))
    }

    /// Every worker's digest subject.
    pub fn all_digests(&self) -> String {
        format!("{}.digest.*", self.prefix)
    }

    /// Request-reply subject on which a worker answers with a full digest of its KV cache.
    pub fn digest(&self, worker_id: &str) -> String {
        format!("{}.digest.{}", self.prefix, sanitize(worker_id))
    }

    /// Where gateway instance `gateway_id` publishes its [`crate::GatewayBeat`].
    pub fn gateway_beat(&self, gateway_id: &str) -> String {
        format!("{}.gateways.{}", self.prefix, sanitize(gateway_id))
    }

    /// Every gateway's beats.
    pub fn all_gateway_beats(&self) -> String {
        format!("{}.gateways.*", self.prefix)
    }

    /// The NATS client API: publish an [`crate::ApiRequest`] here with a reply inbox and
    /// receive [`crate::ApiEvent`]s on that inbox.
    pub fn api_generate(&self) -> String {
        format!("{}.api.generate", self.prefix)
    }
}

/// Replaces characters that are not safe inside one NATS token or stream name.
fn sanitize(token: &str) -> String {
    token
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_share_the_prefix() {
        let s = Subjects::new("t1.preble.v2.");
        assert_eq!(s.requests(), "t1.preble.v2.requests");
        assert_eq!(s.worker("gpu-0"), "t1.preble.v2.worker.gpu-0");
        assert_eq!(
            s.stream_from("gpu-0", "a.b*c"),
            "t1.preble.v2.stream.gpu-0.a_b_c"
        );
        assert_eq!(s.stream_of("a.b*c"), "t1.preble.v2.stream.*.a_b_c");
        assert_eq!(s.requests_stream(), "T1_PREBLE_V2_REQUESTS");
        assert_eq!(s.all_events(), "t1.preble.v2.events.*");
    }

    #[test]
    fn the_events_subject_names_its_worker() {
        let s = Subjects::new("t1.preble.v2");
        assert_eq!(s.events_worker(&s.events("gpu-3")), Some("gpu-3"));
        assert_eq!(s.events_worker("t1.preble.v2.events.a.b"), None);
        assert_eq!(s.events_worker("other.events.gpu-3"), None);
        assert!(valid_worker_id("gpu-3") && valid_worker_id("a_b"));
        assert!(!valid_worker_id("_scheduler") && !valid_worker_id("a.b"));
        assert!(!valid_worker_id("") && !valid_worker_id("a*"));
    }

    #[test]
    fn default_prefix_is_versioned() {
        assert_eq!(Subjects::default().requests(), "preble.v2.requests");
    }
}
