//! The transport contract as a test suite: every transport runs every case.
//!
//! A transport's integration test calls [`transport_contract_tests!`](crate::transport_contract_tests)
//! with an async function that returns an [`EventBus`]; each call must return a *new* bus
//! (its own connections, as another process would have) on the *same* backend (the same
//! SQLite file, the same Kafka cluster). Cases use fresh topic names, so one long-lived
//! backend serves them all, run after run. Deadlines are generous (30 s) and only bound
//! failures: passing cases finish as soon as their condition holds.
//!
//! The cases panic on failure, like any test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    ATTEMPTS_HEADER, Backoff, ERROR_HEADER, Event, EventBus, EventError, Message, ORIGIN_HEADER,
    StartFrom, SubscribeOptions, TRACEPARENT,
};

/// Expands to one `#[tokio::test]` per contract case, each getting buses from
/// `$open().await` (an async fn returning [`EventBus`]).
#[macro_export]
macro_rules! transport_contract_tests {
    ($open:path) => {
        $crate::transport_contract_tests!(@cases $open;
            round_trip_keeps_envelope_fields, publish_batch_assigns_dense_offsets,
            per_key_order_is_kept, failing_handler_is_retried_then_succeeds,
            poison_event_goes_to_dlq_while_others_flow, undeserializable_payload_goes_to_dlq,
            each_group_gets_every_event, group_members_split_partitions_and_take_over,
            replay_from_offset_and_time, graceful_shutdown_finishes_in_flight,
            concurrent_publishers_lose_nothing, topics_and_group_lag_are_listed);
    };
    (@cases $open:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::contract::$case(|| $open()).await;
            }
        )*
    };
}

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    pub n: u64,
    pub text: String,
}

fn payload(n: u64) -> Payload {
    Payload {
        n,
        text: format!("event {n} ü"),
    }
}

/// A topic name unique to this run and case.
pub fn nonce(case: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{case}-{nanos:x}")
}

/// Fast retries for tests.
fn quick() -> SubscribeOptions {
    SubscribeOptions::default()
        .backoff(Backoff {
            initial: Duration::from_millis(1),
            multiplier: 2.0,
            max: Duration::from_millis(20),
        })
        .session_timeout(Duration::from_secs(3))
}

/// Polls `check` until it holds, failing with `what` after the deadline.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

type Log<T> = Arc<Mutex<Vec<T>>>;

fn len<T>(log: &Log<T>) -> usize {
    log.lock().unwrap().len()
}

/// A handler that records every event into a shared log.
fn recorder<T: Send + 'static>(
    log: &Log<Event<T>>,
) -> impl Fn(Event<T>) -> std::future::Ready<Result<(), String>> + Send + Sync + 'static {
    let log = log.clone();
    move |event| {
        log.lock().unwrap().push(event);
        std::future::ready(Ok(()))
    }
}

pub async fn round_trip_keeps_envelope_fields<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("roundtrip");
    let log: Log<Event<Payload>> = Log::default();
    let sub = bus
        .subscribe_with(&topic, "g", quick(), recorder(&log))
        .await
        .unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let published = bus
        .publish(
            &topic,
            Message::new(payload(1))
                .key("k1")
                .event_type("thing.happened")
                .header(TRACEPARENT, traceparent)
                .header("x-tenant", "t1"),
        )
        .await
        .unwrap();
    eventually("the event", || async { len(&log) == 1 }).await;
    let event = log.lock().unwrap()[0].clone();
    assert_eq!(event.id, published.id);
    assert_eq!(event.id.get_version_num(), 7, "ids are UUID v7");
    assert_eq!(event.topic, topic);
    assert_eq!(event.key.as_deref(), Some("k1"));
    assert_eq!(event.event_type, "thing.happened");
    assert_eq!(event.source, bus.options().source);
    assert_eq!(event.traceparent(), Some(traceparent));
    assert_eq!(
        event.headers.get("x-tenant").map(String::as_str),
        Some("t1")
    );
    assert_eq!(event.payload, payload(1));
    assert_eq!(
        (event.partition, event.offset),
        (published.partition, published.offset)
    );
    assert_eq!(event.attempt, 1);
    let age = SystemTime::now().duration_since(event.time).unwrap();
    assert!(age < DEADLINE, "time is the publish time: {age:?}");
    sub.shutdown().await.unwrap();
    let committed = bus.transport().committed(&topic, "g").await.unwrap();
    assert_eq!(
        committed[published.partition as usize],
        Some(published.offset + 1),
        "the offset after the event is committed"
    );
}

