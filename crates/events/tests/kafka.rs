#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The transport contract on a real Kafka broker (`scripts/services up kafka`), plus what
//! only Kafka has: the key → partition choice agrees with librdkafka's `murmur2_random`,
//! headers and timestamps are real Kafka headers and timestamps, and a commit after a
//! revocation is refused. Skipped with a notice when no broker runs, unless
//! `TRELLIS_REQUIRE_ENGINES=1`.

mod kafka_support;

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use kafka_support::{broker_up, open, unique, url};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use trellis_events::partitioner::partition_for_key;
use trellis_events::transport::{Fetch, JoinOptions};
use trellis_events::{
    EventBus, EventError, KafkaOptions, KafkaTransport, Message, StartFrom, TRACEPARENT, Transport,
    transport_contract_tests,
};

transport_contract_tests!(open);

fn raw_config() -> ClientConfig {
    let options = KafkaOptions::from_url(&url()).unwrap();
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", options.brokers.join(","));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_url_picks_the_kafka_transport() {
    if !broker_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = trellis_store::Store::open(&format!("sqlite://{}/unused.db", dir.path().display()))
        .await
        .unwrap();
    let bus = EventBus::from_url(&format!("{}?partitions=3", url()), &store)
        .await
        .unwrap();
    assert_eq!(bus.transport().name(), "kafka");
    assert_eq!(bus.options().partitions, 3);
    let topic = unique("url");
    bus.publish(&topic, Message::new(1)).await.unwrap();
    assert_eq!(
        bus.transport().partition_count(&topic).await.unwrap(),
        Some(3)
    );
    let err = EventBus::from_url("kafka://127.0.0.1:9092?colour=red", &store)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_where_librdkafka_murmur2_random_puts_them() {
    if !broker_up() {
        return;
    }
    let bus = open().await;
    let topic = unique("keys");
    let keys: Vec<String> = (0..64).map(|i| format!("customer-{i}")).collect();
    let published = bus
        .publish_batch(&topic, keys.iter().map(|k| Message::new(1).key(k.clone())))
        .await
        .unwrap();
    let producer: FutureProducer = raw_config()
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let partitions = bus
        .transport()
        .partition_count(&topic)
        .await
        .unwrap()
        .unwrap();
    assert!(partitions > 1);
    let mut used = std::collections::BTreeSet::new();
    for (key, ours) in keys.iter().zip(&published) {
        // No partition given: librdkafka's partitioner chooses.
        let delivery = producer
            .send(
                FutureRecord::<str, str>::to(&topic).key(key).payload("raw"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(delivery.partition as u32, ours.partition, "key {key}");
        assert_eq!(ours.partition, partition_for_key(key, partitions));
        used.insert(ours.partition);
    }
    assert_eq!(
        used.len() as u32,
        partitions,
        "64 keys spread over every partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_key_and_time_are_kafka_native() {
    if !broker_up() {
        return;
    }
    let bus = open().await;
    let topic = unique("headers");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let published = bus
        .publish(
            &topic,
            Message::new(serde_json::json!({"id": "u1"}))
                .key("u1")
                .event_type("user.created")
                .header(TRACEPARENT, traceparent)
                .header("x-tenant", "t1"),
        )
        .await
        .unwrap();
    let reader: BaseConsumer = raw_config()
        .set("group.id", unique("raw-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(
            &topic,
            published.partition as i32,
            Offset::Offset(published.offset as i64),
        )
        .unwrap();
    reader.assign(&assignment).unwrap();
    let message = loop {
        if let Some(result) = reader.poll(Duration::from_secs(10)) {
            break result.unwrap().detach();
        }
    };
    assert_eq!(message.key(), Some(&b"u1"[..]));
    let headers: BTreeMap<String, String> = message
        .headers()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h.key.to_owned(),
                String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(headers[TRACEPARENT], traceparent);
    assert_eq!(headers["x-tenant"], "t1");
    let envelope = trellis_events::Envelope::from_bytes(message.payload().unwrap()).unwrap();
    assert_eq!(envelope.id, published.id);
    let millis = envelope
        .time
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(
        message.timestamp().to_millis(),
        Some(millis),
        "record time = event time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_revocation_is_fenced() {
    if !broker_up() {
        return;
    }
    let options = KafkaOptions::from_url(&url())
        .unwrap()
        .revoke_timeout(Duration::from_secs(1));
    let transport = KafkaTransport::connect(options).await.unwrap();
    let bus = EventBus::new(
        std::sync::Arc::new(transport.clone()),
        trellis_events::BusOptions::default().partitions(2),
    );
    let topic = unique("fenced");
    transport.ensure_topic(&topic, 2).await.unwrap();
    for key in ["a", "b", "c", "d"] {
        bus.publish(&topic, Message::new(1).key(key)).await.unwrap();
    }
    let join = |member: &str| JoinOptions {
        member: member.to_owned(),
        partitions: 2,
        start: StartFrom::Earliest,
        session_timeout: Duration::from_secs(6),
        poll_interval: Duration::from_millis(2),
    };
    let within = Duration::from_secs(30);
    let mut a = transport.join(&topic, "g", join("member-a")).await.unwrap();
    let mut claims = Vec::new();
    for _ in 0..2 {
        claims.push(
            tokio::time::timeout(within, a.next_claim())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for claim in &mut claims {
        assert!(matches!(claim.fetch(10).await.unwrap(), Fetch::Records(_)));
    }
    // b joins: one partition moves. a's worker for it never releases (a stuck handler).
    let mut b = transport.join(&topic, "g", join("member-b")).await.unwrap();
    let mut revoked = None;
    let deadline = tokio::time::Instant::now() + within;
    while revoked.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no partition was revoked from a"
        );
        for (i, claim) in claims.iter_mut().enumerate() {
            if let Ok(Ok(Fetch::Revoked)) =
                tokio::time::timeout(Duration::from_millis(50), claim.fetch(10)).await
            {
                revoked = Some(i);
            }
        }
    }
    let mut lost = claims.remove(revoked.unwrap());
    let claim_b = tokio::time::timeout(within, b.next_claim())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim_b.partition(), lost.partition());
    assert_eq!(
        claim_b.position(),
        0,
        "b starts from the last commit (none)"
    );
    let err = lost.commit(1).await.unwrap_err();
    assert!(matches!(err, EventError::Fenced { .. }), "{err}");
    // The partition a kept still commits.
    let mut kept = claims.pop().unwrap();
    kept.commit(kept.position()).await.unwrap();
    let committed = transport.committed(&topic, "g").await.unwrap();
    assert_eq!(
        committed[lost.partition() as usize],
        None,
        "the fenced commit did not land"
    );
    assert_eq!(committed[kept.partition() as usize], Some(kept.position()));
    lost.release().await.unwrap();
    kept.release().await.unwrap();
    claim_b.release().await.unwrap();
    a.leave().await.unwrap();
    b.leave().await.unwrap();
}
