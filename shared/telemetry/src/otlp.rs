//! Span export over OTLP, configured by the standard OpenTelemetry environment variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (export is off when
//! neither is set, or when `OTEL_SDK_DISABLED=true`), `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`http/protobuf`, the default, or `http/json`), `OTEL_SERVICE_NAME` (default: the binary's
//! name), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_SCHEDULE_DELAY` and the other batch settings,
//! and `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (applied once per request where it
//! enters: see [`crate::sampling`]).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The OpenTelemetry environment variables every preble binary honours (through the
/// OpenTelemetry SDK and its OTLP exporter).
pub const ENV_VARS: [&str; 13] = [
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];

/// Keeps span export alive; [`TracingGuard::shutdown`] flushes what is still buffered.
#[derive(Default)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans are being exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops export. Blocks up to the exporter's timeout:
    /// call it when the service has stopped serving.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("OpenTelemetry shutdown: {e}");
        }
    }
}

impl TracingGuard {
    /// Runs a service to its end, then flushes the spans it left (off the async runtime).
    pub async fn run<T>(self, service: impl std::future::Future<Output = T>) -> T {
        let out = service.await;
        let _ = tokio::task::spawn_blocking(move || self.shutdown()).await;
        out
    }
}

/// Whether the environment asks for span export.
pub fn export_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The export layer and its guard when the environment asks for export; also installs the W3C
/// trace-context propagator that [`crate::propagation`] uses.
pub fn exporter_from_env<S>(service: &str) -> Result<Option<(impl Layer<S>, TracingGuard)>, String>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if !export_requested() {
        return Ok(None);
    }
    let sampler = crate::sampling::HeadSampler::from_env()?;
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => opentelemetry_otlp::Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => opentelemetry_otlp::Protocol::HttpBinary,
        Ok(other) => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported (http/protobuf or http/json)"
            ));
        }
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    // Sampling is decided once per request where it enters (see `crate::sampling`); spans
    // exist only for requests already picked, so the SDK records every one it is given.
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    crate::sampling::install(sampler);
    let tracer = provider.tracer(service.to_string());
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Only what the spans themselves say: location, thread, target and busy/idle attributes
    // cost time on every span and tell an operator nothing here. No per-layer filter: one
    // would lift the subscriber's level hint to TRACE, so every disabled `debug!` and
    // `trace!` in every crate would cost a filter evaluation instead of one comparison.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false);
    Ok(Some((
        layer,
        TracingGuard {
            provider: Some(provider),
        },
    )))
}
