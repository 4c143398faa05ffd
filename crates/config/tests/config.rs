//! The configuration manager on a real SQLite file: typed reads with defaults, validation,
//! history and rollback, optimistic and concurrent writes, and watching in one process.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tempfile::TempDir;
use trellis_config::{
    ConfigError, ConfigOptions, ConfigVersion, ConfigWatch, ConfigurationManager,
};
use trellis_store::Store;

/// Upper bound for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(20);

const SERVICE: &str = "user-service";
const ENV: &str = "test";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Database {
    hosts: Vec<String>,
    keyspace: String,
    consistency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Cache {
    enabled: bool,
    ttl: u64,
    max_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Features {
    email_verification: bool,
    social_login: bool,
}

/// The seed's `user-service` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserServiceConfig {
    database: Database,
    cache: Cache,
    features: Features,
}

fn defaults() -> UserServiceConfig {
    UserServiceConfig {
        database: Database {
            hosts: vec!["cassandra1".into(), "cassandra2".into()],
            keyspace: "users".into(),
            consistency: "QUORUM".into(),
        },
        cache: Cache {
            enabled: true,
            ttl: 3600,
            max_size: 10_000,
        },
        features: Features {
            email_verification: true,
            social_login: false,
        },
    }
}

async fn open(dir: &TempDir) -> Store {
    Store::open(&format!("sqlite://{}/c.db", dir.path().display()))
        .await
        .unwrap()
}

fn options() -> ConfigOptions {
    ConfigOptions {
        refresh_interval: Duration::from_millis(50),
        ..ConfigOptions::for_environment(ENV)
    }
}

async fn manager() -> (TempDir, ConfigurationManager) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let manager = ConfigurationManager::new(&store, options()).unwrap();
    (dir, manager)
}

async fn next(watch: &mut ConfigWatch) -> ConfigVersion {
    tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("no version before the deadline")
        .unwrap()
}

fn versions(history: &[ConfigVersion]) -> Vec<u64> {
    history.iter().map(|v| v.version).collect()
}

