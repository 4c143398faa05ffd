//! Blue-green on the local platform end to end: real child processes, a real registry on a
//! SQLite file, a real gateway with a weighted route whose `/metrics` the analysis scrapes,
//! and a bounded load through the gateway for the whole switch.

#![cfg(feature = "local")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use support::{
    Harness, SERVICE, alive, assert_only_version_serves, assert_rolled_back_within,
    blue_green_under_load, child_spec, eventually, fast_options, marked_pids,
};
use trellis_deploy::{
    Action, AnalysisOptions, BlueGreenOptions, DeployError, Outcome, ReplicaPhase,
};

/// Not a test: the child service when run by the deployer (see support::child_main).
#[test]
fn child_service() {
    support::child_main();
}

/// The analysis of these tests: `window`, checked every 250 ms.
fn analysis(window: Duration) -> AnalysisOptions {
    support::analysis(window, Duration::from_millis(250))
}

async fn blue(h: &Harness, marker: &str) -> Vec<u32> {
    let spec = child_spec("child_service", "1.0.0", 2, false, marker);
    let deployment = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &spec)
        .await
        .unwrap();
    println!("blue: deploy of 2 replicas took {:?}", deployment.took);
    eventually(
        "blue answering through the gateway",
        Duration::from_secs(10),
        async || (h.get("/x").await.0 == 200).then_some(()),
    )
    .await;
    deployment.replicas.iter().map(|r| r.pid.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_green_is_promoted_without_a_failed_request() {
    let h = Harness::start(fast_options()).await;
    let marker = format!("promote-{}", std::process::id());
    let blue_pids = blue(&h, &marker).await;

    let green_spec = child_spec("child_service", "2.0.0", 2, false, &marker);
    let options = BlueGreenOptions::new("1.0.0", "2.0.0")
        .spec(green_spec)
        .traffic_split(70, 30)
        .analysis(analysis(Duration::from_millis(2_000)));
    let (report, load) = blue_green_under_load(&h, "promote", "/work", options).await;
    assert_eq!(report.outcome, Outcome::Promoted, "{:#?}", report.decisions);
    assert_eq!(
        load.failed, 0,
        "failed requests during the switch: {:?}",
        load.failures
    );
    assert!(load.by_version.get("1.0.0").copied().unwrap_or(0) > 0);
    assert!(load.by_version.get("2.0.0").copied().unwrap_or(0) > 0);

    let actions: Vec<Action> = report.decisions.iter().map(|d| d.action).collect();
    assert_eq!(actions[..2], [Action::Start, Action::Split]);
    assert!(
        actions[2..actions.len() - 1]
            .iter()
            .all(|a| *a == Action::Check)
    );
    assert_eq!(actions.last(), Some(&Action::Promote));
    let promote = report.decisions.last().unwrap();
    assert!(promote.requests >= 20, "{promote:?}");
    assert_eq!(promote.errors, 0);
    assert_eq!(promote.error_rate, Some(0.0));
    assert!(promote.p99.is_some());
    assert_eq!(h.deployer.decisions(SERVICE), report.decisions, "queryable");

    // Blue is gone: stopped, deregistered; green alone, with its weight metadata removed.
    for pid in &blue_pids {
        assert!(!alive(*pid), "blue pid {pid} still alive");
    }
    let status = h.deployer.status(SERVICE).await.unwrap();
    assert_eq!(status.len(), 2);
    assert!(
        status.iter().all(|r| r.version == "2.0.0"
            && r.phase == ReplicaPhase::Running
            && r.weight.is_none()),
        "{status:?}"
    );
    assert_eq!(marked_pids(&marker).len(), 2);
    eventually(
        "only green in the gateway's registry",
        Duration::from_secs(5),
        async || {
            let found = h.gateway_registry.discover(SERVICE);
            (found.len() == 2 && found.iter().all(|r| r.instance.version == "2.0.0")).then_some(())
        },
    )
    .await;
    h.deployer.undeploy(SERVICE).await.unwrap();
    assert!(marked_pids(&marker).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_green_is_rolled_back_and_blue_is_untouched() {
    let h = Harness::start(fast_options()).await;
    let marker = format!("rollback-{}", std::process::id());
    let blue_pids = blue(&h, &marker).await;

    let green_spec = child_spec("child_service", "2.0.0", 1, true, &marker);
    let window = Duration::from_secs(10);
    let options = BlueGreenOptions::new("1.0.0", "2.0.0")
        .spec(green_spec)
        .traffic_split(50, 50)
        .analysis(analysis(window));
    let (report, load) = blue_green_under_load(&h, "rollback", "/work", options).await;
    let rollback = assert_rolled_back_within(&report, window);
    assert!(rollback.error_rate.unwrap() > 0.01, "{rollback:?}");
    assert!(
        rollback.reason.contains("error rate"),
        "{}",
        rollback.reason
    );
    assert_eq!(h.deployer.decisions(SERVICE), report.decisions);
    assert!(
        load.failed > 0,
        "green's 500s reached clients during the analysis"
    );

    // Blue never stopped: same pids, alive, and all of the traffic again.
    let status = h.deployer.status(SERVICE).await.unwrap();
    let pids: Vec<u32> = status.iter().map(|r| r.pid.unwrap()).collect();
    assert_eq!(pids, blue_pids);
    assert!(blue_pids.iter().all(|p| alive(*p)));
    assert!(
        status
            .iter()
            .all(|r| r.version == "1.0.0" && r.restarts == 0 && r.weight.is_none()),
        "{status:?}"
    );
    assert_eq!(marked_pids(&marker).len(), 2, "green stopped");
    assert_only_version_serves(&h, "1.0.0", 2, "/x", 50).await;

    // Asking again from a version that is not running changes nothing.
    let err = h
        .deployer
        .blue_green_deploy(SERVICE, BlueGreenOptions::new("2.0.0", "3.0.0"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeployError::VersionMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(h.deployer.status(SERVICE).await.unwrap().len(), 2);
    h.deployer.undeploy(SERVICE).await.unwrap();
    assert!(marked_pids(&marker).is_empty());
}
