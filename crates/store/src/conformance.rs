//! The store contract as a test suite: every backend must pass every case.
//!
//! A backend's integration test calls [`conformance_tests!`](crate::conformance_tests) with an
//! async function that opens a store; the macro expands to one `#[tokio::test]` per case.
//! Cases use their own tables and a fresh partition nonce, so one long-lived store (a shared
//! Cassandra keyspace) can serve them all, run after run.
//!
//! The cases panic on failure, like any test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Batch, BatchOutcome, CasOutcome, ScanQuery, Store, StoreError};

/// Expands to one `#[tokio::test]` per conformance case, each opening a store with
/// `$open().await` (an async fn returning [`Store`]).
#[macro_export]
macro_rules! conformance_tests {
    ($open:path) => {
        $crate::conformance_tests!(@cases $open;
            get_put_delete, versions_count_writes, scan_is_ordered_and_paged, scan_prefix,
            insert_if_absent, update_if_version, ttl_expires, batch_is_atomic,
            batch_across_tables, concurrent_compare_and_set_loses_nothing, change_marker_moves,
            bad_input_is_rejected_and_stores_nothing, binary_values_and_unicode_keys, ping);
    };
    (@cases $open:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store: $crate::Store = $open().await;
                $crate::conformance::$case(&store).await;
            }
        )*
    };
}

/// A partition name unique to this run and case.
fn nonce(case: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{case}-{nanos:x}")
}

pub async fn get_put_delete(store: &Store) {
    let t = store.table("conf_basic").unwrap();
    let p = nonce("basic");
    assert_eq!(t.get(&p, "a").await.unwrap(), None);
    assert_eq!(t.put(&p, "a", b"one".to_vec(), None).await.unwrap(), 1);
    let row = t.get(&p, "a").await.unwrap().expect("row written");
    assert_eq!(row.value, b"one");
    assert_eq!(row.version, 1);
    assert_eq!(row.partition, p);
    assert_eq!(row.clustering, "a");
    assert_eq!(row.expires_at, None);
    assert!(t.delete(&p, "a").await.unwrap(), "delete of a live row");
    assert_eq!(t.get(&p, "a").await.unwrap(), None);
    assert!(!t.delete(&p, "a").await.unwrap(), "delete of an absent row");
}

pub async fn versions_count_writes(store: &Store) {
    let t = store.table("conf_versions").unwrap();
    let p = nonce("versions");
    for expected in 1..=5 {
        assert_eq!(
            t.put(&p, "k", vec![expected as u8], None).await.unwrap(),
            expected
        );
    }
    t.delete(&p, "k").await.unwrap();
    assert_eq!(
        t.put(&p, "k", b"again".to_vec(), None).await.unwrap(),
        1,
        "a deleted row starts over at version 1"
    );
}

