//! Shared parts of the deploy integration tests: the child "service" (this test binary run
//! again), a real registry on a temp SQLite file, a real gateway with a weighted route and
//! its `/metrics`, and a bounded load loop.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use trellis_deploy::{
    Action, AnalysisOptions, BlueGreenOptions, BlueGreenReport, Decision, DeploySpec, HealthCheck,
    LocalOptions, Outcome, Platform, PlatformBackend, PrometheusScrape, ServiceDeployer,
};
use trellis_gateway::{
    ApiGateway, GatewayConfig, GatewayMetrics, LoadBalancer, RouteConfig, RunningGateway,
};
use trellis_registry::{RegistryOptions, ServiceRegistry};
use trellis_store::Store;

#[cfg(feature = "docker")]
pub mod docker;

/// Set in the environment of a child: run the service instead of returning.
pub const CHILD_ENV: &str = "TRELLIS_DEPLOY_TEST_CHILD";
/// A marker put in every child's environment, to find stray processes.
pub const MARKER_ENV: &str = "TRELLIS_DEPLOY_TEST_MARKER";

/// The body of the `child_service` test fn: returns at once unless this process is a child;
/// then serves `GET /health` (always 200) and everything else with `VERSION INSTANCE_ID`
/// (500 when `FAIL=1`) on 127.0.0.1:$PORT until killed.
pub fn child_main() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let version = std::env::var("VERSION").unwrap_or_default();
    let instance = std::env::var("TRELLIS_INSTANCE_ID").unwrap_or_default();
    let fail = std::env::var("FAIL").is_ok_and(|v| v == "1");
    let body = format!("{version} {instance}");
    let ignore_term = std::env::var("IGNORE_TERM").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        use axum::http::StatusCode;
        if ignore_term {
            // A stubborn service: SIGTERM is caught and ignored.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::spawn(async move { while term.recv().await.is_some() {} });
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .fallback(move || {
                let body = body.clone();
                async move {
                    let status = if fail {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    };
                    (status, body)
                }
            });
        axum::serve(listener, app).await.unwrap();
    });
}

/// A spec running this test binary's `test_fn` as the service.
pub fn child_spec(
    test_fn: &str,
    version: &str,
    replicas: i32,
    fail: bool,
    marker: &str,
) -> DeploySpec {
    let exe = std::env::current_exe().unwrap().display().to_string();
    // A free base port: replicas get base + index when free.
    let base = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut environment = BTreeMap::new();
    environment.insert(CHILD_ENV.to_owned(), "1".to_owned());
    environment.insert(MARKER_ENV.to_owned(), marker.to_owned());
    environment.insert("VERSION".to_owned(), version.to_owned());
    environment.insert("FAIL".to_owned(), if fail { "1" } else { "0" }.to_owned());
    DeploySpec {
        command: Some(vec![
            exe,
            "--exact".into(),
            test_fn.into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ]),
        replicas,
        environment,
        health_check: Some(HealthCheck {
            path: "/health".into(),
            port: i32::from(base),
            liveness_path: None,
            readiness_path: None,
        }),
        ..DeploySpec::default()
    }
}

