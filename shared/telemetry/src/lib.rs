//! Observability shared by every preble service.
//!
//! Layout:
//! - [`init_tracing`]: the `tracing` subscriber (pretty or JSON logs, `RUST_LOG`-style filter),
//!   plus OpenTelemetry export over OTLP when the standard `OTEL_*` variables ask for it.
//! - [`propagation`]: W3C trace context in NATS message headers, one helper pair used by every
//!   publisher and consumer.
//! - [`sampling`]: which requests are traced, decided once where a request enters.
//! - [`render_metrics`]: a Prometheus registry as the text exposition format for `/metrics`.
//! - [`nats`]: the NATS connection flags every service shares (credentials, TLS) and the
//!   connection itself.
//! - Process plumbing every service shares: [`bind`], [`serve_ops`], [`shutdown_signal`].

pub mod nats;
pub mod otlp;
pub mod propagation;
pub mod sampling;

use std::str::FromStr;

use prometheus::{Encoder, Registry, TextEncoder};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pretty" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (pretty or json)")),
        }
    }
}

/// The log filter when `RUST_LOG` is not set: `info`, except the Dynamo router's crate (the
/// `dynamo` policy), which logs every routing decision at `info`.
pub const DEFAULT_LOG_FILTER: &str = "info,dynamo_kv_router=warn";

/// Installs the global tracing subscriber for `service`: logs filtered by `RUST_LOG` (default
/// [`DEFAULT_LOG_FILTER`]), and spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set (see [`otlp`]). Keep the returned guard until
/// the service ends: its [`otlp::TracingGuard::shutdown`] flushes the last spans. Calling it
/// twice is harmless: the second call installs nothing.
pub fn init_tracing(service: &str, format: LogFormat) -> otlp::TracingGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let (export, guard) = match otlp::exporter_from_env(service) {
        Ok(Some((layer, guard))) => (Some(layer), guard),
        Ok(None) => (None, otlp::TracingGuard::default()),
        Err(e) => {
            eprintln!("{service}: OpenTelemetry export is off: {e}");
            (None, otlp::TracingGuard::default())
        }
    };
    let registry = tracing_subscriber::registry().with(filter).with(export);
    let result = match format {
        LogFormat::Pretty => registry
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    if result.is_ok() {
        tracing::debug!(
            service,
            exporting = guard.is_exporting(),
            "tracing initialised"
        );
    }
    guard
}

/// Renders every metric of `registry` in the Prometheus text format.
pub fn render_metrics(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buffer) {
        tracing::error!(error = %e, "failed to encode metrics");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

/// Registers `collector` in `registry` and hands it back, for building metric structs.
/// Panics on a duplicate name: metric names are fixed at compile time, so that is a bug.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique");
    collector
}

/// Histogram buckets for latencies in seconds, from 1 ms to 5 minutes.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0,
        120.0, 300.0,
    ]
}

/// Milliseconds since the Unix epoch (for timestamps carried in messages).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: the production shutdown trigger of every service.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c().await.ok();
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Binds a service's HTTP listener; the error names the address.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// Serves `/health` and `/metrics` (from `registry`) on `listener` until `shutdown` resolves:
/// the operations endpoint of the services that have no HTTP API of their own.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{Router, extract::State, routing::get};
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(r): State<Registry>| async move { render_metrics(&r) }),
        )
        .with_state(registry);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounter, Opts};

    #[test]
    fn renders_registered_metrics() {
        let registry = Registry::new();
        let c = IntCounter::with_opts(Opts::new("x_total", "things")).unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        assert!(render_metrics(&registry).contains("x_total 3"));
    }

    #[test]
    fn log_format_parses() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
