//! ServiceClient against real axum servers on 127.0.0.1, registered in a real registry on
//! a temporary SQLite file.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use http::HeaderValue;
use serde_json::{Value, json};
use support::{Hits, Server, env, env_with, eventually, serve};
use trellis_client::{CallContext, ClientError, MAX_ERROR_BODY, ServiceClient};
use trellis_registry::{Instance, InstanceStatus, RegistryOptions};
use trellis_resilience::balance::{OutlierDetection, Strategy};
use trellis_resilience::breaker::{BreakerConfig, BreakerState};
use trellis_resilience::retry::Backoff;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn quick_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(1), Duration::from_millis(20)).unwrap()
}

/// A server answering `GET /who` with its name, counting requests.
async fn named(name: &'static str) -> (Server, Hits) {
    let hits = Hits::default();
    let counter = hits.clone();
    let app = Router::new().route(
        "/who",
        get(move || {
            counter.hit();
            async move { axum::Json(name) }
        }),
    );
    (serve(app).await, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_even_and_follows_the_registry() {
    let env = env().await;
    let mut servers = Vec::new();
    for name in ["order-1", "order-2", "order-3"] {
        let (server, hits) = named(name).await;
        env.register("order-service", name, &server).await;
        servers.push((name, server, hits));
    }
    let client = ServiceClient::new("order-service", &env.registry).unwrap();
    for _ in 0..300 {
        let response = client.get("/who").await.unwrap();
        let instance = response.instance().to_owned();
        let name: String = response.json().await.unwrap();
        assert_eq!(name, instance, "the response says which instance answered");
    }
    for (name, _, hits) in &servers {
        assert!((99..=101).contains(&hits.get()), "{name}: {}", hits.get());
    }

    // A fourth instance joins: it gets its share on the next calls, without a restart.
    let (fourth, fourth_hits) = named("order-4").await;
    env.register("order-service", "order-4", &fourth).await;
    let before: Vec<usize> = servers.iter().map(|(_, _, h)| h.get()).collect();
    for _ in 0..400 {
        let _: String = client.get_json("/who").await.unwrap();
    }
    assert!(
        (99..=101).contains(&fourth_hits.get()),
        "{}",
        fourth_hits.get()
    );
    for ((name, _, hits), before) in servers.iter().zip(before) {
        let delta = hits.get() - before;
        assert!((99..=101).contains(&delta), "{name}: {delta}");
    }

    // One leaves: no call goes to it any more.
    env.registry
        .deregister("order-service", "order-4")
        .await
        .unwrap();
    let gone = fourth_hits.get();
    for _ in 0..30 {
        let _: String = client.get_json("/who").await.unwrap();
    }
    assert_eq!(fourth_hits.get(), gone);
    assert_eq!(client.endpoints().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_instance_metadata() {
    let env = env().await;
    let (blue, blue_hits) = named("blue").await;
    let (green, green_hits) = named("green").await;
    env.register_instance(
        "order-service",
        Instance::new("blue", "127.0.0.1", blue.addr.port()).metadata("weight", "3"),
    )
    .await;
    env.register_instance(
        "order-service",
        Instance::new("green", "127.0.0.1", green.addr.port()).metadata("weight", "1"),
    )
    .await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .load_balancer(Strategy::Weighted)
        .build()
        .unwrap();
    for _ in 0..400 {
        let _: String = client.get_json("/who").await.unwrap();
    }
    assert_eq!((blue_hits.get(), green_hits.get()), (300, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_instance() {
    let env = env().await;
    let mut servers = Vec::new();
    for name in ["cart-1", "cart-2", "cart-3"] {
        let (server, _) = named(name).await;
        env.register("cart-service", name, &server).await;
        servers.push(server);
    }
    let client = ServiceClient::builder("cart-service", &env.registry)
        .load_balancer(Strategy::ConsistentHash)
        .build()
        .unwrap();
    let mut owners = HashMap::new();
    for user in 0..30 {
        let key = format!("user-{user}");
        let first = client.get("/who").hash_key(key.clone()).await.unwrap();
        let owner = first.instance().to_owned();
        for _ in 0..3 {
            let again = client.get("/who").hash_key(key.clone()).await.unwrap();
            assert_eq!(again.instance(), owner, "{key}");
        }
        *owners.entry(owner).or_insert(0) += 1;
    }
    assert_eq!(
        owners.len(),
        3,
        "30 keys spread over the 3 instances: {owners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_stops_failing_calls_once_ejected() {
    let env = env().await;
    let (a, a_hits) = named("order-a").await;
    let (b, b_hits) = named("order-b").await;
    let (c, c_hits) = named("order-c").await;
    for (id, server) in [("order-a", &a), ("order-b", &b), ("order-c", &c)] {
        env.register("order-service", id, server).await;
    }
    let client = ServiceClient::builder("order-service", &env.registry)
        .backoff(quick_backoff())
        .build()
        .unwrap();
    let b_ejected = || {
        let b_status = client
            .endpoints()
            .into_iter()
            .find(|e| e.id == "order-b")
            .unwrap();
        let b_breaker = client
            .breakers()
            .into_iter()
            .find(|(k, _)| k == "order-service/order-b")
            .unwrap()
            .1;
        !b_status.eligible || b_breaker.state == BreakerState::Open
    };

    // Phase 1: four workers keep calling; instance b is killed after 150 calls.
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let b = Arc::new(b);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, done, failed, killed, b) = (
            client.clone(),
            done.clone(),
            failed.clone(),
            killed.clone(),
            b.clone(),
        );
        workers.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < 600 && started.elapsed() < Duration::from_secs(20) {
                if client.get_json::<String>("/who").await.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                if done.fetch_add(1, Ordering::SeqCst) == 150 {
                    b.kill();
                    killed.store(true, Ordering::SeqCst);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert!(killed.load(Ordering::SeqCst));
    assert!(
        eventually(Duration::from_secs(5), b_ejected).await,
        "b is ejected or its breaker open"
    );
    // GETs are retried on another instance, within the budget: callers saw no failure.
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    let b_failures = client
        .endpoints()
        .into_iter()
        .find(|e| e.id == "order-b")
        .unwrap()
        .failures;
    assert!(b_failures >= 5, "{b_failures}");

    // Phase 2: no call fails, none is even attempted on b, a and c share the load.
    let (a0, b0, c0) = (a_hits.get(), b_hits.get(), c_hits.get());
    for _ in 0..300 {
        let _: String = client.get_json("/who").await.unwrap();
    }
    let b_after = client
        .endpoints()
        .into_iter()
        .find(|e| e.id == "order-b")
        .unwrap()
        .failures;
    assert_eq!(b_after, b_failures, "no attempt went to the dead instance");
    assert_eq!(b_hits.get(), b0);
    assert_eq!(a_hits.get() - a0 + c_hits.get() - c0, 300);
    assert!(client.retry_budget().retries >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_retried_only_when_marked() {
    let env = env().await;
    let hits = Hits::default();
    let counter = hits.clone();
    let unavailable = move || {
        counter.hit();
        async { (StatusCode::SERVICE_UNAVAILABLE, "overloaded") }
    };
    let app = Router::new().route(
        "/orders",
        post(unavailable.clone())
            .put(unavailable.clone())
            .get(unavailable),
    );
    let server = serve(app).await;
    env.register("order-service", "order-1", &server).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .backoff(quick_backoff())
        .circuit_breaker(false)
        .build()
        .unwrap();
    let order = json!({"userId": "42", "type": "welcome", "items": [{"productId": "welcome-kit", "quantity": 1}]});

    let err = client.post("/orders").json(&order).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: StatusCode::SERVICE_UNAVAILABLE, ref body, .. } if body == "overloaded"),
        "{err}"
    );
    assert_eq!(hits.get(), 1, "a POST is sent once");
    let err = client
        .post_json::<_, Value>("/orders", &order)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(hits.get(), 2);

    // Marked retryable: 1 + 3 retries.
    let err = client
        .post("/orders")
        .json(&order)
        .retryable()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(hits.get(), 6);
    // Idempotent methods are retried without a mark.
    client.put("/orders").json(&order).await.unwrap_err();
    assert_eq!(hits.get(), 10);
    client.get("/orders").await.unwrap_err();
    assert_eq!(hits.get(), 14);

    // retries(0) turns retrying off.
    let once = ServiceClient::builder("order-service", &env.registry)
        .retries(0)
        .circuit_breaker(false)
        .build()
        .unwrap();
    once.get("/orders").await.unwrap_err();
    assert_eq!(hits.get(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_is_never_retried() {
    let env = env().await;
    let hits = Hits::default();
    let counter = hits.clone();
    let app = Router::new().route(
        "/stream",
        get(move || {
            counter.hit();
            async {
                // The head and a first chunk go out; then the instance dies.
                let chunks = futures_util::stream::unfold(0u8, |step| async move {
                    match step {
                        0 => Some((Ok::<_, std::io::Error>("[1,2,"), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Some((Err(std::io::Error::other("upstream died mid-body")), 2))
                        }
                        _ => None,
                    }
                });
                Body::from_stream(chunks)
            }
        }),
    );
    let server = serve(app).await;
    env.register("order-service", "order-1", &server).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .backoff(quick_backoff())
        .build()
        .unwrap();
    let err = client.get_json::<Vec<u32>>("/stream").await.unwrap_err();
    assert!(matches!(err, ClientError::Body { .. }), "{err}");
    assert_eq!(hits.get(), 1, "the head had arrived: no retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_is_prompt_and_typed() {
    let env = env().await;
    let app = Router::new().route("/slow", get(std::future::pending::<&'static str>));
    let server = serve(app).await;
    env.register("order-service", "order-1", &server).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = client.get("/slow").await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, ClientError::Timeout { after, .. } if after == Duration::from_millis(200)),
        "{err}"
    );
    assert_eq!(err.to_string(), "order-service did not answer within 200ms");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(900),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_timeout_retries_on_another_instance() {
    let env = env().await;
    let slow_hits = Hits::default();
    let counter = slow_hits.clone();
    let slow = serve(Router::new().route(
        "/who",
        get(move || {
            counter.hit();
            std::future::pending::<&'static str>()
        }),
    ))
    .await;
    let (fast, fast_hits) = named("fast").await;
    env.register("order-service", "slow", &slow).await;
    env.register("order-service", "fast", &fast).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .timeout(Duration::from_secs(5))
        .attempt_timeout(Duration::from_millis(100))
        .backoff(quick_backoff())
        .breaker_config(BreakerConfig::default().threshold(2))
        .build()
        .unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        let name: String = client.get_json("/who").await.unwrap();
        assert_eq!(name, "fast");
    }
    // The slow instance was tried until its breaker opened (2 timeouts), then passed over.
    assert_eq!(slow_hits.get(), 2);
    assert_eq!(fast_hits.get(), 10);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let breakers = client.breakers();
    let slow_breaker = &breakers
        .iter()
        .find(|(k, _)| k == "order-service/slow")
        .unwrap()
        .1;
    assert_eq!(slow_breaker.state, BreakerState::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_fails_at_once_without_touching_the_network() {
    let env = env().await;
    let hits = Hits::default();
    let counter = hits.clone();
    let app = Router::new().route(
        "/boom",
        get(move || {
            counter.hit();
            async { (StatusCode::INTERNAL_SERVER_ERROR, "database down") }
        }),
    );
    let server = serve(app).await;
    env.register("order-service", "order-1", &server).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .breaker_config(BreakerConfig::default().threshold(1))
        .build()
        .unwrap();
    let err = client.get("/boom").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status, body, instance, .. }
            if *status == StatusCode::INTERNAL_SERVER_ERROR && body == "database down" && instance == "order-1"),
        "{err}"
    );
    assert_eq!(hits.get(), 1, "500 is not retried");

    let started = Instant::now();
    let err = client.get("/boom").await.unwrap_err();
    let took = started.elapsed();
    match &err {
        ClientError::CircuitOpen {
            service,
            instance,
            retry_in,
        } => {
            assert_eq!(
                (service.as_str(), instance.as_str()),
                ("order-service", "order-1")
            );
            assert!(*retry_in > Duration::from_secs(55), "{retry_in:?}");
        }
        other => panic!("expected CircuitOpen, got {other}"),
    }
    assert!(err.is_retryable());
    assert!(took < Duration::from_millis(50), "{took:?}");
    assert_eq!(hits.get(), 1, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_and_unhealthy_instances_are_no_healthy_instance() {
    let env = env_with(RegistryOptions {
        refresh_interval: Duration::from_millis(20),
        health_check_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let client = ServiceClient::new("order-service", &env.registry).unwrap();
    let err = client.get("/who").await.unwrap_err();
    assert!(
        matches!(err, ClientError::NoHealthyInstance { ref service } if service == "order-service"),
        "{err}"
    );

    // A failing health check turns the instance unhealthy: it is skipped.
    let sick = serve(Router::new().route(
        "/health",
        get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
    ))
    .await;
    env.register_instance(
        "order-service",
        Instance::new("sick", "127.0.0.1", sick.addr.port())
            .health_check("/health", Duration::from_millis(50)),
    )
    .await;
    let registry = env.registry.clone();
    assert!(
        eventually(Duration::from_secs(5), || registry
            .discover("order-service")
            .iter()
            .any(|r| r.status == InstanceStatus::Unhealthy))
        .await
    );
    let err = client.get("/who").await.unwrap_err();
    assert!(
        matches!(err, ClientError::NoHealthyInstance { .. }),
        "{err}"
    );

    // A healthy one next to it takes every call.
    let (well, hits) = named("well").await;
    env.register("order-service", "well", &well).await;
    for _ in 0..20 {
        let name: String = client.get_json("/who").await.unwrap();
        assert_eq!(name, "well");
    }
    assert_eq!(hits.get(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_carry_the_body_and_bad_json_says_why() {
    let env = env().await;
    let app = Router::new()
        .route(
            "/orders/{id}",
            get(|| async { (StatusCode::NOT_FOUND, "no order 7") }),
        )
        .route(
            "/huge-error",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "é".repeat(10_000)) }),
        )
        .route("/not-json", get(|| async { "certainly not json" }))
        .route("/big", get(|| async { "x".repeat(5000) }));
    let server = serve(app).await;
    env.register("order-service", "order-1", &server).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .circuit_breaker(false)
        .max_response_bytes(4096)
        .build()
        .unwrap();

    let err = client.get("/orders/7").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "order-service instance order-1 answered 404 Not Found: no order 7"
    );
    assert!(!err.is_retryable());

    match client.get("/huge-error").await.unwrap_err() {
        ClientError::Status { status, body, .. } => {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert!(body.len() <= MAX_ERROR_BODY && body.len() >= MAX_ERROR_BODY - 4);
            assert!(
                body.chars().all(|c| c == 'é'),
                "cut on a character boundary"
            );
        }
        other => panic!("expected Status, got {other}"),
    }

    let err = client
        .get_json::<Vec<String>>("/not-json")
        .await
        .unwrap_err();
    match &err {
        ClientError::Decode { target, source, .. } => {
            assert!(target.contains("Vec<alloc::string::String>"), "{target}");
            assert!(
                source
                    .to_string()
                    .starts_with("expected value at line 1 column 1"),
                "{source}"
            );
        }
        other => panic!("expected Decode, got {other}"),
    }

    let err = client.get("/big").await.unwrap().bytes().await.unwrap_err();
    assert!(
        matches!(err, ClientError::ResponseTooLarge { limit: 4096, .. }),
        "{err}"
    );

    let err = client.get("no-slash").await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidRequest { .. }), "{err}");
    let err = client
        .get("/x")
        .header("bad header", "v")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid request to order-service: header name"),
        "{err}"
    );
}

/// Echoes what arrived: the deadline and trace headers, the query, and a custom header.
async fn echo(
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    axum::Json(json!({
        "deadline_ms": h("x-trellis-deadline-ms").map(|v| v.parse::<u64>().unwrap()),
        "traceparent": h("traceparent"),
        "tracestate": h("tracestate"),
        "baggage": h("baggage"),
        "api_key": h("x-api-key"),
        "tenant": h("x-tenant"),
        "query": query,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_and_trace_context_travel_and_the_deadline_shrinks() {
    let env = env().await;
    let back = serve(Router::new().route("/echo", get(echo))).await;
    env.register("back-service", "back-1", &back).await;
    let back_client = ServiceClient::new("back-service", &env.registry).unwrap();

    // The front service does 50 ms of work, then calls the back service on behalf of its
    // caller: the context comes from the incoming headers.
    let front_app = Router::new().route(
        "/front",
        get(move |headers: HeaderMap| {
            let back_client = back_client.clone();
            async move {
                let ctx = CallContext::from_headers(&headers);
                let received = headers["x-trellis-deadline-ms"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                let downstream: Value = ctx.scope(back_client.get_json("/echo")).await.unwrap();
                axum::Json(json!({"received": received, "downstream": downstream}))
            }
        }),
    );
    let front = serve(front_app).await;
    env.register("front-service", "front-1", &front).await;
    let front_client = ServiceClient::new("front-service", &env.registry).unwrap();

    let ctx = CallContext::new()
        .with_traceparent(HeaderValue::from_static(TRACEPARENT))
        .with_tracestate(HeaderValue::from_static("congo=t61rcWkgMzE"))
        .with_baggage(HeaderValue::from_static("userId=alice"))
        .with_timeout(Duration::from_millis(1000));
    let answer: Value = front_client
        .get("/front")
        .context(ctx)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let received = answer["received"].as_u64().unwrap();
    let downstream = &answer["downstream"];
    let back_received = downstream["deadline_ms"].as_u64().unwrap();
    assert!(received <= 1000 && received > 700, "front got {received}");
    assert!(
        back_received + 45 <= received,
        "back got {back_received}, front {received}"
    );
    assert_eq!(downstream["traceparent"], TRACEPARENT);
    assert_eq!(downstream["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(downstream["baggage"], "userId=alice");

    // Without a caller deadline the client's own timeout is what is left.
    let direct = ServiceClient::builder("back-service", &env.registry)
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let plain: Value = direct.get_json("/echo").await.unwrap();
    let ms = plain["deadline_ms"].as_u64().unwrap();
    assert!(ms <= 3000 && ms > 2500, "{ms}");
    assert_eq!(plain["traceparent"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_cuts_the_call_short_without_blaming_the_instance() {
    let env = env().await;
    let app = Router::new().route("/slow", get(std::future::pending::<&'static str>));
    let server = serve(app).await;
    env.register("order-service", "order-1", &server).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .breaker_config(BreakerConfig::default().threshold(1))
        .outlier_detection(OutlierDetection::default().consecutive_failures(1))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = CallContext::new()
        .with_timeout(Duration::from_millis(150))
        .scope(client.get("/slow").into_future())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, ClientError::Timeout { after, .. } if after <= Duration::from_millis(150)),
        "{err}"
    );
    assert!(took < Duration::from_millis(700), "{took:?}");
    // The caller gave up, the instance did not fail: its breaker is still closed.
    let (_, breaker) = &client.breakers()[0];
    assert_eq!(breaker.state, BreakerState::Closed);
    assert_eq!(breaker.consecutive_failures, 0);

    // A deadline already passed fails before anything is sent.
    let past = CallContext::new().with_timeout(Duration::ZERO);
    let err = client.get("/slow").context(past).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_headers_query_and_request_headers_arrive() {
    let env = env().await;
    let server = serve(Router::new().route("/echo", get(echo))).await;
    env.register("order-service", "order-1", &server).await;
    let client = ServiceClient::builder("order-service", &env.registry)
        .default_header(
            http::HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("k-123"),
        )
        .build()
        .unwrap();
    let seen: Value = client
        .get("/echo?page=2")
        .query(&[("user", "alice smith")])
        .header("x-tenant", "acme")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["api_key"], "k-123");
    assert_eq!(seen["tenant"], "acme");
    assert_eq!(seen["query"], json!({"page": "2", "user": "alice smith"}));

    // The same through a shared reqwest client: default headers still apply.
    let shared = ServiceClient::builder("order-service", &env.registry)
        .http_client(reqwest::Client::new())
        .default_header(
            http::HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("k-456"),
        )
        .build()
        .unwrap();
    let seen: Value = shared.get_json("/echo").await.unwrap();
    assert_eq!(seen["api_key"], "k-456");
}

#[test]
fn builder_rejects_bad_settings_by_name() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = env().await;
        let err = ServiceClient::new("Order Service!", &env.registry).unwrap_err();
        assert!(err.to_string().contains("service name"), "{err}");
        let err = ServiceClient::builder("order-service", &env.registry)
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(err.to_string(), "timeout: must be above zero");
        let err = ServiceClient::builder("order-service", &env.registry)
            .retries(11)
            .build()
            .unwrap_err();
        assert_eq!(err.to_string(), "retries: 11 is too many; at most 10");
        let err = ServiceClient::builder("order-service", &env.registry)
            .breaker_config(BreakerConfig::default().threshold(0))
            .build()
            .unwrap_err();
        assert_eq!(err.to_string(), "threshold must be at least 1, got 0");
    });
}
