//! Subject names. No other crate writes a subject as a string literal.

/// The default subject prefix of a preble deployment.
pub const DEFAULT_PREFIX: &str = "preble.v1";

/// Builds every subject and JetStream name of one deployment from its prefix.
///
/// The prefix defaults to `preble.v1`; tests and side-by-side deployments pick their own
/// (for example `t3f9a.preble.v1`) so that nothing they publish reaches anyone else.
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

    /// The token stream of one request, from its worker (or the scheduler, for errors) to the
    /// gateway that owns the client connection.
    pub fn stream(&self, request_id: &str) -> String {
        format!("{}.stream.{}", self.prefix, sanitize(request_id))
    }

    /// Every request's token stream (a wildcard, for tools that watch the traffic).
    pub fn all_streams(&self) -> String {
        format!("{}.stream.*", self.prefix)
    }

    /// Events of one worker: heartbeats, load reports, KV-cache changes, finished requests.
    pub fn events(&self, worker_id: &str) -> String {
        format!("{}.events.{}", self.prefix, sanitize(worker_id))
    }

    /// Wildcard matching the events of every worker.
    pub fn all_events(&self) -> String {
        format!("{}.events.*", self.prefix)
    }

    /// Request-reply subject on which a worker answers with a full digest of its KV cache.
    pub fn digest(&self, worker_id: &str) -> String {
        format!("{}.digest.{}", self.prefix, sanitize(worker_id))
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
        let s = Subjects::new("t1.preble.v1.");
        assert_eq!(s.requests(), "t1.preble.v1.requests");
        assert_eq!(s.worker("gpu-0"), "t1.preble.v1.worker.gpu-0");
        assert_eq!(s.stream("a.b*c"), "t1.preble.v1.stream.a_b_c");
        assert_eq!(s.requests_stream(), "T1_PREBLE_V1_REQUESTS");
        assert_eq!(s.all_events(), "t1.preble.v1.events.*");
    }

    #[test]
    fn default_prefix_is_versioned() {
        assert_eq!(Subjects::default().requests(), "preble.v1.requests");
    }
}