/// Pids of live processes whose environment holds `MARKER_ENV=marker`.
pub fn marked_pids(marker: &str) -> Vec<u32> {
    let needle = format!("{MARKER_ENV}={marker}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if !alive(pid) {
            continue;
        }
        if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ"))
            && environ.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

/// True when `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start())
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `limit`.
pub async fn eventually<T>(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registry, a deployer, a gateway (with its own registry on the same file, as another
/// process would have) and the gateway's `/metrics`.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub registry: ServiceRegistry,
    pub gateway_registry: ServiceRegistry,
    pub deployer: ServiceDeployer,
    pub gateway: RunningGateway,
    pub metrics_url: String,
    pub http: reqwest::Client,
}

pub const SERVICE: &str = "echo";

fn registry_options() -> RegistryOptions {
    RegistryOptions {
        refresh_interval: Duration::from_millis(50),
        health_check_interval: Duration::from_millis(200),
        ..RegistryOptions::default()
    }
}

impl Harness {
    pub async fn start(local: LocalOptions) -> Harness {
        Self::start_with(Platform::Local, local, |_| None).await
    }

    /// A harness whose deployer runs on `platform`, with the backend `backend` makes from
    /// the deployer's registry.
    pub async fn start_with(
        platform: Platform,
        local: LocalOptions,
        backend: impl FnOnce(ServiceRegistry) -> Option<Arc<dyn PlatformBackend>>,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        let store = Store::open(&url).await.unwrap();
        let registry = ServiceRegistry::start(&store, registry_options())
            .await
            .unwrap();
        let gateway_store = Store::open(&url).await.unwrap();
        let gateway_registry = ServiceRegistry::start(&gateway_store, registry_options())
            .await
            .unwrap();

        let mut metrics_registry = Registry::default();
        let metrics = GatewayMetrics::new(&mut metrics_registry);
        let metrics_registry = Arc::new(Mutex::new(metrics_registry));
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = metrics_registry.clone();
                async move {
                    let mut out = String::new();
                    prometheus_client::encoding::text::encode(&mut out, &registry.lock().unwrap())
                        .unwrap();
                    out
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let mut config = GatewayConfig {
            listen: "127.0.0.1:0".into(),
            ..GatewayConfig::default()
        };
        let mut route = RouteConfig::new("/api/*", SERVICE).strip_prefix("/api");
        route.load_balancer = Some(LoadBalancer::Weighted);
        config.routes.push(route);
        let gateway = ApiGateway::new(config, gateway_registry.clone())
            .unwrap()
            .with_metrics(metrics)
            .start()
            .await
            .unwrap();

        let mut builder = ServiceDeployer::builder(platform, registry.clone());
        if let Some(backend) = backend(registry.clone()) {
            builder = builder.backend(backend);
        }
        let deployer = builder
            .namespace("test")
            .local_options(local)
            .metrics(PrometheusScrape::new(metrics_url.clone()).unwrap())
            .store(store.clone())
            .build()
            .unwrap();
        Harness {
            dir,
            registry,
            gateway_registry,
            deployer,
            gateway,
            metrics_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        }
    }

    /// A second store on the harness' SQLite file, as another process would open it.
    pub async fn registry_store(&self) -> Store {
        Store::open(&format!(
            "sqlite://{}/registry.db",
            self.dir.path().display()
        ))
        .await
        .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api{path}", self.gateway.local_addr())
    }

    /// One GET through the gateway: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(self.url(path)).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }
}

/// Fast local options for tests.
pub fn fast_options() -> LocalOptions {
    LocalOptions {
        health_check_interval: Duration::from_millis(200),
        startup_timeout: Duration::from_secs(20),
        stop_grace: Duration::from_secs(3),
        drain: Duration::from_millis(600),
        backoff_initial: Duration::from_millis(300),
        backoff_max: Duration::from_secs(5),
        backoff_reset_after: Duration::from_secs(20),
    }
}

/// What a load loop saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub by_version: BTreeMap<String, u64>,
    pub failures: Vec<String>,
}

/// Sends GETs through the gateway one after another until `stop` is set, `max_requests`
/// were sent or `max_time` passed.
pub fn spawn_load(
    url: String,
    stop: Arc<AtomicBool>,
    max_requests: u64,
    max_time: Duration,
) -> tokio::task::JoinHandle<LoadReport> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = Instant::now() + max_time;
        let mut report = LoadReport::default();
        while !stop.load(Ordering::Relaxed)
            && report.sent < max_requests
            && Instant::now() < deadline
        {
            report.sent += 1;
            match client.get(&url).send().await {
                Ok(response) if response.status().is_success() => {
                    report.ok += 1;
                    let body = response.text().await.unwrap_or_default();
                    let version = body.split(' ').next().unwrap_or_default().to_owned();
                    *report.by_version.entry(version).or_default() += 1;
                }
                Ok(response) => {
                    report.failed += 1;
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    if report.failures.len() < 20 {
                        report.failures.push(format!("{status}: {body}"));
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    if report.failures.len() < 20 {
                        report.failures.push(e.to_string());
                    }
                }
            }
            // A constant, modest rate: ~500 requests a second at most.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        report
    })
}

/// The analysis the blue-green tests run: `window`, checked every `interval`, at most 1%
/// errors and 500 ms p99 over at least 20 requests.
pub fn analysis(window: Duration, interval: Duration) -> AnalysisOptions {
    AnalysisOptions {
        window,
        interval,
        max_error_rate: 0.01,
        max_p99_latency: Duration::from_millis(500),
        min_requests: 20,
    }
}

/// Runs the blue-green deployment of [`SERVICE`] with `options` while a bounded load (at
/// most 50 000 requests, 90 s) goes through the gateway to `path`; when green is promoted,
/// the load goes on until `path` answers from green. Prints the report as `label`.
pub async fn blue_green_under_load(
    h: &Harness,
    label: &str,
    path: &str,
    options: BlueGreenOptions,
) -> (BlueGreenReport, LoadReport) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(h.url(path), stop.clone(), 50_000, Duration::from_secs(90));
    let green = options.new_version.clone();
    let report = h
        .deployer
        .blue_green_deploy(SERVICE, options)
        .await
        .unwrap();
    if report.outcome == Outcome::Promoted {
        eventually(
            "green answering after the switch",
            Duration::from_secs(10),
            async || {
                let (code, body) = h.get(path).await;
                (code == 200 && body.starts_with(green.as_str())).then_some(())
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let load = load.await.unwrap();
    print_report(label, &report, &load);
    (report, load)
}

/// Prints what a blue-green deployment under load took, the load's figures and every
/// decision with its figures.
pub fn print_report(label: &str, report: &BlueGreenReport, load: &LoadReport) {
    println!(
        "{label}: green ready after {:?}, analysis {:?}, switch (deregister, drain, retire the loser) {:?}; load {} sent, {} ok, {} failed, by version {:?}",
        report.green_ready_after,
        report.analysis_took,
        report.switch_took,
        load.sent,
        load.ok,
        load.failed,
        load.by_version
    );
    for d in &report.decisions {
        println!(
            "  {:?} {} requests={} errors={} error_rate={:?} p99={:?}: {}",
            d.action, d.version, d.requests, d.errors, d.error_rate, d.p99, d.reason
        );
    }
}

/// Waits until the gateway's registry holds exactly `replicas` instances of [`SERVICE`], all
/// of `version` and without `weight` metadata, then asserts that `requests` GETs of `path`
/// through the gateway are all answered by `version`.
pub async fn assert_only_version_serves(
    h: &Harness,
    version: &str,
    replicas: usize,
    path: &str,
    requests: usize,
) {
    eventually(
        "only one version, unweighted, in the gateway's registry",
        Duration::from_secs(5),
        async || {
            let found = h.gateway_registry.discover(SERVICE);
            (found.len() == replicas
                && found.iter().all(|r| {
                    r.instance.version == version && !r.instance.metadata.contains_key("weight")
                }))
            .then_some(())
        },
    )
    .await;
    for _ in 0..requests {
        let (code, body) = h.get(path).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with(version), "{body}");
    }
}

/// Asserts that green was rolled back on its errors before the end of `window`; returns the
/// rollback decision.
pub fn assert_rolled_back_within(report: &BlueGreenReport, window: Duration) -> &Decision {
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
    rollback
}
