#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![cfg(all(feature = "docker", feature = "local"))]
//! Blue-green on the docker platform against a real Engine API (podman's service): busybox
//! httpd containers (the image imported from a rootfs, nothing pulled), a real registry on a
//! SQLite file, a real gateway on 127.0.0.1 whose weighted route splits the traffic by the
//! instances' `weight` metadata and whose `/metrics` the analysis reads, and a bounded load
//! through the gateway. Skipped with a notice when the engine is not running, unless
//! `TRELLIS_REQUIRE_ENGINES=1`.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Harness, SERVICE, eventually, fast_options, spawn_load};
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

fn services_home() -> PathBuf {
    std::env::var_os("TRELLIS_SERVICES_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.services"))
}

fn socket() -> String {
    std::env::var_os("TRELLIS_DOCKER_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| services_home().join("podman/podman.sock"))
        .to_string_lossy()
        .into_owned()
}

fn required() -> bool {
    std::env::var("TRELLIS_REQUIRE_ENGINES").is_ok_and(|v| v == "1")
}

/// Whether the engine answers; a notice (or a failure when required) when not.
async fn engine_up() -> bool {
    let why = match DockerDeployer::connect_unix(&socket()) {
        Ok(deployer) => match deployer.ping().await {
            Ok(()) => return true,
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    assert!(
        !required(),
        "the podman API service is required (TRELLIS_REQUIRE_ENGINES=1) but: {why}; \
         start it with scripts/services up podman"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: no Docker Engine API ({why}); start it with scripts/services up podman"
    );
    false
}

static IMAGE_BUILT: Mutex<bool> = Mutex::new(false);

/// Imports the busybox image once per test binary: `sh`, `wget`, `httpd` and a `/health`
/// file.
fn build_image() {
    let mut built = IMAGE_BUILT.lock().unwrap();
    if *built {
        return;
    }
    let busybox = PathBuf::from("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: scripts/services up podman installs busybox-static"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "wget", "httpd"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/health"), "ok\n").unwrap();
    let tar = dir.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar failed");
    let output = Command::new("podman")
        .env(
            "CONTAINERS_CONF",
            services_home().join("podman/containers.conf"),
        )
        .arg("import")
        .arg("--change")
        .arg("ENV PATH=/bin")
        .arg(&tar)
        .arg(IMAGE)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "podman import failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    *built = true;
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

fn analysis(window: Duration) -> AnalysisOptions {
    AnalysisOptions {
        window,
        interval: Duration::from_millis(500),
        max_error_rate: 0.01,
        max_p99_latency: Duration::from_millis(500),
        min_requests: 20,
    }
}

fn print_decisions(report: &trellis_deploy::BlueGreenReport) {
    for d in &report.decisions {
        println!(
            "  {:?} {} requests={} errors={} error_rate={:?} p99={:?}: {}",
            d.action, d.version, d.requests, d.errors, d.error_rate, d.p99, d.reason
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_blue_green_promotes_a_healthy_green_and_rolls_back_a_failing_one() {
    if !engine_up().await {
        return;
    }
    build_image();
    let h = harness().await;
    // Leftovers of an interrupted earlier run of this test.
    let cleanup = DockerDeployer::connect_unix(&socket()).unwrap();
    cleanup.remove(SERVICE, None).await.unwrap();

    // ---- Promote: a healthy green gets 30%, is judged, then takes everything. ----
    let blue_ids = blue(&h, 8080).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(h.url("/v"), stop.clone(), 50_000, Duration::from_secs(90));
    let options = BlueGreenOptions::new("1.0.0", "2.0.0")
        .spec(spec("2.0.0", 1, 8080))
        .traffic_split(70, 30)
        .analysis(analysis(Duration::from_secs(4)));
    let report = h
        .deployer
        .blue_green_deploy(SERVICE, options)
        .await
        .unwrap();
    eventually(
        "green alone behind the gateway",
        Duration::from_secs(10),
        async || {
            let (code, body) = h.get("/v").await;
            (code == 200 && body.starts_with("2.0.0")).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let load = load.await.unwrap();
    println!(
        "docker promote: green ready after {:?}, analysis {:?}, switch {:?}; load {} sent, {} ok, {} failed, by version {:?}",
        report.green_ready_after,
        report.analysis_took,
        report.switch_took,
        load.sent,
        load.ok,
        load.failed,
        load.by_version
    );
    print_decisions(&report);
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
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(h.url("/v"), stop.clone(), 50_000, Duration::from_secs(90));
    let window = Duration::from_secs(15);
    let options = BlueGreenOptions::new("1.0.0", "2.0.0")
        .spec(spec("2.0.0", 1, 8081))
        .traffic_split(50, 50)
        .analysis(analysis(window));
    let report = h
        .deployer
        .blue_green_deploy(SERVICE, options)
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let load = load.await.unwrap();
    println!(
        "docker rollback: green ready after {:?}, analysis {:?}, switch {:?}; load {} sent, {} ok, {} failed",
        report.green_ready_after,
        report.analysis_took,
        report.switch_took,
        load.sent,
        load.ok,
        load.failed
    );
    print_decisions(&report);
    assert_eq!(
        report.outcome,
        Outcome::RolledBack,
        "{:#?}",
        report.decisions
    );
    assert!(
        report.analysis_took < window,
        "rolled back within the window: {:?}",
        report.analysis_took
    );
    let rollback = report.decisions.last().unwrap();
    assert_eq!(rollback.action, Action::Rollback);
    assert!(rollback.errors > 0, "{rollback:?}");
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
    eventually(
        "only blue, unweighted, in the gateway's registry",
        Duration::from_secs(5),
        async || {
            let found = h.gateway_registry.discover(SERVICE);
            (found.len() == 2
                && found.iter().all(|r| {
                    r.instance.version == "1.0.0" && !r.instance.metadata.contains_key("weight")
                }))
            .then_some(())
        },
    )
    .await;
    for _ in 0..20 {
        let (code, body) = h.get("/v").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("1.0.0"), "{body}");
    }
    let record = records.get("test", SERVICE).await.unwrap().unwrap();
    assert_eq!(record.state, DeploymentState::RolledBack);
    assert_eq!(record.traffic.len(), 1);
    assert_eq!(record.traffic[0].version, "1.0.0");
    h.deployer.undeploy(SERVICE).await.unwrap();
    assert!(container_ids(SERVICE, "1.0.0").await.is_empty());
}
