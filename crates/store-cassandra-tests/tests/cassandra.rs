//! The registry, the configuration manager and typed models on a real Cassandra node: the
//! same calls as on SQLite, only the store URL differs.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use trellis_config::{ConfigOptions, ConfigWatch, ConfigurationManager};
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::{Key, Model, Models, Store};

const DEFAULT_URL: &str = "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test";
/// Upper bound for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(20);

/// Opens the store, or returns `None` (after a notice) when no node runs and none is
/// required.
async fn open() -> Option<Store> {
    let url = std::env::var("TRELLIS_CASSANDRA_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    match Store::open(&url).await {
        Ok(store) => Some(store),
        Err(e) if e.is_unavailable() => {
            if std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() == Ok("1") {
                panic!(
                    "Cassandra is required (TRELLIS_REQUIRE_ENGINES=1) but unreachable: {e}; \
                     start it with scripts/services up cassandra"
                );
            }
            eprintln!(
                "SKIPPED: no Cassandra node ({e}); start it with scripts/services up cassandra"
            );
            None
        }
        Err(e) => panic!("cannot open {url}: {e}"),
    }
}

/// A name unique to this run, so that runs sharing the keyspace never meet.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{nanos:x}")
}

/// Polls `check` every 20 ms until it holds or `limit` passes; returns the time it took.
async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn registry_options() -> RegistryOptions {
    RegistryOptions {
        health_check_interval: Duration::from_millis(200),
        ttl: Duration::from_secs(2),
        refresh_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_registers_discovers_and_expires_a_silent_instance() {
    let Some(store_a) = open().await else { return };
    let store_b = open().await.unwrap();
    let service = unique("orders");
    // Two registries on two sessions, as two processes would have.
    let a = ServiceRegistry::start(&store_a, registry_options())
        .await
        .unwrap();
    let b = ServiceRegistry::start(&store_b, registry_options())
        .await
        .unwrap();
    for (id, version) in [("o1", "1.0.0"), ("o2", "1.1.0")] {
        a.register(
            &service,
            Instance::new(id, "127.0.0.1", 4000).version(version),
        )
        .await
        .unwrap();
    }
    within(DEADLINE, || b.discover(&service).len() == 2)
        .await
        .expect("the other registry discovers both instances");
    let found = b.discover(&service);
    assert!(!found.is_stale());
    let mut ids: Vec<String> = found.iter().map(|r| r.instance.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["o1", "o2"]);
    assert_eq!(found.with_version("1.1.0").count(), 1);

    // Leases are renewed while the owner lives: nothing lapses over several TTLs.
    let lapsed = within(Duration::from_secs(5), || b.discover(&service).len() != 2).await;
    assert!(lapsed.is_none(), "a lease lapsed while its owner was alive");

    // Deregistering is seen by the other registry.
    assert!(a.deregister(&service, "o2").await.unwrap());
    within(DEADLINE, || b.discover(&service).len() == 1)
        .await
        .expect("deregistration seen");

    // The owner stops heartbeating (its renewal tasks die with it): the instance expires
    // through Cassandra's native TTL.
    drop(a);
    let gone = within(DEADLINE, || b.discover(&service).is_empty())
        .await
        .expect("a silent instance must expire");
    // TTL 2 s, rounded up to whole seconds plus one by the backend, plus a refresh.
    assert!(
        gone <= Duration::from_secs(6),
        "expired only after {gone:?}"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_get_set_watch_rollback() {
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Cache {
        enabled: bool,
        ttl: u64,
        max_size: u64,
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct ServiceConfig {
        consistency: String,
        cache: Cache,
    }
    let defaults = ServiceConfig {
        consistency: "QUORUM".into(),
        cache: Cache {
            enabled: true,
            ttl: 3600,
            max_size: 10_000,
        },
    };
    let Some(store) = open().await else { return };
    let other_store = open().await.unwrap();
    let service = unique("user-service");
    let options = ConfigOptions {
        refresh_interval: Duration::from_millis(100),
        ..ConfigOptions::for_environment("test")
    };
    let writer = ConfigurationManager::new(&store, options.clone()).unwrap();
    let reader = ConfigurationManager::new(&other_store, options).unwrap();

    // Nothing stored: the defaults.
    assert_eq!(
        reader.get_config(&service, defaults.clone()).await.unwrap(),
        defaults
    );
    let mut watch: ConfigWatch = reader.watch_in(&service, "test", Some(0));

    let v1 = writer
        .set_config(&service, "test", json!({"cache": {"ttl": 60}}))
        .await
        .unwrap();
    let v2 = writer
        .set_config(&service, "test", json!({"consistency": "ONE"}))
        .await
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    let config = reader.get_config(&service, defaults.clone()).await.unwrap();
    assert_eq!(config.consistency, "ONE");
    assert_eq!(config.cache.ttl, 3600, "v2 replaced the document of v1");

    // The other manager's watch sees every version, in order.
    for expected in 1..=2 {
        let seen = tokio::time::timeout(DEADLINE, watch.next())
            .await
            .expect("watch delivers before the deadline")
            .unwrap();
        assert_eq!(seen.version, expected);
    }

    // Rollback: a new version with the old document; history keeps everything.
    let v3 = writer.rollback(&service, "test", 1).await.unwrap();
    assert_eq!((v3.version, v3.rolled_back_from), (3, Some(1)));
    let config = reader.get_config(&service, defaults.clone()).await.unwrap();
    assert_eq!(
        (config.consistency.as_str(), config.cache.ttl),
        ("QUORUM", 60)
    );
    let seen = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("watch sees the rollback")
        .unwrap();
    assert_eq!((seen.version, seen.rolled_back_from), (3, Some(1)));
    let history: Vec<u64> = reader
        .history(&service, "test")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(history, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_config_writers_get_distinct_gapless_versions() {
    let Some(store) = open().await else { return };
    let service = unique("busy");
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = open().await.unwrap();
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            let manager =
                ConfigurationManager::new(&store, ConfigOptions::for_environment("test")).unwrap();
            let mut mine = Vec::new();
            for i in 0..5 {
                let v = manager
                    .set_config(&service, "test", json!({"writer": w, "i": i}))
                    .await
                    .unwrap();
                mine.push(v.version);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=20).collect::<Vec<u64>>(),
        "no version lost or repeated"
    );
    let manager =
        ConfigurationManager::new(&store, ConfigOptions::for_environment("test")).unwrap();
    assert_eq!(manager.history(&service, "test").await.unwrap().len(), 20);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserProfile {
    user_id: String,
    email: String,
    logins: u32,
}

impl Model for UserProfile {
    const TABLE: &'static str = "user_profiles";
    fn key(&self) -> Key {
        Key::partition(&self.user_id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_models_create_find_update() {
    let Some(store) = open().await else { return };
    let users: Models<UserProfile> = Models::new(&store).unwrap();
    let id = unique("u");
    let created = users
        .create(&UserProfile {
            user_id: id.clone(),
            email: "a@example.com".into(),
            logins: 0,
        })
        .await
        .unwrap();
    assert_eq!(created.version, 1);
    let again = users
        .create(&UserProfile {
            user_id: id.clone(),
            email: "b@example.com".into(),
            logins: 0,
        })
        .await;
    assert!(
        again.is_err(),
        "a second create of the same key is a conflict"
    );

    let key = Key::partition(&id);
    let found = users.find_one(&key).await.unwrap().unwrap();
    assert_eq!(found.value.email, "a@example.com");

    // Eight concurrent updates through optimistic concurrency: none lost.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let users = users.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            users
                .update(&key, |u| u.logins += 1)
                .await
                .unwrap()
                .unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let updated = users.find_one(&key).await.unwrap().unwrap();
    assert_eq!(updated.value.logins, 8);
    assert_eq!(updated.version, 9);
    assert!(
        users
            .find_one(&Key::partition(unique("nobody")))
            .await
            .unwrap()
            .is_none()
    );
}
