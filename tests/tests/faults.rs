//! The fault suite, short: every fault under a small load, on stacks of their own. No request
//! is lost or fails; the overload is refused at once, and every request is answered within
//! 10 s. `preble-faults` runs the full-size suite.

use std::time::Duration;

use preble_tests::faults::{Fault, SuiteOptions, run_fault, table};

#[tokio::test]
async fn no_fault_loses_or_fails_a_request() {
    let options = SuiteOptions {
        requests: 40,
        spread: Duration::from_secs(3),
        max_tokens: 32,
        workers: 3,
        time_scale: 1.0,
        overload_requests: 400,
        overload_max_tokens: 64,
        overload_limit: 48,
        deadline: Duration::from_secs(30),
    };
    let mut reports = Vec::new();
    for fault in Fault::ALL {
        let report = run_fault(fault, &options, &|line| eprintln!("{line}"))
            .await
            .unwrap();
        reports.push(report);
    }
    let summary = table(&reports);
    eprintln!("{summary}");
    for r in &reports {
        assert_eq!(r.lost, 0, "{}: {:?}\n{summary}", r.fault.name(), r.examples);
        assert_eq!(
            r.failed,
            0,
            "{}: {:?}\n{summary}",
            r.fault.name(),
            r.examples
        );
        assert_eq!(r.completed + r.refused, r.sent, "{summary}");
        if r.fault == Fault::Overload {
            assert!(r.refused > 0, "the overload was refused in part\n{summary}");
            assert!(r.completed > 0, "and served in part\n{summary}");
            assert!(
                r.slowest_refusal < Duration::from_secs(2),
                "refusals come at once\n{summary}"
            );
            assert!(
                r.slowest_answer < Duration::from_secs(10),
                "every request answered within 10 s\n{summary}"
            );
        } else {
            assert_eq!(r.refused, 0, "{summary}");
        }
    }
    let gateway_kill = reports
        .iter()
        .find(|r| r.fault == Fault::GatewayKill)
        .unwrap();
    assert!(
        gateway_kill.client_retries > 0,
        "the killed gateway cut streams, which the clients sent again\n{summary}"
    );
}
