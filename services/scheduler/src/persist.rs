//! Persistence of the global prefix tree in Redis: a snapshot plus an op log.
//!
//! Every cache change the routing actor applies is appended to a Redis stream (the op log);
//! periodically a snapshot replaces both the old snapshot and the log (compaction, in one
//! transaction: the log only ever holds what came after the snapshot). On start the scheduler
//! loads the snapshot, replays the log, and then reconciles with each worker's digest as it
//! joins.
//!
//! The writer task keeps its own copy of the cache picture (a [`Shadow`], fed the same ops in
//! the same order), so periodic snapshots, digests and catch-up are exported there and never
//! pause routing. The shadow starts from what the scheduler restored; only when ops were lost
//! before reaching the writer (its queue was full) does the routing actor export its own tree,
//! which then replaces the shadow.
//!
//! Redis being down never stops routing: ops are dropped and counted, the `degraded` gauge is
//! set, and as soon as Redis answers again a fresh snapshot is written (catch-up).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use preble_policy::mirror::{DEFAULT_MAX_TREE_TOKENS, Mirror};
use preble_policy::{ClusterEvent, ExportedSpan};
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

impl StoredOp {
    /// The cluster event this op records, as a policy (or the shadow) applies it.
    pub fn event(&self, now_ms: u64) -> ClusterEvent<'_> {
        match self {
            StoredOp::Inserted {
                worker,
                parent_hash,
                hash,
                tokens,
            } => ClusterEvent::CacheInserted {
                worker,
                parent_hash: *parent_hash,
                hash: *hash,
                tokens,
                now_ms,
            },
            StoredOp::Evicted {
                worker,
                hash,
                num_tokens,
            } => ClusterEvent::CacheEvicted {
                worker,
                hash: *hash,
                num_tokens: *num_tokens,
            },
            StoredOp::Reset { worker } => ClusterEvent::CacheReset { worker },
            StoredOp::Gone { worker } => ClusterEvent::WorkerGone { worker },
        }
    }
}

/// A stored snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    /// Format version.
    pub v: u16,
    /// The held spans, parents first.
    pub spans: Vec<StoredSpan>,
}

/// The workers a restored picture names as holding something (a scheduler that comes back
/// waits for them before it routes).
pub fn known_workers(snapshot: &StoredSnapshot, ops: &[StoredOp]) -> HashSet<String> {
    let mut known: HashSet<String> = snapshot
        .spans
        .iter()
        .flat_map(|s| s.holders.iter().cloned())
        .collect();
    for op in ops {
        match op {
            StoredOp::Gone { worker } => {
                known.remove(worker);
            }
            StoredOp::Inserted { worker, .. } => {
                known.insert(worker.clone());
            }
            _ => {}
        }
    }
    known
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
    /// Apply to the shadow and append to the log.
    Op(StoredOp),
    /// The routing actor's own export: becomes the shadow and the snapshot.
    Export(Vec<ExportedSpan>),
    /// A worker's digest (its reset, then every span it holds): applied to the shadow, then
    /// a snapshot of the shadow records it (cheaper than logging every span).
    Digest(Vec<StoredOp>),
    /// Write a snapshot of the shadow.
    Snapshot,
}

/// The writer's copy of what the workers' caches hold, fed the ops the routing actor applied.
pub struct Shadow {
    mirror: Mirror,
}

impl Default for Shadow {
    fn default() -> Self {
        Self {
            mirror: Mirror::new(DEFAULT_MAX_TREE_TOKENS),
        }
    }
}

impl Shadow {
    /// Applies one op, as a restoring scheduler replays it into its policy.
    pub fn apply(&mut self, op: &StoredOp) {
        // An op the routing actor could not apply either (it then asks for a digest).
        let _ = self.mirror.observe(&op.event(0));
    }

    /// Replaces the shadow with an export.
    pub fn replace(&mut self, spans: Vec<ExportedSpan>) {
        *self = Shadow::restored(&snapshot_of(spans), &[]);
    }

    /// The shadow of what a starting scheduler restored: the stored snapshot, then the log.
    pub fn restored(snapshot: &StoredSnapshot, ops: &[StoredOp]) -> Self {
        let mut shadow = Shadow::default();
        for span in &snapshot.spans {
            for worker in &span.holders {
                shadow.apply(&StoredOp::Inserted {
                    worker: worker.clone(),
                    parent_hash: span.parent_hash,
                    hash: span.hash,
                    tokens: span.tokens.clone(),
                });
            }
        }
        for op in ops {
            shadow.apply(op);
        }
        shadow
    }

    /// The snapshot of what the shadow holds.
    pub fn snapshot(&self) -> StoredSnapshot {
        snapshot_of(self.mirror.export())
    }
}

