//! The store conformance suite on a real Cassandra node, plus Cassandra-specific behaviour:
//! independent sessions racing on one row, start-up errors, raw CQL, replication options.
//!
//! The node: `scripts/services up cassandra`; the URL: `TRELLIS_CASSANDRA_URL` (default
//! `cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test`). Without a node the tests
//! print a notice and pass, unless `TRELLIS_REQUIRE_ENGINES=1` (the project's test command),
//! where they fail.

#![cfg(feature = "cassandra")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use trellis_store::{Batch, CassandraStore, Store, StoreError};

const DEFAULT_URL: &str = "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test";

fn url() -> String {
    std::env::var("TRELLIS_CASSANDRA_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// The URL with another keyspace and extra query parameters.
fn url_with(keyspace: &str, query: &str) -> String {
    let base = url();
    let base = base.split('?').next().unwrap().to_owned();
    let (hosts, _) = base.rsplit_once('/').unwrap();
    if query.is_empty() {
        format!("{hosts}/{keyspace}")
    } else {
        format!("{hosts}/{keyspace}?{query}")
    }
}

/// Connects, or returns `None` (after a notice) when no node runs and none is required.
async fn connect() -> Option<CassandraStore> {
    match CassandraStore::open(&url()).await {
        Ok(cassandra) => Some(cassandra),
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
        Err(e) => panic!("cannot open {}: {e}", url()),
    }
}

async fn open() -> Option<Store> {
    connect().await.map(|c| c.store())
}

/// The conformance cases, each skipped when no node runs. The list is checked against the
/// `conformance_tests!` macro by `every_conformance_case_runs`.
macro_rules! cassandra_conformance {
    ($($case:ident),* $(,)?) => {
        const CASES: &[&str] = &[$(stringify!($case)),*];
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(store) = open().await else { return };
                trellis_store::conformance::$case(&store).await;
            }
        )*
    };
}

cassandra_conformance!(
    get_put_delete,
    versions_count_writes,
    scan_is_ordered_and_paged,
    scan_prefix,
    insert_if_absent,
    update_if_version,
    ttl_expires,
    batch_is_atomic,
    batch_across_tables,
    concurrent_compare_and_set_loses_nothing,
    change_marker_moves,
    bad_input_is_rejected_and_stores_nothing,
    binary_values_and_unicode_keys,
    ping,
);

#[test]
fn every_conformance_case_runs() {
    let source = include_str!("../src/conformance.rs");
    let start = source.find("@cases $open;").expect("the macro's case list") + 13;
    let end = start + source[start..].find(')').unwrap();
    let listed: Vec<&str> = source[start..end]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        listed, CASES,
        "conformance.rs changed its cases: update cassandra_conformance! in this file"
    );
}

fn nonce(case: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{case}-{nanos:x}")
}

/// Eight independent sessions (as eight processes would have) increment one counter with
/// compare-and-set and blind-write a row of their own: no update may be lost and every
/// version must count the writes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_sessions_compare_and_set_one_row() {
    const WRITERS: u64 = 8;
    const EACH: u64 = 25;
    let Some(store) = open().await else { return };
    let t = store.table("cas_sessions").unwrap();
    let p = nonce("eight");
    t.put(&p, "n", b"0".to_vec(), None).await.unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = open().await.unwrap();
        let p = p.clone();
        writers.push(tokio::spawn(async move {
            let t = store.table("cas_sessions").unwrap();
            let mut done = 0;
            let mut attempts = 0u64;
            while done < EACH {
                attempts += 1;
                assert!(attempts < 5_000, "writer {w} starved");
                let row = t.get(&p, "n").await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&row.value).unwrap().parse().unwrap();
                let next = (n + 1).to_string().into_bytes();
                if t.update_if_version(&p, "n", row.version, next, None)
                    .await
                    .unwrap()
                    .applied()
                {
                    done += 1;
                    let own = t
                        .put(&p, &format!("w{w}"), done.to_string().into_bytes(), None)
                        .await
                        .unwrap();
                    assert_eq!(own, done, "a blind put's version counts its writes");
                }
            }
            attempts
        }));
    }
    let mut attempts = 0;
    for w in writers {
        attempts += w.await.unwrap();
    }
    let row = t.get(&p, "n").await.unwrap().unwrap();
    assert_eq!(
        std::str::from_utf8(&row.value).unwrap(),
        (WRITERS * EACH).to_string(),
        "lost updates"
    );
    assert_eq!(row.version, WRITERS * EACH + 1);
    let own = t.scan_all(&p, Some("w")).await.unwrap();
    assert_eq!(own.len(), WRITERS as usize);
    assert!(own.iter().all(|r| r.version == EACH));
    eprintln!(
        "{} compare-and-set increments took {attempts} attempts",
        WRITERS * EACH
    );
}

