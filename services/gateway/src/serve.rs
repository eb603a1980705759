//! Serving HTTP/1.1 connections within limits: at most `max_connections` open at once, a
//! connection that has not sent a complete request head within `header_read_timeout` (a new
//! one, or one idle between keep-alive requests) is closed, and when the cap is reached the
//! connection idle the longest (no request in progress: never used, or between keep-alive
//! requests) is closed to make room, so idle or slow connections can never lock real clients
//! out. A connection refused because every connection has a request in progress gets an
//! OpenAI-shaped 503 with `Retry-After`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use preble_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
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

/// The open connections, and which of them are idle (no request in progress: new ones, and
/// keep-alive ones between requests), in the order they became idle.
#[derive(Default)]
struct Table {
    next_id: u64,
    next_order: u64,
    open: HashMap<u64, Arc<Notify>>,
    idle: BTreeSet<(u64, u64)>,
    idle_since: HashMap<u64, u64>,
}

impl Table {
    fn set_idle(&mut self, id: u64) {
        if self.open.contains_key(&id) && !self.idle_since.contains_key(&id) {
            let order = self.next_order;
            self.next_order += 1;
            self.idle.insert((order, id));
            self.idle_since.insert(id, order);
        }
    }

    fn set_busy(&mut self, id: u64) {
        if let Some(order) = self.idle_since.remove(&id) {
            self.idle.remove(&(order, id));
        }
    }
}

/// One admitted connection's place in the table; freed when dropped.
struct Slot {
    id: u64,
    table: Arc<Mutex<Table>>,
    evicted: Arc<Notify>,
    metrics: Metrics,
}

impl Slot {
    /// A request arrived: the connection is not evictable until its response is over.
    fn busy(self: &Arc<Self>) -> Busy {
        lock(&self.table).set_busy(self.id);
        Busy(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        t.set_busy(self.id);
        t.open.remove(&self.id);
        self.metrics.connections_open.set(t.open.len() as i64);
    }
}

/// A request in progress on a connection; the connection is idle again when it is dropped
/// (hyper drops the response body once it is sent).
struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        lock(&self.0.table).set_idle(self.0.id);
    }
}

/// A response body that keeps its connection marked busy until it is sent.
struct BusyBody {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Admits a connection, evicting the connection idle the longest when the table is full;
/// `None` when every connection has a request in progress.
fn admit(table: &Arc<Mutex<Table>>, max: usize, metrics: &Metrics) -> Option<Slot> {
    let mut t = lock(table);
    if t.open.len() >= max {
        let (_, oldest) = t.idle.pop_first()?;
        t.idle_since.remove(&oldest);
        if let Some(n) = t.open.remove(&oldest) {
            n.notify_one();
        }
        metrics.connections_evicted.inc();
    }
    let id = t.next_id;
    t.next_id += 1;
    let evicted = Arc::new(Notify::new());
    t.open.insert(id, evicted.clone());
    t.set_idle(id);
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
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
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
            refuse(tcp, &refusals);
            continue;
        };
        let slot = Arc::new(slot);
        let marker = slot.clone();
        let router = router.clone();
        let service = tower::service_fn(move |request: axum::http::Request<Incoming>| {
            let busy = marker.busy();
            let response = router.clone().oneshot(request);
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|inner| Body::new(BusyBody { inner, _busy: busy })),
                )
            }
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

/// Most refusals being written at once; past it a refused connection is closed unanswered, so
/// a connection flood cannot hold more descriptors than this on top of the cap.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Longest a refusal may take: writing the 503, then reading (and discarding) what the client
/// sent until it closes, so closing does not reset the connection before the client has read
/// the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer a connection that cannot be admitted gets: an OpenAI-shaped 503 with
/// `Retry-After`.
fn refusal() -> String {
    let body = ApiError::new(
        ErrorCode::Overloaded,
        "the server has too many open connections; retry shortly",
    )
    .body()
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Answers a connection that cannot be admitted with [`refusal`] on a task of its own, bounded
/// in time by [`REFUSAL_TIMEOUT`] and in number by `in_flight`; past that bound the connection
/// is closed unanswered. A freshly accepted socket is not known to be writable yet, so the
/// answer is awaited, not tried.
fn refuse(mut tcp: TcpStream, in_flight: &Arc<Semaphore>) {
    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
        debug!("too many refusals in flight; closing a connection unanswered");
        return;
    };
    tokio::spawn(async move {
        let answer = async {
            tcp.write_all(refusal().as_bytes()).await?;
            tcp.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut drained = 0usize;
            while drained < 64 * 1024 {
                match tcp.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            Ok::<_, std::io::Error>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(REFUSAL_TIMEOUT, answer).await {
            debug!(error = %e, "refused connection ended with an error");
        }
        drop(permit);
    });
}
