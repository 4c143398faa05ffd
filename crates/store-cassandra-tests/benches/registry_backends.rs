//! The registry on SQLite and on Cassandra, side by side in one run: registrations and
//! lease-renewal writes per second, and `discover` latency (a snapshot read on both).
//!
//! `cargo bench -p trellis-cassandra-tests --bench registry_backends`; the node comes from
//! `TRELLIS_CASSANDRA_URL` (default `cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_bench`).
//! Every loop is bounded in count and time.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

struct Figures {
    register_per_s: f64,
    put_per_s: f64,
    discover_ns: f64,
}

async fn measure(store: Store, run: &str) -> Figures {
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    let service = format!("bench-{run}");
    // Registrations, one after the other, at most 300 or 5 s.
    let started = Instant::now();
    let mut registered = 0u32;
    while registered < 300 && started.elapsed() < Duration::from_secs(5) {
        registry
            .register(
                &service,
                Instance::new(format!("i{registered}"), "127.0.0.1", 3000)
                    .ttl(Duration::from_secs(120)),
            )
            .await
            .unwrap();
        registered += 1;
    }
    let register_per_s = f64::from(registered) / started.elapsed().as_secs_f64();

    // Lease renewals (what steady state costs): 16 writers for 3 s.
    let table = store.table("service_registry").unwrap();
    let row = table
        .get("instances", &format!("{service}/i0"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..16 {
        let (table, row, service) = (table.clone(), row.clone(), service.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(3) && n < 100_000 {
                let id = (n as usize * 16 + w) % (registered as usize);
                table
                    .put(
                        "instances",
                        &format!("{service}/i{id}"),
                        row.clone(),
                        Some(Duration::from_secs(120)),
                    )
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut puts = 0;
    for w in writers {
        puts += w.await.unwrap();
    }
    let put_per_s = puts as f64 / started.elapsed().as_secs_f64();

    // discover + first healthy-or-unknown instance, 1,000,000 calls.
    let calls = 1_000_000u32;
    let started = Instant::now();
    for _ in 0..calls {
        black_box(
            registry
                .discover(black_box(&service))
                .iter()
                .next()
                .is_some(),
        );
    }
    let discover_ns = started.elapsed().as_nanos() as f64 / f64::from(calls);
    registry.shutdown().await.unwrap();
    Figures {
        register_per_s,
        put_per_s,
        discover_ns,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let run = format!("{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Store::open(&format!("sqlite://{}/bench.db", dir.path().display()))
            .await
            .unwrap();
        let lite = measure(sqlite, &run).await;
        let url = std::env::var("TRELLIS_CASSANDRA_URL")
            .map(|u| format!("{}/trellis_bench", u.rsplit_once('/').unwrap().0))
            .unwrap_or_else(|_| {
                "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_bench".into()
            });
        let cassandra = match Store::open(&url).await {
            Ok(store) => store,
            Err(e) => {
                println!("no Cassandra node ({e}); start it with scripts/services up cassandra");
                return;
            }
        };
        let cass = measure(cassandra, &run).await;
        println!("registry on SQLite and on Cassandra (one node on this machine), same run");
        println!("| measure | SQLite | Cassandra | Cassandra / SQLite |");
        println!("|---|---|---|---|");
        println!(
            "| register/s (one task) | {:.0} | {:.0} | {:.3} |",
            lite.register_per_s,
            cass.register_per_s,
            cass.register_per_s / lite.register_per_s
        );
        println!(
            "| lease-renewal writes/s (16 tasks) | {:.0} | {:.0} | {:.3} |",
            lite.put_per_s,
            cass.put_per_s,
            cass.put_per_s / lite.put_per_s
        );
        println!(
            "| discover ns/call | {:.1} | {:.1} | {:.2} |",
            lite.discover_ns,
            cass.discover_ns,
            cass.discover_ns / lite.discover_ns
        );
    });
}
