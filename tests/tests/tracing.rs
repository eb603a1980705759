//! One trace per request across the services: an OTLP/HTTP (JSON) receiver runs inside the
//! test, the real gateway, scheduler and worker export to it, and one streaming request must
//! arrive as one trace with the right spans, parent links across both NATS hops, and the
//! routing decision on the scheduler's span; and with sampling, a request is traced in every
//! service or in none, following a caller's own trace context.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::{Router, body::Bytes, extract::State, routing::post};
use common::*;
use preble_tests::{Options, TestCluster, free_port};
use serde_json::{Value, json};

/// One received span with the service that sent it.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    span: Value,
}

impl ReceivedSpan {
    fn name(&self) -> &str {
        self.span["name"].as_str().unwrap_or_default()
    }

    fn id(&self, field: &str) -> String {
        self.span[field]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase()
    }

    /// An attribute's value as text (OTLP JSON wraps values by type).
    fn attr(&self, key: &str) -> Option<String> {
        let attribute = self.span["attributes"]
            .as_array()?
            .iter()
            .find(|a| a["key"] == key)?;
        let value = &attribute["value"];
        ["stringValue", "intValue", "boolValue", "doubleValue"]
            .iter()
            .find_map(|kind| match &value[kind] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            })
    }
}

/// An OTLP/HTTP receiver on loopback collecting every span it is sent.
async fn start_receiver() -> (String, Arc<Mutex<Vec<ReceivedSpan>>>) {
    let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
    async fn receive(
        State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>,
        body: Bytes,
    ) -> &'static str {
        let Ok(request) = serde_json::from_slice::<Value>(&body) else {
            return "{}";
        };
        let mut out = spans.lock().unwrap();
        for resource in request["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_string();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    out.push(ReceivedSpan {
                        service: service.clone(),
                        span: span.clone(),
                    });
                }
            }
        }
        "{}"
    }
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}"), spans)
}

/// A gateway, a scheduler and 2 workers exporting their spans (JSON, every 100 ms, with
/// `extra` variables) to a receiver in the test, and what it received.
async fn traced_cluster(extra: &[(&str, &str)]) -> (TestCluster, Arc<Mutex<Vec<ReceivedSpan>>>) {
    let (endpoint, received) = start_receiver().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = TestCluster::start(Options {
        workers: 2,
        env,
        ..Options::default()
    })
    .await
    .unwrap();
    (c, received)
}

