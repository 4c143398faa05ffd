//! ServiceClient with a tracer, against real axum servers on 127.0.0.1: one client span
//! per attempt, its context is what the instance receives, and the spans land in a
//! TraceBuffer with the right parents.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use http::HeaderValue;
use serde_json::{Value, json};
use support::{env, serve};
use trellis_client::{CallContext, ServiceClient};
use trellis_registry::Instance;
use trellis_resilience::retry::Backoff;
use trellis_tracing::opentelemetry::trace::TraceId;
use trellis_tracing::{DistributedTracer, SpanView, TraceBuffer, TraceView};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn tracer(buffer: &TraceBuffer) -> DistributedTracer {
    DistributedTracer::builder("front-service")
        .sampling_rate(1.0)
        .buffer(buffer.clone())
        .build()
        .unwrap()
}

/// Echoes the trace headers that arrived.
async fn echo(headers: HeaderMap) -> axum::Json<Value> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    axum::Json(json!({
        "traceparent": h("traceparent"),
        "b3_trace": h("x-b3-traceid"),
        "b3_span": h("x-b3-spanid"),
    }))
}

/// The `traceparent` fields: (trace id, parent span id, flags).
fn split(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn trace(buffer: &TraceBuffer, trace_id: &str) -> TraceView {
    buffer
        .trace(TraceId::from_hex(trace_id).unwrap())
        .unwrap_or_else(|| panic!("trace {trace_id} not in the buffer"))
}

fn client_spans(view: &TraceView) -> Vec<&SpanView> {
    view.spans.iter().filter(|s| s.kind == "client").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_is_a_client_span_whose_context_reaches_the_instance() {
    let env = env().await;
    let back = serve(Router::new().route("/echo", get(echo))).await;
    env.register("back-service", "back-1", &back).await;
    let buffer = TraceBuffer::new(1000);
    let tracer = tracer(&buffer);
    let client = ServiceClient::builder("back-service", &env.registry)
        .tracer(tracer.clone())
        .build()
        .unwrap();

    // The caller's span is the current OpenTelemetry context.
    let handler = tracer.start_span("handle order");
    let seen: Value = handler.in_scope(client.get_json("/echo")).await.unwrap();
    let trace_id = handler.trace_id();
    let handler_id = handler.span_id();
    handler.finish();

    let (seen_trace, seen_parent, flags) = split(seen["traceparent"].as_str().unwrap());
    assert_eq!(seen_trace, trace_id);
    assert_eq!(flags, "01");
    assert_ne!(
        seen_parent, handler_id,
        "the instance must see the client span"
    );
    assert_eq!(seen["b3_trace"], trace_id.as_str());
    assert_eq!(seen["b3_span"], seen_parent.as_str());

    let view = trace(&buffer, &trace_id);
    assert_eq!(view.spans.len(), 2, "{view:#?}");
    let spans = client_spans(&view);
    assert_eq!(spans.len(), 1);
    let span = spans[0];
    assert_eq!(span.span_id, seen_parent);
    assert_eq!(span.parent_span_id.as_deref(), Some(handler_id.as_str()));
    assert!(span.parent_in_trace);
    assert_eq!(span.service, "front-service");
    assert_eq!(span.name, "GET");
    assert_eq!(span.attributes["trellis.upstream.instance"], "back-1");
    assert_eq!(span.attributes["trellis.service"], "back-service");
    assert_eq!(span.attributes["trellis.attempt"], 1);
    assert_eq!(span.attributes["http.response.status_code"], 200);
    assert!(
        span.attributes["url.full"]
            .as_str()
            .unwrap()
            .ends_with("/echo"),
        "{:?}",
        span.attributes
    );
    assert_ne!(span.status.code, "error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_context_parents_the_span_when_there_is_no_current_span() {
    let env = env().await;
    let back = serve(Router::new().route("/echo", get(echo))).await;
    env.register("back-service", "back-1", &back).await;
    let buffer = TraceBuffer::new(1000);
    let client = ServiceClient::builder("back-service", &env.registry)
        .tracer(tracer(&buffer))
        .build()
        .unwrap();

    let ctx = CallContext::new().with_traceparent(HeaderValue::from_static(TRACEPARENT));
    let seen: Value = ctx.scope(client.get_json("/echo")).await.unwrap();
    let (trace_id, parent, _) = split(seen["traceparent"].as_str().unwrap());
    assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parent, "00f067aa0ba902b7");

    let view = trace(&buffer, &trace_id);
    let spans = client_spans(&view);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].span_id, parent);
    assert_eq!(
        spans[0].parent_span_id.as_deref(),
        Some("00f067aa0ba902b7"),
        "the remote caller is the parent"
    );
    assert!(!spans[0].parent_in_trace);

    // No context at all: a new root, still propagated.
    let seen: Value = client.get_json("/echo").await.unwrap();
    let (root_trace, root_span, _) = split(seen["traceparent"].as_str().unwrap());
    assert_ne!(root_trace, trace_id);
    let view = trace(&buffer, &root_trace);
    assert_eq!(view.spans.len(), 1);
    assert_eq!(view.spans[0].span_id, root_span);
    assert_eq!(view.spans[0].parent_span_id, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_a_span_and_failures_are_recorded() {
    let env = env().await;
    // Fails the first request with 503, then answers.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let flaky = serve(Router::new().route(
        "/echo",
        get(move |headers: HeaderMap| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(StatusCode::SERVICE_UNAVAILABLE)
                } else {
                    Ok(echo(headers).await)
                }
            }
        }),
    ))
    .await;
    env.register("back-service", "back-1", &flaky).await;
    let buffer = TraceBuffer::new(1000);
    let tracer = tracer(&buffer);
    let client = ServiceClient::builder("back-service", &env.registry)
        .tracer(tracer.clone())
        .retries(2)
        .backoff(Backoff::new(Duration::from_millis(1), Duration::from_millis(5)).unwrap())
        .build()
        .unwrap();

    let root = tracer.start_span("caller");
    let seen: Value = root.in_scope(client.get_json("/echo")).await.unwrap();
    let trace_id = root.trace_id();
    let root_id = root.span_id();
    root.finish();
    let (_, last_parent, _) = split(seen["traceparent"].as_str().unwrap());

    let view = trace(&buffer, &trace_id);
    let mut spans = client_spans(&view);
    spans.sort_by_key(|s| s.attributes["trellis.attempt"].as_i64());
    assert_eq!(spans.len(), 2, "{view:#?}");
    for span in &spans {
        assert_eq!(span.parent_span_id.as_deref(), Some(root_id.as_str()));
    }
    assert_eq!(spans[0].attributes["http.response.status_code"], 503);
    assert_eq!(spans[0].status.code, "error");
    assert_eq!(spans[0].attributes["error"], true);
    assert_eq!(spans[1].attributes["http.response.status_code"], 200);
    assert_ne!(spans[1].status.code, "error");
    assert_eq!(
        spans[1].span_id, last_parent,
        "each attempt sends its own span"
    );

    // An instance that refuses connections: the span says why.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    env.register_instance("dead-service", Instance::new("dead-1", "127.0.0.1", port))
        .await;
    let dead = ServiceClient::builder("dead-service", &env.registry)
        .tracer(tracer.clone())
        .retries(0)
        .build()
        .unwrap();
    let root = tracer.start_span("caller");
    let err = root.in_scope(dead.get("/x").send()).await.unwrap_err();
    let trace_id = root.trace_id();
    root.finish();
    let view = trace(&buffer, &trace_id);
    let spans = client_spans(&view);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].status.code, "error");
    assert_eq!(spans[0].attributes["trellis.upstream.instance"], "dead-1");
    let message = spans[0].status.message.clone().unwrap_or_default();
    assert!(message.contains("dead-service"), "{message} / {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_tracer_keeps_forwarding_the_callers_context() {
    let env = env().await;
    let back = serve(Router::new().route("/echo", get(echo))).await;
    env.register("back-service", "back-1", &back).await;
    let client = ServiceClient::builder("back-service", &env.registry)
        .tracer(DistributedTracer::disabled())
        .build()
        .unwrap();
    let ctx = CallContext::new().with_traceparent(HeaderValue::from_static(TRACEPARENT));
    let seen: Value = ctx.scope(client.get_json("/echo")).await.unwrap();
    assert_eq!(seen["traceparent"], TRACEPARENT);
    assert_eq!(seen["b3_trace"], Value::Null);
}
