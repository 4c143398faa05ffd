//! The gateway against real HTTP servers on 127.0.0.1, registered in a real registry.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::Request;
use axum::routing::any;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_gateway::{ApiGateway, GatewayConfig, RouteConfig, RunningGateway};
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

/// An upstream that answers with what it received.
async fn echo(name: &'static str, delay: Duration) -> u16 {
    let app = axum::Router::new().fallback(any(move |request: Request| async move {
        tokio::time::sleep(delay).await;
        let headers: HashMap<String, String> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = axum::body::to_bytes(request.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        Json(json!({
            "server": name,
            "headers": headers,
            "body_len": body.len(),
        }))
    }));
    serve(app).await
}

/// An upstream that answers with the request's path and query, to check stripping.
async fn path_echo(name: &'static str) -> u16 {
    let app = axum::Router::new().fallback(any(move |request: Request| async move {
        let headers: HashMap<String, String> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        Json(json!({"server": name, "uri": request.uri().to_string(), "headers": headers}))
    }));
    serve(app).await
}

async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

struct Setup {
    gateway: RunningGateway,
    registry: ServiceRegistry,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn setup(routes: Vec<RouteConfig>) -> Setup {
    setup_with(GatewayConfig {
        routes,
        ..GatewayConfig::default()
    })
    .await
}

async fn setup_with(config: GatewayConfig) -> Setup {
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
    let gateway = ApiGateway::new(config, registry.clone())
        .unwrap()
        .start()
        .await
        .unwrap();
    let base = format!("http://{}", gateway.local_addr());
    Setup {
        gateway,
        registry,
        base,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_even_and_forwarding_headers_arrive() {
    let s = setup(vec![
        RouteConfig::new("/api/users/*", "users").strip_prefix("/api/users"),
    ])
    .await;
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let port = path_echo(name).await;
        s.registry
            .register("users", Instance::new(format!("u{i}"), "127.0.0.1", port))
            .await
            .unwrap();
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..300 {
        let response = s
            .http
            .get(format!("{}/api/users/{i}?x=1", s.base))
            .header("x-forwarded-for", "10.9.8.7")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = response.json().await.unwrap();
        *counts
            .entry(body["server"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert_eq!(
            body["uri"],
            format!("/{i}?x=1"),
            "prefix stripped, query kept"
        );
        let headers = &body["headers"];
        assert_eq!(
            headers["x-request-id"],
            request_id.as_str(),
            "request id reaches upstream and comes back"
        );
        assert_eq!(headers["x-forwarded-for"], "10.9.8.7, 127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(
            headers["x-forwarded-host"],
            s.base.trim_start_matches("http://")
        );
        assert_eq!(
            headers["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (server, n) in &counts {
        assert!(
            (99..=101).contains(n),
            "{server} got {n} of 300: {counts:?}"
        );
    }
    // A client-chosen request id is kept.
    let response = s
        .http
        .get(format!("{}/api/users/1", s.base))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_status() {
    let slow = echo("slow", Duration::from_secs(5)).await;
    let mut config = GatewayConfig {
        routes: vec![
            RouteConfig::new("/slow/*", "slow").timeout(Duration::from_millis(300)),
            RouteConfig::new("/nobody/*", "nobody"),
            RouteConfig::new("/dead/*", "dead"),
        ],
        ..GatewayConfig::default()
    };
    config.limits.max_body_bytes = 1024;
    let s = setup_with(config).await;
    s.registry
        .register("slow", Instance::new("s1", "127.0.0.1", slow))
        .await
        .unwrap();
    // A port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    s.registry
        .register("dead", Instance::new("d1", "127.0.0.1", closed))
        .await
        .unwrap();

    let cases = [
        ("/slow/x", 504, "upstream_timeout"),
        ("/nobody/x", 503, "no_healthy_instance"),
        ("/dead/x", 502, "upstream_unreachable"),
        ("/elsewhere", 404, "no_route"),
        ("/slow/..%2Fadmin", 400, "bad_request"),
    ];
    for (path, status, kind) in cases {
        let started = std::time::Instant::now();
        let response = s
            .http
            .get(format!("{}{path}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], kind, "{path}: {body}");
        if status == 504 {
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_secs(3),
                "{took:?}"
            );
        }
    }
    let big = vec![b'x'; 2048];
    let response = s
        .http
        .post(format!("{}/slow/upload", s.base))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    s.gateway.shutdown().await;
}

/// Sends raw bytes, returns the status line of the answer.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_is_refused_and_others_keep_being_served() {
    let port = echo("ok", Duration::ZERO).await;
    let s = setup(vec![RouteConfig::new("/api/*", "api").strip_prefix("/api")]).await;
    s.registry
        .register("api", Instance::new("a1", "127.0.0.1", port))
        .await
        .unwrap();
    let addr = s.gateway.local_addr();
    // Meanwhile, a well-behaved client keeps getting answers.
    let (http, base) = (s.http.clone(), s.base.clone());
    let steady = tokio::spawn(async move {
        let mut ok = 0;
        for _ in 0..200 {
            if http
                .get(format!("{base}/api/ping"))
                .send()
                .await
                .unwrap()
                .status()
                == 200
            {
                ok += 1;
            }
        }
        ok
    });
    let huge_header = format!(
        "GET /api/x HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), "400"),
        (b"GET /api/x HTTP/9.9\r\nhost: a\r\n\r\n".to_vec(), "HTTP/1.1 "),
        (huge_header.into_bytes(), "431"),
        (b"POST /api/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(), "400"),
        (b"GET /api/../admin HTTP/1.1\r\nhost: a\r\n\r\n".to_vec(), "400"),
        (b"GET /api/%2E%2E/admin HTTP/1.1\r\nhost: a\r\n\r\n".to_vec(), "400"),
    ];
    for (bytes, expected) in cases {
        let status = raw(addr, &bytes).await;
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned();
        assert!(status.contains(expected), "{shown:?} → {status:?}");
        assert!(
            !status.contains(" 200 "),
            "{shown:?} was forwarded: {status}"
        );
    }
    assert_eq!(
        steady.await.unwrap(),
        200,
        "well-behaved requests kept succeeding"
    );
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reload_without_dropping_requests() {
    let one = echo("one", Duration::from_millis(300)).await;
    let two = path_echo("two").await;
    let s = setup(vec![RouteConfig::new("/svc/*", "one")]).await;
    s.registry
        .register("one", Instance::new("o1", "127.0.0.1", one))
        .await
        .unwrap();
    s.registry
        .register("two", Instance::new("t1", "127.0.0.1", two))
        .await
        .unwrap();
    let (http, base) = (s.http.clone(), s.base.clone());
    let in_flight =
        tokio::spawn(async move { http.get(format!("{base}/svc/a")).send().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        ..GatewayConfig::default()
    };
    config.routes.push(RouteConfig::new("/svc/*", "two"));
    s.gateway.reload(config).unwrap();
    let response = in_flight.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["server"],
        "one",
        "the in-flight request finished"
    );
    let after: Value = s
        .http
        .get(format!("{}/svc/a", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after["server"], "two", "new requests use the new routes");
    let bad = GatewayConfig {
        routes: vec![RouteConfig::new("nope", "x")],
        ..GatewayConfig::default()
    };
    assert!(
        s.gateway
            .reload(bad)
            .unwrap_err()
            .to_string()
            .contains("routes[0].path")
    );
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused() {
    // hyper alone would frame such a request by Transfer-Encoding and drop Content-Length
    // (RFC 9112 §6.3); the gateway refuses it outright with 400 and forwards nothing.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let port = serve(axum::Router::new().fallback(any(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "ok" }
    })))
    .await;
    let s = setup(vec![RouteConfig::new("/api/*", "api")]).await;
    s.registry
        .register("api", Instance::new("a1", "127.0.0.1", port))
        .await
        .unwrap();
    let addr = s.gateway.local_addr();
    let exchange = |bytes: Vec<u8>| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        // The gateway closes the connection after the answer.
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    // Content-Length says 4 ("5\r\nh"); chunked framing says "hello"; a smuggled
    // "GET /api/admin" follows only if someone trusted Content-Length.
    let smuggle: &[u8] = b"POST /api/x HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let clean: &[u8] = b"POST /api/x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello";
    let chunked: &[u8] =
        b"POST /api/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let te_first: &[u8] = b"POST /api/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nContent-Length: 4\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

    // Alone, and as the third request on a kept-alive connection after well-framed ones
    // (whose bodies the gateway must follow to find the third head).
    for (name, bytes, answered) in [
        ("alone", smuggle.to_vec(), 0),
        ("te first", te_first.to_vec(), 0),
        ("third", [clean, chunked, smuggle].concat(), 2),
    ] {
        let before = calls.load(Ordering::SeqCst);
        let answer = exchange(bytes).await;
        let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
        let mut expected = vec!["200"; answered];
        expected.push("400");
        assert_eq!(statuses, expected, "{name}: {answer}");
        assert!(
            answer.contains("Content-Length and Transfer-Encoding"),
            "{name}: {answer}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst) - before,
            answered,
            "{name}: only the well-framed requests were forwarded"
        );
    }
    s.gateway.shutdown().await;
}

/// An upstream that answers with the port its caller connected from: one port per
/// upstream connection the gateway opened.
async fn port_echo() -> u16 {
    let app = axum::Router::new().fallback(any(
        |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>| async move {
            peer.port().to_string()
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_share_the_port_and_keep_their_own_upstream_connections() {
    let upstream = port_echo().await;
    let s = setup_with(GatewayConfig {
        workers: trellis_gateway::Workers::Threads(3),
        routes: vec![RouteConfig::new("/*", "svc")],
        ..GatewayConfig::default()
    })
    .await;
    s.registry
        .register("svc", Instance::new("i1", "127.0.0.1", upstream))
        .await
        .unwrap();
    // Every request on a connection of its own: the kernel spreads them over the three
    // workers' sockets, and a socket no worker served would leave its requests unanswered.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut upstream_ports = std::collections::HashSet::new();
    for i in 0..30 {
        let response = fresh.get(format!("{}/n/{i}", s.base)).send().await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        upstream_ports.insert(response.text().await.unwrap());
    }
    // One at a time, so each worker needed one upstream connection and reused it: more
    // than one in all shows several workers served (and did not share a connection
    // registered with another's reactor), at most three that each kept its own.
    assert!(
        (2..=3).contains(&upstream_ports.len()),
        "upstream connections: {upstream_ports:?}"
    );
    // Sharing the port between the workers does not share it with anyone else: a second
    // gateway on the same address is refused, with one worker or several.
    for workers in [1, 2] {
        let second = ApiGateway::new(
            GatewayConfig {
                listen: s.gateway.local_addr().to_string(),
                workers: trellis_gateway::Workers::Threads(workers),
                ..GatewayConfig::default()
            },
            s.registry.clone(),
        )
        .unwrap()
        .start()
        .await
        .map(|g| g.local_addr());
        let err = second.unwrap_err().to_string();
        assert!(err.contains("cannot listen on"), "{workers} workers: {err}");
    }
    // Shutdown lets a request in flight finish, then nothing listens.
    let slow = echo("slow", Duration::from_millis(300)).await;
    s.registry
        .register("svc", Instance::new("i1", "127.0.0.1", slow))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let body = fresh
            .get(format!("{}/x", s.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.contains("slow") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new instance was never used"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (http, base) = (fresh.clone(), s.base.clone());
    let in_flight = tokio::spawn(async move { http.get(format!("{base}/x")).send().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.gateway.shutdown().await;
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert!(fresh.get(format!("{}/x", s.base)).send().await.is_err());
}

/// A consistent hash on X-Forwarded-For hashes the list as it goes upstream, with the
/// caller's address added: callers that send none still stick to one instance each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_a_forwarding_header_hashes_what_goes_upstream() {
    let s = setup(vec![RouteConfig {
        load_balancer: Some(trellis_gateway::LoadBalancer::ConsistentHash),
        hash_header: Some("x-forwarded-for".into()),
        ..RouteConfig::new("/h/*", "sticky")
    }])
    .await;
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let port = path_echo(name).await;
        s.registry
            .register("sticky", Instance::new(format!("s{i}"), "127.0.0.1", port))
            .await
            .unwrap();
    }
    let server = |forwarded_for: Option<String>| {
        let mut request = s.http.get(format!("{}/h/x", s.base));
        if let Some(list) = forwarded_for {
            request = request.header("x-forwarded-for", list);
        }
        async move {
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            body["server"].as_str().unwrap().to_owned()
        }
    };
    let mut without = std::collections::HashSet::new();
    for _ in 0..30 {
        without.insert(server(None).await);
    }
    assert_eq!(without.len(), 1, "one caller, one instance: {without:?}");
    let mut with = std::collections::HashSet::new();
    for n in 0..30 {
        with.insert(server(Some(format!("10.0.0.{n}"))).await);
    }
    assert!(with.len() > 1, "30 lists on one instance: {with:?}");
    s.gateway.shutdown().await;
}
