//! W3C trace context (`traceparent`, `tracestate`) in NATS message headers: a request's trace
//! starts where it enters with [`start_trace`], every publisher injects its span with
//! [`headers_for`], every consumer continues the trace with [`continue_trace`], and a span's
//! phases are made with [`child_span`]. A request that is not traced (export off, or not
//! picked by [`crate::sampling`]) gets disabled spans everywhere: no span is recorded and no
//! header is written.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing::Span;
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

/// The span of a request entering the system here: `make()` when the request is traced, else
/// a disabled span. `caller` holds the caller's own trace context (`traceparent`,
/// `tracestate`) if it sent one: the span then joins the caller's trace, and a parent-based
/// sampler follows the caller's sampled flag (see [`crate::sampling`]).
pub fn start_trace(caller: Option<&HeaderMap>, make: impl FnOnce() -> Span) -> Span {
    let parent = caller.and_then(sent_context);
    let parent_sampled = parent
        .as_ref()
        .map(|context| context.span().span_context().is_sampled());
    if !crate::sampling::sample_request(parent_sampled) {
        return Span::none();
    }
    let span = make();
    if let Some(context) = parent.filter(|_| parent_sampled == Some(true)) {
        // Fails only when the span is disabled (export off in this process).
        let _ = span.set_parent(context);
    }
    span
}

/// A phase of `parent`: `make()` when `parent` is recorded, else a disabled span.
pub fn child_span(parent: &Span, make: impl FnOnce() -> Span) -> Span {
    if parent.is_none() {
        Span::none()
    } else {
        make()
    }
}

/// Headers carrying `span`'s trace context (empty for a disabled span: the message then goes
/// out without headers).
pub fn headers_for(span: &Span) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if span.is_none() {
        return headers;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(&mut headers));
    });
    headers
}

/// The trace-context headers (`traceparent`, `tracestate`) of an HTTP request, for
/// [`start_trace`]; `None` when it sent none.
pub fn from_http(headers: &axum::http::HeaderMap) -> Option<HeaderMap> {
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    let mut out = HeaderMap::new();
    out.insert("traceparent", traceparent);
    if let Some(tracestate) = headers.get("tracestate").and_then(|v| v.to_str().ok()) {
        out.insert("tracestate", tracestate);
    }
    Some(out)
}

/// The valid trace context `headers` carry, if any.
fn sent_context(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    headers.get("traceparent")?;
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    context.span().span_context().is_valid().then_some(context)
}

/// The span of a received message's work: `make()` as a child of the trace context in
/// `headers` when they carry a sampled one, else a disabled span (the request is not traced).
pub fn continue_trace(headers: Option<&HeaderMap>, make: impl FnOnce() -> Span) -> Span {
    let Some(context) = headers
        .and_then(sent_context)
        .filter(|context| context.span().span_context().is_sampled())
    else {
        return Span::none();
    };
    let span = make();
    // Fails only when the span is disabled (export off in this process).
    let _ = span.set_parent(context);
    span
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
        assert!(headers_for(&Span::none()).is_empty());
    }

    #[test]
    fn only_a_sampled_trace_context_is_continued() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let made = |headers: Option<&HeaderMap>| {
            let mut called = false;
            continue_trace(headers, || {
                called = true;
                Span::none()
            });
            called
        };
        let with = |traceparent: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", traceparent);
            headers
        };
        assert!(made(Some(&with(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ))));
        assert!(!made(Some(&with(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        ))));
        assert!(!made(Some(&with("garbage"))));
        assert!(!made(Some(&HeaderMap::new())));
        assert!(!made(None));
        // Without export nothing is sampled where a request enters.
        assert!(start_trace(None, || unreachable!("not sampled")).is_none());
    }
}
