//! The retry layer over HTTP-shaped mock upstreams, under a paused tokio clock: which
//! requests are retried, how long it waits, and when the budget stops it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use trellis_resilience::http::{HttpRetryPolicy, RETRYABLE_HEADER, Retryable};
use trellis_resilience::retry::{Backoff, RetryBudget, RetryLayer};
use trellis_resilience::timeout::TimeoutLayer;
use trellis_resilience::{ErrorKind, error_kind};

/// An upstream answering the statuses in `script` in turn (then 200), counting calls and
/// recording when each arrived.
#[derive(Clone)]
struct Scripted {
    script: Arc<Vec<(u16, Option<&'static str>)>>,
    calls: Arc<AtomicUsize>,
    at: Arc<Mutex<Vec<Instant>>>,
}

impl Scripted {
    fn new(script: Vec<(u16, Option<&'static str>)>) -> Self {
        Scripted {
            script: Arc::new(script),
            calls: Arc::default(),
            at: Arc::default(),
        }
    }

    fn always(status: u16) -> Self {
        Self::new(vec![(status, None); 1000])
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<String>> for Scripted {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.at.lock().unwrap().push(Instant::now());
        let (status, retry_after) = self.script.get(n).copied().unwrap_or((200, None));
        let mut b = Response::builder().status(status);
        if let Some(v) = retry_after {
            b = b.header(http::header::RETRY_AFTER, v);
        }
        // Echo the body so tests see the retried copy is complete.
        std::future::ready(Ok(b.body(req.into_body()).unwrap()))
    }
}

fn req(method: Method) -> Request<String> {
    Request::builder()
        .method(method)
        .uri("/orders")
        .body("payload".to_owned())
        .unwrap()
}

fn no_reserve_budget() -> Arc<RetryBudget> {
    Arc::new(RetryBudget::new(Duration::from_secs(10), 0.2, 0).unwrap())
}

fn layer() -> RetryLayer<HttpRetryPolicy> {
    RetryLayer::new(HttpRetryPolicy::default())
        .backoff(Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).unwrap())
}

#[tokio::test(start_paused = true)]
async fn get_is_retried_three_times_then_the_last_answer_is_returned() {
    let upstream = Scripted::always(503);
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(upstream.clone());
    let res = svc.oneshot(req(Method::GET)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.calls(), 4, "1 attempt + seed default of 3 retries");
}

#[tokio::test(start_paused = true)]
async fn retried_get_succeeds_with_the_full_body() {
    let upstream = Scripted::new(vec![(502, None), (504, None)]);
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(upstream.clone());
    let res = svc.oneshot(req(Method::GET)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.into_body(), "payload");
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn idempotent_methods_are_retried_and_post_and_patch_are_not() {
    for (method, calls) in [
        (Method::GET, 2),
        (Method::HEAD, 2),
        (Method::OPTIONS, 2),
        (Method::PUT, 2),
        (Method::DELETE, 2),
        (Method::POST, 1),
        (Method::PATCH, 1),
    ] {
        let upstream = Scripted::new(vec![(503, None)]);
        let svc = ServiceBuilder::new()
            .layer(layer())
            .service(upstream.clone());
        let res = svc.oneshot(req(method.clone())).await.unwrap();
        assert_eq!(upstream.calls(), calls, "{method}");
        let expected = if calls == 1 { 503 } else { 200 };
        assert_eq!(res.status().as_u16(), expected, "{method}");
    }
}

#[tokio::test(start_paused = true)]
async fn post_marked_retryable_is_retried() {
    let upstream = Scripted::new(vec![(503, None), (503, None)]);
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(upstream.clone());
    let mut by_extension = req(Method::POST);
    by_extension.extensions_mut().insert(Retryable);
    assert_eq!(svc.oneshot(by_extension).await.unwrap().status(), 200);
    assert_eq!(upstream.calls(), 3);

    let upstream = Scripted::new(vec![(503, None)]);
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(upstream.clone());
    let mut by_header = req(Method::POST);
    by_header
        .headers_mut()
        .insert(RETRYABLE_HEADER, http::HeaderValue::from_static("true"));
    assert_eq!(svc.oneshot(by_header).await.unwrap().status(), 200);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn other_statuses_are_not_retried() {
    for status in [200, 201, 400, 404, 429, 500] {
        let upstream = Scripted::new(vec![(status, None)]);
        let svc = ServiceBuilder::new()
            .layer(layer())
            .service(upstream.clone());
        assert_eq!(
            svc.oneshot(req(Method::GET)).await.unwrap().status(),
            status
        );
        assert_eq!(upstream.calls(), 1, "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn waits_follow_full_jitter_bounds() {
    let upstream = Scripted::always(503);
    let svc = ServiceBuilder::new()
        .layer(layer().max_retries(5))
        .service(upstream.clone());
    svc.oneshot(req(Method::GET)).await.unwrap();
    let at = upstream.at.lock().unwrap().clone();
    assert_eq!(at.len(), 6);
    for (retry, pair) in at.windows(2).enumerate() {
        let waited = pair[1] - pair[0];
        let ceiling = Duration::from_millis(100) * (1 << retry);
        assert!(
            waited <= ceiling,
            "retry {retry} waited {waited:?} > {ceiling:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_up_to_the_cap() {
    let upstream = Scripted::new(vec![(503, Some("2"))]);
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(upstream.clone());
    let start = Instant::now();
    assert_eq!(svc.oneshot(req(Method::GET)).await.unwrap().status(), 200);
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(3));

    // Asked to wait longer than the backoff cap (10 s): returned as is, at once.
    let upstream = Scripted::new(vec![(503, Some("60"))]);
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(upstream.clone());
    let start = Instant::now();
    assert_eq!(svc.oneshot(req(Method::GET)).await.unwrap().status(), 503);
    assert_eq!(upstream.calls(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn budget_caps_retries_at_twenty_percent_of_requests() {
    let upstream = Scripted::always(503);
    let budget = no_reserve_budget();
    let mut svc = ServiceBuilder::new()
        .layer(layer().budget(budget.clone()))
        .service(upstream.clone());
    for _ in 0..100 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(req(Method::GET))
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
    }
    assert_eq!(
        upstream.calls(),
        120,
        "100 requests + 20 % retries, not 400"
    );
    let snap = budget.snapshot();
    assert_eq!((snap.requests, snap.retries, snap.remaining), (100, 20, 0));

    // The budget is spent: the next failing request is tried once.
    let before = upstream.calls();
    svc.ready()
        .await
        .unwrap()
        .call(req(Method::GET))
        .await
        .unwrap();
    assert_eq!(upstream.calls() - before, 1);

    // After the window, deposits earn retries again.
    tokio::time::advance(Duration::from_secs(11)).await;
    let before = upstream.calls();
    for _ in 0..10 {
        svc.ready()
            .await
            .unwrap()
            .call(req(Method::GET))
            .await
            .unwrap();
    }
    assert_eq!(upstream.calls() - before, 12);
}

#[tokio::test(start_paused = true)]
async fn per_attempt_timeouts_are_retried_and_the_total_timeout_wins() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let slow_twice = service_fn(move |_req: Request<String>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok::<_, BoxError>(Response::new(String::new()))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .layer(layer())
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(slow_twice);
    let start = Instant::now();
    assert_eq!(
        svc.clone()
            .oneshot(req(Method::GET))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(start.elapsed() >= Duration::from_secs(2));

    // Everything slow: the outer 30 s timeout fires, whatever retries are left.
    let hang = service_fn(|_req: Request<String>| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, BoxError>(Response::new(String::new()))
    });
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .layer(layer().max_retries(100))
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(hang);
    let start = Instant::now();
    let err = svc.oneshot(req(Method::GET)).await.unwrap_err();
    assert_eq!(error_kind(&*err), Some(ErrorKind::Timeout));
    assert_eq!(err.to_string(), "request timed out after 30s");
    assert_eq!(start.elapsed(), Duration::from_secs(30));
}

/// A body that yields one chunk and then fails, as an upstream dying mid-response.
struct BreaksMidway(u8);

impl Body for BreaksMidway {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0 += 1;
        Poll::Ready(Some(match self.0 {
            1 => Ok(Frame::data(Bytes::from_static(b"first bytes"))),
            _ => Err(std::io::Error::other("upstream reset mid-body")),
        }))
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_whose_body_fails_after_bytes_went_out_is_not_retried() {
    use http_body_util::BodyExt;

    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let upstream = service_fn(move |_req: Request<String>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(BreaksMidway(0))) }
    });
    let svc = ServiceBuilder::new().layer(layer()).service(upstream);
    let res = svc.oneshot(req(Method::GET)).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first bytes");
    assert!(body.frame().await.unwrap().is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the caller saw bytes: no retry"
    );
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_and_rate_limits_are_not() {
    use trellis_resilience::ratelimit::{Quota, RateLimiter};

    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let refused_once = service_fn(move |_req: Request<String>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err::<Response<String>, BoxError>(
                    std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
                )
            } else {
                Ok(Response::new(String::new()))
            }
        }
    });
    let svc = ServiceBuilder::new().layer(layer()).service(refused_once);
    assert!(svc.oneshot(req(Method::GET)).await.is_ok());
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let limiter = RateLimiter::new(Quota::new(1, Duration::from_secs(60)).unwrap());
    limiter.check(None, "k").unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let limited = service_fn(move |_req: Request<String>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let err = limiter.check(None, "k").unwrap_err();
        async move { Err::<Response<String>, BoxError>(err.into()) }
    });
    let svc = ServiceBuilder::new().layer(layer()).service(limited);
    let err = svc.oneshot(req(Method::GET)).await.unwrap_err();
    assert_eq!(error_kind(&*err), Some(ErrorKind::RateLimited));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

proptest! {
    /// Full jitter: every wait is within [0, min(cap, base × 2^retry)], so within [0, cap].
    #[test]
    fn backoff_with_full_jitter_stays_within_zero_and_cap(
        base_ms in 0u64..=5_000,
        extra_ms in 0u64..=120_000,
        retry in 0u32..=80,
        unit in 0.0f64..=1.0,
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = base + Duration::from_millis(extra_ms);
        let backoff = Backoff::new(base, cap).unwrap();
        let ceiling = backoff.ceiling(retry);
        prop_assert!(ceiling <= cap);
        prop_assert!(ceiling >= base.min(cap));
        if retry < 30 {
            let exact = base.saturating_mul(1 << retry).min(cap);
            prop_assert_eq!(ceiling, exact);
        }
        prop_assert!(backoff.ceiling(retry + 1) >= ceiling);
        let drawn = backoff.delay_with(retry, unit);
        prop_assert!(drawn <= ceiling);
        for _ in 0..20 {
            prop_assert!(backoff.delay(retry) <= ceiling);
        }
    }
}

#[test]
fn jitter_is_spread_over_the_whole_interval() {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).unwrap();
    let ceiling = backoff.ceiling(3).as_secs_f64();
    let draws: Vec<f64> = (0..20_000)
        .map(|_| backoff.delay(3).as_secs_f64())
        .collect();
    let mean = draws.iter().sum::<f64>() / draws.len() as f64;
    // Uniform on [0, c]: mean c/2 (the tolerance is ~9 standard errors).
    assert!(
        (mean - ceiling / 2.0).abs() < 0.025 * ceiling,
        "mean {mean} of [0, {ceiling}]"
    );
    let low = draws.iter().filter(|&&d| d < ceiling * 0.1).count();
    let high = draws.iter().filter(|&&d| d > ceiling * 0.9).count();
    assert!(low > 1_000 && high > 1_000, "low {low}, high {high}");
}
