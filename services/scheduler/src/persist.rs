//! Persistence of the global prefix tree in Redis: a snapshot plus an op log.
//!
//! Every cache change the routing actor applies is appended to a Redis stream (the op log);
//! periodically the actor exports the whole tree and the snapshot replaces both the old
//! snapshot and the log (compaction, in one transaction: the log only ever holds what came
//! after the snapshot). On start the scheduler loads the snapshot, replays the log, and then
//! reconciles with each worker's digest as it joins.
//!
//! Redis being down never stops routing: ops are dropped and counted, the `degraded` gauge is
//! set, and as soon as Redis answers again a fresh snapshot is written (catch-up).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use preble_policy::ExportedSpan;
use prometheus::{IntCounter, IntGauge};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Format version of what is stored.
const STORE_VERSION: u16 = 1;
/// Ops queued for Redis at most; beyond that they are dropped and a snapshot is asked for.
const QUEUE: usize = 100_000;

/// Redis keys of one deployment.
#[derive(Clone, Debug)]
pub struct Keys {
    /// The snapshot (a string).
    pub snapshot: String,
    /// The op log (a stream).
    pub ops: String,
}

impl Keys {
    /// Keys under the deployment's subject prefix.
    pub fn new(subject_prefix: &str) -> Self {
        Self {
            snapshot: format!("{subject_prefix}:tree:snapshot"),
            ops: format!("{subject_prefix}:tree:ops"),
        }
    }
}

/// One change to the tree, as stored in the op log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StoredOp {
    /// A worker cached a span.
    Inserted {
        /// The worker.
        worker: String,
        /// Hash of the path the span follows.
        parent_hash: u64,
        /// Hash of the path through the span.
        hash: u64,
        /// The span.
        tokens: Vec<u32>,
    },
    /// A worker evicted a span.
    Evicted {
        /// The worker.
        worker: String,
        /// Hash of the path through the span.
        hash: u64,
        /// Its length.
        num_tokens: u32,
    },
    /// A worker's cache is being replaced by its digest.
    Reset {
        /// The worker.
        worker: String,
    },
    /// A worker is gone.
    Gone {
        /// The worker.
        worker: String,
    },
}

/// A stored snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    /// Format version.
    pub v: u16,
    /// The held spans, parents first.
    pub spans: Vec<StoredSpan>,
}

/// A span of a stored snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredSpan {
    /// Hash of the path the span follows.
    pub parent_hash: u64,
    /// Hash of the path through the span.
    pub hash: u64,
    /// The span.
    pub tokens: Vec<u32>,
    /// Workers holding it.
    pub holders: Vec<String>,
}

impl From<ExportedSpan> for StoredSpan {
    fn from(s: ExportedSpan) -> Self {
        Self {
            parent_hash: s.parent_hash,
            hash: s.hash,
            tokens: s.tokens,
            holders: s.holders,
        }
    }
}

/// What the routing actor sends to the writer.
enum Write {
    Op(Vec<u8>),
    Snapshot(Vec<u8>),
}

/// Metrics of persistence.
#[derive(Clone)]
pub struct PersistMetrics {
    /// 1 while Redis cannot be written.
    pub degraded: IntGauge,
    /// Ops that could not be written.
    pub dropped_ops: IntCounter,
    /// Snapshots written.
    pub snapshots: IntCounter,
}

/// The routing actor's handle on persistence.
pub struct Persistence {
    writes: mpsc::Sender<Write>,
    /// Set when a snapshot should be taken as soon as possible (after Redis came back, or
    /// after ops were dropped).
    snapshot_wanted: Arc<AtomicBool>,
    metrics: PersistMetrics,
}

impl Persistence {
    /// Starts the writer task for `redis_url`.
    pub fn start(redis_url: &str, keys: Keys, metrics: PersistMetrics) -> anyhow::Result<Self> {
        let client = redis::Client::open(redis_url)?;
        let (writes, rx) = mpsc::channel(QUEUE);
        let snapshot_wanted = Arc::new(AtomicBool::new(false));
        tokio::spawn(writer(
            client,
            keys,
            rx,
            snapshot_wanted.clone(),
            metrics.clone(),
        ));
        Ok(Self {
            writes,
            snapshot_wanted,
            metrics,
        })
    }

