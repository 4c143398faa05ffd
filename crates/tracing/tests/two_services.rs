#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Two services in one process joined over real HTTP, recorded in the in-memory buffer
//! and read back through the admin router; malformed incoming headers; the store layer;
//! event producer/consumer spans; plain `tracing` spans.

mod support;

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderValue, Method};
use serde_json::Value;
use support::{back_service, front_call, serve};
use trellis_tracing::{DistributedTracer, StoreTraceLayer, TraceBuffer};

fn tracer(service: &str, buffer: &TraceBuffer) -> DistributedTracer {
    DistributedTracer::builder(service)
        .buffer(buffer.clone())
        .build()
        .unwrap()
}

async fn get_json(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn one_trace_across_two_services_as_waterfall_json() {
    let buffer = TraceBuffer::new(1000);
    let front = tracer("user-service", &buffer);
    let back = tracer("profile-service", &buffer);
    let back_addr = serve(back_service(back)).await;
    let admin = serve(trellis_tracing::admin::router(buffer.clone())).await;

    let call = front_call(&front, back_addr, "/profiles/u1").await;
    assert_eq!(call.status, 200);
    assert_eq!(
        call.back_trace_id, call.trace_id,
        "the back service joined the trace"
    );

    let (status, list) =
        get_json(&format!("http://{admin}/v1/traces?service=profile-service")).await;
    assert_eq!(status, 200);
    let traces = list["traces"].as_array().unwrap();
    assert_eq!(traces.len(), 1, "{list}");
    assert_eq!(traces[0]["trace_id"], call.trace_id.as_str());
    assert_eq!(traces[0]["root_name"], "get_user_profile");
    assert_eq!(traces[0]["root_service"], "user-service");
    assert_eq!(traces[0]["span_count"], 4);
    assert_eq!(
        traces[0]["services"],
        serde_json::json!(["profile-service", "user-service"])
    );

    let (status, trace) = get_json(&format!("http://{admin}/v1/traces/{}", call.trace_id)).await;
    assert_eq!(status, 200);
    let spans = trace["spans"].as_array().unwrap();
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no span {name} in {trace}"))
    };
    let root = by_name("get_user_profile");
    let client = by_name("GET");
    let server = by_name("GET /profiles/{id}");
    let db = by_name("db_query");
    assert_eq!(root["parent_span_id"], Value::Null);
    assert_eq!(root["span_id"], call.root_span_id.as_str());
    assert_eq!(root["attributes"]["user.id"], "u1");
    assert_eq!(client["parent_span_id"], root["span_id"]);
    assert_eq!(client["kind"], "client");
    assert_eq!(client["service"], "user-service");
    assert_eq!(server["parent_span_id"], client["span_id"]);
    assert_eq!(server["kind"], "server");
    assert_eq!(server["service"], "profile-service");
    assert_eq!(server["attributes"]["http.route"], "/profiles/{id}");
    assert_eq!(server["attributes"]["http.response.status_code"], 200);
    assert_eq!(server["attributes"]["trellis.service"], "profile-service");
    assert_eq!(db["parent_span_id"], server["span_id"]);
    assert_eq!(db["depth"], 3);
    assert_eq!(root["start_offset_us"], 0);
    for span in spans {
        let end = span["start_offset_us"].as_u64().unwrap() + span["duration_us"].as_u64().unwrap();
        assert!(end <= trace["duration_us"].as_u64().unwrap(), "{span}");
    }

    // Unknown and malformed ids are answered, not crashed on.
    let (status, body) = get_json(&format!("http://{admin}/v1/traces/{}", "ab".repeat(16))).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get_json(&format!("http://{admin}/v1/traces/xyz")).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("xyz"), "{body}");
    let (status, body) = get_json(&format!("http://{admin}/v1/traces?limit=0")).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    let (status, body) = get_json(&format!("http://{admin}/v1/traces?limit=ten")).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn server_errors_mark_the_span_failed() {
    let buffer = TraceBuffer::new(1000);
    let front = tracer("front", &buffer);
    let back_addr = serve(back_service(tracer("back", &buffer))).await;
    let call = front_call(&front, back_addr, "/fail").await;
    assert_eq!(call.status, 503);
    let view = buffer.trace(call.trace_id.parse_trace_id()).unwrap();
    let server = view.spans.iter().find(|s| s.name == "GET /fail").unwrap();
    assert_eq!(server.status.code, "error");
    assert_eq!(server.attributes["error"], true);
    let client = view.spans.iter().find(|s| s.name == "GET").unwrap();
    assert_eq!(client.status.code, "error");
    assert!(buffer.recent(None, 10)[0].error);
}

