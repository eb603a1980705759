//! End to end: overload is answered at once. Past the gateway's in-flight limit a request gets
//! 503 `overloaded`, past its API key's rate 429 `rate_limit_exceeded`, both with `Retry-After`
//! and without waiting for a worker; the requests admitted are served.

mod common;

use std::time::{Duration, Instant};

use common::*;
use preble_tests::{Options, TestCluster, scrape_where};
use serde_json::json;

#[tokio::test]
async fn requests_past_the_in_flight_limit_are_refused_at_once() {
    let c = TestCluster::start(Options {
        workers: 1,
        time_scale: 1.0,
        gateway_env: vec![("PREBLE_MAX_IN_FLIGHT".into(), "3".into())],
        ..Options::default()
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let mut sent = Vec::new();
    for i in 0..10 {
        let client = client.clone();
        let url = format!("{}/v1/completions", c.gateway);
        let body = json!({"model": c.model, "prompt": format!("busy {i}"), "max_tokens": 60,
            "ignore_eos": true});
        sent.push(tokio::spawn(async move {
            let started = Instant::now();
            let response = client.post(url).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: serde_json::Value = response.json().await.unwrap();
            (status, retry_after, body, started.elapsed())
        }));
        // In order, so the first three are the ones admitted.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut served = 0;
    let mut refused = 0;
    for s in sent {
        let (status, retry_after, body, took) = s.await.unwrap();
        match status {
            200 => served += 1,
            503 => {
                refused += 1;
                assert_eq!(code(&body), "overloaded", "{body}");
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert!(took < Duration::from_secs(1), "refused after {took:?}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(
        served,
        3,
        "{served} served, {refused} refused\n{}",
        c.logs()
    );
    assert_eq!(refused, 7);
    let metrics = format!("{}/metrics", c.gateway);
    let counted = scrape_where(&metrics, "preble:requests_refused_total", "overloaded")
        .await
        .unwrap();
    assert_eq!(counted, 7.0);
    // Once they ended, new requests are admitted again.
    let (status, body) = post(
        &c.gateway,
        "/v1/completions",
        &json!({"model": c.model, "prompt": "after", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn each_api_key_is_held_to_its_rate() {
    let c = TestCluster::start(Options {
        workers: 1,
        gateway_env: vec![
            ("PREBLE_API_KEYS".into(), "k1,k2".into()),
            ("PREBLE_RATE_LIMIT".into(), "0.5".into()),
            ("PREBLE_RATE_LIMIT_BURST".into(), "2".into()),
        ],
        ..Options::default()
    })
    .await
    .unwrap();
    let body = json!({"model": c.model, "prompt": "x", "max_tokens": 1}).to_string();
    let client = reqwest::Client::new();
    let send = |key: &'static str| {
        let request = client
            .post(format!("{}/v1/completions", c.gateway))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(body.clone());
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let body: serde_json::Value = response.json().await.unwrap();
            (status, retry_after, body)
        }
    };
    // The burst of two, then refusals that say how long to wait.
    assert_eq!(send("k1").await.0, 200);
    assert_eq!(send("k1").await.0, 200);
    let (status, retry_after, body) = send("k1").await;
    assert_eq!(
        (status, code(&body)),
        (429, "rate_limit_exceeded"),
        "{body}"
    );
    assert!(
        matches!(retry_after, Some(1..=2)),
        "Retry-After {retry_after:?}"
    );
    // Another key has its own budget.
    assert_eq!(send("k2").await.0, 200);
}