/// The spans received once `ready` accepts them (polled every 100 ms for up to 20 s; on time
/// out the test fails with `ready`'s last reason and the services' logs).
async fn spans_once(
    received: &Mutex<Vec<ReceivedSpan>>,
    c: &TestCluster,
    mut ready: impl FnMut(&[ReceivedSpan]) -> Result<(), String>,
) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = received.lock().unwrap().clone();
        match ready(&spans) {
            Ok(()) => return spans,
            Err(why) => assert!(Instant::now() < deadline, "{why}; logs:\n{}", c.logs()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn one_request_is_one_trace_across_gateway_scheduler_and_worker() {
    let (c, received) = traced_cluster(&[]).await;
    let body = json!({
        "model": c.model,
        "messages": [{"role": "user", "content": "Trace me through every service."}],
        "max_tokens": 6,
        "stream": true,
        "seed": 3,
    });
    let (status, events) = stream(&c.gateway, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let request_id = {
        let first: Value = serde_json::from_str(&events[0]).unwrap();
        first["id"]
            .as_str()
            .unwrap()
            .trim_start_matches("chatcmpl-")
            .to_string()
    };

    let spans = spans_once(&received, &c, |spans| {
        let names: BTreeSet<&str> = spans.iter().map(ReceivedSpan::name).collect();
        if REQUEST_SPANS.iter().all(|w| names.contains(w)) {
            Ok(())
        } else {
            Err(format!("spans seen: {names:?}"))
        }
    })
    .await;
    let one = |name: &str| -> ReceivedSpan {
        let matching: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name() == name).collect();
        assert_eq!(matching.len(), 1, "one {name} span for one request");
        matching[0].clone()
    };
    let gateway = one("gateway.request");
    let route = one("scheduler.route");
    let worker = one("worker.request");
    assert_eq!(
        gateway.attr("request_id").as_deref(),
        Some(request_id.as_str())
    );
    assert_eq!(
        route.attr("request_id").as_deref(),
        Some(request_id.as_str())
    );

    // One trace id for everything.
    let trace = gateway.id("traceId");
    assert_eq!(trace.len(), 32);
    for span in &spans {
        assert_eq!(
            span.id("traceId"),
            trace,
            "{} is in another trace",
            span.name()
        );
    }
    // Each service reports its own spans.
    assert_eq!(gateway.service, "preble-gateway");
    assert_eq!(route.service, "preble-scheduler");
    assert_eq!(worker.service, "preble-worker");
    // Parent links across the two NATS hops, and inside the worker.
    assert_eq!(
        gateway.id("parentSpanId"),
        "",
        "the gateway starts the trace"
    );
    assert_eq!(route.id("parentSpanId"), gateway.id("spanId"));
    assert_eq!(worker.id("parentSpanId"), route.id("spanId"));
    for phase in ["worker.queue", "worker.prefill", "worker.decode"] {
        assert_eq!(
            one(phase).id("parentSpanId"),
            worker.id("spanId"),
            "{phase}"
        );
    }
    // The routing decision, with its terms.
    assert_eq!(route.attr("policy").as_deref(), Some("e2"));
    let chosen = route.attr("worker").unwrap();
    assert!(
        c.workers.iter().any(|w| w.id == chosen),
        "route chose {chosen}"
    );
    assert!(
        ["exploit", "explore", "rebalance", "replicate"]
            .contains(&route.attr("decision").unwrap().as_str()),
        "{:?}",
        route.attr("decision")
    );
    assert_eq!(route.attr("cached_tokens").as_deref(), Some("0"));
    assert!(!route.attr("reason").unwrap_or_default().is_empty());
    // What the gateway and the worker learned.
    assert_eq!(gateway.attr("stream").as_deref(), Some("true"));
    assert_eq!(gateway.attr("completion_tokens").as_deref(), Some("6"));
    assert_eq!(worker.attr("completion_tokens").as_deref(), Some("6"));
    assert_eq!(worker.attr("finish_reason").as_deref(), Some("length"));
    let prompt = worker.attr("prompt_tokens").unwrap();
    let prefill = one("worker.prefill");
    assert_eq!(prefill.attr("computed_tokens"), Some(prompt));
    assert_eq!(prefill.attr("reused_tokens").as_deref(), Some("0"));
}

/// The six spans of one traced request.
const REQUEST_SPANS: [&str; 6] = [
    "gateway.request",
    "scheduler.route",
    "worker.request",
    "worker.queue",
    "worker.prefill",
    "worker.decode",
];

#[tokio::test]
async fn sampling_is_decided_once_per_request_and_follows_a_callers_trace() {
    let (c, received) = traced_cluster(&[
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
    ])
    .await;
    let completion =
        |i: usize| json!({"model": c.model, "prompt": format!("request {i}"), "max_tokens": 3});
    let sent = 30;
    for i in 0..sent {
        let (status, body) = common::post(&c.gateway, "/v1/completions", &completion(i)).await;
        assert_eq!(status, 200, "{body}");
    }
    // Callers that bring their own trace context: one sampled, one not.
    let sampled_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let caller_span = "00f067aa0ba902b7";
    for (trace, flags) in [(sampled_trace, "01"), (unsampled_trace, "00")] {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/completions", c.gateway))
            .header("traceparent", format!("00-{trace}-{caller_span}-{flags}"))
            .json(&completion(sent))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    // Wait for the caller's trace, then for the export to go quiet.
    let mut last_count = 0;
    let mut quiet_since = Instant::now();
    let spans = spans_once(&received, &c, |spans| {
        let callers = spans
            .iter()
            .filter(|s| s.id("traceId") == sampled_trace)
            .count();
        if spans.len() != last_count {
            last_count = spans.len();
            quiet_since = Instant::now();
        }
        if callers == REQUEST_SPANS.len() && quiet_since.elapsed() > Duration::from_secs(1) {
            Ok(())
        } else {
            Err(format!("{callers} spans of the caller's trace"))
        }
    })
    .await;

    // Every trace that was recorded is whole: a request is traced everywhere or nowhere.
    let mut traces = std::collections::BTreeMap::<String, Vec<&str>>::new();
    for span in &spans {
        traces
            .entry(span.id("traceId"))
            .or_default()
            .push(span.name());
    }
    for (trace, names) in &traces {
        let mut names = names.clone();
        names.sort_unstable();
        let mut wanted = REQUEST_SPANS.to_vec();
        wanted.sort_unstable();
        assert_eq!(names, wanted, "trace {trace}");
    }
    // About half of the requests without a caller's context are traced (the chance that none
    // or all of 30 are is 2 in a billion), the caller's sampled one is, its unsampled one not.
    assert!(!traces.contains_key(unsampled_trace));
    let own = traces.len() - 1;
    assert!(0 < own && own < sent, "{own} of {sent} traced");
    let gateway = spans
        .iter()
        .find(|s| s.id("traceId") == sampled_trace && s.name() == "gateway.request")
        .unwrap();
    assert_eq!(gateway.id("parentSpanId"), caller_span);
}