#[tokio::test]
async fn typed_get_merges_the_stored_document_over_defaults() {
    let (_dir, manager) = manager().await;
    assert_eq!(manager.environment(), ENV);

    // Nothing stored: the defaults, unchanged.
    let config = manager.get_config(SERVICE, defaults()).await.unwrap();
    assert_eq!(config, defaults());
    assert_eq!(manager.current(SERVICE, ENV).await.unwrap(), None);

    // A partial document: nested fields it leaves out keep their defaults.
    let stored = manager
        .set_config(
            SERVICE,
            ENV,
            json!({"cache": {"ttl": 60}, "features": {"socialLogin": true}}),
        )
        .await
        .unwrap();
    assert_eq!(stored.version, 1);
    assert_eq!(stored.rolled_back_from, None);
    let config = manager.get_config(SERVICE, defaults()).await.unwrap();
    let mut expected = defaults();
    expected.cache.ttl = 60;
    expected.features.social_login = true;
    assert_eq!(config, expected);

    // Other environments are separate; get_config_in reads them.
    let staging = manager
        .get_config_in(SERVICE, "staging", defaults())
        .await
        .unwrap();
    assert_eq!(staging, defaults());
    manager
        .set_config(
            SERVICE,
            "staging",
            json!({"database": {"keyspace": "stage"}}),
        )
        .await
        .unwrap();
    let staging = manager
        .get_config_in(SERVICE, "staging", defaults())
        .await
        .unwrap();
    assert_eq!(staging.database.keyspace, "stage");
    assert_eq!(staging.database.hosts, defaults().database.hosts);
    assert_eq!(
        manager.get_config(SERVICE, defaults()).await.unwrap(),
        expected
    );

    // RFC 7386: `null` removes a key from the defaults; the rest is kept.
    manager
        .set_config(SERVICE, ENV, json!({"cache": {"ttl": null}, "x": 1}))
        .await
        .unwrap();
    let raw: serde_json::Value = manager
        .get_config(
            SERVICE,
            json!({"cache": {"ttl": 1, "enabled": true}, "y": 2}),
        )
        .await
        .unwrap();
    assert_eq!(raw, json!({"cache": {"enabled": true}, "x": 1, "y": 2}));
    // For a typed read that makes a required field missing, named by its path.
    let err = manager.get_config(SERVICE, defaults()).await.unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { path, message, .. }
            if path == "cache" && message.contains("missing field `ttl`")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_stored_document_that_does_not_fit_the_readers_type_is_reported_with_its_path() {
    let (_dir, manager) = manager().await;
    // Not registered, so the write is accepted …
    manager
        .set_config(SERVICE, ENV, json!({"cache": {"maxSize": "big"}}))
        .await
        .unwrap();
    // … and the typed read names the field.
    let err = manager.get_config(SERVICE, defaults()).await.unwrap_err();
    let ConfigError::Invalid {
        service,
        path,
        message,
    } = &err
    else {
        panic!("expected Invalid, got {err:?}");
    };
    assert_eq!(
        (service.as_str(), path.as_str()),
        (SERVICE, "cache.maxSize")
    );
    assert_eq!(message, r#"invalid type: string "big", expected u64"#);
}

#[tokio::test]
async fn invalid_updates_are_rejected_and_change_nothing() {
    let (_dir, manager) = manager().await;
    manager.register_type(SERVICE, defaults());
    manager
        .set_config(SERVICE, ENV, json!({"cache": {"ttl": 60}}))
        .await
        .unwrap();
    let before = manager.history(SERVICE, ENV).await.unwrap();

    // A wrong type deep inside.
    let err = manager
        .set_config(SERVICE, ENV, json!({"cache": {"ttl": "x"}}))
        .await
        .unwrap_err();
    assert!(err.is_invalid_input());
    let ConfigError::Invalid {
        service,
        path,
        message,
    } = &err
    else {
        panic!("expected Invalid, got {err:?}");
    };
    assert_eq!((service.as_str(), path.as_str()), (SERVICE, "cache.ttl"));
    assert_eq!(message, r#"invalid type: string "x", expected u64"#);
    assert_eq!(
        err.to_string(),
        r#"config for user-service rejected at cache.ttl: invalid type: string "x", expected u64"#
    );

    // Inside an array.
    let err = manager
        .set_config(SERVICE, ENV, json!({"database": {"hosts": ["a", 2]}}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { path, .. } if path == "database.hosts[1]"),
        "{err:?}"
    );

    // Not an object at all.
    for document in [json!([1, 2]), json!("text"), json!(null), json!(3)] {
        let err = manager
            .set_config(SERVICE, ENV, document.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { path, message, .. }
                if path == "." && message.contains("must be a JSON object")),
            "{document}: {err:?}"
        );
    }

    // The same through set_config_if.
    let err = manager
        .set_config_if(SERVICE, ENV, json!({"features": {"socialLogin": "yes"}}), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { path, .. } if path == "features.socialLogin"),
        "{err:?}"
    );

    // Nothing changed.
    assert_eq!(
        manager
            .current(SERVICE, ENV)
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    assert_eq!(manager.history(SERVICE, ENV).await.unwrap(), before);

    // Other services, and untyped writes of the same service in clones, follow the same
    // registration; unregistered services only need an object.
    let clone = manager.clone();
    assert!(
        clone
            .set_config(SERVICE, "prod", json!({"cache": {"enabled": 1}}))
            .await
            .is_err()
    );
    clone
        .set_config("billing", ENV, json!({"cache": {"enabled": 1}}))
        .await
        .unwrap();
}

#[tokio::test]
async fn names_are_validated() {
    let (_dir, manager) = manager().await;
    for (service, env) in [("a/b", ENV), (SERVICE, "pro d"), ("", ENV)] {
        let err = manager
            .set_config(service, env, json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, ConfigError::Name(_)), "{err:?}");
        assert!(matches!(
            manager.history(service, env).await,
            Err(ConfigError::Name(_))
        ));
    }
    let mut watch = manager.watch_in("a/b", ENV, None);
    assert!(matches!(watch.next().await, Err(ConfigError::Name(_))));

    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let bad_env = ConfigOptions::for_environment("no/slash");
    assert!(matches!(
        ConfigurationManager::new(&store, bad_env),
        Err(ConfigError::Name(_))
    ));
    let zero = ConfigOptions {
        refresh_interval: Duration::ZERO,
        ..options()
    };
    assert!(matches!(
        ConfigurationManager::new(&store, zero),
        Err(ConfigError::Options {
            field: "refresh_interval",
            ..
        })
    ));
    let bad_table = ConfigOptions {
        config_table: "Bad-Table".into(),
        ..options()
    };
    assert!(matches!(
        ConfigurationManager::new(&store, bad_table),
        Err(ConfigError::Store(_))
    ));
}

#[tokio::test]
async fn history_is_ascending_and_rollback_adds_a_version() {
    let (_dir, manager) = manager().await;
    assert_eq!(manager.history(SERVICE, ENV).await.unwrap(), []);
    const N: u64 = 12;
    for i in 1..=N {
        let written = manager
            .set_config(SERVICE, ENV, json!({"cache": {"ttl": i}}))
            .await
            .unwrap();
        assert_eq!(written.version, i);
        assert_eq!(written.service, SERVICE);
        assert_eq!(written.environment, ENV);
    }
    let history = manager.history(SERVICE, ENV).await.unwrap();
    assert_eq!(versions(&history), (1..=N).collect::<Vec<_>>());
    for (i, version) in history.iter().enumerate() {
        assert_eq!(version.config, json!({"cache": {"ttl": i + 1}}));
        assert!(version.created_at_ms > 0);
    }
    assert_eq!(
        manager.version(SERVICE, ENV, 3).await.unwrap().as_ref(),
        Some(&history[2])
    );
    assert_eq!(manager.version(SERVICE, ENV, N + 1).await.unwrap(), None);

    let restored = manager.rollback(SERVICE, ENV, 3).await.unwrap();
    assert_eq!(restored.version, N + 1);
    assert_eq!(restored.rolled_back_from, Some(3));
    assert_eq!(restored.config, history[2].config);
    assert_eq!(
        manager.current(SERVICE, ENV).await.unwrap(),
        Some(restored.clone())
    );
    let config = manager.get_config(SERVICE, defaults()).await.unwrap();
    assert_eq!(config.cache.ttl, 3);
    let after = manager.history(SERVICE, ENV).await.unwrap();
    assert_eq!(versions(&after), (1..=N + 1).collect::<Vec<_>>());
    assert_eq!(
        after[..N as usize],
        history[..],
        "old versions are never rewritten"
    );

    // Rolling back to a version that does not exist changes nothing.
    for missing in [0, N + 2, 999] {
        let err = manager.rollback(SERVICE, ENV, missing).await.unwrap_err();
        assert!(matches!(err, ConfigError::NotFound { .. }), "{err:?}");
    }
    let err = manager.rollback(SERVICE, "elsewhere", 1).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 1 of user-service/elsewhere not found"
    );
    assert_eq!(manager.history(SERVICE, ENV).await.unwrap(), after);

    // A rollback to a document that no longer fits the registered type is refused.
    manager
        .set_config(SERVICE, ENV, json!({"cache": {"ttl": "later"}}))
        .await
        .unwrap();
    manager.register_type(SERVICE, defaults());
    let err = manager.rollback(SERVICE, ENV, N + 2).await.unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { path, .. } if path == "cache.ttl"),
        "{err:?}"
    );
    assert_eq!(
        manager
            .current(SERVICE, ENV)
            .await
            .unwrap()
            .unwrap()
            .version,
        N + 2
    );
}