pub async fn publish_batch_assigns_dense_offsets<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("batch");
    let first = bus
        .publish_batch(
            &topic,
            (0..10).map(|n| Message::new(payload(n)).key("same")),
        )
        .await
        .unwrap();
    let second = bus
        .publish_batch(
            &topic,
            (10..25).map(|n| Message::new(payload(n)).key("same")),
        )
        .await
        .unwrap();
    let all: Vec<_> = first.iter().chain(&second).collect();
    let partition = all[0].partition;
    assert!(
        all.iter().all(|p| p.partition == partition),
        "one key, one partition"
    );
    let offsets: Vec<u64> = all.iter().map(|p| p.offset).collect();
    let start = offsets[0];
    assert_eq!(offsets, (start..start + 25).collect::<Vec<_>>());
    let ends = bus.transport().end_offsets(&topic).await.unwrap();
    assert_eq!(ends[partition as usize], start + 25);
    assert_eq!(ends.iter().sum::<u64>(), 25, "other partitions are empty");
    // An empty batch and bad names are handled without writing.
    assert!(
        bus.publish_batch::<Payload>(&topic, [])
            .await
            .unwrap()
            .is_empty()
    );
    let err = bus
        .publish("bad topic", Message::new(payload(0)))
        .await
        .unwrap_err();
    assert!(matches!(err, EventError::InvalidName { .. }), "{err}");
}

pub async fn per_key_order_is_kept<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let producer = open().await;
    let consumer = open().await;
    let topic = nonce("order");
    let log: Log<Event<Payload>> = Log::default();
    let sub = consumer
        .subscribe_with(&topic, "g", quick(), recorder(&log))
        .await
        .unwrap();
    let keys = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let mut n = 0u64;
    let mut expected: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for round in 0..20 {
        let mut batch = Vec::new();
        for key in keys {
            n += 1;
            expected.entry(key).or_default().push(n);
            batch.push(Message::new(payload(n)).key(key));
        }
        if round % 2 == 0 {
            producer.publish_batch(&topic, batch).await.unwrap();
        } else {
            for message in batch {
                producer.publish(&topic, message).await.unwrap();
            }
        }
    }
    let total = n as usize;
    eventually("every event", || async { len(&log) >= total }).await;
    sub.shutdown().await.unwrap();
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for event in log.lock().unwrap().iter() {
        seen.entry(event.key.clone().unwrap())
            .or_default()
            .push(event.payload.n);
    }
    for (key, ns) in expected {
        assert_eq!(seen[key], ns, "key {key} out of order or incomplete");
    }
}

pub async fn failing_handler_is_retried_then_succeeds<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("retry");
    let attempts: Log<u32> = Log::default();
    let handler = {
        let attempts = attempts.clone();
        move |event: Event<Payload>| {
            attempts.lock().unwrap().push(event.attempt);
            let result = if event.attempt < 3 {
                Err(format!("transient failure {}", event.attempt))
            } else {
                Ok(())
            };
            std::future::ready(result)
        }
    };
    let sub = bus
        .subscribe_with(&topic, "g", quick().max_attempts(5), handler)
        .await
        .unwrap();
    bus.publish(&topic, Message::new(payload(1))).await.unwrap();
    eventually("the third attempt", || async { sub.stats().handled == 1 }).await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    let stats = sub.stats();
    assert_eq!((stats.failures, stats.dead_lettered), (2, 0));
    sub.shutdown().await.unwrap();
    let dlq = format!("{topic}.dlq");
    assert_eq!(bus.transport().partition_count(&dlq).await.unwrap(), None);
}

