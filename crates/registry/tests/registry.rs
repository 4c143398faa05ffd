//! The registry on a real SQLite file, with real HTTP health endpoints on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use trellis_registry::{Instance, InstanceStatus, RegistryError, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

fn fast() -> RegistryOptions {
    RegistryOptions {
        health_check_interval: Duration::from_millis(100),
        ttl: Duration::from_millis(800),
        refresh_interval: Duration::from_millis(20),
        ..Default::default()
    }
}

async fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&format!("sqlite://{}/registry.db", dir.path().display()))
        .await
        .unwrap()
}

/// Polls `check` every 10 ms until it holds or `limit` passes; returns the time it took.
async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_discover_filter_deregister() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    for (id, version, region) in [
        ("u1", "1.2.0", "us-east-1"),
        ("u2", "1.2.0", "eu-west-1"),
        ("u3", "1.3.0", "us-east-1"),
    ] {
        registry
            .register(
                "user-service",
                Instance::new(id, "127.0.0.1", 3001)
                    .version(version)
                    .metadata("region", region),
            )
            .await
            .unwrap();
    }
    let found = registry.discover("user-service");
    assert!(!found.is_stale());
    assert_eq!(
        found
            .iter()
            .map(|r| r.instance.id.as_str())
            .collect::<Vec<_>>(),
        ["u1", "u2", "u3"]
    );
    assert_eq!(found.with_version("1.2.0").count(), 2);
    assert_eq!(found.with_metadata("region", "us-east-1").count(), 2);
    assert!(
        found
            .iter()
            .all(|r| r.status == InstanceStatus::Unknown && r.expires_at_ms > 0)
    );
    assert_eq!(registry.services(), vec![("user-service".to_owned(), 3)]);
    assert!(registry.discover("nobody").is_empty());

    assert!(registry.deregister("user-service", "u2").await.unwrap());
    assert!(!registry.deregister("user-service", "u2").await.unwrap());
    assert_eq!(registry.discover("user-service").len(), 2);
    registry.shutdown().await.unwrap();
    let after = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    assert!(
        after.discover("user-service").is_empty(),
        "shutdown deregisters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    let cases = [
        ("", Instance::new("a", "h", 1), "service name is empty"),
        ("a/b", Instance::new("a", "h", 1), "contains '/'"),
        ("svc", Instance::new("a", "h", 0), "port"),
        (
            "svc",
            Instance::new("a", "h", 1).health_check("h", Duration::from_secs(5)),
            "health_check.endpoint",
        ),
    ];
    for (service, instance, needle) in cases {
        let err = registry.register(service, instance).await.unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    assert!(registry.services().is_empty(), "nothing stored");
    assert!(matches!(
        registry.heartbeat("svc", "nope"),
        Err(RegistryError::NotRegistered { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_discovers_and_sees_the_lease_lapse() {
    let dir = tempfile::tempdir().unwrap();
    // Two stores on one file: two connections, exactly as two processes would have.
    let a = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    let b = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    let mut watch = b.watch("order-service");
    assert!(
        watch.changed().await.unwrap().is_empty(),
        "first change is the current state"
    );
    a.register("order-service", Instance::new("o1", "127.0.0.1", 4000))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.to_vec()[0].instance.id, "o1");
    assert_eq!(b.discover("order-service").len(), 1);

    // Renewals keep it alive past several ttls.
    let keep = within(Duration::from_millis(2_000), || {
        b.discover("order-service").is_empty()
    })
    .await;
    assert!(keep.is_none(), "lease lapsed while its owner was alive");

    // The owner vanishes without deregistering (its tasks stop with it).
    drop(a);
    let gone = within(Duration::from_secs(5), || {
        b.discover("order-service").is_empty()
    })
    .await
    .expect("instance still discoverable 5 s after its owner died");
    let bound = fast().ttl + fast().health_check_interval + Duration::from_millis(200);
    assert!(gone <= bound, "vanished after {gone:?}, bound {bound:?}");
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(seen.is_empty(), "watch sees the expiry");
}

struct Upstream {
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    port: u16,
}

async fn upstream() -> Upstream {
    let healthy = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let (h, c) = (healthy.clone(), hits.clone());
    let app = Router::new().route(
        "/health",
        get(move || {
            let (h, c) = (h.clone(), c.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if h.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream {
        healthy,
        hits,
        port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_check_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    let up = upstream().await;
    registry
        .register(
            "inventory",
            Instance::new("i1", "127.0.0.1", up.port)
                .health_check("/health", Duration::from_millis(50)),
        )
        .await
        .unwrap();
    let status = || registry.discover("inventory").to_vec()[0].status;
    within(Duration::from_secs(5), || {
        status() == InstanceStatus::Healthy
    })
    .await
    .expect("healthy");

    up.healthy.store(false, Ordering::SeqCst);
    let before = up.hits.load(Ordering::SeqCst);
    within(Duration::from_secs(5), || {
        status() == InstanceStatus::Unhealthy
    })
    .await
    .expect("unhealthy");
    let failures = up.hits.load(Ordering::SeqCst) - before;
    assert!(
        failures >= 3,
        "turned unhealthy after {failures} failed checks; threshold is 3"
    );

    up.healthy.store(true, Ordering::SeqCst);
    let before = up.hits.load(Ordering::SeqCst);
    within(Duration::from_secs(5), || {
        status() == InstanceStatus::Healthy
    })
    .await
    .expect("recovers");
    let successes = up.hits.load(Ordering::SeqCst) - before;
    assert!(
        successes >= 2,
        "healthy again after {successes} checks; threshold is 2"
    );
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_monitors_set_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    let reg = registry
        .register("beats", Instance::new("b1", "127.0.0.1", 1))
        .await
        .unwrap();
    let status = |s: &str| registry.discover(s).to_vec()[0].status;
    assert_eq!(status("beats"), InstanceStatus::Unknown);
    reg.heartbeat().unwrap();
    within(Duration::from_secs(3), || {
        status("beats") == InstanceStatus::Healthy
    })
    .await
    .expect("heartbeat → healthy");
    within(Duration::from_secs(3), || {
        status("beats") == InstanceStatus::Unhealthy
    })
    .await
    .expect("no heartbeat for a ttl → unhealthy");

    let ok = Arc::new(AtomicBool::new(true));
    let flag = ok.clone();
    let monitor = trellis_health::ServiceHealthMonitor::builder("mon")
        .check(
            "flag",
            trellis_health::check_fn(move || {
                let flag = flag.clone();
                async move {
                    if flag.load(Ordering::SeqCst) {
                        Ok(())
                    } else {
                        Err("down".into())
                    }
                }
            }),
        )
        .cache_ttl(Duration::ZERO)
        .build();
    registry
        .register_with_monitor("mon", Instance::new("m1", "127.0.0.1", 2), monitor)
        .await
        .unwrap();
    within(Duration::from_secs(3), || {
        status("mon") == InstanceStatus::Healthy
    })
    .await
    .expect("monitor healthy");
    ok.store(false, Ordering::SeqCst);
    within(Duration::from_secs(3), || {
        status("mon") == InstanceStatus::Unhealthy
    })
    .await
    .expect("monitor unhealthy");
    assert!(reg.deregister().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_serves_a_stale_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let moved = dir.path().join("elsewhere.db");
    let a = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    let b = ServiceRegistry::start(&open(&dir).await, fast())
        .await
        .unwrap();
    a.register("pay", Instance::new("p1", "127.0.0.1", 5000))
        .await
        .unwrap();
    within(Duration::from_secs(3), || b.discover("pay").len() == 1)
        .await
        .unwrap();

    std::fs::rename(&path, &moved).unwrap();
    within(Duration::from_secs(3), || b.is_stale())
        .await
        .expect("outage noticed");
    // Long past the ttl, the last known instances are still served, marked stale.
    tokio::time::sleep(fast().ttl * 2).await;
    let found = b.discover("pay");
    assert!(found.is_stale());
    assert_eq!(found.len(), 1);
    let err = b
        .register("pay", Instance::new("p2", "127.0.0.1", 5001))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("registry.db"),
        "error names the file: {err}"
    );
    assert!(
        matches!(err, RegistryError::Store(ref e) if e.is_unavailable()),
        "{err}"
    );

    // The file comes back: both recover, the owner's lease renewals resume.
    std::fs::rename(&moved, &path).unwrap();
    within(Duration::from_secs(3), || !b.is_stale())
        .await
        .expect("recovered");
    within(Duration::from_secs(3), || b.discover("pay").len() == 1)
        .await
        .expect("instance back");
}

/// A lease write in flight when the instance is deregistered (or registered again with new
/// metadata) must not land afterwards and bring the old row back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_write_lands_after_deregister_or_reregister() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let registry = ServiceRegistry::start(&store, fast()).await.unwrap();
    for round in 0..40 {
        let id = format!("r{round}");
        let reg = registry
            .register("racy", Instance::new(&id, "127.0.0.1", 1))
            .await
            .unwrap();
        // Unknown → healthy: the woken lease loop writes at once, racing the calls below.
        reg.heartbeat().unwrap();
        registry
            .register(
                "racy",
                Instance::new(&id, "127.0.0.1", 1).metadata("weight", "7"),
            )
            .await
            .unwrap();
        registry.heartbeat("racy", &id).unwrap();
        assert!(registry.deregister("racy", &id).await.unwrap());
    }
    let weighted = registry
        .register(
            "racy",
            Instance::new("w", "127.0.0.1", 1).metadata("weight", "1"),
        )
        .await
        .unwrap();
    weighted.heartbeat().unwrap();
    registry
        .register(
            "racy",
            Instance::new("w", "127.0.0.1", 1).metadata("weight", "9"),
        )
        .await
        .unwrap();
    // Another process' view, read from the store: for a whole refresh period and more,
    // only `w` exists and it keeps the newest metadata.
    let other = ServiceRegistry::start(&store, fast()).await.unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(400) {
        other.refresh().await.unwrap();
        let seen = other.discover("racy").to_vec();
        assert_eq!(seen.len(), 1, "a deregistered instance came back: {seen:?}");
        assert_eq!(
            seen[0].instance.metadata.get("weight").map(String::as_str),
            Some("9")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    registry.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}
