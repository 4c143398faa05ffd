//! Producer and consumer spans on the embedded bus (a real SQLite file), kept in a
//! TraceBuffer: the context travels in the event headers, the consumer span is a child of
//! and linked to the producer span, failures are recorded, and the outbox keeps the
//! context captured when the event was staged.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trellis_events::{Backoff, Event, EventBus, Message, Outbox, SubscribeOptions, TRACEPARENT};
use trellis_store::{Batch, Store};
use trellis_tracing::opentelemetry::trace::TraceId;
use trellis_tracing::{DistributedTracer, SpanView, TraceBuffer, TraceView};

struct Env {
    store: Store,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/events.db", dir.path().display()))
        .await
        .unwrap();
    Env { store, _dir: dir }
}

fn tracer(name: &str, buffer: &TraceBuffer) -> DistributedTracer {
    DistributedTracer::builder(name)
        .sampling_rate(1.0)
        .buffer(buffer.clone())
        .build()
        .unwrap()
}

fn options() -> SubscribeOptions {
    SubscribeOptions::default()
        .max_attempts(3)
        .backoff(Backoff {
            initial: Duration::from_millis(1),
            multiplier: 1.0,
            max: Duration::from_millis(1),
        })
        .poll_interval(Duration::from_millis(2))
}

/// Polls the buffer until the trace holds `spans` spans (10 s at most).
async fn wait_for_trace(buffer: &TraceBuffer, trace_id: &str, spans: usize) -> TraceView {
    let id = TraceId::from_hex(trace_id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(view) = buffer.trace(id)
            && view.spans.len() >= spans
        {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace_id} never reached {spans} spans: {:#?}",
            buffer.trace(id)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn by_kind<'a>(view: &'a TraceView, kind: &str) -> Vec<&'a SpanView> {
    view.spans.iter().filter(|s| s.kind == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_span_is_a_child_of_the_producer_span_and_failures_are_recorded() {
    let env = env().await;
    let buffer = TraceBuffer::new(1000);
    let producer_tracer = tracer("orders", &buffer);
    let consumer_tracer = tracer("mailer", &buffer);
    let producer = EventBus::embedded(&env.store)
        .unwrap()
        .with_tracer(producer_tracer.clone());
    let consumer = EventBus::embedded(&env.store)
        .unwrap()
        .with_tracer(consumer_tracer.clone());

    // The handler fails its first attempt, then starts a span of its own and succeeds.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Option<String>>::new()));
    let (calls2, seen2, inner_tracer) = (calls.clone(), seen.clone(), consumer_tracer.clone());
    let subscription = consumer
        .subscribe_with(
            "orders",
            "mailer",
            options(),
            move |event: Event<String>| {
                let n = calls2.fetch_add(1, Ordering::SeqCst);
                seen2
                    .lock()
                    .unwrap()
                    .push(event.headers.get(TRACEPARENT).cloned());
                let tracer = inner_tracer.clone();
                async move {
                    if n == 0 {
                        return Err("mail server unavailable".to_owned());
                    }
                    tracer.start_span("send mail").finish();
                    Ok(())
                }
            },
        )
        .await
        .unwrap();

    let root = producer_tracer.start_span("place order");
    let published = root
        .in_scope(producer.publish("orders", Message::new("o-1".to_owned()).key("o-1")))
        .await
        .unwrap();
    let trace_id = root.trace_id();
    let root_id = root.span_id();
    root.finish();

    // root + producer + 2 consumer attempts + the handler's own span.
    let view = wait_for_trace(&buffer, &trace_id, 5).await;
    subscription.shutdown().await.unwrap();
    assert_eq!(view.services, ["mailer", "orders"]);

    let producers = by_kind(&view, "producer");
    assert_eq!(producers.len(), 1, "{view:#?}");
    let producer_span = producers[0];
    assert_eq!(
        producer_span.parent_span_id.as_deref(),
        Some(root_id.as_str())
    );
    assert_eq!(producer_span.name, "orders publish");
    assert_eq!(producer_span.service, "orders");
    assert_eq!(
        producer_span.attributes["trellis.offset"],
        i64::try_from(published.offset).unwrap()
    );
    assert_eq!(
        producer_span.attributes["messaging.message.id"],
        published.id.to_string()
    );

    // The event carried the producer span's context in the W3C header.
    let headers = seen.lock().unwrap().clone();
    assert_eq!(headers.len(), 2);
    let expected = format!("00-{trace_id}-{}-01", producer_span.span_id);
    for header in &headers {
        assert_eq!(header.as_deref(), Some(expected.as_str()));
    }

    let mut consumers = by_kind(&view, "consumer");
    consumers.sort_by_key(|s| s.attributes["trellis.attempt"].as_i64());
    assert_eq!(consumers.len(), 2, "{view:#?}");
    for span in &consumers {
        assert_eq!(span.service, "mailer");
        assert_eq!(span.name, "orders process");
        assert_eq!(
            span.parent_span_id.as_deref(),
            Some(producer_span.span_id.as_str())
        );
        assert_eq!(span.links.len(), 1);
        assert_eq!(span.links[0].span_id, producer_span.span_id);
        assert_eq!(span.attributes["messaging.consumer.group.name"], "mailer");
    }
    assert_eq!(consumers[0].status.code, "error");
    assert_eq!(
        consumers[0].status.message.as_deref(),
        Some("mail server unavailable")
    );
    assert_ne!(consumers[1].status.code, "error");

    // The handler's span is a child of the successful consumer span.
    let inner = view.spans.iter().find(|s| s.name == "send mail").unwrap();
    assert_eq!(
        inner.parent_span_id.as_deref(),
        Some(consumers[1].span_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_on_the_message_parents_the_producer_span() {
    let env = env().await;
    let buffer = TraceBuffer::new(1000);
    let bus = EventBus::embedded(&env.store)
        .unwrap()
        .with_tracer(tracer("orders", &buffer));
    let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    bus.publish_batch(
        "orders",
        [
            Message::new(1).header(TRACEPARENT, upstream),
            Message::new(2).header(TRACEPARENT, upstream),
        ],
    )
    .await
    .unwrap();
    let view = wait_for_trace(&buffer, "4bf92f3577b34da6a3ce929d0e0e4736", 2).await;
    let producers = by_kind(&view, "producer");
    assert_eq!(producers.len(), 2);
    for span in producers {
        assert_eq!(span.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert!(span.attributes.contains_key("trellis.offset"));
    }

    // Without a tracer, the header is passed on untouched.
    let plain = EventBus::embedded(&env.store).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let subscription = plain
        .subscribe_with("plain", "g", options(), move |event: Event<i32>| {
            let tx = tx.clone();
            async move { tx.send(event.headers).map_err(|e| e.to_string()) }
        })
        .await
        .unwrap();
    plain
        .publish("plain", Message::new(1).header(TRACEPARENT, upstream))
        .await
        .unwrap();
    let headers = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    subscription.shutdown().await.unwrap();
    assert_eq!(headers.get(TRACEPARENT).map(String::as_str), Some(upstream));
    assert_eq!(headers.len(), 1, "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_relay_keeps_the_context_captured_at_write_time() {
    let env = env().await;
    let buffer = TraceBuffer::new(1000);
    let writer = tracer("orders", &buffer);
    let outbox = Outbox::new(&env.store).unwrap().tracer(writer.clone());

    let root = writer.start_span("create order");
    let guard = root.enter();
    let mut batch = Batch::new();
    let id = outbox
        .stage(&mut batch, "orders", Message::new("o-2".to_owned()))
        .unwrap();
    drop(guard);
    env.store.batch(batch).await.unwrap();
    let trace_id = root.trace_id();
    let root_id = root.span_id();
    root.finish();

    // The relay runs later, outside any span, on a traced bus; the consumer joins the
    // writer's trace.
    let consumer_tracer = tracer("mailer", &buffer);
    let bus = EventBus::embedded(&env.store)
        .unwrap()
        .with_tracer(consumer_tracer);
    let subscription = bus
        .subscribe_with("orders", "mailer", options(), |_: Event<String>| async {
            Ok::<(), String>(())
        })
        .await
        .unwrap();
    let unrelated = writer.start_span("unrelated relay caller");
    assert_eq!(
        unrelated.in_scope(outbox.relay_once(&bus)).await.unwrap(),
        1
    );
    unrelated.finish();

    let view = wait_for_trace(&buffer, &trace_id, 3).await;
    subscription.shutdown().await.unwrap();
    let producers = by_kind(&view, "producer");
    assert_eq!(producers.len(), 1, "{view:#?}");
    assert_eq!(
        producers[0].parent_span_id.as_deref(),
        Some(root_id.as_str())
    );
    assert_eq!(producers[0].attributes["trellis.outbox"], true);
    assert_eq!(
        producers[0].attributes["messaging.message.id"],
        id.to_string()
    );
    let consumers = by_kind(&view, "consumer");
    assert_eq!(consumers.len(), 1);
    assert_eq!(
        consumers[0].parent_span_id.as_deref(),
        Some(producers[0].span_id.as_str())
    );
}