pub async fn poison_event_goes_to_dlq_while_others_flow<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("poison");
    let handled: Log<u64> = Log::default();
    let handler = {
        let handled = handled.clone();
        move |event: Event<Payload>| {
            let result = if event.payload.n == 5 {
                Err(format!("poison {} cannot be handled", event.payload.n))
            } else {
                handled.lock().unwrap().push(event.payload.n);
                Ok(())
            };
            std::future::ready(result)
        }
    };
    let sub = bus
        .subscribe_with(&topic, "g", quick().max_attempts(3), handler)
        .await
        .unwrap();
    // One key: the poison sits in the middle of one partition's stream.
    bus.publish_batch(&topic, (0..20).map(|n| Message::new(payload(n)).key("one")))
        .await
        .unwrap();
    eventually("the 19 good events", || async { len(&handled) == 19 }).await;
    assert_eq!(
        *handled.lock().unwrap(),
        (0..20).filter(|n| *n != 5).collect::<Vec<_>>(),
        "the events after the poison were handled, in order"
    );
    let stats = sub.stats();
    assert_eq!((stats.failures, stats.dead_lettered), (3, 1));
    sub.shutdown().await.unwrap();

    let dead: Log<Event<Payload>> = Log::default();
    let dlq = format!("{topic}.dlq");
    let reader = bus
        .subscribe_with(&dlq, "dlq-reader", quick(), recorder(&dead))
        .await
        .unwrap();
    eventually("the dead letter", || async { len(&dead) == 1 }).await;
    reader.shutdown().await.unwrap();
    let letter = dead.lock().unwrap()[0].clone();
    assert_eq!(letter.payload, payload(5));
    assert_eq!(letter.key.as_deref(), Some("one"));
    assert!(
        letter.headers[ERROR_HEADER].contains("poison 5 cannot be handled"),
        "{:?}",
        letter.headers
    );
    assert_eq!(letter.headers[ATTEMPTS_HEADER], "3");
    assert!(letter.headers[ORIGIN_HEADER].starts_with(&format!("{topic}/")));
}

pub async fn undeserializable_payload_goes_to_dlq<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("badpayload");
    let log: Log<Event<Payload>> = Log::default();
    let sub = bus
        .subscribe_with(&topic, "g", quick(), recorder(&log))
        .await
        .unwrap();
    let bad = bus
        .publish(
            &topic,
            Message::new(serde_json::json!({"n": "not a number", "text": "x"})).key("k"),
        )
        .await
        .unwrap();
    bus.publish(&topic, Message::new(payload(7)).key("k"))
        .await
        .unwrap();
    eventually("the good event after the bad one", || async {
        len(&log) == 1
    })
    .await;
    assert_eq!(log.lock().unwrap()[0].payload, payload(7));
    eventually("the dead letter count", || async {
        sub.stats().dead_lettered == 1
    })
    .await;
    assert_eq!(sub.stats().failures, 0, "the handler never saw it");
    sub.shutdown().await.unwrap();

    let dead: Log<Event<serde_json::Value>> = Log::default();
    let reader = bus
        .subscribe_with(&format!("{topic}.dlq"), "r", quick(), recorder(&dead))
        .await
        .unwrap();
    eventually("the dead letter", || async { len(&dead) == 1 }).await;
    reader.shutdown().await.unwrap();
    let letter = dead.lock().unwrap()[0].clone();
    assert_eq!(letter.id, bad.id, "a dead letter keeps its id");
    assert_eq!(letter.payload["n"], "not a number");
    let error = &letter.headers[ERROR_HEADER];
    assert!(
        error.contains("does not deserialize") && error.contains("invalid type"),
        "{error}"
    );
    assert_eq!(letter.headers[ATTEMPTS_HEADER], "0");
}

pub async fn each_group_gets_every_event<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("groups");
    let a: Log<Event<Payload>> = Log::default();
    let b: Log<Event<Payload>> = Log::default();
    let sub_a = bus
        .subscribe_with(&topic, "group-a", quick(), recorder(&a))
        .await
        .unwrap();
    let sub_b = bus
        .subscribe_with(&topic, "group-b", quick(), recorder(&b))
        .await
        .unwrap();
    let published = bus
        .publish_batch(
            &topic,
            (0..50).map(|n| Message::new(payload(n)).key(format!("k{n}"))),
        )
        .await
        .unwrap();
    let expected: BTreeSet<Uuid> = published.iter().map(|p| p.id).collect();
    eventually("both groups", || async { len(&a) >= 50 && len(&b) >= 50 }).await;
    sub_a.shutdown().await.unwrap();
    sub_b.shutdown().await.unwrap();
    for log in [a, b] {
        let got: BTreeSet<Uuid> = log.lock().unwrap().iter().map(|e| e.id).collect();
        assert_eq!(got, expected);
    }
}

