//! Circuit breakers as a layer: keyed per upstream instance and per route, failing fast
//! while open, probing when half-open — under a paused tokio clock.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::time::{Instant, advance};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use trellis_resilience::breaker::{
    BreakerConfig, BreakerOpen, BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitBreakers,
    KeyedBreakers,
};
use trellis_resilience::http::ServerErrors;
use trellis_resilience::{ErrorKind, error_kind};

/// The instance the balancer picked, as the gateway would record it on the request.
#[derive(Clone, Debug)]
struct Upstream(&'static str);

fn request(route: &str, instance: &'static str) -> Request<()> {
    let mut r = Request::get(route).body(()).unwrap();
    r.extensions_mut().insert(Upstream(instance));
    r
}

/// Instances listed in `down` answer 503; others 200. Counts calls per instance.
fn upstreams(
    down: Arc<Mutex<Vec<&'static str>>>,
    calls: Arc<Mutex<HashMap<&'static str, usize>>>,
) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future: Send> + Clone {
    service_fn(move |req: Request<()>| {
        let instance = req.extensions().get::<Upstream>().unwrap().0;
        *calls.lock().unwrap().entry(instance).or_default() += 1;
        let status = if down.lock().unwrap().contains(&instance) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        async move { Ok(Response::builder().status(status).body(()).unwrap()) }
    })
}

#[tokio::test(start_paused = true)]
async fn a_failing_instance_is_cut_off_and_others_keep_serving() {
    let down = Arc::new(Mutex::new(vec!["b"]));
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let breakers = Arc::new(CircuitBreakers::<String>::new(BreakerConfig::default()).unwrap());
    let key = |req: &Request<()>| {
        let instance = req.extensions().get::<Upstream>()?.0;
        Some(format!("user-service/{instance}"))
    };
    let svc = ServiceBuilder::new()
        .layer(
            CircuitBreakerLayer::new(KeyedBreakers::new(breakers.clone(), key))
                .classify(ServerErrors),
        )
        .service(upstreams(down.clone(), calls.clone()));

    // Five 503s from b (seed threshold 5) open b's breaker; a is untouched.
    for _ in 0..5 {
        let res = svc.clone().oneshot(request("/users/1", "b")).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(
            svc.clone()
                .oneshot(request("/users/1", "a"))
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let start = Instant::now();
    let err = svc
        .clone()
        .oneshot(request("/users/1", "b"))
        .await
        .unwrap_err();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "an open breaker answers at once"
    );
    assert_eq!(error_kind(&*err), Some(ErrorKind::CircuitOpen));
    let open = err.downcast_ref::<BreakerOpen>().unwrap();
    assert_eq!(open.name(), "user-service/b");
    assert_eq!(open.retry_in(), Duration::from_secs(60));
    assert_eq!(
        calls.lock().unwrap()["b"],
        5,
        "the refused request never reached b"
    );

    let states: HashMap<String, BreakerState> = breakers
        .snapshot()
        .into_iter()
        .map(|(k, s)| (k, s.state))
        .collect();
    assert_eq!(states["user-service/a"], BreakerState::Closed);
    assert_eq!(states["user-service/b"], BreakerState::Open);

    // 60 s later (seed timeout) one probe goes through; b has recovered, so it closes.
    down.lock().unwrap().clear();
    advance(Duration::from_secs(60)).await;
    assert_eq!(
        svc.clone()
            .oneshot(request("/users/1", "b"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(breakers.get("user-service/b").state(), BreakerState::Closed);
    assert_eq!(calls.lock().unwrap()["b"], 6);
}

#[tokio::test(start_paused = true)]
async fn breakers_per_route_and_instance_are_independent() {
    let breakers =
        Arc::new(CircuitBreakers::<String>::new(BreakerConfig::default().threshold(2)).unwrap());
    // A route with its own settings.
    breakers
        .insert(
            "/api/slow|a".to_owned(),
            BreakerConfig::default()
                .threshold(1)
                .open_timeout(Duration::from_secs(5)),
        )
        .unwrap();
    let key = |req: &Request<()>| {
        let instance = req.extensions().get::<Upstream>()?.0;
        Some(format!("{}|{instance}", req.uri().path()))
    };
    let down = Arc::new(Mutex::new(vec!["a"]));
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let svc = ServiceBuilder::new()
        .layer(
            CircuitBreakerLayer::new(KeyedBreakers::new(breakers.clone(), key))
                .classify(ServerErrors),
        )
        .service(upstreams(down, calls));

    svc.clone()
        .oneshot(request("/api/slow", "a"))
        .await
        .unwrap();
    assert_eq!(breakers.get("/api/slow|a").state(), BreakerState::Open);
    // Same instance on another route: its own breaker, threshold 2, still closed.
    svc.clone()
        .oneshot(request("/api/fast", "a"))
        .await
        .unwrap();
    assert_eq!(breakers.get("/api/fast|a").state(), BreakerState::Closed);
    let err = svc
        .clone()
        .oneshot(request("/api/slow", "a"))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<BreakerOpen>().unwrap().retry_in(),
        Duration::from_secs(5)
    );

    // Instances that left the registry lose their breakers.
    breakers.retain(|k| !k.ends_with("|a"));
    assert!(breakers.is_empty());
}

#[tokio::test(start_paused = true)]
async fn open_breaker_fails_without_touching_the_inner_service() {
    let breaker =
        Arc::new(CircuitBreaker::new("inventory", BreakerConfig::default().threshold(1)).unwrap());
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<&'static str, &'static str, _>(
        CircuitBreakerLayer::new(breaker.clone()),
    );
    handle.allow(10);

    assert!(svc.poll_ready().is_ready());
    let first = svc.call("one");
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, "one");
    send.send_error(std::io::Error::other("connection refused"));
    assert_eq!(first.await.unwrap_err().to_string(), "connection refused");
    assert_eq!(breaker.state(), BreakerState::Open);

    assert!(svc.poll_ready().is_ready());
    let err = svc.call("two").await.unwrap_err();
    assert_eq!(error_kind(&*err), Some(ErrorKind::CircuitOpen));
    assert!(
        matches!(handle.poll_request(), Poll::Pending),
        "nothing reached the mock"
    );
    assert_eq!(breaker.snapshot().rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_a_limited_number_of_probes_through() {
    let breaker = Arc::new(
        CircuitBreaker::new(
            "search",
            BreakerConfig::default()
                .threshold(1)
                .half_open_probes(2)
                .open_timeout(Duration::from_secs(10)),
        )
        .unwrap(),
    );
    let in_flight = Arc::new(AtomicUsize::new(0));
    let seen = in_flight.clone();
    let (release, _) = tokio::sync::broadcast::channel::<()>(1);
    let gate = release.clone();
    let slow = service_fn(move |fail: bool| {
        seen.fetch_add(1, Ordering::SeqCst);
        let mut open = gate.subscribe();
        async move {
            if fail {
                return Err::<(), BoxError>("boom".into());
            }
            let _ = open.recv().await;
            Ok(())
        }
    });
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .service(slow);

    assert!(svc.clone().oneshot(true).await.is_err());
    advance(Duration::from_secs(10)).await;
    // Two probes start and hang; the third request is refused while they are in flight.
    let p1 = tokio::spawn(svc.clone().oneshot(false));
    let p2 = tokio::spawn(svc.clone().oneshot(false));
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "probes did not start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let err = svc.clone().oneshot(false).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<BreakerOpen>().unwrap().state(),
        BreakerState::HalfOpen
    );
    assert_eq!(in_flight.load(Ordering::SeqCst), 3);
    release.send(()).unwrap();
    p1.await.unwrap().unwrap();
    p2.await.unwrap().unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
}
