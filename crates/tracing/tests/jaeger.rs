#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Against a real Jaeger v2 (`scripts/services up jaeger`): spans of two services joined
//! over real HTTP arrive over OTLP as one trace with the right structure. Skipped with a
//! notice when Jaeger is not running, unless `TRELLIS_REQUIRE_ENGINES=1`.

mod support;

use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::{back_service, front_call, serve};
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
        otlp_endpoint()
    );
    false
}

fn exporting_tracer(service: &str, buffer: &TraceBuffer) -> DistributedTracer {
    DistributedTracer::builder(service)
        .buffer(buffer.clone())
        .otlp(&otlp_endpoint(), Protocol::HttpProtobuf)
        .unwrap()
        .batch_interval(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// Polls Jaeger's query API until `service` has trace `trace_id` with `spans` spans.
async fn wait_for_trace(service: &str, trace_id: &str, spans: usize) -> Value {
    let url = format!("{}/api/traces/{trace_id}", query_url());
    let list = format!(
        "{}/api/traces?service={service}&limit=20&lookback=1h",
        query_url()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::new();
    loop {
        let found = client
            .get(&list)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        let listed = found["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|t| t["traceID"] == trace_id));
        if listed {
            let trace: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
            if trace["data"][0]["spans"].as_array().map_or(0, Vec::len) == spans {
                return trace["data"][0].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace_id} with {spans} spans not in Jaeger for {service} after 30s: {found}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_over_http_arrive_in_jaeger_as_one_trace() {
    if !jaeger_up() {
        return;
    }
    let suffix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let front_name = format!("trellis-front-{suffix}");
    let back_name = format!("trellis-back-{suffix}");
    let buffer = TraceBuffer::new(1000);
    let front = exporting_tracer(&front_name, &buffer);
    let back = exporting_tracer(&back_name, &buffer);
    let back_addr = serve(back_service(back.clone())).await;

    let call = front_call(&front, back_addr, "/profiles/u1").await;
    assert_eq!(call.status, 200);
    assert_eq!(call.back_trace_id, call.trace_id);
    front.flush();
    back.flush();

    let trace = wait_for_trace(&back_name, &call.trace_id, 4).await;
    // The same trace is found from the other service.
    wait_for_trace(&front_name, &call.trace_id, 4).await;

    let service_of = |span: &Value| {
        let pid = span["processID"].as_str().unwrap();
        trace["processes"][pid]["serviceName"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let spans = trace["spans"].as_array().unwrap();
    let by_name = |name: &str| spans.iter().find(|s| s["operationName"] == name).unwrap();
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
    };
    let root = by_name("get_user_profile");
    let client = by_name("GET");
    let server = by_name("GET /profiles/{id}");
    let db = by_name("db_query");
    assert_eq!(root["spanID"], call.root_span_id.as_str());
    assert_eq!(parent_of(root), None);
    assert_eq!(parent_of(client).as_deref(), root["spanID"].as_str());
    assert_eq!(parent_of(server).as_deref(), client["spanID"].as_str());
    assert_eq!(parent_of(db).as_deref(), server["spanID"].as_str());
    assert_eq!(service_of(root), front_name);
    assert_eq!(service_of(client), front_name);
    assert_eq!(service_of(server), back_name);
    assert_eq!(service_of(db), back_name);
    assert_eq!(tag(root, "user.id"), Some(Value::from("u1")));
    assert_eq!(
        tag(server, "http.route"),
        Some(Value::from("/profiles/{id}"))
    );
    assert_eq!(
        tag(server, "http.response.status_code"),
        Some(Value::from(200))
    );
    assert_eq!(tag(server, "span.kind"), Some(Value::from("server")));
    assert_eq!(tag(client, "span.kind"), Some(Value::from("client")));
    assert_eq!(tag(db, "db.table"), Some(Value::from("profiles")));
    assert_eq!(front.stats().dropped(), 0);
    assert_eq!(front.stats().exported(), 2);
    assert_eq!(back.stats().exported(), 2);
}
