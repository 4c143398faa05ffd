#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Distributed tracing end to end, on real parts: a request through the gateway → service A
//! (an axum server on 127.0.0.1 found in the registry) → `ServiceClient` → service B → an
//! event on the embedded bus (a SQLite file) → a consumer. Each hop has its own
//! `DistributedTracer` and service name and exports OTLP to the real Jaeger
//! (`scripts/services up jaeger`), which must show ONE trace with the right structure.
//!
//! The Jaeger test is skipped with a notice when Jaeger is not running, unless
//! `TRELLIS_REQUIRE_ENGINES=1`. The others need no collector: a collector that is down
//! (a closed port) and malformed trace headers.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_client::ServiceClient;
use trellis_events::{Backoff, Event, EventBus, Message, SubscribeOptions, Subscription};
use trellis_gateway::{ApiGateway, GatewayConfig, RouteConfig, RunningGateway};
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;
use trellis_tracing::opentelemetry::trace::TraceId;
use trellis_tracing::{DistributedTracer, Protocol, TraceBuffer};

fn otlp_endpoint() -> String {
    std::env::var("TRELLIS_OTLP_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4318".into())
}

fn query_url() -> String {
    std::env::var("TRELLIS_JAEGER_QUERY").unwrap_or_else(|_| "http://127.0.0.1:16686".into())
}

fn reachable(url: &str) -> bool {
    let authority = url.split("://").nth(1).unwrap_or(url).trim_end_matches('/');
    authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

fn jaeger_up() -> bool {
    if reachable(&otlp_endpoint()) && reachable(&query_url()) {
        return true;
    }
    assert!(
        std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() != Ok("1"),
        "Jaeger is required (TRELLIS_REQUIRE_ENGINES=1) but {} / {} do not answer; start it with scripts/services up jaeger",
        otlp_endpoint(),
        query_url()
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: no Jaeger at {}; start it with scripts/services up jaeger",
        query_url()
    );
    false
}

/// A suffix unique to this run, so that Jaeger's in-memory history from other runs never
/// matches.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

/// A tracer for `service` keeping spans in `buffer`, exporting to `endpoint` when given.
fn tracer(service: &str, buffer: &TraceBuffer, endpoint: Option<&str>) -> DistributedTracer {
    let mut builder = DistributedTracer::builder(service)
        .sampling_rate(1.0)
        .buffer(buffer.clone())
        .batch_interval(Duration::from_millis(50))
        .export_timeout(Duration::from_millis(500))
        .queue_size(64);
    if let Some(endpoint) = endpoint {
        builder = builder.otlp(endpoint, Protocol::HttpProtobuf).unwrap();
    }
    builder.build().unwrap()
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The four tracers of one chain.
struct Tracers {
    gateway: DistributedTracer,
    a: DistributedTracer,
    b: DistributedTracer,
    consumer: DistributedTracer,
}

impl Tracers {
    fn flush(&self) {
        for t in [&self.gateway, &self.a, &self.b, &self.consumer] {
            t.flush();
        }
    }
}

/// Gateway → A → B → event → consumer, all on 127.0.0.1 and one SQLite file.
struct Chain {
    gateway: RunningGateway,
    base: String,
    topic: String,
    handled: mpsc::UnboundedReceiver<Value>,
    subscription: Option<Subscription>,
    registry: ServiceRegistry,
    _dir: tempfile::TempDir,
}

async fn chain(run: &str, tracers: &Tracers) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/e2e.db", dir.path().display()))
        .await
        .unwrap();
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    let service_a = format!("svc-a-{run}");
    let service_b = format!("svc-b-{run}");
    let topic = format!("orders-{run}");

    // The consumer, on its own bus handle with its own tracer.
    let consumer_bus = EventBus::embedded(&store)
        .unwrap()
        .with_tracer(tracers.consumer.clone());
    let (tx, handled) = mpsc::unbounded_channel();
    let consumer_tracer = tracers.consumer.clone();
    // Short pauses after a failed fetch (a busy SQLite file on a loaded machine).
    let options = SubscribeOptions::default().backoff(Backoff {
        initial: Duration::from_millis(5),
        multiplier: 2.0,
        max: Duration::from_millis(100),
    });
    let subscription = consumer_bus
        .subscribe_with(&topic, "mailer", options, move |event: Event<Value>| {
            let tx = tx.clone();
            let tracer = consumer_tracer.clone();
            async move {
                // Work inside the handler joins the consumer span.
                tracer.start_span("send confirmation").finish();
                tx.send(event.payload).map_err(|e| e.to_string())
            }
        })
        .await
        .unwrap();

    // Service B: a server span from the incoming headers; publishes inside it.
    let bus_b = EventBus::embedded(&store)
        .unwrap()
        .with_tracer(tracers.b.clone());
    let (tracer_b, topic_b) = (tracers.b.clone(), topic.clone());
    let app_b = axum::Router::new().route(
        "/orders/{id}",
        get(
            move |axum::extract::Path(id): axum::extract::Path<String>, headers: HeaderMap| {
                let (tracer, bus, topic) = (tracer_b.clone(), bus_b.clone(), topic_b.clone());
                async move {
                    let span =
                        tracer.http_server_span(&Method::GET, &format!("/orders/{id}"), &headers);
                    span.set_route("/orders/{id}");
                    let message = Message::new(json!({"order": id})).key(id.clone());
                    match span.in_scope(bus.publish(&topic, message)).await {
                        Ok(published) => {
                            span.finish(200);
                            (StatusCode::OK, Json(json!({"offset": published.offset})))
                        }
                        Err(e) => {
                            span.finish(500);
                            (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                Json(json!({"error": e.to_string()})),
                            )
                        }
                    }
                }
            },
        ),
    );
    let addr_b = serve(app_b).await;
    registry
        .register(&service_b, Instance::new("b-1", "127.0.0.1", addr_b.port()))
        .await
        .unwrap();

    // Service A: a server span, then a traced ServiceClient call to B inside it.
    let client_a = ServiceClient::builder(&service_b, &registry)
        .tracer(tracers.a.clone())
        .build()
        .unwrap();
    let tracer_a = tracers.a.clone();
    let app_a = axum::Router::new().route(
        "/checkout",
        get(move |headers: HeaderMap| {
            let (tracer, client) = (tracer_a.clone(), client_a.clone());
            async move {
                let span = tracer.http_server_span(&Method::GET, "/checkout", &headers);
                span.set_route("/checkout");
                match span.in_scope(client.get_json::<Value>("/orders/o-1")).await {
                    Ok(answer) => {
                        span.finish(200);
                        (StatusCode::OK, Json(answer))
                    }
                    Err(e) => {
                        span.finish(502);
                        (
                            StatusCode::BAD_GATEWAY,
                            Json(json!({"error": e.to_string()})),
                        )
                    }
                }
            }
        }),
    );
    let addr_a = serve(app_a).await;
    registry
        .register(&service_a, Instance::new("a-1", "127.0.0.1", addr_a.port()))
        .await
        .unwrap();

    let config = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        routes: vec![RouteConfig::new("/api/*", &service_a).strip_prefix("/api")],
        ..GatewayConfig::default()
    };
    let gateway = ApiGateway::new(config, registry.clone())
        .unwrap()
        .with_tracer(tracers.gateway.clone())
        .start()
        .await
        .unwrap();
    Chain {
        base: format!("http://{}", gateway.local_addr()),
        gateway,
        topic,
        handled,
        subscription: Some(subscription),
        registry,
        _dir: dir,
    }
}

