#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! A consumer process killed with SIGKILL in the middle of 100,000 events: after a restart
//! every event was processed at least once and none is missing (count and checksums). The
//! producer is this process, the consumer a child process on the same SQLite file; half the
//! events are published while the first consumer runs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trellis_events::{Event, EventBus, Message, StartFrom, SubscribeOptions};
use trellis_store::Store;

const TOTAL: u64 = 100_000;
const TOPIC: &str = "crash-test";
const GROUP: &str = "crash-group";
const CHILD_VAR: &str = "TRELLIS_EVENTS_CONSUMER_CHILD";

/// Child half: consumes until the group caught up with the topic's end, recording each
/// event's payload under its (partition, offset) in the `seen` table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_child() {
    let Ok(url) = std::env::var(CHILD_VAR) else {
        return;
    };
    let store = Store::open(&url).await.unwrap();
    let bus = EventBus::embedded(&store).unwrap();
    let seen = store.table("seen").unwrap();
    let options = SubscribeOptions::default()
        .start(StartFrom::Earliest)
        .session_timeout(Duration::from_secs(2));
    let sub = bus
        .subscribe_with(TOPIC, GROUP, options, move |event: Event<u64>| {
            let seen = seen.clone();
            async move {
                seen.put(
                    &format!("p{}", event.partition),
                    &format!("{:020}", event.offset),
                    event.payload.to_string().into_bytes(),
                    None,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
        })
        .await
        .unwrap();
    println!("CHILD SUBSCRIBED");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let ends: u64 = bus
            .transport()
            .end_offsets(TOPIC)
            .await
            .unwrap()
            .iter()
            .sum();
        let committed: u64 = bus
            .transport()
            .committed(TOPIC, GROUP)
            .await
            .unwrap()
            .iter()
            .map(|c| c.unwrap_or(0))
            .sum();
        if ends == TOTAL && committed == TOTAL {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "child never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sub.shutdown().await.unwrap();
    println!("CHILD DONE");
}

fn spawn_child(url: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "consumer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn committed(bus: &EventBus) -> u64 {
    bus.transport()
        .committed(TOPIC, GROUP)
        .await
        .map(|c| c.iter().map(|o| o.unwrap_or(0)).sum())
        .unwrap_or(0)
}

async fn publish_range(bus: &EventBus, range: std::ops::Range<u64>) {
    let mut n = range.start;
    while n < range.end {
        let end = (n + 5_000).min(range.end);
        bus.publish_batch(
            TOPIC,
            (n..end).map(|i| Message::new(i).key(format!("k{}", i % 1_000))),
        )
        .await
        .unwrap();
        n = end;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    if std::env::var(CHILD_VAR).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/crash.db", dir.path().display());
    let store = Store::open(&url).await.unwrap();
    let bus = EventBus::embedded(&store).unwrap();
    publish_range(&bus, 0..TOTAL / 2).await;

    let mut first = spawn_child(&url);
    // Wait until the child is visibly consuming, then publish the rest meanwhile.
    let mut stdout = BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("CHILD SUBSCRIBED") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "child exited early"
        );
    }
    publish_range(&bus, TOTAL / 2..TOTAL).await;
    // Generous: a debug build on a loaded 2-core machine is slow, and this bounds a wait,
    // it measures nothing.
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(400);
    let mut next_report = started + Duration::from_secs(10);
    loop {
        let now_committed = committed(&bus).await;
        if now_committed >= TOTAL * 3 / 5 {
            break;
        }
        let now = tokio::time::Instant::now();
        assert!(
            now < deadline,
            "child made too little progress: {now_committed} of {TOTAL} committed after {:?}",
            now - started
        );
        if now >= next_report {
            eprintln!("{:?}: {now_committed} committed", now - started);
            next_report = now + Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = committed(&bus).await;
    assert!(
        at_kill < TOTAL,
        "the child finished before the kill ({at_kill}); the test proves nothing"
    );

    let second = spawn_child(&url);
    let out = second.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD DONE"),
        "restarted consumer failed:\n{stdout}\n{stderr}"
    );

    // Every (partition, offset) was processed, with the right payload.
    let seen = store.table("seen").unwrap();
    let mut count = 0u64;
    let mut sum = 0u128;
    let mut squares = 0u128;
    for p in 0..bus.options().partitions {
        for row in seen.scan_all(&format!("p{p}"), None).await.unwrap() {
            let n: u64 = std::str::from_utf8(&row.value).unwrap().parse().unwrap();
            count += 1;
            sum += u128::from(n);
            squares += u128::from(n) * u128::from(n);
        }
    }
    let expected_sum: u128 = (0..u128::from(TOTAL)).sum();
    let expected_squares: u128 = (0..u128::from(TOTAL)).map(|n| n * n).sum();
    assert_eq!(
        count, TOTAL,
        "events missing (killed at {at_kill} committed)"
    );
    assert_eq!(sum, expected_sum, "checksum");
    assert_eq!(squares, expected_squares, "checksum of squares");
    println!("killed at {at_kill} committed of {TOTAL}; all {count} processed after restart");
}
