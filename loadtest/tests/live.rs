//! The live driver against a real stack (gateway, scheduler, sim workers on a NATS server with
//! the deployment's users and permissions): the same workload over HTTP and over NATS (as the
//! deployment's client identity) completes with the asked output lengths, and shared prefixes
//! show up as cached tokens.

use std::time::Duration;

use preble_loadtest::live::{LiveConfig, Transport, run};
use preble_loadtest::report::{Judging, Summary};
use preble_loadtest::workload::arrivals::Arrivals;
use preble_loadtest::workload::synth::{Kind, SynthConfig, generate};
use preble_tests::{Options, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_nats_runs_complete_every_request() {
    let cluster = TestCluster::start(Options {
        workers: 2,
        time_scale: 0.02,
        auth: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let nats = cluster.nats.as_ref().expect("the cluster's own NATS");
    let mut requests = generate(&SynthConfig::new(Kind::ToolBench, 60, 2));
    Arrivals::Poisson {
        rate: 30.0,
        seed: 1,
    }
    .apply(&mut requests);
    for transport in [
        Transport::Http {
            base_url: cluster.gateway.clone(),
            api_key: None,
        },
        Transport::Nats {
            url: nats.url.clone(),
            subject_prefix: cluster.prefix.clone(),
            credentials: Some(nats.user_of("client.env").unwrap()),
            api_key: None,
        },
    ] {
        let config = LiveConfig {
            transport: transport.clone(),
            model: cluster.model.clone(),
            request_timeout: Duration::from_secs(60),
        };
        let last = std::sync::Mutex::new(0);
        let result = run(&requests, &config, &|n| *last.lock().unwrap() = n)
            .await
            .unwrap();
        assert_eq!(*last.lock().unwrap(), requests.len(), "{transport:?}");
        for (r, q) in result.records.iter().zip(&requests) {
            assert_eq!(r.error, None, "{transport:?}");
            assert_eq!(r.output_tokens, q.output_tokens, "{transport:?}");
            assert!(r.first_token_ms.unwrap() <= r.end_ms.unwrap());
        }
        let summary = Summary::of(&result, Judging::default());
        assert_eq!(summary.completed, requests.len());
        assert!(
            summary.prefix_hit_ratio > 0.3,
            "{transport:?}: tool specs are shared, hit ratio {}",
            summary.prefix_hit_ratio
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_that_refuses_shows_as_errors_not_as_hangs() {
    let cluster = TestCluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut requests = generate(&SynthConfig::new(Kind::ToolBench, 3, 2));
    Arrivals::Poisson {
        rate: 50.0,
        seed: 1,
    }
    .apply(&mut requests);
    let config = LiveConfig {
        transport: Transport::Http {
            base_url: cluster.gateway.clone(),
            api_key: None,
        },
        model: "no-such-model".into(),
        request_timeout: Duration::from_secs(30),
    };
    let result = run(&requests, &config, &|_| {}).await.unwrap();
    for r in &result.records {
        let error = r.error.as_deref().unwrap_or_default();
        assert!(error.contains("404") || error.contains("model"), "{error}");
    }
}