    /// Appends an op to the log.
    pub fn record(&self, op: &StoredOp) {
        let bytes = match rmp_serde::to_vec_named(op) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode a tree op");
                return;
            }
        };
        if self.writes.try_send(Write::Op(bytes)).is_err() {
            self.metrics.dropped_ops.inc();
            self.snapshot_wanted.store(true, Ordering::Relaxed);
        }
    }

    /// Writes queued and not yet done (how far Redis lags behind the tree).
    pub fn pending_writes(&self) -> usize {
        self.writes.max_capacity() - self.writes.capacity()
    }

    /// Asks for a snapshot at the next opportunity.
    pub fn want_snapshot(&self) {
        self.snapshot_wanted.store(true, Ordering::Relaxed);
    }

    /// Whether a snapshot is wanted now (and clears the wish).
    pub fn take_snapshot_wish(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    /// Writes a snapshot of `spans`; it replaces the old snapshot and the log.
    pub fn snapshot(&self, spans: Vec<ExportedSpan>) {
        let snapshot = StoredSnapshot {
            v: STORE_VERSION,
            spans: spans.into_iter().map(StoredSpan::from).collect(),
        };
        match rmp_serde::to_vec_named(&snapshot) {
            Ok(bytes) => {
                if self.writes.try_send(Write::Snapshot(bytes)).is_err() {
                    self.snapshot_wanted.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => warn!(error = %e, "cannot encode a tree snapshot"),
        }
    }
}

async fn connect(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1);
    client.get_connection_manager_with_config(config).await
}

/// Writes ops and snapshots in order; on failure marks persistence degraded, drops what it
/// cannot write, and once Redis answers again asks for a fresh snapshot.
async fn writer(
    client: redis::Client,
    keys: Keys,
    mut writes: mpsc::Receiver<Write>,
    snapshot_wanted: Arc<AtomicBool>,
    metrics: PersistMetrics,
) {
    let mut connection: Option<ConnectionManager> = None;
    while let Some(write) = writes.recv().await {
        if connection.is_none() {
            match connect(&client).await {
                Ok(c) => {
                    connection = Some(c);
                    if metrics.degraded.get() == 1 {
                        info!("redis is back: catching up with a snapshot");
                        snapshot_wanted.store(true, Ordering::Relaxed);
                    }
                    metrics.degraded.set(0);
                }
                Err(e) => {
                    degrade(&metrics, &snapshot_wanted, &e);
                    if matches!(write, Write::Op(_)) {
                        metrics.dropped_ops.inc();
                    }
                    continue;
                }
            }
        }
        let Some(con) = connection.as_mut() else {
            continue;
        };
        let result = match &write {
            Write::Op(bytes) => redis::cmd("XADD")
                .arg(&keys.ops)
                .arg("*")
                .arg("op")
                .arg(bytes.as_slice())
                .query_async::<String>(con)
                .await
                .map(|_| ()),
            Write::Snapshot(bytes) => {
                let r = redis::pipe()
                    .atomic()
                    .set(&keys.snapshot, bytes.as_slice())
                    .ignore()
                    .del(&keys.ops)
                    .ignore()
                    .query_async::<()>(con)
                    .await;
                if r.is_ok() {
                    metrics.snapshots.inc();
                }
                r
            }
        };
        if let Err(e) = result {
            if matches!(write, Write::Op(_)) {
                metrics.dropped_ops.inc();
            }
            degrade(&metrics, &snapshot_wanted, &e);
            connection = None;
        } else if metrics.degraded.get() == 1 {
            metrics.degraded.set(0);
            snapshot_wanted.store(true, Ordering::Relaxed);
        }
    }
}

fn degrade(metrics: &PersistMetrics, snapshot_wanted: &AtomicBool, e: &redis::RedisError) {
    if metrics.degraded.get() == 0 {
        warn!(error = %e, "redis unavailable: routing continues, tree persistence degraded");
    }
    metrics.degraded.set(1);
    snapshot_wanted.store(true, Ordering::Relaxed);
}

/// Reads the snapshot and the op log (what a starting scheduler restores). Redis being
/// unreachable or holding nothing gives empty results.
pub async fn load(redis_url: &str, keys: &Keys) -> anyhow::Result<(StoredSnapshot, Vec<StoredOp>)> {
    let client = redis::Client::open(redis_url)?;
    let mut con = tokio::time::timeout(Duration::from_secs(3), connect(&client)).await??;
    let snapshot: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&keys.snapshot)
        .query_async(&mut con)
        .await?;
    let snapshot = match snapshot {
        Some(bytes) => {
            let s: StoredSnapshot = rmp_serde::from_slice(&bytes)?;
            if s.v != STORE_VERSION {
                anyhow::bail!("stored snapshot has format {} (want {STORE_VERSION})", s.v);
            }
            s
        }
        None => StoredSnapshot::default(),
    };
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let entries: Vec<Entry> = redis::cmd("XRANGE")
        .arg(&keys.ops)
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await?;
    let mut ops = Vec::with_capacity(entries.len());
    for (_, fields) in entries {
        for (_, bytes) in fields {
            match rmp_serde::from_slice::<StoredOp>(&bytes) {
                Ok(op) => ops.push(op),
                Err(e) => warn!(error = %e, "skipping an unreadable tree op"),
            }
        }
    }
    Ok((snapshot, ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_and_snapshots_round_trip() {
        let op = StoredOp::Inserted {
            worker: "gpu-0".into(),
            parent_hash: 0,
            hash: 9,
            tokens: vec![1, 2, 3],
        };
        let bytes = rmp_serde::to_vec_named(&op).unwrap();
        assert_eq!(rmp_serde::from_slice::<StoredOp>(&bytes).unwrap(), op);
        let snap = StoredSnapshot {
            v: STORE_VERSION,
            spans: vec![StoredSpan {
                parent_hash: 0,
                hash: 9,
                tokens: vec![1, 2, 3],
                holders: vec!["gpu-0".into()],
            }],
        };
        let bytes = rmp_serde::to_vec_named(&snap).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<StoredSnapshot>(&bytes).unwrap(),
            snap
        );
    }
}