pub async fn scan_is_ordered_and_paged(store: &Store) {
    let t = store.table("conf_scan").unwrap();
    let p = nonce("scan");
    let other = nonce("scan-other");
    // Inserted out of order.
    let mut keys: Vec<String> = (0..25).map(|i| format!("k{:02}", (i * 7) % 25)).collect();
    for k in &keys {
        t.put(&p, k, k.as_bytes().to_vec(), None).await.unwrap();
    }
    t.put(&other, "k00", b"elsewhere".to_vec(), None)
        .await
        .unwrap();
    keys.sort();

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = t
            .scan(
                &p,
                ScanQuery {
                    prefix: None,
                    after: after.clone(),
                    limit: 10,
                },
            )
            .await
            .unwrap();
        pages += 1;
        assert!(page.rows.len() <= 10);
        seen.extend(page.rows.iter().map(|r| r.clustering.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(pages < 10, "scan never ended");
    }
    assert_eq!(seen, keys, "every row once, in clustering order");
    assert_eq!(pages, 3);
    let all = t.scan_all(&p, None).await.unwrap();
    assert_eq!(all.len(), 25);
    assert!(all.iter().all(|r| r.partition == p));
    let empty = t
        .scan(&nonce("nothing"), ScanQuery::default())
        .await
        .unwrap();
    assert!(empty.rows.is_empty() && empty.next.is_none());
}

pub async fn scan_prefix(store: &Store) {
    let t = store.table("conf_prefix").unwrap();
    let p = nonce("prefix");
    for k in ["a/1", "a/2", "a/3", "ab/1", "b/1", "a"] {
        t.put(&p, k, b"x".to_vec(), None).await.unwrap();
    }
    let keys = |rows: Vec<crate::Row>| rows.into_iter().map(|r| r.clustering).collect::<Vec<_>>();
    assert_eq!(
        keys(t.scan_all(&p, Some("a/")).await.unwrap()),
        ["a/1", "a/2", "a/3"]
    );
    assert_eq!(keys(t.scan_all(&p, Some("b/")).await.unwrap()), ["b/1"]);
    assert!(t.scan_all(&p, Some("c/")).await.unwrap().is_empty());
    let page = t
        .scan(
            &p,
            ScanQuery {
                prefix: Some("a/".into()),
                after: Some("a/1".into()),
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(keys(page.rows), ["a/2"]);
    assert_eq!(page.next.as_deref(), Some("a/2"));
}

pub async fn insert_if_absent(store: &Store) {
    let t = store.table("conf_insert").unwrap();
    let p = nonce("insert");
    let first = t
        .insert_if_absent(&p, "k", b"first".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(first, CasOutcome::Applied { version: 1 });
    match t
        .insert_if_absent(&p, "k", b"second".to_vec(), None)
        .await
        .unwrap()
    {
        CasOutcome::Rejected { current: Some(row) } => {
            assert_eq!(row.value, b"first");
            assert_eq!(row.version, 1);
        }
        other => panic!("second insert must be rejected with the current row, got {other:?}"),
    }
    assert_eq!(t.get(&p, "k").await.unwrap().unwrap().value, b"first");
}

pub async fn update_if_version(store: &Store) {
    let t = store.table("conf_update").unwrap();
    let p = nonce("update");
    assert_eq!(
        t.update_if_version(&p, "k", 1, b"x".to_vec(), None)
            .await
            .unwrap(),
        CasOutcome::Rejected { current: None },
        "no row to update"
    );
    t.put(&p, "k", b"v1".to_vec(), None).await.unwrap();
    match t
        .update_if_version(&p, "k", 7, b"bad".to_vec(), None)
        .await
        .unwrap()
    {
        CasOutcome::Rejected { current: Some(row) } => assert_eq!(row.version, 1),
        other => panic!("stale version must be rejected, got {other:?}"),
    }
    assert_eq!(
        t.update_if_version(&p, "k", 1, b"v2".to_vec(), None)
            .await
            .unwrap(),
        CasOutcome::Applied { version: 2 }
    );
    let row = t.get(&p, "k").await.unwrap().unwrap();
    assert_eq!((row.value.as_slice(), row.version), (b"v2".as_slice(), 2));
}

/// Polls `check` until it holds, up to `limit`.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn ttl_expires(store: &Store) {
    let t = store.table("conf_ttl").unwrap();
    let p = nonce("ttl");
    let before = SystemTime::now();
    t.put(&p, "short", b"x".to_vec(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    t.put(&p, "long", b"y".to_vec(), Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    t.put(&p, "forever", b"z".to_vec(), None).await.unwrap();
    let row = t
        .get(&p, "short")
        .await
        .unwrap()
        .expect("visible before expiry");
    let expires = row.expires_at.expect("a row with a TTL has an expiry");
    assert!(
        expires > before && expires <= before + Duration::from_secs(3),
        "{expires:?}"
    );
    let gone = eventually(Duration::from_secs(10), || async {
        t.get(&p, "short").await.unwrap().is_none()
    })
    .await;
    assert!(gone, "a 1 s TTL row still readable after 10 s");
    let keys: Vec<String> = t
        .scan_all(&p, None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.clustering)
        .collect();
    assert_eq!(keys, ["forever", "long"], "scans hide expired rows");
    assert!(
        t.insert_if_absent(&p, "short", b"new".to_vec(), None)
            .await
            .unwrap()
            .applied(),
        "an expired row counts as absent"
    );
    assert_eq!(t.get(&p, "short").await.unwrap().unwrap().version, 1);
}

pub async fn batch_is_atomic(store: &Store) {
    let t = store.table("conf_batch").unwrap();
    let p = nonce("batch");
    t.put(&p, "taken", b"old".to_vec(), None).await.unwrap();
    // A failing condition anywhere: nothing of the batch is written.
    let rejected = store
        .batch(
            Batch::new()
                .push(t.mutation_put(&p, "a", b"a".to_vec(), None).unwrap())
                .push(
                    t.mutation_insert_if_absent(&p, "taken", b"new".to_vec(), None)
                        .unwrap(),
                )
                .push(t.mutation_delete(&p, "taken").unwrap()),
        )
        .await
        .unwrap();
    match rejected {
        BatchOutcome::Rejected { index, current } => {
            assert_eq!(index, 1);
            assert_eq!(current.unwrap().value, b"old");
        }
        other => panic!("expected a rejected batch, got {other:?}"),
    }
    assert_eq!(
        t.get(&p, "a").await.unwrap(),
        None,
        "rejected batch wrote a row"
    );
    assert_eq!(t.get(&p, "taken").await.unwrap().unwrap().value, b"old");

    // All conditions hold: everything is written.
    let applied = store
        .batch(
            Batch::new()
                .push(t.mutation_put(&p, "a", b"a".to_vec(), None).unwrap())
                .push(
                    t.mutation_update_if_version(&p, "taken", 1, b"new".to_vec(), None)
                        .unwrap(),
                )
                .push(
                    t.mutation_insert_if_absent(&p, "fresh", b"f".to_vec(), None)
                        .unwrap(),
                ),
        )
        .await
        .unwrap();
    assert_eq!(
        applied,
        BatchOutcome::Applied {
            versions: vec![1, 2, 1]
        }
    );
    assert_eq!(t.get(&p, "taken").await.unwrap().unwrap().value, b"new");
    assert_eq!(t.get(&p, "fresh").await.unwrap().unwrap().value, b"f");
}

pub async fn batch_across_tables(store: &Store) {
    let orders = store.table("conf_batch_orders").unwrap();
    let outbox = store.table("conf_batch_outbox").unwrap();
    let p = nonce("xbatch");
    let outcome = store
        .batch(
            Batch::new()
                .push(
                    orders
                        .mutation_put(&p, "o1", b"order".to_vec(), None)
                        .unwrap(),
                )
                .push(
                    outbox
                        .mutation_put(&format!("{p}-out"), "e1", b"event".to_vec(), None)
                        .unwrap(),
                )
                .push(orders.mutation_delete(&p, "missing").unwrap()),
        )
        .await
        .unwrap();
    assert!(outcome.applied());
    assert_eq!(orders.get(&p, "o1").await.unwrap().unwrap().value, b"order");
    assert_eq!(
        outbox
            .get(&format!("{p}-out"), "e1")
            .await
            .unwrap()
            .unwrap()
            .value,
        b"event"
    );
    assert!(
        store.batch(Batch::new()).await.unwrap().applied(),
        "an empty batch is a no-op"
    );
}

pub async fn concurrent_compare_and_set_loses_nothing(store: &Store) {
    const TASKS: u64 = 8;
    const EACH: u64 = 40;
    let t = store.table("conf_counter").unwrap();
    let p = nonce("counter");
    t.put(&p, "n", b"0".to_vec(), None).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let t = t.clone();
        let p = p.clone();
        handles.push(tokio::spawn(async move {
            let mut done = 0;
            while done < EACH {
                let row = t.get(&p, "n").await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&row.value).unwrap().parse().unwrap();
                let next = (n + 1).to_string().into_bytes();
                if t.update_if_version(&p, "n", row.version, next, None)
                    .await
                    .unwrap()
                    .applied()
                {
                    done += 1;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let row = t.get(&p, "n").await.unwrap().unwrap();
    assert_eq!(
        std::str::from_utf8(&row.value).unwrap(),
        (TASKS * EACH).to_string()
    );
    assert_eq!(row.version, TASKS * EACH + 1);
}

pub async fn change_marker_moves(store: &Store) {
    let t = store.table("conf_marker").unwrap();
    let p = nonce("marker");
    let Some(before) = t.change_marker().await.unwrap() else {
        return; // The backend cannot tell; callers re-read on a timer.
    };
    t.put(&p, "k", b"x".to_vec(), None).await.unwrap();
    let after = t
        .change_marker()
        .await
        .unwrap()
        .expect("marker stays supported");
    assert_ne!(before, after, "a write must move the change marker");
}

pub async fn bad_input_is_rejected_and_stores_nothing(store: &Store) {
    for bad in [
        "",
        "Upper",
        "1abc",
        "with-dash",
        "semi;colon",
        &"x".repeat(49),
    ] {
        match store.table(bad) {
            Err(StoreError::InvalidInput {
                what: "table name", ..
            }) => {}
            other => panic!("table name {bad:?} accepted: {other:?}"),
        }
    }
    let t = store.table("conf_bad").unwrap();
    let p = nonce("bad");
    let long = "k".repeat(crate::MAX_KEY_BYTES + 1);
    let err = t.put(&long, "c", b"x".to_vec(), None).await.unwrap_err();
    assert!(err.to_string().contains("partition key"), "{err}");
    let err = t.put(&p, &long, b"x".to_vec(), None).await.unwrap_err();
    assert!(err.to_string().contains("clustering key"), "{err}");
    let err = t
        .put(&p, "c", b"x".to_vec(), Some(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ttl"), "{err}");
    let err = t
        .mutation_put(&p, "c", vec![0; crate::MAX_VALUE_BYTES + 1], None)
        .unwrap_err();
    assert!(err.to_string().contains("value"), "{err}");
    assert!(!err.is_retryable());
    assert!(
        t.scan_all(&p, None).await.unwrap().is_empty(),
        "rejected writes stored something"
    );
}

pub async fn binary_values_and_unicode_keys(store: &Store) {
    let t = store.table("conf_binary").unwrap();
    let p = nonce("binary-ü");
    let blob: Vec<u8> = (0..=255u8).collect();
    let keys = ["zeta", "Ärger", "alpha", "日本", "Zulu", ""];
    for k in keys {
        t.put(&p, k, blob.clone(), None).await.unwrap();
    }
    let rows = t.scan_all(&p, None).await.unwrap();
    let mut expected: Vec<&str> = keys.to_vec();
    expected.sort(); // byte order of UTF-8
    assert_eq!(
        rows.iter()
            .map(|r| r.clustering.as_str())
            .collect::<Vec<_>>(),
        expected
    );
    assert!(rows.iter().all(|r| r.value == blob));
    let by_key: BTreeMap<_, _> = rows
        .into_iter()
        .map(|r| (r.clustering, r.version))
        .collect();
    assert_eq!(by_key.len(), keys.len());
}

pub async fn ping(store: &Store) {
    store.ping().await.unwrap();
}
