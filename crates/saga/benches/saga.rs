//! Sagas per second for a 3-step saga with in-process steps, and the time to recover
//! unfinished sagas after a crash, on SQLite and on Cassandra.
//!
//! `cargo bench -p trellis-saga --bench saga`; the Cassandra node comes from
//! `TRELLIS_CASSANDRA_URL` (default `cassandra://cassandra:cassandra@127.0.0.1:9042/…`, a
//! fresh keyspace per run). Every loop is bounded in count and time. `SAGA_BENCH_RECOVER`
//! sets the number of unfinished sagas recovered on SQLite (default 10,000).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trellis_saga::{Saga, SagaLog, SagaOptions, SagaOrchestrator, SagaState, Step};
use trellis_store::Store;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    n: u64,
    trail: Vec<String>,
}

fn saga(hang_at_second: Option<Arc<AtomicUsize>>) -> Saga<Data> {
    let step = |name: &'static str| {
        Step::new(
            name,
            move |_, mut d: Data| async move {
                d.n += 1;
                d.trail.push(name.to_owned());
                Ok(d)
            },
            |_, _| async { Ok(()) },
        )
        .idempotent()
    };
    let second = match hang_at_second {
        None => step("two"),
        Some(entered) => Step::new(
            "two",
            move |_, d: Data| {
                let entered = entered.clone();
                async move {
                    entered.fetch_add(1, Ordering::Relaxed);
                    // Never finishes: the "crash" happens while every saga is here.
                    std::future::pending::<()>().await;
                    Ok(d)
                }
            },
            |_, _| async { Ok(()) },
        )
        .idempotent(),
    };
    Saga::builder("bench", 1)
        .add_step(step("one"))
        .add_step(second)
        .add_step(step("three"))
        .build()
        .unwrap()
}

/// Sagas per second: `workers` callers running sagas back to back, at most `max` sagas or
/// `limit` time.
async fn throughput(store: &Store, node: &str, max: usize, limit: Duration) -> (usize, f64) {
    let orchestrator = SagaOrchestrator::start(
        store,
        SagaOptions::default().node_id(node).max_concurrent(64),
    )
    .await
    .unwrap();
    orchestrator.register(saga(None)).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (o, done) = (orchestrator.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while started.elapsed() < limit && done.fetch_add(1, Ordering::Relaxed) < max {
                let outcome = o
                    .run(
                        "bench",
                        &Data {
                            n: 0,
                            trail: vec![],
                        },
                    )
                    .await
                    .unwrap();
                assert_eq!(outcome.state, SagaState::Completed);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let finished = done.load(Ordering::Relaxed).min(max);
    orchestrator.shutdown();
    (finished, finished as f64 / elapsed)
}

/// Leaves `count` sagas unfinished (stuck in step two when their orchestrator "dies"), then
/// times a restarted orchestrator's `recover()`.
async fn recovery(
    store: &Store,
    node: &str,
    count: usize,
    limit: Duration,
) -> (usize, Duration, Duration) {
    let entered = Arc::new(AtomicUsize::new(0));
    let crashed = SagaOrchestrator::start(
        store,
        SagaOptions::default()
            .node_id(node)
            .max_concurrent(count.max(1)),
    )
    .await
    .unwrap();
    crashed.register(saga(Some(entered.clone()))).unwrap();
    let prepared = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let o = crashed.clone();
        tasks.push(tokio::spawn(async move {
            let _ = o
                .run(
                    "bench",
                    &Data {
                        n: 0,
                        trail: vec![],
                    },
                )
                .await;
        }));
    }
    while entered.load(Ordering::Relaxed) < count {
        assert!(
            prepared.elapsed() < limit,
            "only {} of {count} sagas started within {limit:?}",
            entered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let preparation = prepared.elapsed();
    for task in tasks {
        task.abort();
    }
    crashed.shutdown();
    drop(crashed);

    let restarted = SagaOrchestrator::start(
        store,
        SagaOptions::default().node_id(node).max_concurrent(64),
    )
    .await
    .unwrap();
    restarted.register(saga(None)).unwrap();
    let started = Instant::now();
    let report = restarted.recover().await.unwrap();
    let took = started.elapsed();
    assert!(
        report.errors.is_empty(),
        "{:?}",
        &report.errors[..report.errors.len().min(3)]
    );
    let completed = report
        .outcomes
        .iter()
        .filter(|o| o.state == SagaState::Completed)
        .count();
    let log = SagaLog::new(store).unwrap();
    let (left, _) = log.list(SagaState::Running, 10, None).await.unwrap();
    assert!(left.is_empty(), "sagas left running after recovery");
    restarted.shutdown();
    (completed, took, preparation)
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{nanos:x}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let recover_count: usize = std::env::var("SAGA_BENCH_RECOVER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&format!("sqlite://{}/bench.db", dir.path().display()))
        .await
        .unwrap();
    // Warm-up (table creation, page cache), not counted.
    throughput(&sqlite, "warm", 200, Duration::from_secs(2)).await;
    let (n, rate) = throughput(&sqlite, "sqlite", 20_000, Duration::from_secs(10)).await;
    println!("sqlite    3-step sagas: {n:>6} in a run, {rate:>8.0} sagas/s (64 at once)");
    let (n, took, prep) = recovery(
        &sqlite,
        "sqlite-crashed",
        recover_count,
        Duration::from_secs(120),
    )
    .await;
    println!(
        "sqlite    recovery: {n:>6} unfinished sagas completed in {:.2} s ({:.0} sagas/s; preparing them took {:.2} s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        prep.as_secs_f64()
    );

    let base = std::env::var("TRELLIS_CASSANDRA_URL")
        .unwrap_or_else(|_| "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_bench".into());
    let base = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(b, _)| b)
        .to_owned();
    match Store::open(&format!("{base}/{}", unique("saga_bench"))).await {
        Ok(cassandra) => {
            throughput(&cassandra, "warm", 50, Duration::from_secs(5)).await;
            let (n, rate) =
                throughput(&cassandra, "cassandra", 3_000, Duration::from_secs(10)).await;
            println!("cassandra 3-step sagas: {n:>6} in a run, {rate:>8.0} sagas/s (64 at once)");
            let count = recover_count.min(1_000);
            let (n, took, prep) = recovery(
                &cassandra,
                "cassandra-crashed",
                count,
                Duration::from_secs(120),
            )
            .await;
            println!(
                "cassandra recovery: {n:>6} unfinished sagas completed in {:.2} s ({:.0} sagas/s; preparing them took {:.2} s)",
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64(),
                prep.as_secs_f64()
            );
        }
        Err(e) => println!("cassandra: skipped ({e})"),
    }
}
