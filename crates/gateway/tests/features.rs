//! Blue-green weights, per-version upstream metrics, CORS, retried bodies, WebSocket
//! upgrades and h2c upstreams, against real servers on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::routing::any;
use futures_util::{SinkExt, StreamExt};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use trellis_gateway::{
    ApiGateway, CorsConfig, GatewayConfig, GatewayMetrics, LoadBalancer, RouteConfig,
    RunningGateway, UpstreamProtocol,
};
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

struct Setup {
    gateway: RunningGateway,
    registry: ServiceRegistry,
    metrics: Registry,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn setup(config: GatewayConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/gw.db", dir.path().display()))
        .await
        .unwrap();
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    let config = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        ..config
    };
    let mut metrics = Registry::default();
    let gateway = ApiGateway::new(config, registry.clone())
        .unwrap()
        .with_metrics(GatewayMetrics::new(&mut metrics))
        .start()
        .await
        .unwrap();
    let base = format!("http://{}", gateway.local_addr());
    Setup {
        gateway,
        registry,
        metrics,
        base,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

fn routes(routes: Vec<RouteConfig>) -> GatewayConfig {
    GatewayConfig {
        routes,
        ..GatewayConfig::default()
    }
}

impl Setup {
    /// The value of one sample of the Prometheus exposition, 0 when absent.
    fn metric(&self, sample: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// An upstream answering `{"server": name}` and counting its calls.
async fn named(name: &'static str) -> (u16, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().fallback(any(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            (
                // An upstream's own CORS header must never decide for the gateway.
                [("access-control-allow-origin", "*")],
                axum::Json(json!({"server": name})),
            )
        }
    }));
    (serve(app).await, calls)
}

