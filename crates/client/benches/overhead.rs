//! What a `ServiceClient` GET costs over a raw reqwest GET to the same local server, in
//! the same run: sequential requests, one at a time, body read, the clients taking turns
//! request by request so that both see the same machine. The headline is the ratio
//! of medians (the mean on a shared 2-core VM is dominated by scheduling outliers).
//!
//! The server (axum, answering a 13-byte body) and the registry run on their own thread
//! and runtime; the clients share another thread. A third client, raw reqwest with a 10 s
//! timeout, shows what a timer per request costs a plain reqwest user. `cargo bench -p trellis-client
//! --bench overhead` runs 5 rounds of at most 4 000 request triples or 3 s each (15 s in
//! all, 5 s per client); without `--bench` (as under `cargo test --all-targets`) one short round,
//! as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use trellis_client::ServiceClient;
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

struct Settings {
    rounds: usize,
    per_round: usize,
    round_budget: Duration,
}

#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn mean(&self) -> Duration {
        self.0.iter().sum::<Duration>() / self.0.len().max(1) as u32
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let settings = if full {
        Settings {
            rounds: 5,
            per_round: 4_000,
            round_budget: Duration::from_secs(3),
        }
    } else {
        Settings {
            rounds: 1,
            per_round: 200,
            round_budget: Duration::from_millis(500),
        }
    };

    // Server + registry on their own thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&format!("sqlite://{}/bench.db", dir.path().display()))
                .await
                .unwrap();
            let registry = ServiceRegistry::start(&store, RegistryOptions::default())
                .await
                .unwrap();
            registry
                .register(
                    "bench-service",
                    Instance::new("bench-1", "127.0.0.1", addr.port()),
                )
                .await
                .unwrap();
            tx.send((addr, registry.clone())).unwrap();
            let app = Router::new().route("/ping", get(|| async { "pong from one" }));
            axum::serve(listener, app).await.unwrap();
            drop(dir);
        });
    });
    let (addr, registry) = rx.recv().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let raw = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
        // What a reqwest user who sets a timeout pays (a timer per request).
        let raw_timeout = reqwest::Client::builder()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = format!("http://{addr}/ping");
        let client = ServiceClient::new("bench-service", &registry).unwrap();

        // Warm-up: connections open, caches hot.
        for _ in 0..300 {
            let body = raw.get(&url).send().await.unwrap().bytes().await.unwrap();
            assert_eq!(&body[..], b"pong from one");
            let body = raw_timeout.get(&url).send().await.unwrap().bytes().await.unwrap();
            assert_eq!(&body[..], b"pong from one");
            let body = client.get("/ping").await.unwrap().bytes().await.unwrap();
            assert_eq!(&body[..], b"pong from one");
        }

        // raw reqwest, ServiceClient, raw reqwest with a timeout.
        let mut samples: [Samples; 3] = Default::default();
        println!(
            "{:<6} {:>9} {:>12} {:>15} {:>8} {:>20}",
            "round", "requests", "raw p50 µs", "client p50 µs", "ratio", "raw+timeout p50 µs"
        );
        for round in 0..settings.rounds {
            let before: Vec<usize> = samples.iter().map(|s| s.0.len()).collect();
            let started = Instant::now();
            // Triples, in rotating order, so that drift and order effects hit all alike.
            for i in 0..settings.per_round {
                if started.elapsed() > settings.round_budget {
                    break;
                }
                for k in 0..3 {
                    let which = (i + k) % 3;
                    let t = Instant::now();
                    let body = match which {
                        0 => raw.get(&url).send().await.unwrap().bytes().await.unwrap(),
                        1 => client.get("/ping").await.unwrap().bytes().await.unwrap(),
                        _ => raw_timeout.get(&url).send().await.unwrap().bytes().await.unwrap(),
                    };
                    let took = t.elapsed();
                    std::hint::black_box(body);
                    samples[which].0.push(took);
                }
            }
            let round_p50 = |k: usize| Samples(samples[k].0[before[k]..].to_vec()).quantile(0.5);
            println!(
                "{:<6} {:>9} {:>12.1} {:>15.1} {:>7.3}× {:>20.1}",
                round + 1,
                samples[0].0.len() - before[0],
                us(round_p50(0)),
                us(round_p50(1)),
                round_p50(1).as_secs_f64() / round_p50(0).as_secs_f64(),
                us(round_p50(2)),
            );
        }
        let [raw_samples, client_samples, timeout_samples] = &samples;
        println!();
        for (name, s) in [
            ("raw reqwest", raw_samples),
            ("ServiceClient", client_samples),
            ("raw + timeout", timeout_samples),
        ] {
            println!(
                "{name:<14} {:>6} requests  mean {:>7.1} µs  p50 {:>7.1} µs  p99 {:>7.1} µs",
                s.0.len(),
                us(s.mean()),
                us(s.quantile(0.5)),
                us(s.quantile(0.99)),
            );
        }
        let p50 = |s: &Samples| s.quantile(0.5).as_secs_f64();
        let ratio = p50(client_samples) / p50(raw_samples);
        println!(
            "ServiceClient / raw reqwest at p50: {ratio:.3}× ({:+.1} µs, {:+.1} %; target ≤ 1.10×); mean {:.3}×",
            (p50(client_samples) - p50(raw_samples)) * 1e6,
            (ratio - 1.0) * 100.0,
            client_samples.mean().as_secs_f64() / raw_samples.mean().as_secs_f64(),
        );
    });
}
