//! The Cassandra node stops in the middle of a registry and config workload: discovery keeps
//! answering from the snapshot (stale), writes fail with an error naming the host, and all
//! resumes once the node is back, with no config version lost.
//!
//! This restarts the node through `scripts/services`, so it runs only when the node is the
//! one `scripts/services` manages and `TRELLIS_REQUIRE_ENGINES=1` (the project's test
//! command); otherwise it prints a notice and passes. Its own test binary, so that no other
//! test runs while the node is down.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use trellis_config::{ConfigOptions, ConfigurationManager};
use trellis_registry::{Instance, RegistryError, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

const URL: &str = "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn services(action: &str) {
    let out = tokio::process::Command::new(repo().join("scripts/services"))
        .args([action, "cassandra"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/services {action} cassandra failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stopped_during_a_registry_workload() {
    let required = std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() == Ok("1");
    let url = std::env::var("TRELLIS_CASSANDRA_URL").unwrap_or_else(|_| URL.to_owned());
    let home = std::env::var("TRELLIS_SERVICES_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join(".services"));
    if !required || url != URL || !home.join("cassandra.pid").exists() {
        eprintln!(
            "SKIPPED: this test stops and restarts the node; it runs with \
             TRELLIS_REQUIRE_ENGINES=1 against the node of scripts/services up cassandra"
        );
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let service = format!("pay-{nanos:x}");
    let options = RegistryOptions {
        health_check_interval: Duration::from_millis(500),
        // Longer than the outage, so the lease survives it.
        ttl: Duration::from_secs(120),
        refresh_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let store_a = Store::open(&url).await.unwrap();
    let store_b = Store::open(&url).await.unwrap();
    let a = ServiceRegistry::start(&store_a, options.clone())
        .await
        .unwrap();
    let b = ServiceRegistry::start(&store_b, options).await.unwrap();
    let config =
        ConfigurationManager::new(&store_a, ConfigOptions::for_environment("test")).unwrap();
    a.register(&service, Instance::new("p1", "127.0.0.1", 5000))
        .await
        .unwrap();
    assert_eq!(
        config
            .set_config(&service, "test", json!({"limit": 1}))
            .await
            .unwrap()
            .version,
        1
    );
    within(Duration::from_secs(10), || b.discover(&service).len() == 1)
        .await
        .expect("discovered before the outage");

    services("down").await;
    let (b2, config2, service2) = (b.clone(), config.clone(), service.clone());
    let outage = async move {
        let (b, config, service) = (b2, config2, service2);
        within(Duration::from_secs(30), || b.is_stale())
            .await
            .expect("the outage is noticed");
        let found = b.discover(&service);
        assert!(found.is_stale());
        assert_eq!(found.len(), 1, "the snapshot keeps answering");
        let err = b
            .register(&service, Instance::new("p2", "127.0.0.1", 5001))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Store(ref e) if e.is_unavailable()),
            "{err}"
        );
        assert!(
            err.to_string().contains("127.0.0.1:9042"),
            "names the host: {err}"
        );
        let err = config
            .set_config(&service, "test", json!({"limit": 2}))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
    };
    // Whatever happens, the node comes back for the tests after this one.
    let during = tokio::spawn(outage).await;
    services("up").await;
    if let Err(panic) = during {
        std::panic::resume_unwind(panic.into_panic());
    }

    within(Duration::from_secs(90), || !b.is_stale())
        .await
        .expect("the registry recovers once the node is back");
    assert_eq!(b.discover(&service).len(), 1);
    // Writes work again and no config version was lost.
    let deadline = Instant::now() + Duration::from_secs(60);
    let v2 = loop {
        match config
            .set_config(&service, "test", json!({"limit": 2}))
            .await
        {
            Ok(v) => break v,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("config write after recovery: {e}"),
        }
    };
    assert_eq!(v2.version, 2);
    let history: Vec<u64> = config
        .history(&service, "test")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(history, [1, 2]);
    a.register(&service, Instance::new("p2", "127.0.0.1", 5001))
        .await
        .unwrap();
    within(Duration::from_secs(10), || b.discover(&service).len() == 2)
        .await
        .expect("registrations resume");
}
