#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![cfg(all(feature = "docker", feature = "local"))]
//! Blue-green on the docker platform against a real Engine API (podman's service): busybox
//! httpd containers (the image imported from a rootfs, nothing pulled), a real registry on a
//! SQLite file, a real gateway on 127.0.0.1 whose weighted route splits the traffic by the
//! instances' `weight` metadata and whose `/metrics` the analysis reads, and a bounded load
//! through the gateway. Skipped with a notice when the engine is not running, unless
//! `TRELLIS_REQUIRE_ENGINES=1`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::docker::{build_image, engine, socket};
use support::{
    Harness, SERVICE, assert_only_version_serves, assert_rolled_back_within, blue_green_under_load,
    eventually, fast_options,
};
use trellis_deploy::{
    Action, AnalysisOptions, BlueGreenOptions, DeploySpec, DeploymentRecords, DeploymentState,
    DockerBackend, DockerDeployer, DockerOptions, Outcome, Platform, ReplicaPhase,
};

const IMAGE: &str = "localhost/trellis-test/busybox-httpd:bg";

/// Not a test: the support module's child service (unused here, linked for the module).
#[test]
fn child_service() {
    support::child_main();
}

/// httpd on 8080 answering `/v` with `{version} ok` and `/health`; the service port is
/// `port` (8080 serves; any other port has nothing listening, so every request routed to
/// it fails).
fn spec(version: &str, replicas: i32, port: u16) -> DeploySpec {
    DeploySpec::from_toml(&format!(
        r#"
        image = "{IMAGE}"
        command = ["/bin/sh", "-c", "echo \"$VERSION ok\" > /www/v && exec /bin/busybox httpd -f -p 8080 -h /www"]
        replicas = {replicas}
        port = {port}
        [environment]
        VERSION = "{version}"
        [health_check]
        path = "/health"
        port = 8080
        "#
    ))
    .unwrap()
}

async fn harness() -> Harness {
    Harness::start_with(Platform::Docker, fast_options(), |registry| {
        let deployer = DockerDeployer::connect_unix(&socket())
            .unwrap()
            .with_registry(registry);
        let options = DockerOptions::new()
            .health_interval(Duration::from_secs(1))
            .ready_timeout(Duration::from_secs(60))
            .stop_timeout(Duration::from_secs(1))
            .drain(Duration::from_millis(500));
        Some(Arc::new(DockerBackend::new(deployer).options(options)))
    })
    .await
}

/// Deploys blue (2 replicas of 1.0.0) and waits until the gateway routes to it.
async fn blue(h: &Harness, service_port: u16) -> Vec<String> {
    let deployment = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &spec("1.0.0", 2, service_port))
        .await
        .unwrap();
    println!(
        "blue: 2 containers healthy and registered in {:?}",
        deployment.took
    );
    eventually(
        "blue answering through the gateway",
        Duration::from_secs(20),
        async || {
            let (code, body) = h.get("/v").await;
            (code == 200 && body.starts_with("1.0.0")).then_some(())
        },
    )
    .await;
    deployment
        .replicas
        .iter()
        .map(|r| r.instance_id.clone())
        .collect()
}

async fn container_ids(name: &str, version: &str) -> Vec<(String, String)> {
    DockerDeployer::connect_unix(&socket())
        .unwrap()
        .containers(name, Some(version))
        .await
        .unwrap()
}

