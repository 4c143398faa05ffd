#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Embedded transport benchmarks, with raw rusqlite measured in the same run as the
//! baseline. `cargo bench -p trellis-events`.
//!
//! - publish throughput, batched (`publish_batch` of 1,000) and one by one (sequential
//!   `publish` awaits, and 8 concurrent publishers);
//! - end-to-end latency at 1,000 events/s: producer and consumer on two separate store
//!   handles of one file, so the consumer learns about events only by polling the change
//!   marker (the cross-process path), at the default 2 ms poll interval.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use trellis_events::{Event, EventBus, Message, StartFrom, SubscribeOptions};
use trellis_store::Store;

const BATCHED_EVENTS: usize = 100_000;
const BATCH: usize = 1_000;
const SINGLE_EVENTS: usize = 10_000;
const RATE_EVENTS: usize = 5_000;

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order: u64,
    customer: String,
    cents: u64,
}

fn order(n: usize) -> OrderPlaced {
    OrderPlaced {
        order: n as u64,
        customer: format!("customer-{}", n % 977),
        cents: (n as u64 * 37) % 100_000,
    }
}

fn raw_connection(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .unwrap();
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL;
         CREATE TABLE t (pk TEXT NOT NULL, ck TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (pk, ck)) WITHOUT ROWID;",
    )
    .unwrap();
    conn
}

/// Raw rusqlite: the same row shape as the log, inserts in transactions of `per_tx`.
fn raw_inserts(path: &std::path::Path, total: usize, per_tx: usize) -> f64 {
    let mut conn = raw_connection(path);
    let value = serde_json::to_vec(&order(1)).unwrap();
    let start = Instant::now();
    let mut n = 0;
    while n < total {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO t (pk, ck, value) VALUES (?1, ?2, ?3)")
                .unwrap();
            for _ in 0..per_tx {
                stmt.execute(rusqlite::params![
                    format!("topic/{}", n % 4),
                    format!("o/{n:020}"),
                    value
                ])
                .unwrap();
                n += 1;
            }
        }
        tx.commit().unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn open(dir: &tempfile::TempDir, name: &str) -> Store {
    Store::open(&format!("sqlite://{}/{name}", dir.path().display()))
        .await
        .unwrap()
}

/// The store alone: what one sequential publish costs underneath, a conditional batch of
/// two mutations (the head row's compare-and-set and the record).
async fn store_batches(store: &Store) -> f64 {
    let t = store.table("raw_store").unwrap();
    let value = serde_json::to_vec(&order(1)).unwrap();
    t.put("p", "head", b"0".to_vec(), None).await.unwrap();
    let mut version = 1;
    let start = Instant::now();
    for n in 0..SINGLE_EVENTS {
        let batch = trellis_store::Batch::new()
            .push(
                t.mutation_update_if_version(
                    "p",
                    "head",
                    version,
                    n.to_string().into_bytes(),
                    None,
                )
                .unwrap(),
            )
            .push(
                t.mutation_put("p", &format!("o/{n:020}"), value.clone(), None)
                    .unwrap(),
            );
        match store.batch(batch).await.unwrap() {
            trellis_store::BatchOutcome::Applied { versions } => version = versions[0],
            other => panic!("{other:?}"),
        }
    }
    SINGLE_EVENTS as f64 / start.elapsed().as_secs_f64()
}

async fn publish_batched(bus: &EventBus) -> f64 {
    let start = Instant::now();
    for chunk in 0..BATCHED_EVENTS / BATCH {
        let messages = (chunk * BATCH..(chunk + 1) * BATCH)
            .map(|n| Message::new(order(n)).key(format!("c{}", n % 977)));
        bus.publish_batch("batched", messages).await.unwrap();
    }
    BATCHED_EVENTS as f64 / start.elapsed().as_secs_f64()
}

async fn publish_single(bus: &EventBus) -> f64 {
    let start = Instant::now();
    for n in 0..SINGLE_EVENTS {
        bus.publish(
            "single",
            Message::new(order(n)).key(format!("c{}", n % 977)),
        )
        .await
        .unwrap();
    }
    SINGLE_EVENTS as f64 / start.elapsed().as_secs_f64()
}

async fn publish_concurrent(bus: &EventBus, tasks: usize) -> f64 {
    let start = Instant::now();
    let per_task = SINGLE_EVENTS / tasks;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    let n = t * per_task + i;
                    bus.publish(
                        "concurrent",
                        Message::new(order(n)).key(format!("c{}", n % 977)),
                    )
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    (per_task * tasks) as f64 / start.elapsed().as_secs_f64()
}

/// Latencies (publish call → handler start) at a steady 1,000 events/s.
async fn latency(producer: &EventBus, consumer: &EventBus) -> Vec<Duration> {
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let sub = {
        let latencies = latencies.clone();
        consumer
            .subscribe_with(
                "latency",
                "bench",
                SubscribeOptions::default().start(StartFrom::Earliest),
                move |e: Event<OrderPlaced>| {
                    let age = SystemTime::now().duration_since(e.time).unwrap_or_default();
                    latencies.lock().unwrap().push(age);
                    async { Ok::<(), String>(()) }
                },
            )
            .await
            .unwrap()
    };
    // Let the member claim its partitions before the clock starts.
    producer
        .publish("latency", Message::new(order(0)))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "consumer never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies.lock().unwrap().clear();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..RATE_EVENTS {
        tick.tick().await;
        producer
            .publish(
                "latency",
                Message::new(order(n)).key(format!("c{}", n % 977)),
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap().len() < RATE_EVENTS {
        assert!(Instant::now() < deadline, "events lost in the latency run");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sub.shutdown().await.unwrap();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    l
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let raw_batched = raw_inserts(&dir.path().join("raw1.db"), BATCHED_EVENTS, BATCH);
        let raw_single = raw_inserts(&dir.path().join("raw2.db"), SINGLE_EVENTS, 1);

        let store = open(&dir, "bus.db").await;
        let bus = EventBus::embedded(&store).unwrap();
        let store_only = store_batches(&store).await;
        let batched = publish_batched(&bus).await;
        let single = publish_single(&bus).await;
        let concurrent = publish_concurrent(&bus, 8).await;

        let producer = EventBus::embedded(&open(&dir, "latency.db").await).unwrap();
        let consumer = EventBus::embedded(&open(&dir, "latency.db").await).unwrap();
        let lat = latency(&producer, &consumer).await;

        println!("trellis-events embedded benchmarks (2 worker threads, SQLite WAL, synchronous=NORMAL)");
        println!(
            "{:<44} {:>12} {:>12} {:>8}",
            "case", "events/s", "raw rows/s", "ratio"
        );
        for (case, value, raw) in [
            ("publish batched (1,000 per call)", batched, raw_batched),
            ("publish one by one (sequential awaits)", single, raw_single),
            ("publish one by one (8 concurrent tasks)", concurrent, raw_single),
            ("store alone: CAS+put batch, sequential", store_only, raw_single),
        ] {
            println!(
                "{case:<44} {value:>12.0} {raw:>12.0} {:>7.2}x",
                value / raw
            );
        }
        println!(
            "targets: batched >= 100,000/s: {}; one by one >= 10,000/s: {}",
            if batched >= 100_000.0 { "met" } else { "MISSED" },
            if single >= 10_000.0 { "met" } else { "MISSED" }
        );
        println!(
            "end-to-end latency at 1,000 events/s, {} events, consumer on its own store handle (2 ms poll): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < 10 ms: {})",
            lat.len(),
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3,
            if pct(&lat, 0.99) < Duration::from_millis(10) { "met" } else { "MISSED" }
        );
    });
}
