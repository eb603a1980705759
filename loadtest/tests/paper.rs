//! The paper's experiments as the `paper` command runs them: the ablation's steps on the same
//! requests, and the mixed run's two streams at their traces' arrivals.

use preble_loadtest::paper::{
    self, ABLATION, Contender, MIXED, MIXED_FIRST_ENTRY, MIXED_TIME_SCALE, run_ablation,
    run_contenders, sweep_requests,
};
use preble_loadtest::report::Judging;
use preble_loadtest::sim::SimConfig;
use preble_policy::PolicyKind;

fn base() -> SimConfig {
    SimConfig::new("4xA6000-mistral7b".parse().unwrap(), PolicyKind::E2)
}

#[test]
fn the_ablation_runs_every_step_on_the_same_requests_and_each_step_acts() {
    let point = ABLATION.points[0].scaled(4, 0.05);
    assert_eq!(
        (point.patterns, point.requests, point.rate),
        (2000, 360, 36.0)
    );
    let requests = sweep_requests(&ABLATION, point, 1, 7);
    let steps = run_ablation(
        &requests,
        point.rate,
        &base(),
        Judging::default(),
        &mut |_, _, _| {},
    );
    assert_eq!(steps.len(), 5);
    for (step, run) in &steps {
        assert_eq!(run.summary.completed, requests.len(), "{}", step.label);
        assert_eq!(run.summary.policy, step.label);
    }
    // The baseline routes by load alone; every E2 step exploits cached prefixes.
    assert_eq!(
        steps[0].1.summary.decisions.keys().collect::<Vec<_>>(),
        ["load"]
    );
    for (step, run) in &steps[1..] {
        assert!(
            run.summary.decisions.contains_key("exploit"),
            "{}",
            step.label
        );
    }
    assert!(
        steps[1].1.summary.latency_ms.mean < steps[0].1.summary.latency_ms.mean,
        "E2's placement beats round-robin on a Zipf-skewed stream at load"
    );
    // The last step changes only the wait order, and that changes who waits.
    let latencies = |i: usize| -> Vec<Option<f64>> {
        steps[i]
            .1
            .result
            .records
            .iter()
            .map(|r| r.latency_ms())
            .collect()
    };
    assert_ne!(
        latencies(3),
        latencies(4),
        "the priority queue changed nothing"
    );
}

/// An Azure-format trace of `n` arrivals, `gap_s` apart, after two at the first instant.
fn write_trace(dir: &std::path::Path, name: &str, n: usize, gap_s: f64) {
    let mut csv = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n0,1,1\n");
    for i in 1..=n {
        csv.push_str(&format!("{},1,1\n", i as f64 * gap_s));
    }
    std::fs::write(dir.join(name), csv).unwrap();
}

#[test]
fn the_mixed_run_interleaves_both_streams_at_their_traces_arrivals() {
    let dir = tempfile::tempdir().unwrap();
    let wanted = MIXED_FIRST_ENTRY + 100;
    write_trace(dir.path(), MIXED[0].trace, wanted, 1.0);
    write_trace(dir.path(), MIXED[1].trace, wanted, 0.5);
    let fraction = 100.0 / MIXED[0].requests as f64;
    let requests = paper::mixed_requests(dir.path(), 1, fraction).unwrap();
    assert_eq!(requests.len(), 200);
    let ids: Vec<u64> = requests.iter().map(|r| r.id).collect();
    assert_eq!(ids, (0..200).collect::<Vec<u64>>());
    assert!(requests.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    for (part, gap_s) in [(&MIXED[0], 1.0), (&MIXED[1], 0.5)] {
        let times: Vec<f64> = requests
            .iter()
            .filter(|r| r.kind == part.workload.name())
            .map(|r| r.at_ms)
            .collect();
        assert_eq!(times.len(), 100, "{}", part.workload.name());
        let expected: Vec<f64> = (0..100)
            .map(|i| i as f64 * gap_s * 1e3 * MIXED_TIME_SCALE)
            .collect();
        for (t, e) in times.iter().zip(&expected) {
            assert!((t - e).abs() < 1e-6, "{t} vs {e}");
        }
    }
    let contenders: Vec<Contender> = ["e2", "round-robin/lpm"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    let runs = run_contenders(
        &requests,
        paper::MIXED_NAME,
        0.0,
        &contenders,
        &base(),
        Judging::default(),
        &mut |_, _, _| {},
    );
    let labels: Vec<&str> = runs.iter().map(|r| r.summary.policy.as_str()).collect();
    assert_eq!(labels, ["e2", "round-robin+lpm"]);
    assert!(runs.iter().all(|r| r.summary.completed == 200));
}

#[test]
fn a_trace_too_short_for_the_mixed_run_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_trace(dir.path(), MIXED[0].trace, 10, 1.0);
    write_trace(dir.path(), MIXED[1].trace, 10, 1.0);
    let err = format!(
        "{:#}",
        paper::mixed_requests(dir.path(), 1, 0.01).unwrap_err()
    );
    assert!(err.contains("has 10 entries"), "{err}");
    let missing = format!(
        "{:#}",
        paper::mixed_requests(&dir.path().join("nowhere"), 1, 0.01).unwrap_err()
    );
    assert!(missing.contains("nowhere"), "{missing}");
}