/// The analysis of these tests: `window`, checked every 500 ms.
fn analysis(window: Duration) -> AnalysisOptions {
    support::analysis(window, Duration::from_millis(500))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_blue_green_promotes_a_healthy_green_and_rolls_back_a_failing_one() {
    if engine().await.is_none() {
        return;
    }
    build_image(IMAGE);
    let h = harness().await;
    // Leftovers of an interrupted earlier run of this test.
    let cleanup = DockerDeployer::connect_unix(&socket()).unwrap();
    cleanup.remove(SERVICE, None).await.unwrap();

    // ---- Promote: a healthy green gets 30%, is judged, then takes everything. ----
    let blue_ids = blue(&h, 8080).await;
    let options = BlueGreenOptions::new("1.0.0", "2.0.0")
        .spec(spec("2.0.0", 1, 8080))
        .traffic_split(70, 30)
        .analysis(analysis(Duration::from_secs(4)));
    let (report, load) = blue_green_under_load(&h, "docker promote", "/v", options).await;
    assert_eq!(report.outcome, Outcome::Promoted, "{:#?}", report.decisions);
    let actions: Vec<Action> = report.decisions.iter().map(|d| d.action).collect();
    assert_eq!(actions[..2], [Action::Start, Action::Split]);
    assert_eq!(actions.last(), Some(&Action::Promote));
    assert!(
        report.decisions[1].reason.contains("weight 7 on each of 2"),
        "{}",
        report.decisions[1].reason
    );
    assert!(
        report.decisions[1].reason.contains("weight 6 on each of 1"),
        "{}",
        report.decisions[1].reason
    );
    let promote = report.decisions.last().unwrap();
    assert!(
        promote.requests >= 20,
        "green judged on its traffic: {promote:?}"
    );
    assert_eq!(promote.errors, 0);
    // The gateway split by weight during the analysis: both versions answered the load.
    assert!(
        load.by_version.get("1.0.0").copied().unwrap_or(0) > 0,
        "{:?}",
        load.by_version
    );
    assert!(
        load.by_version.get("2.0.0").copied().unwrap_or(0) > 0,
        "{:?}",
        load.by_version
    );
    assert_eq!(load.failed, 0, "{:?}", load.failures);
    // Blue's containers are gone, deregistered; green alone, its weight removed.
    assert!(container_ids(SERVICE, "1.0.0").await.is_empty());
    for id in &blue_ids {
        assert!(
            h.registry
                .discover(SERVICE)
                .iter()
                .all(|r| &r.instance.id != id)
        );
    }
    let green = h.deployer.status(SERVICE).await.unwrap();
    assert_eq!(green.len(), 1, "{green:?}");
    assert!(
        green
            .iter()
            .all(|r| r.version == "2.0.0" && r.phase == ReplicaPhase::Running)
    );
    eventually(
        "only green, unweighted, in the gateway's registry",
        Duration::from_secs(5),
        async || {
            let found = h.gateway_registry.discover(SERVICE);
            (found.len() == 1
                && found.iter().all(|r| {
                    r.instance.version == "2.0.0" && !r.instance.metadata.contains_key("weight")
                }))
            .then_some(())
        },
    )
    .await;
    let records = DeploymentRecords::new(h.registry_store().await);
    let record = records.get("test", SERVICE).await.unwrap().unwrap();
    assert_eq!(record.state, DeploymentState::Promoted);
    assert_eq!(record.platform, Platform::Docker);
    assert_eq!(record.decisions.len(), report.decisions.len());
    h.deployer.undeploy(SERVICE).await.unwrap();
    assert!(container_ids(SERVICE, "2.0.0").await.is_empty());

    // ---- Rollback: green's service port has nothing listening, so its answers fail. ----
    let blue_ids = blue(&h, 8080).await;
    let blue_before = container_ids(SERVICE, "1.0.0").await;
    assert_eq!(blue_before.len(), 2);
    let window = Duration::from_secs(15);
    let options = BlueGreenOptions::new("1.0.0", "2.0.0")
        .spec(spec("2.0.0", 1, 8081))
        .traffic_split(50, 50)
        .analysis(analysis(window));
    let (report, _load) = blue_green_under_load(&h, "docker rollback", "/v", options).await;
    assert_rolled_back_within(&report, window);
    assert!(
        report.green_ready_after.is_some(),
        "green started and was judged"
    );
    // Blue never touched: the same containers, running, not restarted, unweighted again.
    assert_eq!(container_ids(SERVICE, "1.0.0").await, blue_before);
    assert!(
        container_ids(SERVICE, "2.0.0").await.is_empty(),
        "green removed"
    );
    let status = h.deployer.status(SERVICE).await.unwrap();
    let ids: Vec<String> = status.iter().map(|r| r.instance_id.clone()).collect();
    assert_eq!(ids, blue_ids);
    assert!(
        status
            .iter()
            .all(|r| r.version == "1.0.0" && r.phase == ReplicaPhase::Running && r.restarts == 0),
        "{status:?}"
    );
    assert_only_version_serves(&h, "1.0.0", 2, "/v", 20).await;
    let record = records.get("test", SERVICE).await.unwrap().unwrap();
    assert_eq!(record.state, DeploymentState::RolledBack);
    assert_eq!(record.traffic.len(), 1);
    assert_eq!(record.traffic[0].version, "1.0.0");
    h.deployer.undeploy(SERVICE).await.unwrap();
    assert!(container_ids(SERVICE, "1.0.0").await.is_empty());
}
