#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Kafka transport publish throughput against raw rdkafka `FutureProducer` in the same run,
//! on the broker of `scripts/services up kafka` (or `TRELLIS_KAFKA_URL`).
//! `cargo bench -p trellis-events --features kafka --bench kafka`.
//!
//! Every side uses the same producer settings (idempotent, `acks=all`, `linger.ms=1`), the
//! same encoded envelopes, keys and partitions, and fresh 4-partition topics.
//!
//! - Batches of 1,000 awaited one after the other (what `publish_batch` does): raw
//!   `send_result` + awaiting the deliveries, once with value and key only and once also
//!   with the event's headers and time as Kafka headers and timestamp, against
//!   `KafkaTransport::append` (which reads time and headers out of each encoded envelope:
//!   compared with the raw producer that sends the same headers) and against it with
//!   `record_headers=false` (compared with the raw producer that sends value and key). Both
//!   sides own their records and drop them after sending. The four run back to back in 9
//!   rounds, the order rotating, and the medians of the rounds' ratios are reported: the
//!   machine is shared, single rounds are noisy.
//! - `EventBus::publish_batch` (which also builds and encodes the envelopes).
//! - One by one (each send awaited): raw `send` against `EventBus::publish`.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use trellis_events::partitioner::partition_for_key;
use trellis_events::transport::OutRecord;
use trellis_events::{BusOptions, EventBus, KafkaOptions, KafkaTransport, Message, Transport};

const PARTITIONS: u32 = 4;
const BATCHED_EVENTS: usize = 100_000;
const BATCH: usize = 1_000;
const SINGLE_EVENTS: usize = 2_000;
const PAIRED_ROUNDS: usize = 9;
const ROUNDS: usize = 3;

#[derive(serde::Serialize, serde::Deserialize, Clone)]
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

fn message(n: usize) -> Message<OrderPlaced> {
    Message::new(order(n))
        .key(format!("customer-{}", n % 977))
        .event_type("order.placed")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
}

/// One encoded event, with what a raw producer knows about it without parsing.
#[derive(Clone)]
struct Prepared {
    record: OutRecord,
    millis: i64,
    headers: Vec<(String, String)>,
}

fn prepared(count: usize) -> Vec<Prepared> {
    (0..count)
        .map(|n| {
            let envelope = message(n).into_envelope("bench", "bench").unwrap();
            let key = envelope.key.clone().unwrap();
            Prepared {
                record: OutRecord {
                    partition: partition_for_key(&key, PARTITIONS),
                    key: Some(key),
                    value: envelope.to_bytes().unwrap(),
                },
                millis: envelope
                    .time
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64,
                headers: envelope.headers.into_iter().collect(),
            }
        })
        .collect()
}

fn raw_producer(options: &KafkaOptions) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", options.brokers.join(","))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", options.linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            options.delivery_timeout.as_millis().to_string(),
        )
        .create()
        .unwrap()
}

