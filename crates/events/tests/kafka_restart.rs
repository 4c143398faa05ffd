#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The Kafka broker restarted (`scripts/services down kafka`, then `up kafka`) while four
//! publishers keep publishing and a subscriber keeps consuming: afterwards every event that
//! was published is in the topic exactly once (the idempotent producer retried the batches
//! that were in flight) and was handled (count and checksums). Skipped with a notice when no
//! broker runs, unless `TRELLIS_REQUIRE_ENGINES=1`.

mod kafka_support;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_support::{broker_up, open, services, unique};
use trellis_events::{Event, Message, SubscribeOptions};

const PUBLISHERS: u64 = 4;
const BATCH: u64 = 100;
/// Pause between one publisher's batches: about 2,000 events/s together.
const PACE: Duration = Duration::from_millis(200);
/// Hard bounds of the load loop.
const MAX_EVENTS: u64 = 500_000;
const DEADLINE: Duration = Duration::from_secs(240);

/// Starts the broker again if the test ends while it is down.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            services("up");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_while_publishing_loses_nothing() {
    if !broker_up() {
        return;
    }
    if kafka_support::url() != "kafka://127.0.0.1:9092" {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the restart test restarts the local broker of scripts/services; \
             TRELLIS_KAFKA_URL points elsewhere"
        );
        return;
    }
    let _guard = BrokerGuard;
    let started = Instant::now();
    let bus = open().await;
    let topic = unique("restart");

    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        move |event: Event<u64>| {
            seen.lock().unwrap().push(event.payload);
            std::future::ready(Ok::<(), String>(()))
        }
    };
    let sub = bus
        .subscribe_with(
            &topic,
            "restart",
            SubscribeOptions::default().session_timeout(Duration::from_secs(6)),
            handler,
        )
        .await
        .unwrap();

    // Publishers take ranges of numbers from one counter; a batch is retried until it is
    // acknowledged, so every number below the counter's final value must arrive.
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let republished = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (bus, topic, next, acked, republished, stop) = (
            bus.clone(),
            topic.clone(),
            next.clone(),
            acked.clone(),
            republished.clone(),
            stop.clone(),
        );
        publishers.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(PACE);
            while !stop.load(Ordering::SeqCst) && started.elapsed() < DEADLINE {
                pace.tick().await;
                let first = next.fetch_add(BATCH, Ordering::SeqCst);
                if first >= MAX_EVENTS {
                    break;
                }
                let messages: Vec<_> = (first..first + BATCH)
                    .map(|n| Message::new(n).key(format!("key-{}", n % 97)))
                    .collect();
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match bus.publish_batch(&topic, messages.clone()).await {
                        Ok(_) => break,
                        Err(e) => {
                            assert!(
                                e.is_retryable() && started.elapsed() < DEADLINE,
                                "publisher {p}: {e}"
                            );
                            eprintln!("publisher {p}: attempt {attempt} failed, retrying: {e}");
                            republished.fetch_add(BATCH, Ordering::SeqCst);
                        }
                    }
                }
                acked.fetch_add(BATCH, Ordering::SeqCst);
            }
        }));
    }

    let wait_acked = |target: u64| {
        let acked = acked.clone();
        async move {
            while acked.load(Ordering::SeqCst) < target {
                assert!(started.elapsed() < DEADLINE, "publishers stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_acked(5_000).await;
    let at_down = acked.load(Ordering::SeqCst);
    let restart = Instant::now();
    tokio::task::spawn_blocking(|| services("down"))
        .await
        .unwrap();
    // Batches taken but not acknowledged now wait in the producer for the broker.
    let acked_while_down = acked.load(Ordering::SeqCst);
    let taken_while_down = next.load(Ordering::SeqCst).min(MAX_EVENTS);
    tokio::task::spawn_blocking(|| services("up"))
        .await
        .unwrap();
    let downtime = restart.elapsed();
    assert!(
        taken_while_down > acked_while_down,
        "no batch was in flight while the broker was down; the test proves nothing"
    );
    // Keep publishing for a while after the restart, then stop.
    let after_up = acked.load(Ordering::SeqCst);
    wait_acked(after_up + 5_000).await;
    stop.store(true, Ordering::SeqCst);
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let total = acked.load(Ordering::SeqCst);
    assert_eq!(total, next.load(Ordering::SeqCst).min(MAX_EVENTS));

    // Every number arrived at the consumer.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let distinct: BTreeSet<u64> = seen.lock().unwrap().iter().copied().collect();
        if distinct.len() as u64 == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer has {} of {total} events",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sub.shutdown().await.unwrap();
    let deliveries = seen.lock().unwrap().clone();
    let distinct: BTreeSet<u64> = deliveries.iter().copied().collect();
    let sum: u128 = distinct.iter().map(|&n| u128::from(n)).sum();
    let squares: u128 = distinct
        .iter()
        .map(|&n| u128::from(n) * u128::from(n))
        .sum();
    assert_eq!(distinct.len() as u64, total, "count");
    assert_eq!(sum, (0..u128::from(total)).sum::<u128>(), "checksum");
    assert_eq!(
        squares,
        (0..u128::from(total)).map(|n| n * n).sum::<u128>(),
        "checksum of squares"
    );
    // The idempotent producer wrote each acknowledged record once; only batches the test
    // itself published again after an error may be there twice.
    let written: u64 = bus
        .transport()
        .end_offsets(&topic)
        .await
        .unwrap()
        .iter()
        .sum();
    let republished = republished.load(Ordering::SeqCst);
    assert!(
        written >= total && written <= total + republished,
        "{written} records for {total} events ({republished} republished)"
    );
    println!(
        "broker restart: {total} events ({at_down} acknowledged when the restart began, \
         {acked_while_down} when the broker was down with {} more in flight, {after_up} when \
         it was up again; downtime {downtime:.1?}); {written} records written, \
         {republished} republished by the test, {} deliveries ({} redelivered); all {total} \
         handled",
        taken_while_down - acked_while_down,
        deliveries.len(),
        deliveries.len() as u64 - total
    );
}
