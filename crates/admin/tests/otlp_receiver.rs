//! The node takes OTLP/HTTP spans from other processes at `POST /v1/traces`: two tracers
//! exporting through the real OTLP exporter to the node's admin port show up as one trace
//! with both service names; bad bodies are refused with 400 and store nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use trellis_admin::{Node, Settings};
use trellis_tracing::opentelemetry::trace::SpanKind;
use trellis_tracing::{DistributedTracer, Protocol, extract_from_map, inject_into_map};

async fn start() -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\nurl = \"sqlite://{}/admin.db\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [tracing]\nservice_name = \"the-node\"\nsampling_rate = 1.0\nbuffer_spans = 1000",
        dir.path().display()
    );
    let settings = Settings::from_toml(&text, "trellis.toml").unwrap();
    (Node::start(settings).await.unwrap(), dir)
}

fn exporting_tracer(service: &str, node: &Node) -> DistributedTracer {
    DistributedTracer::builder(service)
        .sampling_rate(1.0)
        .otlp(
            &format!("http://{}", node.admin_addr()),
            Protocol::HttpProtobuf,
        )
        .unwrap()
        .batch_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

async fn get(node: &Node, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{}{path}", node.admin_addr()))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn post(node: &Node, content_type: &str, body: Vec<u8>) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/traces", node.admin_addr()))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_exported_by_two_processes_form_one_trace_on_the_node() {
    let (node, _dir) = start().await;
    let buffer = node.trace_buffer().unwrap().clone();
    let front = exporting_tracer("web-frontend", &node);
    let back = exporting_tracer("order-service", &node);

    // The front calls the back: the context crosses in headers, as over HTTP.
    let root = front.span("GET /checkout").kind(SpanKind::Server).start();
    root.set_tag("http.route", "/checkout");
    let call = front
        .span("POST /orders")
        .kind(SpanKind::Client)
        .child_of(root.context())
        .start();
    let mut headers = BTreeMap::new();
    inject_into_map(call.context(), &mut headers);
    let served = back
        .span("POST /orders")
        .kind(SpanKind::Server)
        .child_of(&extract_from_map(&headers))
        .start();
    served.log("order stored");
    served.set_error("stock check failed");
    let trace_id = root.trace_id();
    let served_parent = call.span_id();
    served.finish();
    call.finish();
    root.finish();
    // Nothing is in the node's own buffer yet: these tracers only export.
    assert_eq!(buffer.span_count(), 0);
    // flush() blocks until the export thread has sent the queued spans.
    let (front, back) = tokio::task::spawn_blocking(move || {
        front.flush();
        back.flush();
        (front, back)
    })
    .await
    .unwrap();
    assert_eq!(front.stats().exported(), 2, "{:?}", front.stats());
    assert_eq!(back.stats().exported(), 1, "{:?}", back.stats());

    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let (status, view) = get(&node, &format!("/v1/traces/{trace_id}")).await;
        if status == 200 && view["spans"].as_array().map_or(0, Vec::len) == 3 {
            break view;
        }
        assert!(Instant::now() < deadline, "trace not complete: {view:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        view["services"],
        serde_json::json!(["order-service", "web-frontend"])
    );
    let spans = view["spans"].as_array().unwrap();
    let root_view = spans.iter().find(|s| s["name"] == "GET /checkout").unwrap();
    assert_eq!(root_view["service"], "web-frontend");
    assert_eq!(root_view["kind"], "server");
    assert_eq!(root_view["parent_span_id"], Value::Null);
    assert_eq!(root_view["attributes"]["http.route"], "/checkout");
    let served_view = spans
        .iter()
        .find(|s| s["service"] == "order-service")
        .unwrap();
    assert_eq!(served_view["parent_span_id"], served_parent.as_str());
    assert_eq!(served_view["parent_in_trace"], true);
    assert_eq!(served_view["depth"], 2);
    assert_eq!(served_view["status"]["code"], "error");
    assert_eq!(served_view["status"]["message"], "stock check failed");
    assert_eq!(served_view["events"][0]["name"], "order stored");

    // The list filters by either service.
    let (status, list) = get(&node, "/v1/traces?service=order-service").await;
    assert_eq!(status, 200);
    assert_eq!(list["traces"][0]["trace_id"], trace_id.as_str());
    assert_eq!(list["traces"][0]["root_name"], "GET /checkout");
    assert_eq!(list["traces"][0]["root_service"], "web-frontend");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_refused_and_store_nothing() {
    let (node, _dir) = start().await;
    let buffer = node.trace_buffer().unwrap().clone();
    let before = buffer.span_count();

    // Not protobuf at all.
    let (status, body) = post(&node, "application/x-protobuf", vec![0xff; 7]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("protobuf"), "{body}");

    // Valid JSON with one good span and one whose trace id is too short: nothing kept.
    let json = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"bad-sender"}}]},
      "scopeSpans":[{"spans":[
        {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"good",
         "startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000001000000"},
        {"traceId":"5b8eff","spanId":"eee19b7ec3c1b175","name":"bad",
         "startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000001000000"}]}]}]}"#;
    let (status, body) = post(&node, "application/json", json.into()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("resource_spans[0].scope_spans[0].spans[1]: trace_id is 3 bytes"),
        "{body}"
    );

    // Not JSON.
    let (status, body) = post(&node, "application/json", b"{\"resourceSpans\": 3".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("JSON"), "{body}");

    // Another content type.
    let (status, body) = post(&node, "text/plain", b"hello".to_vec()).await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("text/plain"), "{body}");

    // Too large (the limit is 4 MiB): refused from the Content-Length, before the body is
    // sent (a client writing the body would see the connection closed under it).
    let mut stream = tokio::net::TcpStream::connect(node.admin_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        trellis_tracing::receiver::DEFAULT_MAX_BODY_BYTES + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than 4194304 bytes"), "{answer}");

    assert_eq!(buffer.span_count(), before);
    assert!(!buffer.services().contains(&"bad-sender".to_string()));

    // The same JSON without the bad span is taken.
    let good = json.replace(
        r#"{"traceId":"5b8eff""#,
        r#"{"traceId":"5b8efff798038103d269b633813fc60c""#,
    );
    let (status, body) = post(&node, "application/json", good.into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(buffer.span_count(), before + 2);
    assert!(buffer.services().contains(&"bad-sender".to_string()));
    node.shutdown().await.unwrap();
}