#[tokio::test]
async fn set_config_if_refuses_a_stale_version() {
    let (_dir, manager) = manager().await;
    let err = manager
        .set_config_if(SERVICE, ENV, json!({"a": 1}), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Conflict {
                expected: 1,
                current: 0,
                ..
            }
        ),
        "{err:?}"
    );
    let first = manager
        .set_config_if(SERVICE, ENV, json!({"a": 1}), 0)
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    let second = manager
        .set_config_if(SERVICE, ENV, json!({"a": 2}), 1)
        .await
        .unwrap();
    assert_eq!(second.version, 2);

    let err = manager
        .set_config_if(SERVICE, ENV, json!({"a": 3}), 1)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "version conflict for user-service/test: expected 1, current is 2"
    );
    let err = manager
        .set_config_if(SERVICE, ENV, json!({"a": 3}), 0)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ConfigError::Conflict {
            expected: 0,
            current: 2,
            ..
        }
    ));
    assert_eq!(
        versions(&manager.history(SERVICE, ENV).await.unwrap()),
        [1, 2]
    );

    // Two read-modify-write clients racing on the same version: exactly one wins.
    let (a, b) = tokio::join!(
        manager.set_config_if(SERVICE, ENV, json!({"a": "a"}), 2),
        manager.set_config_if(SERVICE, ENV, json!({"a": "b"}), 2),
    );
    assert_eq!(
        u8::from(a.is_ok()) + u8::from(b.is_ok()),
        1,
        "{a:?} / {b:?}"
    );
    assert_eq!(
        manager
            .current(SERVICE, ENV)
            .await
            .unwrap()
            .unwrap()
            .version,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_distinct_gapless_versions() {
    let dir = tempfile::tempdir().unwrap();
    const TASKS: u64 = 8;
    const EACH: u64 = 25;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        // Separate store handles and managers, as separate processes would have.
        let store = open(&dir).await;
        let manager = ConfigurationManager::new(&store, options()).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..EACH {
                let written = manager
                    .set_config(SERVICE, ENV, json!({"task": task, "i": i}))
                    .await
                    .unwrap();
                mine.push(written.version);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let mine = tokio::time::timeout(DEADLINE * 3, task)
            .await
            .expect("writers finish")
            .unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=TASKS * EACH).collect::<Vec<_>>());

    let manager = ConfigurationManager::new(&open(&dir).await, options()).unwrap();
    let history = manager.history(SERVICE, ENV).await.unwrap();
    assert_eq!(versions(&history), (1..=TASKS * EACH).collect::<Vec<_>>());
    // Every write is there exactly once.
    let mut writes: Vec<(u64, u64)> = history
        .iter()
        .map(|v| {
            (
                v.config["task"].as_u64().unwrap(),
                v.config["i"].as_u64().unwrap(),
            )
        })
        .collect();
    writes.sort_unstable();
    let expected: Vec<(u64, u64)> = (0..TASKS)
        .flat_map(|t| (0..EACH).map(move |i| (t, i)))
        .collect();
    assert_eq!(writes, expected);
}

