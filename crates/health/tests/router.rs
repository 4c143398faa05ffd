//! The HTTP endpoints, driven in-process with `tower::ServiceExt::oneshot`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use trellis_health::{CheckOptions, HealthReport, HealthStatus, ServiceHealthMonitor, check_fn};

/// Sends `GET uri` to `app`; returns the status and the JSON body.
async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    let response = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/json",
        "{uri}"
    );
    assert_eq!(
        response.headers()[header::CACHE_CONTROL],
        "no-store",
        "{uri}"
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn degraded_monitor(runs: &Arc<AtomicUsize>) -> ServiceHealthMonitor {
    let runs = Arc::clone(runs);
    ServiceHealthMonitor::builder("orders")
        .check(
            "database",
            check_fn(move || {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }),
        )
        .check_with(
            "recommendations",
            CheckOptions::default().critical(false),
            check_fn(|| async { Err("503 from recommendations".to_owned()) }),
        )
        .cache_ttl(Duration::ZERO)
        .build()
}

fn unhealthy_monitor() -> ServiceHealthMonitor {
    ServiceHealthMonitor::builder("orders")
        .check(
            "database",
            check_fn(|| async { Err("connection refused".to_owned()) }),
        )
        .check("cache", check_fn(|| async { Ok(()) }))
        .build()
}

#[tokio::test]
async fn health_is_200_with_the_report_while_serving() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = degraded_monitor(&runs).router();
    let (status, body) = get(&app, "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"], "orders");
    assert_eq!(body["status"], "degraded");
    assert!(body["checked_at_ms"].as_u64().unwrap() > 0);

    let checks = body["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[0]["name"], "database");
    assert_eq!(checks[0]["status"], "healthy");
    assert_eq!(checks[0]["critical"], true);
    assert!(checks[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(
        checks[0].get("error").is_none(),
        "no error key when healthy"
    );
    assert_eq!(checks[1]["name"], "recommendations");
    assert_eq!(checks[1]["status"], "unhealthy");
    assert_eq!(checks[1]["critical"], false);
    assert_eq!(checks[1]["error"], "503 from recommendations");

    // The body is a HealthReport.
    let report: HealthReport = serde_json::from_value(body).unwrap();
    assert_eq!(report.status, HealthStatus::Degraded);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn health_is_503_when_a_critical_check_fails() {
    let app = unhealthy_monitor().router();
    let (status, body) = get(&app, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["checks"][0]["error"], "connection refused");
}

#[tokio::test]
async fn live_is_200_and_runs_no_check() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = degraded_monitor(&runs).router();
    let (status, body) = get(&app, "/health/live").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"status": "alive"}));
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // Even when the service is unhealthy and not ready.
    let monitor = unhealthy_monitor();
    monitor.set_ready(false);
    let (status, _) = get(&monitor.router(), "/health/live").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn ready_follows_the_switch_and_the_report() {
    let runs = Arc::new(AtomicUsize::new(0));
    let monitor = degraded_monitor(&runs);
    let app = monitor.router();

    let (status, body) = get(&app, "/health/ready").await;
    assert_eq!(status, StatusCode::OK, "degraded still serves");
    assert_eq!(body, serde_json::json!({"status": "ready"}));

    monitor.set_ready(false);
    let before = runs.load(Ordering::SeqCst);
    let (status, body) = get(&app, "/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("readiness switched off")
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        before,
        "no checks while switched off"
    );
    // /health itself is unaffected by readiness.
    assert_eq!(get(&app, "/health").await.0, StatusCode::OK);

    monitor.set_ready(true);
    assert_eq!(get(&app, "/health/ready").await.0, StatusCode::OK);
}

#[tokio::test]
async fn ready_is_503_naming_the_failing_critical_checks() {
    let app = unhealthy_monitor().router();
    let (status, body) = get(&app, "/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    assert_eq!(
        body["reason"],
        "unhealthy: critical checks failing: database"
    );
}

#[tokio::test]
async fn router_merges_into_an_app_and_serves_head() {
    let monitor = unhealthy_monitor();
    let app = Router::new()
        .route("/", axum::routing::get(|| async { "hi" }))
        .merge(monitor.router());
    let response = app
        .oneshot(Request::head("/health/live").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
