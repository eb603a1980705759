//! What each identity of a deployment may publish and subscribe to. The NATS server enforces
//! these (a generated configuration gives every service its own user with exactly these
//! permissions), so a worker can speak only as itself and nobody reads what is not theirs.
//!
//! - gateway: publishes requests (to the requests stream), cancels, its beats and NATS API
//!   answers (to API clients' inboxes); reads every token stream and the NATS API subject.
//! - scheduler: consumes the requests stream, dispatches to workers (and cancels dispatches
//!   that timed out), asks for digests, reads every worker's events, and publishes error ends
//!   of streams under [`SCHEDULER_ORIGIN`].
//! - worker `<id>`: reads only its dispatch and digest subjects, cancels and gateway beats (to
//!   stop the requests of a gateway that died); publishes only its
//!   own events and the streams of requests dispatched to it (under its own id), and answers
//!   the requests it receives.
//! - client: publishes NATS API requests and reads its inbox.
//!
//! Every role but the client reads replies under its own inbox prefix ([`inbox_prefix`]).

use crate::subjects::{CLIENT_INBOX_PREFIX, SCHEDULER_ORIGIN, Subjects, inbox_prefix};

/// One identity of a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The gateway (any number of them share this identity).
    Gateway,
    /// The scheduler.
    Scheduler,
    /// The worker with this id.
    Worker(String),
    /// A client of the NATS API (the load tester, applications).
    Client,
}

/// The subjects a role may publish and subscribe to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to (NATS wildcards allowed).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer the requests it receives (publish to their reply subjects, any
    /// number of messages each: digests come in parts).
    pub answers_requests: bool,
}

impl Role {
    /// The NATS user name of this role.
    pub fn user(&self) -> String {
        match self {
            Role::Gateway => "preble-gateway".into(),
            Role::Scheduler => "preble-scheduler".into(),
            Role::Worker(id) => format!("preble-worker-{id}"),
            Role::Client => "preble-client".into(),
        }
    }

    /// The inbox prefix its NATS connection must use.
    pub fn inbox_prefix(&self) -> String {
        match self {
            Role::Client => CLIENT_INBOX_PREFIX.into(),
            other => inbox_prefix(&other.user()),
        }
    }

    /// What it may do in the deployment named by `s`.
    pub fn permissions(&self, s: &Subjects) -> Permissions {
        let own_inbox = format!("{}.>", self.inbox_prefix());
        match self {
            Role::Gateway => Permissions {
                publish: vec![
                    s.requests(),
                    s.cancel(),
                    s.all_gateway_beats(),
                    // NATS API answers go to the clients' inboxes.
                    format!("{CLIENT_INBOX_PREFIX}.>"),
                ],
                subscribe: vec![s.all_streams(), s.api_generate(), own_inbox],
                answers_requests: false,
            },
            Role::Scheduler => {
                let stream = s.requests_stream();
                let consumer = s.scheduler_consumer();
                Permissions {
                    publish: vec![
                        s.all_workers(),
                        s.all_digests(),
                        // A dispatch that timed out is cancelled on its worker.
                        s.cancel(),
                        s.streams_from(SCHEDULER_ORIGIN),
                        "$JS.API.INFO".to_string(),
                        format!("$JS.API.STREAM.INFO.{stream}"),
                        format!("$JS.API.STREAM.CREATE.{stream}"),
                        format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
                        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                        format!("$JS.API.CONSUMER.CREATE.{stream}"),
                        format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}"),
                        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
                        format!("$JS.ACK.{stream}.{consumer}.>"),
                    ],
                    subscribe: vec![s.all_events(), own_inbox],
                    answers_requests: false,
                }
            }
            Role::Worker(id) => Permissions {
                publish: vec![s.events(id), s.streams_from(id)],
                subscribe: vec![
                    s.worker(id),
                    s.digest(id),
                    s.cancel(),
                    s.all_gateway_beats(),
                    own_inbox,
                ],
                answers_requests: true,
            },
            Role::Client => Permissions {
                publish: vec![s.api_generate()],
                subscribe: vec![own_inbox],
                answers_requests: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_publishes_only_as_itself() {
        let s = Subjects::new("t.preble.v2");
        let p = Role::Worker("gpu-1".into()).permissions(&s);
        assert_eq!(
            p.publish,
            vec![
                "t.preble.v2.events.gpu-1".to_string(),
                "t.preble.v2.stream.gpu-1.>".to_string()
            ]
        );
        assert!(
            p.subscribe
                .contains(&"t.preble.v2.worker.gpu-1".to_string())
        );
        assert!(!p.subscribe.iter().any(|x| x.contains("stream")));
        assert!(p.answers_requests);
    }

    #[test]
    fn identities_have_distinct_users_and_inboxes() {
        let roles = [
            Role::Gateway,
            Role::Scheduler,
            Role::Worker("a".into()),
            Role::Worker("b".into()),
            Role::Client,
        ];
        let users: std::collections::HashSet<_> = roles.iter().map(Role::user).collect();
        let inboxes: std::collections::HashSet<_> = roles.iter().map(Role::inbox_prefix).collect();
        assert_eq!(users.len(), roles.len());
        assert_eq!(inboxes.len(), roles.len());
    }
}