#[tokio::test]
async fn watch_sees_every_version_in_order_at_once() {
    let (_dir, manager) = manager().await;
    // Created before any write: starts from "nothing".
    let mut watch = manager.watch(SERVICE);
    let mut other_env = manager.watch_in(SERVICE, "other", None);

    // One at a time.
    for i in 1..=3 {
        manager
            .set_config(SERVICE, ENV, json!({"i": i}))
            .await
            .unwrap();
        let seen = next(&mut watch).await;
        assert_eq!((seen.version, seen.config), (i, json!({"i": i})));
    }
    // A burst, then a rollback: delivered one by one, in order.
    for i in 4..=10 {
        manager
            .set_config(SERVICE, ENV, json!({"i": i}))
            .await
            .unwrap();
    }
    manager.rollback(SERVICE, ENV, 2).await.unwrap();
    for i in 4..=11 {
        assert_eq!(next(&mut watch).await.version, i);
    }
    assert_eq!(watch.position(), Some(11));

    // A watch created now starts after the current version.
    let mut late = manager.watch(SERVICE);
    assert_eq!(late.position(), Some(11));
    // Replays are explicit.
    let mut replay = manager.watch_in(SERVICE, ENV, Some(8));
    manager
        .set_config(SERVICE, ENV, json!({"i": 12}))
        .await
        .unwrap();
    assert_eq!(next(&mut late).await.version, 12);
    assert_eq!(next(&mut watch).await.version, 12);
    let replayed: Vec<u64> = [
        next(&mut replay).await,
        next(&mut replay).await,
        next(&mut replay).await,
        next(&mut replay).await,
    ]
    .iter()
    .map(|v| v.version)
    .collect();
    assert_eq!(replayed, [9, 10, 11, 12]);
    let rolled_back = manager.version(SERVICE, ENV, 11).await.unwrap().unwrap();
    assert_eq!(rolled_back.rolled_back_from, Some(2));

    // The other environment saw nothing yet; a timeout on `next` loses nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), other_env.next())
            .await
            .is_err()
    );
    manager
        .set_config(SERVICE, "other", json!({}))
        .await
        .unwrap();
    let seen = next(&mut other_env).await;
    assert_eq!((seen.environment.as_str(), seen.version), ("other", 1));
}

#[tokio::test]
async fn watch_from_another_manager_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let writer = ConfigurationManager::new(&open(&dir).await, options()).unwrap();
    let reader = ConfigurationManager::new(&open(&dir).await, options()).unwrap();
    writer
        .set_config(SERVICE, ENV, json!({"i": 0}))
        .await
        .unwrap();
    // The reader has read the current version (1), so its watch starts there.
    assert_eq!(
        reader.current(SERVICE, ENV).await.unwrap().unwrap().version,
        1
    );
    let mut watch = reader.watch(SERVICE);
    for i in 1..=5 {
        writer
            .set_config(SERVICE, ENV, json!({"i": i}))
            .await
            .unwrap();
    }
    for i in 2..=6 {
        assert_eq!(next(&mut watch).await.version, i);
    }
}

#[tokio::test]
async fn watch_with_calls_back_until_the_handle_is_dropped() {
    let (_dir, manager) = manager().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = {
        let seen = seen.clone();
        manager.watch_with(SERVICE, move |version: ConfigVersion| {
            seen.lock().unwrap().push(version.version);
            let _ = tx.send(version.version);
        })
    };
    for i in 1..=5 {
        manager
            .set_config(SERVICE, ENV, json!({"i": i}))
            .await
            .unwrap();
    }
    let mut received = Vec::new();
    while received.len() < 5 {
        let version = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("callback before the deadline")
            .expect("task alive");
        received.push(version);
    }
    assert_eq!(received, [1, 2, 3, 4, 5]);
    assert!(!handle.is_finished());

    drop(handle);
    // Once stopped, the task drops the callback (and its sender): the channel closes.
    let closed = tokio::time::timeout(DEADLINE, rx.recv()).await.unwrap();
    assert_eq!(closed, None);
    manager
        .set_config(SERVICE, ENV, json!({"i": 6}))
        .await
        .unwrap();
    tokio::task::yield_now().await;
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3, 4, 5]);
}
