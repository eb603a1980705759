//! The prefix tree's persistence in Redis, against a dedicated `redis-server` this test starts
//! and stops: routing never stops while Redis is down, persistence reports itself degraded and
//! catches up with a fresh snapshot when Redis returns, and a restarted scheduler restores the
//! tree from it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::post;
use preble_tests::{Options, RedisServer, TestCluster, free_port, scrape, wait_for_port};
use serde_json::json;

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(model: &str, family: u32, unique: u32) -> serde_json::Value {
    let mut prompt: Vec<u32> = (0..300).map(|t| 5 + (family * 311 + t * 7) % 570).collect();
    prompt.extend((0..10).map(|t| 5 + (unique * 10 + t) % 570));
    json!({"model": model, "prompt": prompt, "max_tokens": 4})
}

#[tokio::test]
async fn routing_survives_redis_restarts_and_persistence_catches_up() {
    let port = free_port();
    let mut redis = RedisServer::start(port);
    let mut cluster = TestCluster::start(Options {
        workers: 2,
        scheduler_args: vec![
            "--redis-url".into(),
            format!("redis://127.0.0.1:{port}"),
            "--snapshot-interval-s".into(),
            "1".into(),
        ],
        ..Options::default()
    })
    .await
    .unwrap();
    let key = format!("{}:tree:snapshot", cluster.prefix);
    let metrics = cluster.scheduler_metrics.clone();
    let metric = |name: &'static str| {
        let metrics = metrics.clone();
        async move { scrape(&metrics, name).await.unwrap_or(-1.0) }
    };

    for i in 0..4 {
        let (status, out) = post(
            &cluster.gateway,
            "/v1/completions",
            &request(&cluster.model, 1, i),
        )
        .await;
        assert_eq!(status, 200, "{out}");
    }
    wait_for("a snapshot in redis", async || redis.strlen(&key) > 0).await;
    assert_eq!(metric("preble:scheduler_persistence_degraded").await, 0.0);

    // Redis goes away: every request is still served; persistence says it is degraded.
    redis.stop();
    for i in 0..6 {
        let (status, out) = post(
            &cluster.gateway,
            "/v1/completions",
            &request(&cluster.model, 2 + i % 2, 10 + i),
        )
        .await;
        assert_eq!(status, 200, "routing stopped with redis down: {out}");
    }
    wait_for("degraded persistence", async || {
        metric("preble:scheduler_persistence_degraded").await == 1.0
    })
    .await;

    // Redis returns empty: the scheduler catches up with a fresh snapshot.
    let redis = RedisServer::start(port);
    let snapshots = metric("preble:scheduler_tree_snapshots_total").await;
    let (status, _) = post(
        &cluster.gateway,
        "/v1/completions",
        &request(&cluster.model, 4, 99),
    )
    .await;
    assert_eq!(status, 200);
    wait_for("catch-up", async || {
        metric("preble:scheduler_persistence_degraded").await == 0.0
            && metric("preble:scheduler_tree_snapshots_total").await > snapshots
            && redis.strlen(&key) > 0
    })
    .await;

    // A new scheduler restores the tree from redis before any worker's digest.
    cluster.start_scheduler().unwrap();
    wait_for("the tree restored", async || {
        metric("preble:scheduler_tree_tokens_restored").await > 0.0
    })
    .await;
    let (status, out) = post(
        &cluster.gateway,
        "/v1/completions",
        &request(&cluster.model, 1, 500),
    )
    .await;
    assert_eq!(status, 200, "{out}");
}

/// A `redis-server` that wants a password, optionally over TLS only (certificates from
/// [`preble_tests::make_test_certificates`] in `dir`).
fn start_secured_redis(port: u16, password: &str, tls_dir: Option<&std::path::Path>) -> Child {
    let mut command = Command::new("redis-server");
    command.args([
        "--save",
        "",
        "--appendonly",
        "no",
        "--requirepass",
        password,
    ]);
    match tls_dir {
        None => {
            command.args(["--port", &port.to_string()]);
        }
        Some(dir) => {
            preble_tests::make_test_certificates(dir).unwrap();
            command.current_dir(dir).args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                "no",
            ]);
        }
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    wait_for_port(port);
    child
}

/// Length of the value at `key` in a secured Redis (0 when absent or unreachable).
fn secured_strlen(port: u16, password: &str, tls_dir: Option<&std::path::Path>, key: &str) -> u64 {
    let mut command = Command::new("redis-cli");
    command.args(["-p", &port.to_string(), "-a", password, "--no-auth-warning"]);
    if let Some(dir) = tls_dir {
        command.arg("--tls").arg("--cacert").arg(dir.join("ca.pem"));
    }
    let out = command
        .args(["STRLEN", key])
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Starts a cluster persisting to `url`; returns it once a request was routed.
async fn cluster_persisting_to(url: &str, env: Vec<(String, String)>) -> TestCluster {
    let cluster = TestCluster::start(Options {
        workers: 1,
        scheduler_args: vec![
            "--redis-url".into(),
            url.into(),
            "--snapshot-interval-s".into(),
            "1".into(),
        ],
        env,
        ..Options::default()
    })
    .await
    .unwrap();
    let (status, out) = post(
        &cluster.gateway,
        "/v1/completions",
        &request(&cluster.model, 1, 0),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    cluster
}

#[tokio::test]
async fn redis_credentials_and_tls_come_from_the_url() {
    for tls in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut redis = start_secured_redis(port, "s3cret", tls.then_some(dir.path()));
        let scheme = if tls { "rediss" } else { "redis" };
        // The CA that signed the server's certificate is trusted the standard way.
        let env: Vec<(String, String)> = if tls {
            vec![(
                "SSL_CERT_FILE".into(),
                dir.path().join("ca.pem").display().to_string(),
            )]
        } else {
            Vec::new()
        };
        let good =
            cluster_persisting_to(&format!("{scheme}://:s3cret@127.0.0.1:{port}"), env.clone())
                .await;
        let key = format!("{}:tree:snapshot", good.prefix);
        wait_for("a snapshot written with the password", async || {
            secured_strlen(port, "s3cret", tls.then_some(dir.path()), &key) > 0
        })
        .await;
        // A wrong password: persistence is degraded, routing goes on.
        let bad = cluster_persisting_to(&format!("{scheme}://:wrong@127.0.0.1:{port}"), env).await;
        let metrics = bad.scheduler_metrics.clone();
        wait_for("degraded persistence with a wrong password", async || {
            scrape(&metrics, "preble:scheduler_persistence_degraded")
                .await
                .unwrap_or(0.0)
                == 1.0
        })
        .await;
        let (status, out) = post(&bad.gateway, "/v1/completions", &request(&bad.model, 2, 1)).await;
        assert_eq!(status, 200, "{out}");
        let _ = redis.kill();
        let _ = redis.wait();
    }
}