/// Raw rdkafka: each batch sent with `send_result`, then its deliveries awaited. With
/// `native`, each record also gets the event's headers and time, as the transport sends it.
/// The batches are owned copies made beforehand and dropped after sending, as with `append`.
async fn raw_batched(
    producer: &FutureProducer,
    topic: &str,
    all: &[Prepared],
    native: bool,
) -> f64 {
    let owned: Vec<Vec<Prepared>> = all.chunks(BATCH).map(<[_]>::to_vec).collect();
    let start = Instant::now();
    for chunk in owned {
        let mut pending = Vec::with_capacity(chunk.len());
        for prepared in &chunk {
            let record = &prepared.record;
            let mut out = FutureRecord::<str, [u8]>::to(topic)
                .partition(record.partition as i32)
                .payload(record.value.as_slice());
            if let Some(key) = &record.key {
                out = out.key(key.as_str());
            }
            if native {
                let mut headers = OwnedHeaders::new_with_capacity(prepared.headers.len());
                for (key, value) in &prepared.headers {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                out = out.timestamp(prepared.millis).headers(headers);
            }
            loop {
                match producer.send_result(out) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((_, back)) => {
                        out = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        for delivery in pending {
            delivery.await.unwrap().unwrap();
        }
    }
    all.len() as f64 / start.elapsed().as_secs_f64()
}

/// The transport: `append` takes its records by value, so the batches are built first.
async fn transport_batched(transport: &KafkaTransport, topic: &str, all: &[Prepared]) -> f64 {
    let chunks: Vec<Vec<OutRecord>> = all
        .chunks(BATCH)
        .map(|c| c.iter().map(|p| p.record.clone()).collect())
        .collect();
    let start = Instant::now();
    for chunk in chunks {
        transport.append(topic, chunk).await.unwrap();
    }
    all.len() as f64 / start.elapsed().as_secs_f64()
}

async fn bus_batched(bus: &EventBus, topic: &str) -> f64 {
    let start = Instant::now();
    let mut n = 0;
    while n < BATCHED_EVENTS {
        bus.publish_batch(topic, (n..n + BATCH).map(message))
            .await
            .unwrap();
        n += BATCH;
    }
    BATCHED_EVENTS as f64 / start.elapsed().as_secs_f64()
}

async fn raw_single(producer: &FutureProducer, topic: &str, all: &[Prepared]) -> f64 {
    let start = Instant::now();
    for prepared in &all[..SINGLE_EVENTS] {
        let record = &prepared.record;
        producer
            .send(
                FutureRecord::<str, [u8]>::to(topic)
                    .partition(record.partition as i32)
                    .key(record.key.as_deref().unwrap())
                    .payload(record.value.as_slice()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    SINGLE_EVENTS as f64 / start.elapsed().as_secs_f64()
}

async fn bus_single(bus: &EventBus, topic: &str) -> f64 {
    let start = Instant::now();
    for n in 0..SINGLE_EVENTS {
        bus.publish(topic, message(n)).await.unwrap();
    }
    SINGLE_EVENTS as f64 / start.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn broker_up(options: &KafkaOptions) -> bool {
    use std::net::ToSocketAddrs;
    options.brokers[0]
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        })
}

fn main() {
    let url =
        std::env::var("TRELLIS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let options = KafkaOptions::from_url(&url).unwrap();
    if !broker_up(&options) {
        eprintln!(
            "SKIPPED: no Kafka broker at {}; start it with scripts/services up kafka",
            options.brokers[0]
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let transport = KafkaTransport::connect(options.clone()).await.unwrap();
        let bus = EventBus::new(
            Arc::new(transport.clone()),
            BusOptions::default().partitions(PARTITIONS),
        );
        let producer = raw_producer(&options);
        let run = trellis_events::contract::nonce("bench");
        let topic = |what: &str, round: usize| format!("{run}-{what}-{round}");
        let all = prepared(BATCHED_EVENTS);
        println!(
            "kafka publish: {BATCHED_EVENTS} events of {} bytes in batches of {BATCH}, \
             {PARTITIONS} partitions, acks=all, idempotent",
            all[0].record.value.len()
        );
        // Four variants back to back, the order rotating, many rounds: the machine is
        // shared, so each round's ratios are taken and their medians reported.
        let plain = KafkaTransport::connect(options.clone().record_headers(false))
            .await
            .unwrap();
        let mut rates: [Vec<f64>; 4] = Default::default();
        let (mut vs_native, mut vs_bare) = (Vec::new(), Vec::new());
        for round in 0..PAIRED_ROUNDS {
            let topics = ["raw", "rawh", "ours", "plain"].map(|what| topic(what, round));
            for t in &topics {
                transport.ensure_topic(t, PARTITIONS).await.unwrap();
            }
            let mut round_rates = [0.0; 4];
            for i in 0..4 {
                let which = (round + i) % 4;
                round_rates[which] = match which {
                    0 => raw_batched(&producer, &topics[0], &all, false).await,
                    1 => raw_batched(&producer, &topics[1], &all, true).await,
                    2 => transport_batched(&transport, &topics[2], &all).await,
                    _ => transport_batched(&plain, &topics[3], &all).await,
                };
            }
            let [b, n, o, p] = round_rates;
            println!(
                "  round {round}: raw {b:.0}/s, raw with headers {n:.0}/s, transport {o:.0}/s \
                 ({:.2}x), transport without record headers {p:.0}/s ({:.2}x)",
                o / n,
                p / b
            );
            for (list, rate) in rates.iter_mut().zip(round_rates) {
                list.push(rate);
            }
            vs_native.push(o / n);
            vs_bare.push(p / b);
        }
        let (mut bus_rates, mut raw_one, mut bus_one) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let topics = [
                topic("bus", round),
                topic("raw1", round),
                topic("bus1", round),
            ];
            for t in &topics {
                transport.ensure_topic(t, PARTITIONS).await.unwrap();
            }
            bus_rates.push(bus_batched(&bus, &topics[0]).await);
            raw_one.push(raw_single(&producer, &topics[1], &all).await);
            bus_one.push(bus_single(&bus, &topics[2]).await);
        }
        let [bare, native, ours, plain] = rates.map(median);
        let (vs_native, vs_bare) = (median(vs_native), median(vs_bare));
        let bus_rate = median(bus_rates);
        let (raw_one, bus_one) = (median(raw_one), median(bus_one));
        println!("medians:");
        println!("  raw FutureProducer, value + key             {bare:>9.0} events/s");
        println!("  raw FutureProducer, + headers and timestamp {native:>9.0} events/s");
        println!(
            "  KafkaTransport::append                      {ours:>9.0} events/s  \
             {vs_native:.2}x raw with the same headers and timestamps (target >= 0.9x)"
        );
        println!(
            "  KafkaTransport::append, record_headers=false {plain:>8.0} events/s  \
             {vs_bare:.2}x raw value + key (target >= 0.9x)"
        );
        println!(
            "  EventBus::publish_batch                     {bus_rate:>9.0} events/s  \
             ratio {:.2}x to raw with headers (also builds and encodes the envelopes)",
            bus_rate / native
        );
        println!("  raw FutureProducer, one by one              {raw_one:>9.0} events/s");
        println!(
            "  EventBus::publish, one by one               {bus_one:>9.0} events/s  ratio {:.2}x",
            bus_one / raw_one
        );
    });
}
