#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! A consumer process killed with SIGKILL in the middle of 100,000 events on Kafka: after a
//! restart every event was processed at least once and none is missing (count and
//! checksums). The producer is this process; the consumer is a child process (this test
//! binary again) that appends each event's number to a file before the bus commits it. Half
//! the events are published while the first consumer runs. Skipped with a notice when no
//! broker runs, unless `TRELLIS_REQUIRE_ENGINES=1`.

mod kafka_support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_support::{broker_up, open, unique};
use trellis_events::{Event, EventBus, Message, StartFrom, SubscribeOptions};

const TOTAL: u64 = 100_000;
const GROUP: &str = "crash-group";
const TOPIC_VAR: &str = "TRELLIS_KAFKA_CRASH_TOPIC";
const OUT_VAR: &str = "TRELLIS_KAFKA_CRASH_OUT";

async fn progress(bus: &EventBus, topic: &str) -> u64 {
    bus.transport()
        .committed(topic, GROUP)
        .await
        .map(|c| c.iter().map(|o| o.unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// Child half: consumes until the group committed every event, appending each number to
/// the output file first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_child() {
    let (Ok(topic), Ok(out)) = (std::env::var(TOPIC_VAR), std::env::var(OUT_VAR)) else {
        return;
    };
    let bus = open().await;
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .unwrap(),
    );
    let options = SubscribeOptions::default()
        .start(StartFrom::Earliest)
        .session_timeout(Duration::from_secs(6));
    let sub = bus
        .subscribe_with(&topic, GROUP, options, move |event: Event<u64>| {
            // One write(2) per event: it is in the file before the offset is committed.
            let result = (&*file)
                .write_all(format!("{}\n", event.payload).as_bytes())
                .map_err(|e| e.to_string());
            std::future::ready(result)
        })
        .await
        .unwrap();
    println!("CHILD SUBSCRIBED");
    let deadline = Instant::now() + Duration::from_secs(300);
    while progress(&bus, &topic).await < TOTAL {
        assert!(Instant::now() < deadline, "child never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sub.shutdown().await.unwrap();
    println!("CHILD DONE");
}

fn spawn_child(topic: &str, out: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "consumer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(TOPIC_VAR, topic)
        .env(OUT_VAR, out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn publish_range(bus: &EventBus, topic: &str, range: std::ops::Range<u64>) {
    let mut n = range.start;
    while n < range.end {
        let end = (n + 5_000).min(range.end);
        bus.publish_batch(
            topic,
            (n..end).map(|i| Message::new(i).key(format!("k{}", i % 1_000))),
        )
        .await
        .unwrap();
        n = end;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    if std::env::var(TOPIC_VAR).is_ok() || !broker_up() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("processed.txt");
    let bus = open().await;
    let topic = unique("crash");
    publish_range(&bus, &topic, 0..TOTAL / 2).await;

    let mut first = spawn_child(&topic, &out);
    let mut stdout = BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("CHILD SUBSCRIBED") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "child exited early"
        );
    }
    publish_range(&bus, &topic, TOTAL / 2..TOTAL).await;
    let published_at = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress(&bus, &topic).await < TOTAL * 3 / 5 {
        assert!(Instant::now() < deadline, "child made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = progress(&bus, &topic).await;
    let lines_at_kill = std::fs::read_to_string(&out).unwrap().lines().count();
    assert!(
        at_kill < TOTAL,
        "the child finished before the kill ({at_kill}); the test proves nothing"
    );

    let restart = Instant::now();
    let second = spawn_child(&topic, &out);
    let output = tokio::task::spawn_blocking(move || second.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("CHILD DONE"),
        "restarted consumer failed:\n{stdout}\n{stderr}"
    );
    let recovery = restart.elapsed();

    let text = std::fs::read_to_string(&out).unwrap();
    let processed: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    let distinct: BTreeSet<u64> = processed.iter().copied().collect();
    let sum: u128 = distinct.iter().map(|&n| u128::from(n)).sum();
    let squares: u128 = distinct
        .iter()
        .map(|&n| u128::from(n) * u128::from(n))
        .sum();
    assert_eq!(
        distinct.len() as u64,
        TOTAL,
        "events missing (killed at {at_kill})"
    );
    assert_eq!(distinct.last(), Some(&(TOTAL - 1)));
    assert_eq!(sum, (0..u128::from(TOTAL)).sum::<u128>(), "checksum");
    assert_eq!(
        squares,
        (0..u128::from(TOTAL)).map(|n| n * n).sum::<u128>(),
        "checksum of squares"
    );
    println!(
        "SIGKILL at {at_kill} of {TOTAL} committed ({lines_at_kill} processed); restart \
         caught up in {recovery:.1?}; {} processed in all ({} twice); all {TOTAL} present; \
         published in {published_at:.1?}, whole test {:.1?}",
        processed.len(),
        processed.len() as u64 - TOTAL,
        started.elapsed()
    );
}