/// Eight tasks doing blind puts of one row at once: every put gets its own version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_never_repeat_a_version() {
    let Some(store) = open().await else { return };
    let t = store.table("cas_puts").unwrap();
    let p = nonce("puts");
    let mut tasks = Vec::new();
    for w in 0..8u8 {
        let t = t.clone();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for _ in 0..10 {
                versions.push(t.put(&p, "k", vec![w], None).await.unwrap());
            }
            versions
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=80).collect::<Vec<u64>>());
    assert_eq!(t.get(&p, "k").await.unwrap().unwrap().version, 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_without_ttl_makes_a_ttl_row_permanent() {
    let Some(store) = open().await else { return };
    let t = store.table("ttl_overwrite").unwrap();
    let p = nonce("ttl");
    t.put(&p, "k", b"lease".to_vec(), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    let row = t.get(&p, "k").await.unwrap().unwrap();
    let left = row
        .expires_at
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(55) && left <= Duration::from_secs(62),
        "{left:?}"
    );
    t.put(&p, "k", b"forever".to_vec(), None).await.unwrap();
    let row = t.get(&p, "k").await.unwrap().unwrap();
    assert_eq!((row.version, row.expires_at), (2, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_batches_must_stay_in_one_partition() {
    let Some(store) = open().await else { return };
    let t = store.table("batch_rules").unwrap();
    let p = nonce("rules");
    let err = store
        .batch(
            Batch::new()
                .push(t.mutation_put(&p, "a", b"1".to_vec(), None).unwrap())
                .push(
                    t.mutation_insert_if_absent(&format!("{p}-other"), "b", b"2".to_vec(), None)
                        .unwrap(),
                ),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::InvalidInput { what: "batch", .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("one partition of one table"),
        "{err}"
    );
    assert_eq!(t.get(&p, "a").await.unwrap(), None, "nothing written");
}

/// Every operation reaches the middleware chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middleware_sees_every_operation() {
    let Some(store) = open().await else { return };
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let store = store.layer(tower::layer::layer_fn(
        move |inner: trellis_store::StoreService| {
            let counter = counter.clone();
            tower::service_fn(move |request: trellis_store::StoreRequest| {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut inner = inner.clone();
                async move { tower::Service::call(&mut inner, request).await }
            })
        },
    ));
    let t = store.table("middleware").unwrap();
    let p = nonce("mw");
    t.put(&p, "a", b"1".to_vec(), None).await.unwrap();
    t.get(&p, "a").await.unwrap();
    t.scan_all(&p, None).await.unwrap();
    t.delete(&p, "a").await.unwrap();
    store.ping().await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_cql_runs_prepared_in_the_keyspace() {
    let Some(cassandra) = connect().await else {
        return;
    };
    let t = cassandra.store().table("raw_users").unwrap();
    let p = nonce("raw");
    t.put(&p, "a", b"x".to_vec(), None).await.unwrap();
    t.put(&p, "a", b"y".to_vec(), None).await.unwrap();
    let rows = cassandra
        .execute(
            "SELECT ck, version FROM t_raw_users WHERE pk = ?",
            (p.as_str(),),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let found: Vec<(String, i64)> = rows
        .rows::<(String, i64)>()
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(found, [("a".to_owned(), 2)]);
    let now = cassandra
        .execute("SELECT now() FROM system.local", ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    assert_eq!(now.rows_num(), 1);
    let err = cassandra
        .execute("SELEKT nothing", ())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("raw CQL") && err.contains("127.0.0.1:9042"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_topology_replication_and_local_dc() {
    let Some(cassandra) = connect().await else {
        return;
    };
    // SimpleSnitch puts the node in "datacenter1".
    let store = Store::open(&url_with(
        "trellis_test_nts",
        "replication=datacenter1:1&local_dc=datacenter1&consistency=local_quorum&serial_consistency=local_serial&speculative=1:200ms&retry=never",
    ))
    .await
    .unwrap();
    let t = store.table("nts").unwrap();
    let p = nonce("nts");
    assert_eq!(t.put(&p, "a", b"1".to_vec(), None).await.unwrap(), 1);
    assert!(
        t.update_if_version(&p, "a", 1, b"2".to_vec(), None)
            .await
            .unwrap()
            .applied()
    );
    assert_eq!(t.get(&p, "a").await.unwrap().unwrap().version, 2);
    let rows = cassandra
        .execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
            ("trellis_test_nts",),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let (replication,): (std::collections::HashMap<String, String>,) = rows.single_row().unwrap();
    assert_eq!(
        replication.get("class").map(String::as_str),
        Some("org.apache.cassandra.locator.NetworkTopologyStrategy")
    );
    assert_eq!(
        replication.get("datacenter1").map(String::as_str),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_host_is_named() {
    let started = std::time::Instant::now();
    let err = Store::open("cassandra://127.0.0.1:1/trellis_test?connect_timeout=1s")
        .await
        .unwrap_err();
    assert!(err.is_unavailable() && err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1:1"),
        "names the host: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "gave up in time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_rejected_before_connecting() {
    for (url, needle) in [
        ("cassandra://127.0.0.1:9042", "no keyspace"),
        ("cassandra://127.0.0.1:9042/Bad-Name", "keyspace"),
        (
            "cassandra://127.0.0.1:9042/ks?consistency=most",
            "consistency",
        ),
        (
            "cassandra://127.0.0.1:9042/ks?tls=false&tls_ca=/ca.pem",
            "TLS",
        ),
        ("cassandra://u:secret@127.0.0.1:nope/ks", "port"),
    ] {
        let err = Store::open(url).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{url}: {err}");
        assert!(err.to_string().contains(needle), "{url}: {err}");
        assert!(
            !err.to_string().contains("secret"),
            "password leaked: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_named() {
    let Some(_) = connect().await else { return };
    let good = url();
    let Some(at) = good.find('@') else {
        eprintln!("SKIPPED: {good} has no credentials; the node runs without authentication");
        return;
    };
    let wrong = format!("cassandra://cassandra:wrong-password{}", &good[at..]);
    let err = Store::open(&wrong).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{text}");
    assert!(
        text.contains("rejected the login") && text.contains("127.0.0.1:9042"),
        "{text}"
    );
    assert!(!text.contains("wrong-password"), "password leaked: {text}");
    let anonymous = format!("cassandra://{}", &good[at + 1..]);
    let err = Store::open(&anonymous).await.unwrap_err().to_string();
    assert!(err.contains("127.0.0.1:9042"), "{err}");
    assert!(
        err.contains("login") || err.contains("USER:PASSWORD"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keyspace_without_permission_is_named() {
    let Some(admin) = connect().await else { return };
    let good = url();
    let Some(at) = good.find('@') else {
        eprintln!("SKIPPED: {good} has no credentials; the node runs without authentication");
        return;
    };
    admin
        .execute(
            "CREATE ROLE IF NOT EXISTS trellis_limited WITH PASSWORD = 'limited' AND LOGIN = true",
            (),
        )
        .await
        .unwrap();
    let keyspace = format!("missing_{}", nonce("ks").replace('-', "_"));
    let limited = format!("cassandra://trellis_limited:limited{}", &good[at..]);
    let limited = limited.replace("/trellis_test", &format!("/{keyspace}"));
    let err = Store::open(&limited).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{text}");
    assert!(
        text.contains(&keyspace)
            && text.contains("no permission to create it")
            && text.contains("127.0.0.1:9042"),
        "{text}"
    );
    let err = Store::open(&url_with(&keyspace, "create_keyspace=false"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not exist") && err.contains("create_keyspace=false"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_table_never_written_find_nothing() {
    let Some(store) = open().await else { return };
    let t = store
        .table(
            &format!("never_{}", nonce("t").replace('-', "_"))
                .chars()
                .take(40)
                .collect::<String>(),
        )
        .unwrap();
    assert_eq!(t.get("p", "c").await.unwrap(), None);
    assert!(t.scan_all("p", None).await.unwrap().is_empty());
    assert_eq!(t.change_marker().await.unwrap(), None);
}
