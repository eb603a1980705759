//! Every service's `/metrics` after known traffic: counters moved by exactly the right amounts,
//! histograms counted every request, and the scheduler's tree and per-worker gauges are there.

mod common;

use std::time::{Duration, Instant};

use common::*;
use preble_tests::{Options, TestCluster, scrape, scrape_where};
use serde_json::json;

/// Totals the clients saw.
#[derive(Default)]
struct Seen {
    requests: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
}

/// Polls `check` until it returns `Ok` or 10 s pass (gauges move on the services' ticks).
async fn eventually<F, Fut>(what: &str, cluster: &TestCluster, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("{what}: {e}\nlogs:\n{}", cluster.logs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn same(name: &str, got: f64, want: u64) -> Result<(), String> {
    if got == want as f64 {
        Ok(())
    } else {
        Err(format!("{name} is {got}, expected {want}"))
    }
}

#[tokio::test]
async fn counters_move_by_exactly_the_traffic() {
    let c = TestCluster::start(Options::default()).await.unwrap();
    let mut seen = Seen::default();
    let shared =
        "The same long system prompt, repeated so that later requests hit the cache. ".repeat(8);
    for i in 0..5 {
        let prompt = if i < 3 {
            shared.clone()
        } else {
            format!("A different prompt number {i}")
        };
        let body = json!({"model": c.model, "prompt": prompt, "max_tokens": 4, "ignore_eos": true, "seed": i});
        let (status, out) = post(&c.gateway, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{out}");
        seen.requests += 1;
        seen.prompt += out["usage"]["prompt_tokens"].as_u64().unwrap();
        seen.cached += out["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        seen.completion += out["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(seen.completion, 20);
    assert!(seen.cached > 0, "the repeated prompt hit the cache");

    let gateway = format!("{}/metrics", c.gateway);
    eventually("gateway", &c, || async {
        let ok = scrape_where(
            &gateway,
            "preble:http_requests_total",
            r#"endpoint="completions",status="200""#,
        )
        .await
        .map_err(|e| e.to_string())?;
        same("http_requests_total", ok, seen.requests)?;
        for (name, want) in [
            ("preble:prompt_tokens_total", seen.prompt),
            ("preble:prompt_tokens_cached_total", seen.cached),
            ("preble:generation_tokens_total", seen.completion),
            ("preble:time_to_first_token_seconds_count", seen.requests),
            ("preble:e2e_request_latency_seconds_count", seen.requests),
        ] {
            same(
                name,
                scrape(&gateway, name).await.map_err(|e| e.to_string())?,
                want,
            )?;
        }
        Ok(())
    })
    .await;

    let scheduler = c.scheduler_metrics.clone();
    eventually("scheduler", &c, || async {
        let get = |name: &'static str| {
            let url = scheduler.clone();
            async move { scrape(&url, name).await.map_err(|e| e.to_string()) }
        };
        same(
            "decisions",
            get("preble:scheduler_decisions_total").await?,
            seen.requests,
        )?;
        same(
            "dispatches",
            get("preble:scheduler_dispatches_total").await?,
            seen.requests,
        )?;
        if get("preble:scheduler_tree_tokens").await? < seen.prompt as f64 / 5.0 {
            return Err("the tree does not hold the prompts".into());
        }
        if get("preble:scheduler_tree_nodes").await? < 2.0 {
            return Err("the tree has no nodes".into());
        }
        for w in &c.workers {
            let label = format!("worker=\"{}\"", w.id);
            scrape_where(
                &scheduler,
                "preble:scheduler_worker_load_estimate_ms",
                &label,
            )
            .await
            .map_err(|e| format!("no load estimate for {}: {e}", w.id))?;
        }
        Ok(())
    })
    .await;

    eventually("workers", &c, || async {
        let decode_steps = seen.completion - seen.requests;
        for (name, want) in [
            ("preble:requests_accepted_total", seen.requests),
            ("preble:prompt_tokens_total", seen.prompt),
            ("preble:prefix_cache_queries_total", seen.prompt),
            ("preble:prefix_cache_hit_tokens_total", seen.cached),
            ("preble:generation_tokens_total", seen.completion),
            ("preble:time_to_first_token_seconds_count", seen.requests),
            ("preble:time_per_output_token_seconds_count", seen.requests),
            ("preble:e2e_request_latency_seconds_count", seen.requests),
            ("preble:request_queue_time_seconds_count", seen.requests),
            (
                "preble:engine_computed_tokens_total",
                seen.prompt - seen.cached + decode_steps,
            ),
        ] {
            same(name, c.worker_sum(name).await, want)?;
        }
        let mut finished = 0.0;
        for w in &c.workers {
            finished += scrape_where(
                &w.metrics_url,
                "preble:request_finished_total",
                r#"finished_reason="length""#,
            )
            .await
            .unwrap_or(0.0);
        }
        same("finished (length)", finished, seen.requests)?;
        let usage = c.worker_sum("preble:kv_cache_usage_perc").await;
        if !(usage > 0.0 && usage <= c.workers.len() as f64) {
            return Err(format!("kv_cache_usage_perc sums to {usage}"));
        }
        Ok(())
    })
    .await;

    // Every metric the Grafana dashboard charts is one a service exposes.
    let mut exposed = String::new();
    let mut urls = vec![gateway.clone(), c.scheduler_metrics.clone()];
    urls.extend(c.workers.iter().map(|w| w.metrics_url.clone()));
    for url in urls {
        exposed.push_str(&reqwest::get(&url).await.unwrap().text().await.unwrap());
    }
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docker/grafana/dashboards/preble.json"),
    )
    .unwrap();
    let mut charted = std::collections::BTreeSet::new();
    for (start, _) in dashboard.match_indices("preble:") {
        let name: String = dashboard[start..]
            .chars()
            .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_' || *ch == ':')
            .collect();
        charted.insert(name);
    }
    assert!(charted.len() >= 10, "{charted:?}");
    for name in charted {
        let is_series = |line: &str| {
            line.strip_prefix(name.as_str()).is_some_and(|rest| {
                let rest = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| rest.strip_prefix(suffix))
                    .unwrap_or(rest);
                rest.starts_with(' ') || rest.starts_with('{')
            })
        };
        assert!(
            exposed.lines().any(is_series),
            "the dashboard charts {name}, which no service exposes"
        );
    }
}