impl Chain {
    /// Waits (30 s at most) for the consumer to handle one event.
    async fn consumed(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(30), self.handled.recv())
            .await
            .expect("the consumer handled the event within 30 s")
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(subscription) = self.subscription.take() {
            subscription.shutdown().await.unwrap();
        }
        self.gateway.shutdown().await;
        self.registry.shutdown().await.unwrap();
    }
}

/// Polls Jaeger until `service` lists trace(s) and the one trace holds `spans` spans.
async fn wait_for_jaeger(service: &str, spans: usize) -> Value {
    let list = format!(
        "{}/api/traces?service={service}&limit=20&lookback=1h",
        query_url()
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found: Value = client
            .get(&list)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(data) = found["data"].as_array()
            && !data.is_empty()
        {
            assert_eq!(data.len(), 1, "one request, one trace: {found:#}");
            let id = data[0]["traceID"].as_str().unwrap();
            let trace: Value = client
                .get(format!("{}/api/traces/{id}", query_url()))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if trace["data"][0]["spans"].as_array().map_or(0, Vec::len) >= spans {
                return trace["data"][0].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no trace with {spans} spans for {service} in Jaeger after 30 s: {found}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_gateway_services_and_bus_is_one_trace_in_jaeger() {
    if !jaeger_up() {
        return;
    }
    let run = run_id();
    let names = [
        format!("e2e-gateway-{run}"),
        format!("e2e-a-{run}"),
        format!("e2e-b-{run}"),
        format!("e2e-consumer-{run}"),
    ];
    let buffer = TraceBuffer::new(1000);
    let endpoint = otlp_endpoint();
    let tracers = Tracers {
        gateway: tracer(&names[0], &buffer, Some(&endpoint)),
        a: tracer(&names[1], &buffer, Some(&endpoint)),
        b: tracer(&names[2], &buffer, Some(&endpoint)),
        consumer: tracer(&names[3], &buffer, Some(&endpoint)),
    };
    let mut chain = chain(&run, &tracers).await;
    let response = reqwest::get(format!("{}/api/checkout", chain.base))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(chain.consumed().await, json!({"order": "o-1"}));
    let topic = chain.topic.clone();
    chain.stop().await;
    tracers.flush();

    // gateway server + client, A server + client, B server + producer, consumer + its work.
    let trace = wait_for_jaeger(&names[0], 8).await;
    let spans = trace["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 8, "{trace:#}");
    let service_of = |span: &Value| {
        let pid = span["processID"].as_str().unwrap();
        trace["processes"][pid]["serviceName"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let parent_of = |span: &Value| {
        span["references"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["refType"] == "CHILD_OF")
            .map(|r| r["spanID"].as_str().unwrap().to_owned())
    };
    let tag = |span: &Value, key: &str| {
        span["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == key)
            .map(|t| t["value"].clone())
            .unwrap_or(Value::Null)
    };
    let find = |service: &str, kind: &str| -> &Value {
        let matching: Vec<&Value> = spans
            .iter()
            .filter(|s| service_of(s) == service && tag(s, "span.kind") == kind)
            .collect();
        assert_eq!(matching.len(), 1, "{service} {kind}: {trace:#}");
        matching[0]
    };
    let gw_server = find(&names[0], "server");
    let gw_client = find(&names[0], "client");
    let a_server = find(&names[1], "server");
    let a_client = find(&names[1], "client");
    let b_server = find(&names[2], "server");
    let b_producer = find(&names[2], "producer");
    let consumer = find(&names[3], "consumer");
    let work = spans
        .iter()
        .find(|s| s["operationName"] == "send confirmation")
        .unwrap();

    // The structure: one chain of parents from the gateway's root.
    assert_eq!(parent_of(gw_server), None);
    for (child, parent) in [
        (gw_client, gw_server),
        (a_server, gw_client),
        (a_client, a_server),
        (b_server, a_client),
        (b_producer, b_server),
        (work, consumer),
    ] {
        assert_eq!(
            parent_of(child).as_deref(),
            parent["spanID"].as_str(),
            "{} should be a child of {}",
            child["operationName"],
            parent["operationName"]
        );
    }
    assert_eq!(service_of(work), names[3]);
    // The consumer span is a child of, and linked to, the producer span; Jaeger shows that
    // as one FOLLOWS_FROM reference (its messaging convention).
    let consumer_refs = consumer["references"].as_array().unwrap();
    assert_eq!(consumer_refs.len(), 1, "{consumer:#}");
    assert_eq!(consumer_refs[0]["refType"], "FOLLOWS_FROM");
    assert_eq!(consumer_refs[0]["spanID"], b_producer["spanID"]);
    assert_eq!(consumer_refs[0]["traceID"], trace["traceID"]);

    // Tags on each hop.
    let service_a = format!("svc-a-{run}");
    let service_b = format!("svc-b-{run}");
    assert_eq!(gw_server["operationName"], "GET /api/*");
    assert_eq!(tag(gw_server, "http.route"), "/api/*");
    assert_eq!(tag(gw_server, "trellis.service"), service_a.as_str());
    assert_eq!(tag(gw_server, "trellis.upstream.instance"), "a-1");
    assert_eq!(tag(gw_server, "http.response.status_code"), 200);
    assert_eq!(tag(gw_client, "trellis.upstream.instance"), "a-1");
    assert_eq!(a_server["operationName"], "GET /checkout");
    assert_eq!(tag(a_client, "trellis.service"), service_b.as_str());
    assert_eq!(tag(a_client, "trellis.upstream.instance"), "b-1");
    assert_eq!(tag(a_client, "http.response.status_code"), 200);
    assert_eq!(tag(b_server, "http.route"), "/orders/{id}");
    assert_eq!(b_producer["operationName"], format!("{topic} publish"));
    assert_eq!(
        tag(b_producer, "messaging.destination.name"),
        topic.as_str()
    );
    assert_eq!(consumer["operationName"], format!("{topic} process"));
    assert_eq!(tag(consumer, "messaging.consumer.group.name"), "mailer");
    for span in spans {
        assert_ne!(tag(span, "error"), true, "{span:#}");
    }
    for t in [&tracers.gateway, &tracers.a, &tracers.b, &tracers.consumer] {
        assert_eq!(t.stats().dropped(), 0, "{}", t.service_name());
    }

    // The same trace is what the in-memory buffer holds.
    let local = buffer.recent(Some(&names[0]), 10);
    assert_eq!(local.len(), 1);
    assert_eq!(local[0].trace_id, trace["traceID"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_slows_nothing_and_drops_are_counted() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let run = run_id();
    let buffer = TraceBuffer::new(100);
    let tracers = Tracers {
        gateway: tracer(&format!("down-gateway-{run}"), &buffer, Some(&down)),
        a: tracer(&format!("down-a-{run}"), &buffer, None),
        b: tracer(&format!("down-b-{run}"), &buffer, None),
        consumer: tracer(&format!("down-consumer-{run}"), &buffer, None),
    };
    let mut chain = chain(&run, &tracers).await;
    let http = reqwest::Client::new();
    const REQUESTS: usize = 60;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..REQUESTS {
        let sent = Instant::now();
        let response = http
            .get(format!("{}/api/checkout", chain.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        slowest = slowest.max(sent.elapsed());
        chain.consumed().await;
    }
    let total = started.elapsed();
    // Export attempts time out after 500 ms: a request that waited on one would show it.
    assert!(
        slowest < Duration::from_millis(450),
        "slowest request {slowest:?} (total {total:?})"
    );
    let gateway = &tracers.gateway;
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway.stats().dropped() < 2 * REQUESTS as u64 {
        assert!(
            Instant::now() < deadline,
            "dropped {} of {} spans",
            gateway.stats().dropped(),
            2 * REQUESTS
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gateway.stats().exported(), 0);
    // The counter a node exposes in /metrics.
    let mut registry = prometheus_client::registry::Registry::default();
    gateway.stats().register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    // Queue full or export failed: every span is accounted for.
    let count: f64 = text
        .lines()
        .filter(|l| l.starts_with("trellis_tracing_spans_dropped_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(count >= 2.0 * REQUESTS as f64, "{text}");
    chain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_trace_headers_through_the_gateway_start_a_fresh_root() {
    let run = run_id();
    let buffer = TraceBuffer::new(1000);
    let tracers = Tracers {
        gateway: tracer(&format!("bad-gateway-{run}"), &buffer, None),
        a: tracer(&format!("bad-a-{run}"), &buffer, None),
        b: tracer(&format!("bad-b-{run}"), &buffer, None),
        consumer: tracer(&format!("bad-consumer-{run}"), &buffer, None),
    };
    let gateway_name = tracers.gateway.service_name().to_owned();
    let mut chain = chain(&run, &tracers).await;
    let http = reqwest::Client::new();
    let cases: [&[(&str, &str)]; 4] = [
        &[("traceparent", "00-xyz-00f067aa0ba902b7-01")],
        &[(
            "traceparent",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
        &[("b3", "not-a-b3-header")],
        &[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "short"),
        ],
    ];
    let mut seen = Vec::new();
    for headers in cases {
        let mut request = http.get(format!("{}/api/checkout", chain.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{headers:?}");
        chain.consumed().await;
        let recent = buffer.recent(Some(&gateway_name), 100);
        let newest = recent.iter().find(|t| !seen.contains(&t.trace_id)).unwrap();
        seen.push(newest.trace_id.clone());
        assert_ne!(newest.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let view = buffer
            .trace(TraceId::from_hex(&newest.trace_id).unwrap())
            .unwrap();
        let server = view
            .spans
            .iter()
            .find(|s| s.service == gateway_name && s.kind == "server")
            .unwrap();
        assert_eq!(server.parent_span_id, None, "{headers:?}: a fresh root");
        // The whole chain joined the fresh trace (the consumer span may still be ending).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let view = buffer
                .trace(TraceId::from_hex(&newest.trace_id).unwrap())
                .unwrap();
            if view.spans.len() >= 8 {
                assert_eq!(view.services.len(), 4, "{view:#?}");
                break;
            }
            assert!(Instant::now() < deadline, "{view:#?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    chain.stop().await;
}
