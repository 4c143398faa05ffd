//! The store layer's overhead over raw `scylla` calls, on a real Cassandra node.
//!
//! Same node, same prepared CQL, same consistency, same run: `Table::get` against one
//! prepared `SELECT`, and `Table::put` against the same read plus the same lightweight
//! transaction issued directly on the driver session. Target: at most 10% overhead.
//! Run: `scripts/services up cassandra`, then
//! `cargo bench -p trellis-store --features cassandra --bench cassandra`.
//! Bounded: a fixed number of operations per measurement, and at most 20 s each.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use trellis_store::CassandraStore;
use trellis_store::scylla::statement::Consistency;

const URL: &str = "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_bench";
const GETS: usize = 3_000;
const PUTS: usize = 600;
const ROUNDS: usize = 3;
const LIMIT: Duration = Duration::from_secs(20);

/// Runs `op` `n` times (or until `LIMIT`), returns microseconds per operation.
async fn measure<F, Fut>(n: usize, mut op: F) -> f64
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let mut done = 0;
    while done < n && start.elapsed() < LIMIT {
        op(done).await;
        done += 1;
    }
    start.elapsed().as_secs_f64() * 1e6 / done.max(1) as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("TRELLIS_CASSANDRA_BENCH_URL").unwrap_or_else(|_| URL.to_owned());
    let cassandra = match CassandraStore::open(&url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("no Cassandra node ({e}); start it with scripts/services up cassandra");
            return;
        }
    };
    let store = cassandra.store();
    let table = store.table("bench").unwrap();
    table.put("p", "k", vec![7; 100], None).await.unwrap();
    let session = cassandra.session();
    let mut select = session
        .prepare("SELECT value, version, TTL(value) FROM t_bench WHERE pk = ? AND ck = ?")
        .await
        .unwrap();
    select.set_consistency(Consistency::Quorum);
    select.set_is_idempotent(true);
    let update = session
        .prepare(
            "UPDATE t_bench USING TTL ? SET value = ?, version = ? WHERE pk = ? AND ck = ? IF version = ?",
        )
        .await
        .unwrap();
    type Columns = (Option<Vec<u8>>, Option<i64>, Option<i32>);

    println!("store layer vs raw scylla, {ROUNDS} rounds, best of each (µs per operation)");
    let (mut best_store_get, mut best_raw_get) = (f64::MAX, f64::MAX);
    let (mut best_store_put, mut best_raw_put) = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        best_raw_get = best_raw_get.min(
            measure(GETS, |_| async {
                let rows = session
                    .execute_unpaged(&select, ("p", "k"))
                    .await
                    .unwrap()
                    .into_rows_result()
                    .unwrap();
                let row = rows.maybe_first_row::<Columns>().unwrap();
                std::hint::black_box(row);
            })
            .await,
        );
        best_store_get = best_store_get.min(
            measure(GETS, |_| async {
                std::hint::black_box(table.get("p", "k").await.unwrap());
            })
            .await,
        );
        best_raw_put = best_raw_put.min(
            measure(PUTS, |i| {
                let (select, update) = (&select, &update);
                async move {
                    // The same work as Table::put: read the version, then one LWT.
                    let rows = session
                        .execute_unpaged(select, ("p", "raw"))
                        .await
                        .unwrap()
                        .into_rows_result()
                        .unwrap();
                    let version = rows
                        .maybe_first_row::<Columns>()
                        .unwrap()
                        .and_then(|(_, v, _)| v);
                    let applied = session
                        .execute_unpaged(
                            update,
                            (
                                0i32,
                                vec![i as u8; 100],
                                version.map_or(1, |v| v + 1),
                                "p",
                                "raw",
                                version,
                            ),
                        )
                        .await
                        .unwrap();
                    std::hint::black_box(applied);
                }
            })
            .await,
        );
        best_store_put = best_store_put.min(
            measure(PUTS, |i| {
                let table = &table;
                async move {
                    table
                        .put("p", "store", vec![i as u8; 100], None)
                        .await
                        .unwrap();
                }
            })
            .await,
        );
    }
    let overhead = |store: f64, raw: f64| (store / raw - 1.0) * 100.0;
    println!(
        "get: store {best_store_get:8.1} µs   raw {best_raw_get:8.1} µs   overhead {:+5.1}%",
        overhead(best_store_get, best_raw_get)
    );
    println!(
        "put: store {best_store_put:8.1} µs   raw {best_raw_put:8.1} µs   overhead {:+5.1}%",
        overhead(best_store_put, best_raw_put)
    );
}
