//! W3C trace context (`traceparent`, `tracestate`) in NATS message headers: every publisher
//! injects its current span with [`headers_for`], every consumer continues the trace with
//! [`continue_trace`]. Without span export both are cheap no-ops (no header is written).

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Headers carrying `span`'s trace context (empty when spans are not exported).
pub fn headers_for(span: &tracing::Span) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(&mut headers));
    });
    headers
}

/// Makes `span` a child of the trace context in `headers`, if they carry one.
pub fn continue_trace(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers else {
        return;
    };
    if headers.get("traceparent").is_none() {
        return;
    }
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    // Fails only when the span is disabled or already started a trace of its own.
    let _ = span.set_parent(context);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_header_survives_extraction() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let mut headers = HeaderMap::new();
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        headers.insert("traceparent", traceparent);
        let context = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(&headers))
        });
        let mut out = HeaderMap::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(&mut out));
        });
        assert_eq!(
            out.get("traceparent").map(|v| v.as_str()),
            Some(traceparent)
        );
        // Without export, a span carries no context and writes no header.
        assert!(
            headers_for(&tracing::Span::none())
                .get("traceparent")
                .is_none()
        );
    }
}