fn snapshot_of(spans: Vec<ExportedSpan>) -> StoredSnapshot {
    StoredSnapshot {
        v: STORE_VERSION,
        spans: spans.into_iter().map(StoredSpan::from).collect(),
    }
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
    /// Set when writes were lost before reaching the writer: its shadow missed them, so the
    /// routing actor must export its own tree.
    export_wanted: Arc<AtomicBool>,
    metrics: PersistMetrics,
}

impl Persistence {
    /// Starts the writer task for `redis_url`, its shadow starting from `shadow` (what was
    /// restored).
    pub fn start(
        redis_url: &str,
        keys: Keys,
        metrics: PersistMetrics,
        shadow: Shadow,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(redis_url)?;
        let (writes, rx) = mpsc::channel(QUEUE);
        let export_wanted = Arc::new(AtomicBool::new(false));
        tokio::spawn(writer(
            client,
            keys,
            rx,
            shadow,
            export_wanted.clone(),
            metrics.clone(),
        ));
        Ok(Self {
            writes,
            export_wanted,
            metrics,
        })
    }

    /// Appends an op to the log.
    pub fn record(&self, op: StoredOp) {
        self.send(Write::Op(op));
    }

    /// Records a worker's digest: its cache now holds exactly `spans`.
    pub fn digest(&self, worker: &str, spans: impl IntoIterator<Item = StoredOp>) {
        let mut ops = vec![StoredOp::Reset {
            worker: worker.to_string(),
        }];
        ops.extend(spans);
        self.send(Write::Digest(ops));
    }

    /// Asks the writer for a periodic snapshot (of its shadow: routing does not pause).
    pub fn snapshot(&self) {
        self.send(Write::Snapshot);
    }

    /// Writes the routing actor's own export as the snapshot (after ops were lost on the
    /// way to the writer: its shadow missed them).
    pub fn export(&self, spans: Vec<ExportedSpan>) {
        self.send(Write::Export(spans));
    }

    /// Queues a write; if the queue is full, the write is lost and the routing actor will
    /// have to export its tree.
    fn send(&self, write: Write) {
        if self.writes.try_send(write).is_err() {
            self.metrics.dropped_ops.inc();
            self.export_wanted.store(true, Ordering::Relaxed);
        }
    }

    /// Writes queued and not yet done (how far Redis lags behind the tree).
    pub fn pending_writes(&self) -> usize {
        self.writes.max_capacity() - self.writes.capacity()
    }

    /// Whether the routing actor must export its tree (writes were lost before reaching
    /// the writer), and clears the wish.
    pub fn take_export_wish(&self) -> bool {
        self.export_wanted.swap(false, Ordering::Relaxed)
    }
}

async fn connect(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1);
    client.get_connection_manager_with_config(config).await
}

/// What one write puts in Redis.
enum Store {
    /// An op appended to the log.
    Op(StoredOp),
    /// A snapshot of the shadow, replacing the snapshot and the log.
    Snapshot,
}

/// Keeps the shadow and writes ops and snapshots in order. On failure it marks persistence
/// degraded and drops what it cannot write; the first write once Redis answers again is a
/// snapshot of the shadow (catch-up), which holds everything that happened meanwhile.
async fn writer(
    client: redis::Client,
    keys: Keys,
    mut writes: mpsc::Receiver<Write>,
    mut shadow: Shadow,
    export_wanted: Arc<AtomicBool>,
    metrics: PersistMetrics,
) {
    let mut connection: Option<ConnectionManager> = None;
    let mut catch_up = false;
    while let Some(write) = writes.recv().await {
        // The shadow follows every write, whether Redis takes it or not.
        let store = match write {
            Write::Op(op) => {
                shadow.apply(&op);
                if catch_up {
                    Store::Snapshot
                } else {
                    Store::Op(op)
                }
            }
            Write::Export(spans) => {
                off_runtime(&mut shadow, &export_wanted, move |s| s.replace(spans)).await;
                Store::Snapshot
            }
            Write::Digest(ops) => {
                off_runtime(&mut shadow, &export_wanted, move |s| {
                    for op in &ops {
                        s.apply(op);
                    }
                })
                .await;
                Store::Snapshot
            }
            Write::Snapshot => Store::Snapshot,
        };
        if connection.is_none() {
            match connect(&client).await {
                Ok(c) => connection = Some(c),
                Err(e) => {
                    lost(&metrics, &store, &e);
                    catch_up = true;
                    continue;
                }
            }
        }
        let Some(con) = connection.as_mut() else {
            continue;
        };
        let encoded = match &store {
            Store::Op(op) => rmp_serde::to_vec_named(op).map_err(|e| e.to_string()),
            Store::Snapshot => off_runtime(&mut shadow, &export_wanted, |s| {
                rmp_serde::to_vec_named(&s.snapshot()).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|| Err("the shadow was lost".into())),
        };
        let bytes = match encoded {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "cannot encode a tree write");
                continue;
            }
        };
        let result = match &store {
            Store::Op(_) => redis::cmd("XADD")
                .arg(&keys.ops)
                .arg("*")
                .arg("op")
                .arg(bytes.as_slice())
                .query_async::<String>(con)
                .await
                .map(|_| ()),
            Store::Snapshot => {
                redis::pipe()
                    .atomic()
                    .set(&keys.snapshot, bytes.as_slice())
                    .ignore()
                    .del(&keys.ops)
                    .ignore()
                    .query_async::<()>(con)
                    .await
            }
        };
        match result {
            Err(e) => {
                lost(&metrics, &store, &e);
                catch_up = true;
                connection = None;
            }
            Ok(()) => {
                if let Store::Snapshot = store {
                    metrics.snapshots.inc();
                    if catch_up {
                        info!("redis is back: caught up with a snapshot");
                    }
                    catch_up = false;
                }
                if !catch_up {
                    metrics.degraded.set(0);
                }
            }
        }
    }
}