pub async fn group_members_split_partitions_and_take_over<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus_a = open().await;
    let bus_b = open().await;
    let topic = nonce("split");
    // event id -> (member, partition), for every delivery.
    let deliveries: Log<(Uuid, char, u32)> = Log::default();
    let member = |name: char| {
        let deliveries = deliveries.clone();
        move |event: Event<Payload>| {
            deliveries
                .lock()
                .unwrap()
                .push((event.id, name, event.partition));
            std::future::ready(Ok::<(), String>(()))
        }
    };
    let sub_a = bus_a
        .subscribe_with(&topic, "workers", quick(), member('a'))
        .await
        .unwrap();
    let sub_b = bus_b
        .subscribe_with(&topic, "workers", quick(), member('b'))
        .await
        .unwrap();
    let partitions = bus_a
        .transport()
        .partition_count(&topic)
        .await
        .unwrap()
        .unwrap();
    assert!(partitions >= 2, "the case needs at least 2 partitions");
    let mut published: BTreeSet<Uuid> = BTreeSet::new();
    let mut n = 0u64;
    let mut split = false;
    // Rounds of events over many keys until one round is split cleanly: every partition
    // handled by exactly one member, both members busy.
    for _ in 0..100 {
        let round: BTreeSet<Uuid> = bus_a
            .publish_batch(
                &topic,
                (0..40).map(|i| {
                    n += 1;
                    Message::new(payload(n)).key(format!("key-{i}"))
                }),
            )
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        published.extend(&round);
        eventually("the round", || async {
            let d = deliveries.lock().unwrap();
            let got: BTreeSet<Uuid> = d
                .iter()
                .map(|x| x.0)
                .filter(|id| round.contains(id))
                .collect();
            got.len() == round.len()
        })
        .await;
        let d = deliveries.lock().unwrap();
        let mut owners: HashMap<u32, BTreeSet<char>> = HashMap::new();
        for (id, who, partition) in d.iter() {
            if round.contains(id) {
                owners.entry(*partition).or_default().insert(*who);
            }
        }
        let members: BTreeSet<char> = owners.values().flatten().copied().collect();
        if owners.len() == partitions as usize
            && owners.values().all(|o| o.len() == 1)
            && members.len() == 2
        {
            split = true;
            break;
        }
    }
    assert!(split, "the two members never split the partitions");
    // One member leaves; the other takes every partition, and nothing is lost.
    sub_a.shutdown().await.unwrap();
    let after: BTreeSet<Uuid> = bus_a
        .publish_batch(
            &topic,
            (0..200).map(|i| Message::new(payload(10_000 + i)).key(format!("key-{i}"))),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    published.extend(&after);
    eventually("every event after the leave", || async {
        let d = deliveries.lock().unwrap();
        let got: BTreeSet<Uuid> = d.iter().map(|x| x.0).collect();
        published.is_subset(&got)
    })
    .await;
    let d = deliveries.lock().unwrap().clone();
    assert!(
        d.iter()
            .filter(|(id, _, _)| after.contains(id))
            .all(|(_, who, _)| *who == 'b'),
        "only the remaining member handles events after the leave"
    );
    sub_b.shutdown().await.unwrap();
}

