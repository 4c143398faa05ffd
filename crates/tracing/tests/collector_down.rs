#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! A collector that is down (closed port) or hangs (accepts, never answers): span creation
//! stays fast, nothing blocks, and lost spans are counted.

use std::time::{Duration, Instant};

use trellis_tracing::{DistributedTracer, Protocol};

const SPANS: usize = 5_000;

/// Creates `SPANS` root spans with a child each; returns (total, slowest single pair).
fn create_spans(tracer: &DistributedTracer) -> (Duration, Duration) {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..SPANS {
        let t = Instant::now();
        let root = tracer.start_span("request");
        root.set_tag("i", i as i64);
        tracer.start_child("work", &root).finish();
        root.finish();
        slowest = slowest.max(t.elapsed());
    }
    (started.elapsed(), slowest)
}

async fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn closed_port_counts_failed_exports_without_slowing_spans() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let tracer = DistributedTracer::builder("down")
        .otlp(&format!("http://127.0.0.1:{port}"), Protocol::HttpProtobuf)
        .unwrap()
        .queue_size(100_000)
        .max_batch(20_000)
        .batch_interval(Duration::from_millis(500))
        .export_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (total, slowest) = create_spans(&tracer);
    eprintln!("closed port: {SPANS} span pairs in {total:?}, slowest {slowest:?}");
    // Bounds far below the export timeout (2 s): generous for a loaded 2-core machine,
    // where a thread can be descheduled for tens of milliseconds.
    assert!(
        slowest < Duration::from_millis(250),
        "a span blocked for {slowest:?}"
    );
    assert!(total < Duration::from_secs(1), "{total:?}");
    let stats = tracer.stats();
    wait_until("all spans to be accounted", Duration::from_secs(20), || {
        stats.dropped() == 2 * SPANS as u64
    })
    .await;
    assert_eq!(stats.exported(), 0);
    assert_eq!(stats.dropped_export_failed(), 2 * SPANS as u64);

    let mut registry = prometheus_client::registry::Registry::default();
    stats.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!(
            "trellis_tracing_spans_dropped_total{{reason=\"export_failed\"}} {}",
            2 * SPANS
        )),
        "{text}"
    );
    let started = Instant::now();
    tracer.shutdown();
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_collector_drops_and_counts_when_the_queue_is_full() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts connections and holds them open without ever answering.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
            if held.len() > 100 {
                break;
            }
        }
        held
    });
    let export_timeout = Duration::from_millis(1500);
    let tracer = DistributedTracer::builder("hang")
        .otlp(&format!("http://{addr}"), Protocol::HttpProtobuf)
        .unwrap()
        .queue_size(100)
        .max_batch(10)
        .batch_interval(Duration::from_millis(10))
        .export_timeout(export_timeout)
        .build()
        .unwrap();
    let (total, slowest) = create_spans(&tracer);
    eprintln!("hanging collector: {SPANS} span pairs in {total:?}, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_millis(250),
        "a span blocked for {slowest:?}"
    );
    assert!(
        total < export_timeout,
        "creating spans took {total:?}: it waited for the collector"
    );
    let stats = tracer.stats();
    assert!(
        stats.dropped_queue_full() >= (2 * SPANS - 200) as u64,
        "dropped {} of {}",
        stats.dropped_queue_full(),
        2 * SPANS
    );
    assert_eq!(stats.exported(), 0);

    // Shutdown waits at most the export timeout, even with a full queue and a stuck export.
    let started = Instant::now();
    tracer.shutdown();
    let waited = started.elapsed();
    assert!(
        waited < export_timeout + Duration::from_secs(1),
        "shutdown took {waited:?}"
    );
    // The stuck exports time out and are counted too.
    wait_until(
        "the stuck export to time out",
        Duration::from_secs(10),
        || stats.dropped_export_failed() >= 10,
    )
    .await;
    hold.abort();
}