/// Runs `work` on the shadow on a blocking thread: replaying or exporting a large tree takes
/// milliseconds the async runtime must not wait for. If the work panics, the shadow starts
/// over empty and the routing actor is asked for an export; `None` then.
async fn off_runtime<T: Send + 'static>(
    shadow: &mut Shadow,
    export_wanted: &AtomicBool,
    work: impl FnOnce(&mut Shadow) -> T + Send + 'static,
) -> Option<T> {
    let mut owned = std::mem::take(shadow);
    match tokio::task::spawn_blocking(move || {
        let out = work(&mut owned);
        (owned, out)
    })
    .await
    {
        Ok((owned, out)) => {
            *shadow = owned;
            Some(out)
        }
        Err(e) => {
            warn!(error = %e, "the persistence shadow was lost; asking for an export");
            export_wanted.store(true, Ordering::Relaxed);
            None
        }
    }
}

/// Counts what Redis did not take and marks persistence degraded.
fn lost(metrics: &PersistMetrics, store: &Store, e: &redis::RedisError) {
    if let Store::Op(_) = store {
        metrics.dropped_ops.inc();
    }
    if metrics.degraded.get() == 0 {
        warn!(error = %e, "redis unavailable: routing continues, tree persistence degraded");
    }
    metrics.degraded.set(1);
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
    use preble_policy::{E2, E2Config, Policy};

    fn inserted(worker: &str, parent: &[u32], span: &[u32]) -> StoredOp {
        let mut path = parent.to_vec();
        path.extend_from_slice(span);
        StoredOp::Inserted {
            worker: worker.into(),
            parent_hash: preble_prefix::path_hash(parent),
            hash: preble_prefix::path_hash(&path),
            tokens: span.to_vec(),
        }
    }

    #[test]
    fn the_shadow_holds_what_the_policy_holds() {
        let ops = vec![
            inserted("gpu-0", &[], &[1, 2, 3, 4]),
            inserted("gpu-1", &[], &[1, 2, 9]),
            inserted("gpu-0", &[1, 2, 3, 4], &[5, 6]),
            StoredOp::Evicted {
                worker: "gpu-0".into(),
                hash: preble_prefix::path_hash(&[1, 2, 3, 4, 5, 6]),
                num_tokens: 2,
            },
            inserted("gpu-2", &[], &[7, 7]),
            StoredOp::Gone {
                worker: "gpu-2".into(),
            },
        ];
        let mut shadow = Shadow::default();
        let mut policy = E2::new(E2Config::default());
        for op in &ops {
            shadow.apply(op);
            let mut one = Shadow::default();
            one.replace(policy.export());
            one.apply(op);
            // Replaying the op on the policy's export equals the policy applying it.
            policy.observe(&op.event(0)).expect("applies");
            let policy_after = snapshot_of(policy.export());
            assert_eq!(shadow.snapshot(), policy_after, "after {op:?}");
            assert_eq!(
                one.snapshot(),
                policy_after,
                "replayed on an export, {op:?}"
            );
        }
        let held: Vec<(Vec<u32>, Vec<String>)> = shadow
            .snapshot()
            .spans
            .into_iter()
            .map(|s| (s.tokens, s.holders))
            .collect();
        assert_eq!(held.len(), 3, "{held:?}");
        // What a restarting scheduler rebuilds from the stored snapshot and log is the same.
        let stored = snapshot_of(policy.export());
        assert_eq!(
            Shadow::restored(&StoredSnapshot::default(), &ops).snapshot(),
            stored
        );
        assert_eq!(Shadow::restored(&stored, &[]).snapshot(), stored);
        // A digest replaces what a worker held.
        shadow.apply(&StoredOp::Reset {
            worker: "gpu-0".into(),
        });
        shadow.apply(&inserted("gpu-0", &[], &[4, 4]));
        let spans = shadow.snapshot().spans;
        assert!(
            spans
                .iter()
                .all(|s| s.holders != vec!["gpu-0".to_string()] || s.tokens == vec![4, 4]),
            "{spans:?}"
        );
    }

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
