//! A node configured by `[tracing]`: store operations inside a trace become spans, the
//! buffer is served at `/v1/traces`, the export counters are in `/metrics`; disabled
//! tracing leaves no trace of itself.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use serde_json::Value;
use trellis_admin::{Node, Settings};

async fn start(tracing: &str) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\nurl = \"sqlite://{}/admin.db\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{tracing}",
        dir.path().display()
    );
    let settings = Settings::from_toml(&text, "trellis.toml").unwrap();
    (Node::start(settings).await.unwrap(), dir)
}

async fn get(node: &Node, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{}{path}", node.admin_addr()))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_traces_its_store_and_serves_the_buffer() {
    let (node, _dir) = start(
        "[tracing]\nservice_name = \"node-under-test\"\nsampling_rate = 1.0\nbuffer_spans = 500",
    )
    .await;
    let tracer = node.tracer().clone();
    assert!(tracer.is_enabled());
    assert_eq!(tracer.service_name(), "node-under-test");
    let buffer = node.trace_buffer().unwrap().clone();
    assert_eq!(buffer.capacity(), 500);

    // A store operation inside a trace is a child span; outside one, nothing is recorded.
    let table = node.store().table("notes").unwrap();
    table
        .put("p", "outside", b"x".to_vec(), None)
        .await
        .unwrap();
    let before = buffer.span_count();
    let root = tracer.start_span("handler");
    root.in_scope(table.put("p", "inside", b"y".to_vec(), None))
        .await
        .unwrap();
    let trace_id = root.trace_id();
    let root_id = root.span_id();
    root.finish();
    assert_eq!(buffer.span_count(), before + 2);

    let (status, body) = get(&node, "/v1/traces?service=node-under-test").await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["traces"][0]["trace_id"], trace_id.as_str());
    let (status, body) = get(&node, &format!("/v1/traces/{trace_id}")).await;
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    let spans = view["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2, "{view:#}");
    let store_span = spans.iter().find(|s| s["name"] == "put notes").unwrap();
    assert_eq!(store_span["parent_span_id"], root_id.as_str());
    let (status, _) = get(&node, "/v1/traces/not-a-trace-id").await;
    assert_eq!(status, 400);

    // The export counters are in the node's metrics.
    let (status, metrics) = get(&node, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("trellis_tracing_spans_dropped"),
        "{metrics}"
    );
    assert!(metrics.contains("trellis_tracing_spans_exported"));
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_tracing_records_nothing_and_serves_no_traces() {
    let (node, _dir) = start("[tracing]\nenabled = false").await;
    assert!(!node.tracer().is_enabled());
    assert!(node.trace_buffer().is_none());
    let (status, _) = get(&node, "/v1/traces").await;
    assert_eq!(status, 404);
    let span = node.tracer().start_span("x");
    assert!(!span.is_sampled());
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_requests_nothing_and_drops_are_counted() {
    // A closed port: every export fails; spans are dropped and counted, never waited on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (node, _dir) = start(&format!(
        "[tracing]\nservice_name = \"lonely\"\nendpoint = \"http://127.0.0.1:{port}\"\n\
         batch_interval = \"10ms\"\nexport_timeout = \"200ms\""
    ))
    .await;
    assert!(node.tracer().is_exporting());
    let tracer = node.tracer().clone();
    let table = node.store().table("notes").unwrap();
    let started = std::time::Instant::now();
    for i in 0..20 {
        let root = tracer.start_span("handler");
        root.in_scope(table.put("p", &i.to_string(), b"v".to_vec(), None))
            .await
            .unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while tracer.stats().dropped() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "dropped {} spans",
            tracer.stats().dropped()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = get(&node, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("trellis_tracing_spans_dropped_total{reason=\"export_failed\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 40.0, "{line}");
    node.shutdown().await.unwrap();
}