/// A port with nothing listening: connections are refused.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_gets_no_traffic_and_metrics_split_by_version() {
    let mut slow_route = RouteConfig::new("/slow/*", "slow").timeout(Duration::from_millis(200));
    slow_route.load_balancer = Some(LoadBalancer::RoundRobin);
    let mut weighted = RouteConfig::new("/w/*", "shop");
    weighted.load_balancer = Some(LoadBalancer::Weighted);
    let s = setup(routes(vec![
        RouteConfig::new("/shop/*", "shop"),
        weighted,
        RouteConfig::new("/dead/*", "dead"),
        slow_route,
    ]))
    .await;
    let (blue, blue_calls) = named("blue").await;
    let (green, green_calls) = named("green").await;
    let register = |id: &'static str, port: u16, version: &'static str, weight: &'static str| {
        let registry = s.registry.clone();
        async move {
            registry
                .register(
                    "shop",
                    Instance::new(id, "127.0.0.1", port)
                        .version(version)
                        .metadata("weight", weight),
                )
                .await
                .unwrap();
        }
    };
    // Blue-green: blue (1.0.0) drained with weight 0, green (2.0.0) takes everything —
    // under round robin and under the weighted balancer alike.
    register("blue", blue, "1.0.0", "0").await;
    register("green", green, "2.0.0", "1").await;
    for path in ["/shop/x", "/w/x"] {
        for _ in 0..25 {
            let body: Value = s
                .http
                .get(format!("{}{path}", s.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(body["server"], "green", "{path}");
        }
    }
    assert_eq!(blue_calls.load(Ordering::SeqCst), 0);
    assert_eq!(green_calls.load(Ordering::SeqCst), 50);
    assert_eq!(
        s.metric(r#"trellis_gateway_upstream_requests_total{service="shop",version="2.0.0",status="2xx"}"#),
        50.0
    );
    assert_eq!(
        s.metric(r#"trellis_gateway_upstream_requests_total{service="shop",version="1.0.0",status="2xx"}"#),
        0.0
    );
    assert_eq!(
        s.metric(r#"trellis_gateway_upstream_request_duration_seconds_count{service="shop",version="2.0.0"}"#),
        50.0
    );

    // Every instance at 0: none is preferred, so all take traffic.
    register("green", green, "2.0.0", "0").await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..20 {
        let body: Value = s
            .http
            .get(format!("{}/shop/x", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        *seen
            .entry(body["server"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.get("blue"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("green"), Some(&10), "{seen:?}");
    assert_eq!(
        s.metric(r#"trellis_gateway_upstream_requests_total{service="shop",version="1.0.0",status="2xx"}"#),
        10.0
    );

    // No answer: a refused connection counts as "error", a slow upstream as "timeout".
    s.registry
        .register(
            "dead",
            Instance::new("d1", "127.0.0.1", closed_port()).version("9.9.9"),
        )
        .await
        .unwrap();
    let slow = serve(axum::Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        "late"
    })))
    .await;
    s.registry
        .register("slow", Instance::new("s1", "127.0.0.1", slow))
        .await
        .unwrap();
    let dead = s
        .http
        .get(format!("{}/dead/x", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(dead.status(), 502);
    let late = s
        .http
        .get(format!("{}/slow/x", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 504);
    assert_eq!(
        s.metric(r#"trellis_gateway_upstream_requests_total{service="dead",version="9.9.9",status="error"}"#),
        1.0
    );
    assert_eq!(
        s.metric(r#"trellis_gateway_upstream_requests_total{service="slow",version="unknown",status="timeout"}"#),
        1.0
    );
    s.gateway.shutdown().await;
}

fn cors_header_names(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_and_origins() {
    let app = CorsConfig::new(&["https://app.example.com"])
        .allowed_methods(&["GET", "PUT"])
        .allowed_headers(&["content-type", "x-token"])
        .expose_headers(&["x-request-id"])
        .allow_credentials(true)
        .max_age(Duration::from_secs(600));
    let config = GatewayConfig {
        cors: Some(CorsConfig::new(&["*"])),
        ..routes(vec![
            RouteConfig::new("/api/*", "api")
                .methods(&["GET", "PUT", "DELETE"])
                .cors(app),
            RouteConfig::new("/open/*", "api"),
        ])
    };
    let s = setup(config).await;
    let (port, calls) = named("api").await;
    s.registry
        .register("api", Instance::new("a1", "127.0.0.1", port))
        .await
        .unwrap();
    let preflight = |origin: &'static str, method: &'static str, headers: &'static str| {
        s.http
            .request(reqwest::Method::OPTIONS, format!("{}/api/items/1", s.base))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
    };

    let ok = preflight("https://app.example.com", "PUT", "Content-Type, X-Token")
        .await
        .unwrap();
    assert_eq!(ok.status(), 204);
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, PUT");
    assert_eq!(h["access-control-allow-headers"], "content-type, x-token");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the gateway answered itself"
    );

    for (origin, method, headers, why) in [
        ("https://evil.example.com", "PUT", "content-type", "origin"),
        (
            "https://app.example.com",
            "DELETE",
            "content-type",
            "method",
        ),
        ("https://app.example.com", "PUT", "x-other", "header"),
    ] {
        let refused = preflight(origin, method, headers).await.unwrap();
        assert_eq!(refused.status(), 403, "{why}");
        assert!(cors_header_names(refused.headers()).is_empty(), "{why}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "cors_forbidden", "{why}");
    }
    // A preflight for a method no route serves finds no route.
    let unrouted = preflight("https://app.example.com", "PATCH", "")
        .await
        .unwrap();
    assert_eq!(unrouted.status(), 404);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let allowed = s
        .http
        .get(format!("{}/api/items/1", s.base))
        .header("origin", "https://APP.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    let h = allowed.headers();
    assert_eq!(h["access-control-allow-origin"], "https://APP.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-expose-headers"], "x-request-id");
    assert!(h.get_all("vary").iter().any(|v| v == "origin"));

    // Another origin gets no CORS header at all, not even the upstream's own `*`.
    let other = s
        .http
        .get(format!("{}/api/items/1", s.base))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(cors_header_names(other.headers()).is_empty());

    // The gateway-wide policy applies to routes without their own.
    let open = s
        .http
        .get(format!("{}/open/x", s.base))
        .header("origin", "https://anyone.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(open.headers()["access-control-allow-origin"], "*");
    assert!(
        open.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    s.gateway.shutdown().await;
}

/// An upstream answering with the body it received.
async fn body_echo() -> u16 {
    serve(
        axum::Router::new().fallback(any(|request: Request| async move {
            axum::body::to_bytes(request.into_body(), 1 << 22)
                .await
                .unwrap()
        })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_replayed_on_retry_up_to_the_buffer_limit() {
    let config = GatewayConfig {
        retry_buffer_bytes: 16 * 1024,
        ..routes(vec![
            RouteConfig::new("/put/*", "files").retries(2),
            RouteConfig::new("/post/*", "files").retries(2),
            RouteConfig::new("/marked/*", "files").retries(2),
            RouteConfig::new("/any/*", "files")
                .retries(2)
                .retry_non_idempotent(true),
            RouteConfig::new("/large/*", "files").retries(2),
        ])
    };
    let s = setup(config).await;
    s.registry
        .register("files", Instance::new("dead", "127.0.0.1", closed_port()))
        .await
        .unwrap();
    s.registry
        .register(
            "files",
            Instance::new("live", "127.0.0.1", body_echo().await),
        )
        .await
        .unwrap();
    let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let send = |method: reqwest::Method, path: &str, body: Vec<u8>, marked: bool| {
        let mut request = s
            .http
            .request(method, format!("{}{path}", s.base))
            .body(body);
        if marked {
            request = request.header("x-trellis-retryable", "true");
        }
        request.send()
    };
    let dead_failures = |route: &str| {
        let upstreams = s.gateway.inspector().upstreams();
        let route = upstreams
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == route)
            .unwrap()
            .clone();
        route["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "dead")
            .unwrap()["failures"]
            .as_u64()
            .unwrap()
    };

    // Idempotent PUT, retryable POSTs: every one arrives intact although round robin sends
    // every other attempt to the refusing instance.
    for (method, path, marked) in [
        (reqwest::Method::PUT, "/put/f", false),
        (reqwest::Method::POST, "/marked/f", true),
        (reqwest::Method::POST, "/any/f", false),
    ] {
        for _ in 0..4 {
            let response = send(method.clone(), path, body.clone(), marked)
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{method} {path}");
            assert_eq!(response.bytes().await.unwrap(), body, "{method} {path}");
        }
        let route = format!("/{}/*", path.split('/').nth(1).unwrap());
        assert!(
            dead_failures(&route) >= 1,
            "{route} never met the dead instance"
        );
    }

    // A POST nobody marked is sent once: the attempt on the dead instance is a 502.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(
            send(reqwest::Method::POST, "/post/f", body.clone(), false)
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 502]);

    // A body over retry_buffer_bytes streams and is not retried.
    let large: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let response = send(reqwest::Method::PUT, "/large/f", large.clone(), false)
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status == 200 {
            assert_eq!(response.bytes().await.unwrap(), large);
        }
        statuses.push(status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 502]);
    s.gateway.shutdown().await;
}

/// A WebSocket echo server.
async fn websocket_echo() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() {
                        break;
                    }
                    if ws.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through() {
    use tokio_tungstenite::tungstenite::Message;
    let s = setup(routes(vec![
        RouteConfig::new("/ws/*", "chat")
            .strip_prefix("/ws")
            .timeout(Duration::from_millis(300)),
    ]))
    .await;
    s.registry
        .register(
            "chat",
            Instance::new("c1", "127.0.0.1", websocket_echo().await),
        )
        .await
        .unwrap();
    let url = format!("ws://{}/ws/room", s.gateway.local_addr());
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-request-id"));
    for i in 0..3 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
        if i == 1 {
            // Idle for longer than the route's timeout: it bounds the handshake only.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    let binary = Message::binary(vec![0u8, 1, 2, 255]);
    ws.send(binary.clone()).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, binary);
    ws.close(None).await.unwrap();
    s.gateway.shutdown().await;
}

/// An upstream speaking only HTTP/2 (prior knowledge), answering with the version.
async fn h2c_only() -> u16 {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let text = format!("{:?} {}", request.version(), request.uri().path());
                        Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(text),
                        )))
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstreams() {
    let s = setup(routes(vec![
        RouteConfig::new("/h2/*", "grpc")
            .strip_prefix("/h2")
            .upstream_protocol(UpstreamProtocol::H2c),
        RouteConfig::new("/h1/*", "grpc").strip_prefix("/h1"),
    ]))
    .await;
    s.registry
        .register("grpc", Instance::new("g1", "127.0.0.1", h2c_only().await))
        .await
        .unwrap();
    for i in 0..5 {
        let response = s
            .http
            .get(format!("{}/h2/call/{i}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.text().await.unwrap(),
            format!("HTTP/2.0 /call/{i}")
        );
    }
    // The same h2-only server over HTTP/1.1 fails: the option is what makes it work.
    let response = s
        .http
        .get(format!("{}/h1/call", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    s.gateway.shutdown().await;
}

/// An upstream counting the connections it accepted; `close_after_answer` makes it close
/// each connection right after its first answer without saying so (no
/// `Connection: close`), as an upstream's idle timeout would.
async fn counting_upstream(close_after_answer: bool) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (a, c) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                if close_after_answer {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    drop(stream);
                } else {
                    // The body is read to its end before the answer: hyper closes a
                    // connection whose request body was left unread when it answered, and
                    // the gateway may send a body after its head.
                    let service = hyper::service::service_fn(
                        |request: hyper::Request<hyper::body::Incoming>| async {
                            use http_body_util::BodyExt;
                            let _ = request.into_body().collect().await;
                            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (port, accepted, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_closed_ones_replaced() {
    // One worker: idle connections are pooled per worker, and the client may open a second
    // connection to the gateway (it returns its first one to its pool in the background),
    // which another worker could accept.
    let s = setup(GatewayConfig {
        workers: trellis_gateway::Workers::Threads(1),
        ..routes(vec![
            RouteConfig::new("/keep/*", "keep"),
            RouteConfig::new("/close/*", "close"),
        ])
    })
    .await;
    let (keep, keep_accepted, _) = counting_upstream(false).await;
    let (close, close_accepted, close_closed) = counting_upstream(true).await;
    s.registry
        .register("keep", Instance::new("k1", "127.0.0.1", keep))
        .await
        .unwrap();
    s.registry
        .register("close", Instance::new("c1", "127.0.0.1", close))
        .await
        .unwrap();
    for i in 0..30 {
        let response = s
            .http
            .post(format!("{}/keep/{i}", s.base))
            .body(vec![b'x'; i * 100])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(
        keep_accepted.load(Ordering::SeqCst),
        1,
        "sequential requests share one kept-alive upstream connection"
    );

    // The upstream closes each connection after answering; the next request (a POST, never
    // retried) must not be sent on the dead pooled connection.
    for i in 1..=5 {
        let response = s
            .http
            .post(format!("{}/close/{i}", s.base))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(response.text().await.unwrap(), "ok");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while close_closed.load(Ordering::SeqCst) < i {
            assert!(
                std::time::Instant::now() < deadline,
                "upstream never closed"
            );
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(close_accepted.load(Ordering::SeqCst), 5);
    s.gateway.shutdown().await;
}

/// An HTTP/1.1 upstream answering every request on a kept-alive connection with the
/// same head (names in their own case, repeated and hop-by-hop headers) and body "ok".
async fn fixed_head_upstream() -> u16 {
    fixed_answer_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Mixed-Case: Value\r\n\
        X-Request-Id: upstream-id\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\
        Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nConnection: keep-alive, X-Hop\r\n\
        X-Hop: secret\r\nKeep-Alive: timeout=5\r\n\r\nok",
    )
    .await
}

/// An HTTP/1.1 upstream answering every request on a kept-alive connection with
/// `answer` (whose body must be "ok").
async fn fixed_answer_upstream(answer: &'static str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // Requests without bodies: one answer per head.
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Writes `request` on `stream` and reads the answer, whose body is "ok", as text.
async fn exchange_ok(stream: &mut tokio::net::TcpStream, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(answer).unwrap()
}

/// A GET of `url` over HTTP/2 with prior knowledge (hyper serves such connections).
async fn h2_get(addr: &str, url: &str) -> hyper::Response<hyper::body::Incoming> {
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(url)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    sender.send_request(request).await.unwrap()
}

/// A rate-limited route's `RateLimit-*` headers are the gateway's, once each, in place of
/// the upstream's own (sent in other cases): over HTTP/1.1 (the gateway's own writer, with
/// the inline upstream pool and with hyper's client) and over HTTP/2 (hyper's writer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_replace_the_upstreams() {
    let port = fixed_answer_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nRateLimit-Limit: 7\r\n\
        RATELIMIT-REMAINING: 99\r\nratelimit-reset: 1234\r\nX-Other: kept\r\n\r\nok",
    )
    .await;
    for inline in [true, false] {
        let mut config = routes(vec![RouteConfig::new("/rl/*", "rl")]);
        config.rate_limiting = Some(trellis_gateway::RateLimitConfig {
            enabled: true,
            requests: 50,
            // One request back every 72 s: none comes back during the test.
            window: Duration::from_secs(3600).into(),
        });
        config.inline_upstream_connections = inline;
        let s = setup(config).await;
        s.registry
            .register("rl", Instance::new("r1", "127.0.0.1", port))
            .await
            .unwrap();
        let addr = s.base.trim_start_matches("http://").to_owned();
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        for remaining in ["49", "48"] {
            let text = exchange_ok(&mut stream, b"GET /rl/x HTTP/1.1\r\nhost: t\r\n\r\n").await;
            let lines: Vec<String> = text.split("\r\n").map(str::to_ascii_lowercase).collect();
            assert_eq!(lines[0], "http/1.1 200 ok", "{text}");
            let values = |name: &str| -> Vec<String> {
                let prefix = format!("{name}: ");
                lines
                    .iter()
                    .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
                    .collect()
            };
            assert_eq!(values("ratelimit-limit"), ["50"], "inline {inline}: {text}");
            assert_eq!(
                values("ratelimit-remaining"),
                [remaining],
                "inline {inline}: {text}"
            );
            // The full quota is back within the hour.
            let reset = values("ratelimit-reset");
            assert_eq!(reset.len(), 1, "inline {inline}: {text}");
            let reset: u64 = reset[0].parse().unwrap();
            assert!((1..=3600).contains(&reset), "inline {inline}: {text}");
            assert_eq!(values("x-other"), ["kept"], "inline {inline}: {text}");
        }

        let response = h2_get(&addr, &format!("{}/rl/y", s.base)).await;
        assert_eq!(response.status(), 200);
        let h = response.headers();
        let all = |name: &str| -> Vec<&str> {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("ratelimit-limit"), ["50"], "inline {inline}");
        assert_eq!(all("ratelimit-remaining"), ["47"], "inline {inline}");
        assert_eq!(all("ratelimit-reset").len(), 1, "inline {inline}");
        assert_eq!(all("x-other"), ["kept"], "inline {inline}");
        s.gateway.shutdown().await;
    }
}

/// An upstream's headers reach the client as they came — case, order and repeats kept,
/// its Date used — without its hop-by-hop headers, and with the gateway's request id in
/// place of the upstream's; over HTTP/1.1 (written by the gateway's own server) and over
/// HTTP/2 (written by hyper) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_headers_pass_through_as_received() {
    let s = setup(routes(vec![RouteConfig::new("/raw/*", "raw")])).await;
    s.registry
        .register(
            "raw",
            Instance::new("r1", "127.0.0.1", fixed_head_upstream().await),
        )
        .await
        .unwrap();
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for _ in 0..2 {
        let text = exchange_ok(
            &mut stream,
            b"GET /raw/x HTTP/1.1\r\nhost: t\r\nx-request-id: client-id\r\n\r\n",
        )
        .await;
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], "HTTP/1.1 200 OK", "{text}");
        let count = |prefix: &str| {
            lines
                .iter()
                .filter(|l| l.to_ascii_lowercase().starts_with(prefix))
                .count()
        };
        assert!(lines.contains(&"X-Mixed-Case: Value"), "{text}");
        let cookies: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("Set-Cookie"))
            .collect();
        assert_eq!(cookies, [&"Set-Cookie: a=1", &"Set-Cookie: b=2"], "{text}");
        assert!(
            lines.contains(&"Date: Thu, 01 Jan 2026 00:00:00 GMT"),
            "{text}"
        );
        assert_eq!(count("date:"), 1, "{text}");
        assert_eq!(count("content-length:"), 1, "{text}");
        assert_eq!(count("x-request-id:"), 1, "{text}");
        assert!(lines.contains(&"x-request-id: client-id"), "{text}");
        for gone in ["x-hop:", "keep-alive:", "connection:"] {
            assert_eq!(count(gone), 0, "{gone} {text}");
        }
    }

    // HTTP/2 with prior knowledge: hyper serves the connection and writes the map.
    let response = h2_get(&addr, &format!("{}/raw/y", s.base)).await;
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["x-mixed-case"], "Value");
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(h.get_all("date").iter().count(), 1);
    assert_ne!(h["x-request-id"], "upstream-id");
    assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none());
    s.gateway.shutdown().await;
}