trait ParseTraceId {
    fn parse_trace_id(&self) -> trellis_tracing::opentelemetry::trace::TraceId;
}

impl ParseTraceId for String {
    fn parse_trace_id(&self) -> trellis_tracing::opentelemetry::trace::TraceId {
        trellis_tracing::opentelemetry::trace::TraceId::from_hex(self).unwrap()
    }
}

#[tokio::test]
async fn malformed_traceparent_and_b3_over_http_start_fresh_roots() {
    let buffer = TraceBuffer::new(1000);
    let back_addr = serve(back_service(tracer("back", &buffer))).await;
    let bad_trace = "0af7651916cd43dd8448eb211c80319c";
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![("traceparent", "00-xyz-abc-01".into())],
        vec![("traceparent", format!("00-{bad_trace}-0000000000000000-01"))],
        vec![(
            "traceparent",
            format!("00-{}-b7ad6b7169203331-01", "0".repeat(32)),
        )],
        vec![("traceparent", format!("00-{bad_trace}-b7ad6b71692033-01"))],
        vec![("b3", "garbage".into())],
        vec![("b3", format!("{bad_trace}-b7ad6b7169203331-x"))],
        vec![
            ("x-b3-traceid", bad_trace.into()),
            ("x-b3-spanid", "nothex!!nothex!!".into()),
        ],
        vec![
            ("x-b3-traceid", "123".into()),
            ("x-b3-spanid", "b7ad6b7169203331".into()),
        ],
    ];
    let client = reqwest::Client::new();
    let mut seen = std::collections::HashSet::new();
    for case in &cases {
        let mut request = client.get(format!("http://{back_addr}/profiles/u1"));
        for (k, v) in case {
            request = request.header(*k, v);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{case:?}");
        let trace_id = response.text().await.unwrap();
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, bad_trace, "{case:?} must not be joined");
        assert_ne!(trace_id, "0".repeat(32), "{case:?}");
        assert!(
            seen.insert(trace_id.clone()),
            "{case:?}: each request is its own trace"
        );
        let view = buffer.trace(trace_id.parse_trace_id()).unwrap();
        let server = view.spans.iter().find(|s| s.kind == "server").unwrap();
        assert_eq!(server.parent_span_id, None, "{case:?}: a root span");
    }
    // A valid B3 header from a Zipkin peer is joined.
    let response = client
        .get(format!("http://{back_addr}/profiles/u1"))
        .header("X-B3-TraceId", bad_trace)
        .header("X-B3-SpanId", "b7ad6b7169203331")
        .header("X-B3-Sampled", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), bad_trace);
}

#[tokio::test]
async fn store_operations_inside_a_trace_get_spans() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = TraceBuffer::new(1000);
    let tracer = tracer("store-user", &buffer);
    let store = trellis_store::Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    let backend = store.backend();
    let store = store.layer(StoreTraceLayer::new(tracer.clone()).backend(backend));
    let users = store.table("users").unwrap();

    // Outside any trace: no span (background polling stays out of the buffer).
    users.get("p", "c").await.unwrap();
    assert_eq!(buffer.span_count(), 0);

    let root = tracer.start_span("handler");
    root.in_scope(async {
        users.put("p", "c", b"v".to_vec(), None).await.unwrap();
        users.get("p", "c").await.unwrap();
    })
    .await;
    let trace_id = root.trace_id();
    root.finish();
    let view = buffer.trace(trace_id.parse_trace_id()).unwrap();
    assert_eq!(view.spans.len(), 3, "{view:#?}");
    let put = view.spans.iter().find(|s| s.name == "put users").unwrap();
    let get = view.spans.iter().find(|s| s.name == "get users").unwrap();
    for span in [put, get] {
        assert_eq!(
            span.parent_span_id.as_deref(),
            Some(view.spans[0].span_id.as_str())
        );
        assert_eq!(span.attributes["db.system.name"], "sqlite");
        assert_eq!(span.attributes["db.collection.name"], "users");
        assert_eq!(span.kind, "client");
    }
    assert_eq!(get.attributes["db.operation.name"], "get");

    // With root spans on, background operations are traced too.
    let rooted = trellis_store::Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap()
        .layer(StoreTraceLayer::new(tracer.clone()).with_root_spans(true));
    rooted.ping().await.unwrap();
    assert_eq!(buffer.recent(None, 10)[0].root_name, "ping");
}

