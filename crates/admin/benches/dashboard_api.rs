//! What the dashboard asks of a large node, run with
//! `cargo bench -p trellis-admin --bench dashboard_api`: 1,000 services × 10 instances in a
//! SQLite store, a real node on 127.0.0.1, and the latency (p50, p99, max) of
//!
//! 1. `GET /v1/services` — the services page;
//! 2. `GET /v1/services/{service}/instances` — a service page, over random services;
//! 3. `GET /v1/services/{service}/instances/{id}` — an instance page;
//! 4. `GET /metrics` — what the services and metrics pages poll (it walks every instance).
//!
//! One client on one connection, requests in sequence, as one browser tab would. Target:
//! p99 under 100 ms for 1 and 2. Every loop is bounded in count and time;
//! `TRELLIS_BENCH_QUICK=1` shrinks the counts ten times.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use trellis_admin::{Node, Settings};
use trellis_registry::{Instance, InstanceRecord, InstanceStatus};
use trellis_store::{Batch, Store};

const SERVICES: usize = 1_000;
const INSTANCES_PER_SERVICE: usize = 10;
/// The registry's default table and the row format it reads (`crates/registry`); the setup
/// checks over HTTP that the node sees every row, so a format change fails the bench.
const TABLE: &str = "service_registry";
const PARTITION: &str = "instances";
const TARGET_P99_MS: f64 = 100.0;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn service_name(i: usize) -> String {
    format!("service-{i:04}")
}

fn record(service: &str, i: usize) -> InstanceRecord {
    let now = now_ms();
    InstanceRecord {
        service: service.to_owned(),
        instance: Instance::new(format!("{service}-{i}"), "127.0.0.1", 3000 + i as u16)
            .version("1.2.0")
            .metadata("region", "us-east-1")
            .metadata("zone", "us-east-1a"),
        status: if i == 0 {
            InstanceStatus::Unhealthy
        } else {
            InstanceStatus::Healthy
        },
        registered_at_ms: now,
        updated_at_ms: now,
        owner: "bench-host:1".into(),
        expires_at_ms: 0,
    }
}

/// Writes every record straight into the registry table, 500 per transaction, with a lease
/// that outlives the bench.
async fn populate(url: &str) {
    let store = Store::open(url).await.unwrap();
    let table = store.table(TABLE).unwrap();
    let records: Vec<InstanceRecord> = (0..SERVICES)
        .flat_map(|s| {
            let name = service_name(s);
            (0..INSTANCES_PER_SERVICE).map(move |i| record(&name, i))
        })
        .collect();
    for chunk in records.chunks(500) {
        let mut batch = Batch::new();
        for r in chunk {
            batch.add(
                table
                    .mutation_put(
                        PARTITION,
                        &format!("{}/{}", r.service, r.instance.id),
                        serde_json::to_vec(r).unwrap(),
                        Some(Duration::from_secs(3_600)),
                    )
                    .unwrap(),
            );
        }
        store.batch(batch).await.unwrap();
    }
}

/// One measured endpoint: `path(i)` is the i-th request's path; `targeted` when the
/// 100 ms p99 target applies.
struct Case {
    name: &'static str,
    count: usize,
    path: Box<dyn Fn(usize) -> String>,
    targeted: bool,
}

struct Figures {
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    bytes: usize,
}

/// Runs up to `count` requests (or until `limit` passes) of the paths `path(i)` yields.
async fn measure(
    http: &reqwest::Client,
    base: &str,
    count: usize,
    limit: Duration,
    path: impl Fn(usize) -> String,
) -> Figures {
    // Warm-up: connection, allocator, caches.
    for i in 0..20 {
        let r = http.get(format!("{base}{}", path(i))).send().await.unwrap();
        assert!(r.status().is_success(), "{} {}", path(i), r.status());
        r.bytes().await.unwrap();
    }
    let mut times = Vec::with_capacity(count);
    let mut bytes = 0;
    let deadline = Instant::now() + limit;
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let url = format!("{base}{}", path(i));
        let started = Instant::now();
        let response = http.get(&url).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        let body = response.bytes().await.unwrap();
        times.push(started.elapsed().as_secs_f64() * 1e3);
        bytes = body.len();
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Figures {
        count: times.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: times[times.len() - 1],
        bytes,
    }
}

fn main() {
    let quick = std::env::var("TRELLIS_BENCH_QUICK").is_ok_and(|v| v == "1");
    let scale = if quick { 10 } else { 1 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/bench.db", dir.path().display());
        let started = Instant::now();
        populate(&url).await;
        let populated = started.elapsed();
        let mut settings = Settings::default();
        settings.store.url = url;
        settings.admin.listen = "127.0.0.1:0".into();
        let node = Node::start(settings).await.unwrap();
        let base = format!("http://{}", node.admin_addr());
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();

        // The node must see every service and instance before anything is measured.
        let list: serde_json::Value = http
            .get(format!("{base}/v1/services"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let services = list["services"].as_array().unwrap();
        assert_eq!(services.len(), SERVICES, "the node must see every service");
        assert!(
            services
                .iter()
                .all(|s| s["instances"] == INSTANCES_PER_SERVICE),
            "the node must see every instance"
        );
        println!(
            "dashboard API bench: {SERVICES} services × {INSTANCES_PER_SERVICE} instances \
             (written to SQLite in {:.1} s), one connection, sequential requests",
            populated.as_secs_f64()
        );

        // A fixed pseudo-random walk over the services (no RNG dependency).
        let pick = |i: usize| (i.wrapping_mul(7_919) + 13) % SERVICES;
        let cases = [
            Case {
                name: "GET /v1/services",
                count: 500 / scale,
                path: Box::new(|_| "/v1/services".to_owned()),
                targeted: true,
            },
            Case {
                name: "GET /v1/services/{service}/instances",
                count: 5_000 / scale,
                path: Box::new(move |i| format!("/v1/services/{}/instances", service_name(pick(i)))),
                targeted: true,
            },
            Case {
                name: "GET /v1/services/{service}/instances/{id}",
                count: 5_000 / scale,
                path: Box::new(move |i| {
                    let s = service_name(pick(i));
                    format!("/v1/services/{s}/instances/{s}-{}", i % INSTANCES_PER_SERVICE)
                }),
                targeted: true,
            },
            Case {
                name: "GET /metrics",
                count: 200 / scale,
                path: Box::new(|_| "/metrics".to_owned()),
                targeted: false,
            },
        ];
        let mut failed = Vec::new();
        for Case {
            name,
            count,
            path,
            targeted,
        } in cases
        {
            let f = measure(&http, &base, count, Duration::from_secs(30), path).await;
            let verdict = match (targeted, f.p99_ms < TARGET_P99_MS) {
                (false, _) => "(no target)".to_owned(),
                (true, true) => format!("ok (target p99 < {TARGET_P99_MS} ms)"),
                (true, false) => {
                    failed.push(name);
                    format!("MISSED (target p99 < {TARGET_P99_MS} ms)")
                }
            };
            println!(
                "  {name:<44} n={:<5} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  {:>8} bytes  {verdict}",
                f.count, f.p50_ms, f.p99_ms, f.max_ms, f.bytes
            );
        }
        node.shutdown().await.unwrap();
        if !failed.is_empty() {
            eprintln!("targets missed: {failed:?}");
            std::process::exit(1);
        }
    });
}