pub async fn replay_from_offset_and_time<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("replay");
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            bus.publish(&topic, Message::new(payload(n)).key("k"))
                .await
                .unwrap()
                .id,
        );
    }
    let middle = SystemTime::now();
    let middle = UNIX_EPOCH
        + Duration::from_micros(middle.duration_since(UNIX_EPOCH).unwrap().as_micros() as u64);
    for n in 5..10 {
        ids.push(
            bus.publish(&topic, Message::new(payload(n)).key("k"))
                .await
                .unwrap()
                .id,
        );
    }
    let consume = |start: Option<StartFrom>| {
        let bus = bus.clone();
        let topic = topic.clone();
        async move {
            let log: Log<Event<Payload>> = Log::default();
            let mut options = quick();
            if let Some(start) = start {
                options = options.start(start);
            }
            let sub = bus
                .subscribe_with(&topic, "g", options, recorder(&log))
                .await
                .unwrap();
            let ends: u64 = bus
                .transport()
                .end_offsets(&topic)
                .await
                .unwrap()
                .iter()
                .sum();
            eventually("caught up", || async {
                let c = bus.transport().committed(&topic, "g").await.unwrap();
                c.iter().map(|o| o.unwrap_or(0)).sum::<u64>() == ends
            })
            .await;
            sub.shutdown().await.unwrap();
            let got: Vec<Uuid> = log.lock().unwrap().iter().map(|e| e.id).collect();
            got
        }
    };
    assert_eq!(consume(Some(StartFrom::Earliest)).await, ids);
    assert_eq!(consume(None).await, Vec::<Uuid>::new(), "nothing new");
    bus.replay(&topic, "g", StartFrom::Offset(0)).await.unwrap();
    assert_eq!(consume(None).await, ids, "replayed from offset 0");
    bus.replay(&topic, "g", StartFrom::Time(middle))
        .await
        .unwrap();
    assert_eq!(consume(None).await, ids[5..], "replayed from the middle");
    bus.replay(&topic, "g", StartFrom::Latest).await.unwrap();
    assert_eq!(consume(None).await, Vec::<Uuid>::new());
    // Not while the group is running.
    let sub = bus
        .subscribe_with(&topic, "g", quick(), |_: Event<Payload>| async {
            Ok::<(), String>(())
        })
        .await
        .unwrap();
    eventually("the member to own its partitions", || async {
        matches!(
            bus.replay(&topic, "g", StartFrom::Earliest).await,
            Err(EventError::GroupActive { .. })
        )
    })
    .await;
    sub.shutdown().await.unwrap();
}

pub async fn graceful_shutdown_finishes_in_flight<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let bus = open().await;
    let topic = nonce("graceful");
    let started = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let handler = {
        let (started, gate, finished, calls) = (
            started.clone(),
            gate.clone(),
            finished.clone(),
            calls.clone(),
        );
        move |_: Event<Payload>| {
            let (started, gate, finished) = (started.clone(), gate.clone(), finished.clone());
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                started.notify_one();
                gate.notified().await;
                finished.store(true, Ordering::SeqCst);
                Ok::<(), String>(())
            }
        }
    };
    let sub = bus
        .subscribe_with(&topic, "g", quick(), handler)
        .await
        .unwrap();
    let published = bus
        .publish_batch(&topic, (0..3).map(|n| Message::new(payload(n)).key("k")))
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("the handler started");
    let mut shutdown = tokio::spawn(sub.shutdown());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut shutdown)
            .await
            .is_err(),
        "shutdown waits for the handler in flight"
    );
    gate.notify_one();
    shutdown.await.unwrap().unwrap();
    assert!(finished.load(Ordering::SeqCst));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no new event after shutdown began"
    );
    let committed = bus.transport().committed(&topic, "g").await.unwrap();
    assert_eq!(
        committed[published[0].partition as usize],
        Some(published[0].offset + 1),
        "the finished event is committed, the others are not"
    );
}

pub async fn concurrent_publishers_lose_nothing<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    let topic = nonce("concurrent");
    let buses = [open().await, open().await, open().await];
    let mut tasks = Vec::new();
    for (b, bus) in buses.iter().enumerate() {
        let bus = bus.clone();
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..20u64 {
                let size = 1 + (round * 7 + b as u64) % 9;
                let batch = (0..size).map(|i| Message::new(payload(round * 100 + i)).key("hot"));
                ids.extend(
                    bus.publish_batch(&topic, batch)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|p| p.id),
                );
            }
            ids
        }));
    }
    let mut ids = BTreeSet::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    let bus = &buses[0];
    let ends = bus.transport().end_offsets(&topic).await.unwrap();
    assert_eq!(
        ends.iter().sum::<u64>(),
        ids.len() as u64,
        "offsets are dense"
    );
    let log: Log<Event<Payload>> = Log::default();
    let sub = bus
        .subscribe_with(&topic, "g", quick(), recorder(&log))
        .await
        .unwrap();
    eventually("every event", || async { len(&log) >= ids.len() }).await;
    sub.shutdown().await.unwrap();
    let got: BTreeSet<Uuid> = log.lock().unwrap().iter().map(|e| e.id).collect();
    assert_eq!(got, ids);
    let offsets: Vec<u64> = log.lock().unwrap().iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (0..ids.len() as u64).collect::<Vec<_>>());
}