#[tokio::test]
async fn event_consumer_span_is_child_of_and_linked_to_the_producer() {
    let buffer = TraceBuffer::new(1000);
    let producer_tracer = tracer("orders", &buffer);
    let consumer_tracer = tracer("billing", &buffer);
    let mut headers = BTreeMap::new();
    let producer = producer_tracer.producer_span("order.created", &mut headers);
    let producer_id = producer.span_id();
    let trace_id = producer.trace_id();
    producer.finish();
    assert!(headers["traceparent"].contains(&trace_id));

    // The headers travel in the envelope as JSON.
    let wire = serde_json::to_string(&headers).unwrap();
    let received: BTreeMap<String, String> = serde_json::from_str(&wire).unwrap();
    let consumer = consumer_tracer.consumer_span("order.created", "billing", &received);
    assert_eq!(consumer.trace_id(), trace_id);
    consumer.finish();

    let view = buffer.trace(trace_id.parse_trace_id()).unwrap();
    let consumer = view.spans.iter().find(|s| s.kind == "consumer").unwrap();
    assert_eq!(consumer.service, "billing");
    assert_eq!(consumer.name, "order.created process");
    assert_eq!(
        consumer.parent_span_id.as_deref(),
        Some(producer_id.as_str())
    );
    assert_eq!(consumer.links[0].span_id, producer_id);
    assert_eq!(
        consumer.attributes["messaging.consumer.group.name"],
        "billing"
    );

    // Headers without trace context: a new root, no error.
    let lone = consumer_tracer.consumer_span("order.created", "billing", &BTreeMap::new());
    assert_ne!(lone.trace_id(), trace_id);
    let mut bad = BTreeMap::new();
    bad.insert("traceparent".to_owned(), "00-garbage".to_owned());
    let lone = consumer_tracer.consumer_span("order.created", "billing", &bad);
    assert!(lone.is_sampled());
    assert_ne!(lone.trace_id(), trace_id);
}

#[tokio::test]
async fn plain_tracing_spans_join_the_trace() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let buffer = TraceBuffer::new(1000);
    let tracer = tracer("tracing-user", &buffer);
    let subscriber = tracing_subscriber::registry().with(tracer.layer());
    let _default = tracing::subscriber::set_default(subscriber);

    let root = tracer.start_span("request");
    {
        let _cx = root.enter();
        let outer = tracing::info_span!("load_user", user.id = "u1");
        let _entered = outer.enter();
        // A span of ours started inside a `tracing` span is its child.
        tracer.start_span("inner").finish();
    }
    let trace_id = root.trace_id();
    root.finish();
    let view = buffer.trace(trace_id.parse_trace_id()).unwrap();
    let load = view.spans.iter().find(|s| s.name == "load_user").unwrap();
    let inner = view.spans.iter().find(|s| s.name == "inner").unwrap();
    assert_eq!(
        load.parent_span_id.as_deref(),
        Some(view.spans[0].span_id.as_str())
    );
    assert_eq!(inner.parent_span_id.as_deref(), Some(load.span_id.as_str()));
    assert_eq!(load.attributes["user.id"], "u1");
}

#[tokio::test]
async fn buffer_is_bounded_and_evicts_oldest_traces() {
    let buffer = TraceBuffer::new(50);
    let tracer = tracer("bounded", &buffer);
    let mut ids = Vec::new();
    for _ in 0..100 {
        let root = tracer.start_span("root");
        tracer.start_child("child", &root).finish();
        ids.push(root.trace_id());
        root.finish();
    }
    assert_eq!(buffer.span_count(), 50);
    assert_eq!(buffer.trace_count(), 25);
    let recent = buffer.recent(None, 1000);
    assert_eq!(recent.len(), 25);
    assert_eq!(recent[0].trace_id, ids[99], "newest first");
    assert_eq!(recent[24].trace_id, ids[75]);
    assert!(
        buffer.trace(ids[0].parse_trace_id()).is_none(),
        "oldest evicted"
    );

    // One trace larger than the whole buffer keeps its newest spans.
    let small = TraceBuffer::new(5);
    let tracer = DistributedTracer::builder("big")
        .buffer(small.clone())
        .build()
        .unwrap();
    let root = tracer.start_span("root");
    for _ in 0..20 {
        tracer.start_child("child", &root).finish();
    }
    root.finish();
    assert_eq!(small.span_count(), 5);
    assert_eq!(small.recent(None, 10)[0].span_count, 5);

    // Disabled tracing records nothing and writes no headers.
    let disabled = DistributedTracer::disabled();
    let mut incoming = HeaderMap::new();
    incoming.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let server = disabled.http_server_span(&Method::GET, "/", &incoming);
    assert!(!server.is_sampled());
    let mut out = HeaderMap::new();
    disabled.http_client_span_with_parent(server.context(), &Method::GET, "http://x/", &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert!(!disabled.start_span("x").is_sampled());
}
