//! Serving HTTP/1.1 connections within limits: at most `max_connections` open at once, a
//! connection that has not sent a complete request head within `header_read_timeout` (a new
//! one, or one idle between keep-alive requests) is closed, and when the cap is reached the
//! oldest connection that has never sent a request is closed to make room, so idle or slow
//! connections can never lock real clients out. A connection refused because every slot is
//! serving a request gets an OpenAI-shaped 503 with `Retry-After`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use preble_protocol::ErrorCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Limits on client connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest wait for a complete request head (also the keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// Longest wait for open connections to finish at shutdown.
    pub drain_timeout: Duration,
}

/// The open connections: which have not yet sent a request (evictable, oldest first).
#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashSet<u64>,
    never_used: BTreeSet<u64>,
    evict: HashMap<u64, Arc<Notify>>,
}

/// One admitted connection's place in the table; freed when dropped.
struct Slot {
    id: u64,
    table: Arc<Mutex<Table>>,
    evicted: Arc<Notify>,
    metrics: Metrics,
}

impl Slot {
    /// The connection sent a request: it is no longer evictable.
    fn mark_used(&self) {
        let mut t = lock(&self.table);
        t.never_used.remove(&self.id);
        t.evict.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        t.open.remove(&self.id);
        t.never_used.remove(&self.id);
        t.evict.remove(&self.id);
        self.metrics.connections_open.set(t.open.len() as i64);
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Admits a connection, evicting the oldest never-used one when the table is full; `None`
/// when every slot is serving a request.
fn admit(table: &Arc<Mutex<Table>>, max: usize, metrics: &Metrics) -> Option<Slot> {
    let mut t = lock(table);
    if t.open.len() >= max {
        let oldest = t.never_used.pop_first()?;
        t.open.remove(&oldest);
        if let Some(n) = t.evict.remove(&oldest) {
            n.notify_one();
        }
        metrics.connections_evicted.inc();
    }
    let id = t.next_id;
    t.next_id += 1;
    let evicted = Arc::new(Notify::new());
    t.open.insert(id);
    t.never_used.insert(id);
    t.evict.insert(id, evicted.clone());
    metrics.connections_open.set(t.open.len() as i64);
    Some(Slot {
        id,
        table: table.clone(),
        evicted,
        metrics: metrics.clone(),
    })
}

/// The limits with `max_connections` lowered to fit the process's file limit, after raising
/// the soft limit as far as the hard limit allows (each connection holds a descriptor, and NATS,
/// the model files and the runtime need some too).
pub fn fit_to_file_limit(mut limits: ConnectionLimits) -> ConnectionLimits {
    const RESERVED: u64 = 256;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => {
            let room = usize::try_from(soft.saturating_sub(RESERVED).max(16)).unwrap_or(usize::MAX);
            if room < limits.max_connections {
                warn!(
                    wanted = limits.max_connections,
                    allowed = room,
                    file_limit = soft,
                    "--max-connections lowered to fit the file limit"
                );
                limits.max_connections = room;
            }
        }
        Err(e) => warn!(error = %e, "could not read or raise the file limit"),
    }
    limits
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open connections finish
/// (up to the drain timeout).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: back off
                // briefly rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Token streams are many small writes: without TCP_NODELAY a chunk can wait for the
        // client's delayed ACK of the previous one.
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY on a client connection");
        }
        let Some(slot) = admit(&table, limits.max_connections, &metrics) else {
            metrics.connections_refused.inc();
            refuse(&tcp);
            continue;
        };
        let slot = Arc::new(slot);
        let marker = slot.clone();
        let service = router
            .clone()
            .map_request(move |request: axum::http::Request<Incoming>| {
                marker.mark_used();
                request
            });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        debug!(error = %e, "client connection ended with an error");
                    }
                }
                () = slot.evicted.notified() => {
                    debug!("idle connection closed to make room");
                }
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("connections still open after the drain timeout; closing them");
    }
}

/// Answers a connection that cannot be admitted with a 503 (best effort, never blocking).
fn refuse(tcp: &TcpStream) {
    let body = ApiError::new(
        ErrorCode::Overloaded,
        "the server has too many open connections; retry shortly",
    )
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(response.as_bytes());
}
