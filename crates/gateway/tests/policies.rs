//! Gateway policies against real upstreams on 127.0.0.1: outlier ejection, retries,
//! circuit breakers, rate limits, JWT authentication and authorization.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::routing::any;
use serde_json::{Value, json};
use trellis_gateway::{ApiGateway, GatewayConfig, RateLimitConfig, RouteConfig, RunningGateway};
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

/// An upstream answering `status` and counting its calls; returns (port, calls, task).
async fn upstream(status: StatusCode) -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().fallback(any(move |request: Request| {
        counter.fetch_add(1, Ordering::SeqCst);
        let user = request
            .headers()
            .get("x-user-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        async move { (status, axum::Json(json!({"user": user}))) }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, calls, task)
}

struct Setup {
    gateway: RunningGateway,
    registry: ServiceRegistry,
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

fn routes(routes: Vec<RouteConfig>) -> GatewayConfig {
    GatewayConfig {
        routes,
        ..GatewayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_ejected_and_retries_hide_it() {
    let s = setup(routes(vec![
        RouteConfig::new("/plain/*", "svc"),
        RouteConfig::new("/retry/*", "svc").retries(2),
    ]))
    .await;
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (port, _, task) = upstream(StatusCode::OK).await;
        s.registry
            .register("svc", Instance::new(format!("i{i}"), "127.0.0.1", port))
            .await
            .unwrap();
        tasks.push(task);
    }
    // Kill one instance: its port now refuses connections.
    tasks[0].abort();
    let _ = (&mut tasks[0]).await;
    let mut failures = Vec::new();
    for n in 0..300 {
        let status = s
            .http
            .get(format!("{}/plain/x", s.base))
            .send()
            .await
            .unwrap()
            .status();
        if status != 200 {
            failures.push(n);
        }
    }
    // Outlier ejection trips after 5 consecutive failures of the dead instance; after that
    // no GET fails.
    assert!(
        failures.len() <= 5,
        "{} failed GETs: {failures:?}",
        failures.len()
    );
    assert!(
        failures.iter().all(|&n| n < 30),
        "failures after ejection: {failures:?}"
    );
    // A route with retries hides the dead instance from the first request on (a fresh
    // balancer per route, so the dead one is still picked now and then).
    for _ in 0..100 {
        let status = s
            .http
            .get(format!("{}/retry/x", s.base))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_or_marked_requests_are_retried() {
    let s = setup(routes(vec![
        RouteConfig::new("/api/*", "flaky").retries(3),
        RouteConfig::new("/ok/*", "fine").retries(3),
    ]))
    .await;
    let (port, calls, _task) = upstream(StatusCode::SERVICE_UNAVAILABLE).await;
    s.registry
        .register("flaky", Instance::new("f1", "127.0.0.1", port))
        .await
        .unwrap();
    let (fine, _, _fine_task) = upstream(StatusCode::OK).await;
    s.registry
        .register("fine", Instance::new("ok1", "127.0.0.1", fine))
        .await
        .unwrap();
    // Answered requests spend no retry budget: after many of them, retries are still there.
    for _ in 0..200 {
        let status = s
            .http
            .get(format!("{}/ok/x", s.base))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }

    let get = s
        .http
        .get(format!("{}/api/x", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 503);
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        4,
        "GET: 1 call + 3 retries"
    );

    let post = s
        .http
        .post(format!("{}/api/x", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 503);
    assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "POST is never retried");

    let marked = s
        .http
        .post(format!("{}/api/x", s.base))
        .header("x-trellis-retryable", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(marked.status(), 503);
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        4,
        "a POST marked retryable is"
    );
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_answers_503_at_once() {
    let s = setup(routes(vec![
        RouteConfig::new("/api/*", "broken").circuit_breaker(3, Duration::from_secs(60)),
    ]))
    .await;
    let (port, calls, _task) = upstream(StatusCode::INTERNAL_SERVER_ERROR).await;
    s.registry
        .register("broken", Instance::new("b1", "127.0.0.1", port))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            s.http
                .get(format!("{}/api/x", s.base))
                .send()
                .await
                .unwrap()
                .status(),
            500
        );
    }
    let started = Instant::now();
    let response = s
        .http
        .get(format!("{}/api/x", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "circuit_open");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the open breaker did not call the upstream"
    );
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_admit_the_configured_rate() {
    let mut config = routes(vec![RouteConfig::new("/api/*", "svc")]);
    config.rate_limiting = Some(RateLimitConfig {
        enabled: true,
        requests: 50,
        window: Duration::from_secs(1).into(),
    });
    let s = setup(config).await;
    let (port, _, _task) = upstream(StatusCode::OK).await;
    s.registry
        .register("svc", Instance::new("s1", "127.0.0.1", port))
        .await
        .unwrap();

    let first = s
        .http
        .get(format!("{}/api/x", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-limit"], "50");
    // Over 10 s, as fast as the client can go (bounded by count and time).
    let started = Instant::now();
    let (mut admitted, mut limited) = (1u64, 0u64);
    let mut saw_headers = false;
    while started.elapsed() < Duration::from_secs(10) && admitted + limited < 200_000 {
        let response = s
            .http
            .get(format!("{}/api/x", s.base))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                limited += 1;
                if !saw_headers {
                    saw_headers = true;
                    assert!(response.headers().contains_key("retry-after"));
                    assert_eq!(response.headers()["ratelimit-remaining"], "0");
                    assert_eq!(
                        response.json::<Value>().await.unwrap()["error"],
                        "rate_limited"
                    );
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // A burst of 50, then 50 a second.
    let expected = 50.0 + 50.0 * seconds;
    let ratio = admitted as f64 / expected;
    assert!(limited > 0, "never limited");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "admitted {admitted} in {seconds:.2}s, expected {expected:.0}"
    );
    s.gateway.shutdown().await;
}

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// `token`'s header and signature around another payload (the subject changed to `root`).
fn tampered(token_text: &str) -> String {
    let other = token(
        json!({"sub": "root", "iss": "trellis-test", "exp": now() + 600, "roles": ["admin"]}),
    );
    let parts: Vec<&str> = token_text.split('.').collect();
    let other_payload = other.split('.').nth(1).unwrap();
    format!("{}.{}.{}", parts[0], other_payload, parts[2])
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authentication_and_authorization() {
    let auth = trellis_auth::JwtConfig::from_toml(&format!(
        "secret = \"{SECRET}\"\nissuer = \"trellis-test\"\nforward_claims = {{ sub = \"x-user-id\" }}"
    ))
    .unwrap();
    let mut admin_only =
        RouteConfig::new("/admin/*", "svc").middleware(&["authentication", "authorization"]);
    admin_only.authorization = Some(trellis_auth::AuthzRule::any().roles(["admin"]));
    let mut config = routes(vec![
        RouteConfig::new("/api/*", "svc"),
        admin_only,
        RouteConfig::new("/public/*", "svc").middleware(&["rate_limiting"]),
    ]);
    config.authentication = Some(auth);
    let s = setup(config).await;
    let (port, calls, _task) = upstream(StatusCode::OK).await;
    s.registry
        .register("svc", Instance::new("s1", "127.0.0.1", port))
        .await
        .unwrap();

    let good =
        token(json!({"sub": "u-42", "iss": "trellis-test", "exp": now() + 600, "roles": ["user"]}));
    let response = s
        .http
        .get(format!("{}/api/me", s.base))
        .bearer_auth(&good)
        .header("x-user-id", "spoofed")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["user"],
        "u-42",
        "the claim, not the spoofed header, reaches upstream"
    );

    let cases = [
        (None, "missing_token"),
        (
            Some(token(
                json!({"sub": "u", "iss": "trellis-test", "exp": now() - 3600}),
            )),
            "expired",
        ),
        (
            Some(token(
                json!({"sub": "u", "iss": "someone-else", "exp": now() + 600}),
            )),
            "bad_issuer",
        ),
        (Some(tampered(&good)), "bad_signature"),
        (
            Some("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1In0.".to_owned()),
            "alg_not_allowed",
        ),
    ];
    let before = calls.load(Ordering::SeqCst);
    for (bearer, reason) in cases {
        let mut request = s.http.get(format!("{}/api/me", s.base));
        if let Some(t) = &bearer {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{reason}");
        assert!(response.headers().contains_key("www-authenticate"));
        assert_eq!(response.json::<Value>().await.unwrap()["error"], reason);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "rejected requests never reach upstream"
    );

    let forbidden = s
        .http
        .get(format!("{}/admin/x", s.base))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let admin = token(
        json!({"sub": "root", "iss": "trellis-test", "exp": now() + 600, "roles": ["admin"]}),
    );
    assert_eq!(
        s.http
            .get(format!("{}/admin/x", s.base))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.http
            .get(format!("{}/public/x", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "a route that does not list authentication"
    );
    s.gateway.shutdown().await;
}
