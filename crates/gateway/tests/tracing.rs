//! The gateway with a tracer, against real HTTP servers on 127.0.0.1 and a real registry:
//! a server span per request parented by incoming W3C or B3 headers, a client span per
//! upstream attempt whose context reaches the instance, malformed headers start a new root
//! and the request still succeeds.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;

use axum::Json;
use axum::extract::Request;
use axum::routing::any;
use serde_json::{Value, json};
use trellis_gateway::{ApiGateway, GatewayConfig, RouteConfig, RunningGateway};
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;
use trellis_tracing::opentelemetry::trace::TraceId;
use trellis_tracing::{DistributedTracer, SpanView, TraceBuffer, TraceView};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// An upstream that answers with the headers it received, a repeated name's values joined
/// with ", " (so that a trace header sent twice shows).
async fn echo() -> u16 {
    let app = axum::Router::new().fallback(any(|request: Request| async move {
        let mut headers: HashMap<String, String> = HashMap::new();
        for (name, value) in request.headers() {
            let value = value.to_str().unwrap_or("");
            headers
                .entry(name.to_string())
                .and_modify(|all| {
                    all.push_str(", ");
                    all.push_str(value);
                })
                .or_insert_with(|| value.to_owned());
        }
        Json(json!({ "headers": headers }))
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

struct Setup {
    _gateway: RunningGateway,
    base: String,
    http: reqwest::Client,
    buffer: TraceBuffer,
    _dir: tempfile::TempDir,
}

async fn setup(tracer: Option<DistributedTracer>, buffer: TraceBuffer) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/gw.db", dir.path().display()))
        .await
        .unwrap();
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    let port = echo().await;
    registry
        .register("users", Instance::new("users-1", "127.0.0.1", port))
        .await
        .unwrap();
    let config = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        routes: vec![
            RouteConfig::new("/api/users/*", "users").strip_prefix("/api"),
            RouteConfig::new("/nobody/*", "nobody"),
        ],
        ..GatewayConfig::default()
    };
    let mut gateway = ApiGateway::new(config, registry).unwrap();
    if let Some(tracer) = tracer {
        gateway = gateway.with_tracer(tracer);
    }
    let gateway = gateway.start().await.unwrap();
    Setup {
        base: format!("http://{}", gateway.local_addr()),
        _gateway: gateway,
        http: reqwest::Client::new(),
        buffer,
        _dir: dir,
    }
}

async fn traced() -> Setup {
    let buffer = TraceBuffer::new(1000);
    let tracer = DistributedTracer::builder("edge")
        .sampling_rate(1.0)
        .buffer(buffer.clone())
        .build()
        .unwrap();
    setup(Some(tracer), buffer).await
}

impl Setup {
    /// GETs `path` with `headers`; returns the status and the headers the upstream saw.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, HashMap<String, String>) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        let seen = body["headers"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        (status, seen)
    }

    fn trace(&self, trace_id: &str) -> TraceView {
        self.buffer
            .trace(TraceId::from_hex(trace_id).unwrap())
            .unwrap_or_else(|| panic!("trace {trace_id} not in the buffer"))
    }
}

/// (trace id, span id) of a `traceparent`.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn kind<'a>(view: &'a TraceView, kind: &str) -> &'a SpanView {
    let spans: Vec<&SpanView> = view.spans.iter().filter(|s| s.kind == kind).collect();
    assert_eq!(spans.len(), 1, "{view:#?}");
    spans[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_a_server_span_with_a_client_span_for_the_upstream_call() {
    let s = traced().await;
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    let (status, seen) = s
        .get(
            "/api/users/42",
            &[("traceparent", &incoming), ("tracestate", "congo=t61")],
        )
        .await;
    assert_eq!(status, 200);
    let (trace_id, upstream_parent) = ids(&seen["traceparent"]);
    assert_eq!(trace_id, TRACE);
    assert_eq!(seen["tracestate"], "congo=t61");
    assert_eq!(seen["x-b3-traceid"], TRACE);
    assert_eq!(seen["x-b3-spanid"], upstream_parent);

    let view = s.trace(TRACE);
    assert_eq!(view.spans.len(), 2, "{view:#?}");
    let server = kind(&view, "server");
    let client = kind(&view, "client");
    assert_eq!(server.parent_span_id.as_deref(), Some(PARENT));
    assert_eq!(server.name, "GET /api/users/*");
    assert_eq!(server.service, "edge");
    assert_eq!(server.attributes["http.route"], "/api/users/*");
    assert_eq!(server.attributes["trellis.service"], "users");
    assert_eq!(server.attributes["trellis.upstream.instance"], "users-1");
    assert_eq!(server.attributes["http.response.status_code"], 200);
    assert_eq!(server.attributes["url.path"], "/api/users/42");
    assert_eq!(
        client.parent_span_id.as_deref(),
        Some(server.span_id.as_str())
    );
    assert_eq!(
        client.span_id, upstream_parent,
        "the upstream's parent is the client span"
    );
    assert_eq!(client.attributes["trellis.upstream.instance"], "users-1");
    assert_eq!(client.attributes["http.response.status_code"], 200);
    assert!(
        client.attributes["url.full"]
            .as_str()
            .unwrap()
            .ends_with("/users/42"),
        "{:?}",
        client.attributes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_headers_parent_the_server_span() {
    let s = traced().await;
    let other = "80f198ee56343ba864fe8b2a57d3eff7";
    let (status, seen) = s
        .get(
            "/api/users/1",
            &[
                ("x-b3-traceid", other),
                ("x-b3-spanid", "e457b5a2e4d86bd1"),
                ("x-b3-sampled", "1"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(ids(&seen["traceparent"]).0, other);
    let server = s.trace(other);
    assert_eq!(
        kind(&server, "server").parent_span_id.as_deref(),
        Some("e457b5a2e4d86bd1")
    );

    let single = "a3ce929d0e0e47364bf92f3577b34da6";
    let (status, seen) = s
        .get(
            "/api/users/2",
            &[("b3", &format!("{single}-00f067aa0ba902b7-1"))],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(ids(&seen["traceparent"]).0, single);
    assert_eq!(seen.get("b3"), None, "multi-header B3 is written upstream");
    assert_eq!(
        kind(&s.trace(single), "server").parent_span_id.as_deref(),
        Some("00f067aa0ba902b7")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_trace_headers_start_a_new_root_and_the_request_succeeds() {
    let s = traced().await;
    for headers in [
        vec![("traceparent", "00-not-hex-01")],
        vec![(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )],
        vec![("traceparent", "zz")],
        vec![("b3", "garbage-in")],
        vec![("x-b3-traceid", "xyz"), ("x-b3-spanid", "1")],
        vec![("traceparent", "00-bad"), ("b3", "also-bad")],
    ] {
        let (status, seen) = s.get("/api/users/7", &headers).await;
        assert_eq!(status, 200, "{headers:?}");
        let (trace_id, parent) = ids(&seen["traceparent"]);
        assert_ne!(trace_id, "00000000000000000000000000000000");
        for (name, value) in &headers {
            assert_ne!(
                seen.get(*name).map(String::as_str),
                Some(*value),
                "{name} forwarded"
            );
        }
        let view = s.trace(&trace_id);
        let server = kind(&view, "server");
        assert_eq!(server.parent_span_id, None, "{headers:?}: a new root");
        assert_eq!(kind(&view, "client").span_id, parent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_recorded_on_the_server_span() {
    let s = traced().await;
    let response = s
        .http
        .get(format!("{}/nobody/x", s.base))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let view = s.trace(TRACE);
    assert_eq!(view.spans.len(), 1, "no upstream call, no client span");
    let server = &view.spans[0];
    assert_eq!(server.attributes["trellis.service"], "nobody");
    assert_eq!(server.attributes["http.response.status_code"], 503);
    assert_eq!(server.status.code, "error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tracer_trace_headers_pass_through_untouched() {
    let s = setup(None, TraceBuffer::new(10)).await;
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    let (status, seen) = s
        .get(
            "/api/users/1",
            &[("traceparent", &incoming), ("b3", "whatever")],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(seen["traceparent"], incoming);
    assert_eq!(seen["b3"], "whatever");
    assert_eq!(seen.get("x-b3-traceid"), None);
}