/// Topics and their groups are listed, and each group's lag is exact: a group that
/// consumed 10 events before 4 more were published lags by 4; a group reset to offset 1 of
/// a 5-event topic lags by 4; a new topic without groups has none.
pub async fn topics_and_group_lag_are_listed<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventBus>,
{
    use crate::admin::{topic_info, topic_list};
    use crate::partitioner::partition_for_key;

    let bus = open().await;
    let transport = bus.transport().clone();
    let orders = nonce("lag-orders");
    let payments = nonce("lag-payments");
    let quiet = nonce("lag-quiet");
    assert_eq!(transport.ensure_topic(&orders, 2).await.unwrap(), 2);
    assert_eq!(transport.ensure_topic(&payments, 1).await.unwrap(), 1);
    assert_eq!(transport.ensure_topic(&quiet, 3).await.unwrap(), 3);
    // Keys that land in both partitions of `orders`.
    let keys: Vec<String> = (0..)
        .map(|n| format!("k{n}"))
        .scan([0u32; 2], |seen, key| {
            let p = partition_for_key(&key, 2) as usize;
            seen[p] += 1;
            Some((key, seen[p]))
        })
        .filter(|(_, nth)| *nth <= 7)
        .map(|(key, _)| key)
        .take(14)
        .collect();
    let message = |n: usize| Message::new(payload(n as u64)).key(keys[n].clone());

    // `billing` consumes the first 10 events of `orders` and stops.
    bus.publish_batch(&orders, (0..10).map(message))
        .await
        .unwrap();
    let seen: Log<Event<Payload>> = Log::default();
    let billing = bus
        .subscribe_with(
            &orders,
            "billing",
            quick().start(StartFrom::Earliest),
            recorder(&seen),
        )
        .await
        .unwrap();
    eventually("billing committed all 10", || {
        let transport = transport.clone();
        let orders = orders.clone();
        async move {
            let committed = transport.committed(&orders, "billing").await.unwrap();
            committed.iter().map(|c| c.unwrap_or(0)).sum::<u64>() == 10
        }
    })
    .await;
    billing.shutdown().await.unwrap();
    assert_eq!(len(&seen), 10);
    bus.publish_batch(&orders, (10..14).map(message))
        .await
        .unwrap();

    // `audit` is moved to offset 1 of `payments`, which holds 5 events.
    bus.publish_batch(&payments, (0..5).map(|n| Message::new(payload(n))))
        .await
        .unwrap();
    assert_eq!(
        transport
            .reset_group(&payments, "audit", StartFrom::Offset(1))
            .await
            .unwrap(),
        vec![1]
    );

    let info = topic_info(&*transport, &orders, true).await.unwrap();
    assert_eq!(info.name, orders);
    assert_eq!(info.partitions, 2);
    assert_eq!(info.end_offset, 14);
    assert_eq!(info.end_offsets, Some(vec![7, 7]));
    assert_eq!(info.groups.len(), 1, "{info:?}");
    let billing = &info.groups[0];
    assert_eq!(billing.group, "billing");
    assert_eq!(billing.lag, 4);
    assert_eq!(billing.uncommitted_partitions, 0);
    let per_partition: u64 = billing
        .partitions
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.lag.unwrap())
        .sum();
    assert_eq!(per_partition, 4);

    // The list holds all three topics, each with its own groups and figures.
    let list = topic_list(&*transport).await.unwrap();
    assert_eq!(list.transport, transport.name());
    let find = |name: &str| {
        list.topics
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} not listed in {:?}", list.topics))
            .clone()
    };
    let listed = find(&orders);
    assert_eq!((listed.end_offset, listed.groups[0].lag), (14, 4));
    assert_eq!(
        listed.end_offsets, None,
        "no per-partition figures in the list"
    );
    let listed = find(&payments);
    assert_eq!(listed.partitions, 1);
    assert_eq!(listed.end_offset, 5);
    assert_eq!(listed.groups.len(), 1);
    assert_eq!(
        (listed.groups[0].group.as_str(), listed.groups[0].lag),
        ("audit", 4)
    );
    let listed = find(&quiet);
    assert_eq!((listed.partitions, listed.end_offset), (3, 0));
    assert!(listed.groups.is_empty());
    let names: Vec<&str> = list.topics.iter().map(|t| t.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "topics are sorted");

    // An unknown topic is an error naming it, not an empty answer.
    let missing = nonce("lag-missing");
    let err = topic_info(&*transport, &missing, false).await.unwrap_err();
    assert!(
        matches!(err, EventError::UnknownTopic(ref t) if *t == missing),
        "{err}"
    );
}
