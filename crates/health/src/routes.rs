//! The HTTP face of a monitor: `GET /health`, `/health/live` and `/health/ready`.
//!
//! Liveness and readiness are kept apart on purpose. Liveness ("restart me if this fails")
//! must not depend on other services, or one failing database restarts every service that
//! uses it; so `/health/live` runs no check. Readiness ("send me traffic") combines the
//! readiness switch with the (cached) health report.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::monitor::ServiceHealthMonitor;

/// Body of `/health/live` and `/health/ready`.
#[derive(Serialize)]
struct ProbeBody {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl ServiceHealthMonitor {
    /// An axum router serving this monitor (state included, so it merges into any app):
    ///
    /// - `GET /health` — the [`HealthReport`](crate::HealthReport) as JSON; 200 when healthy or
    ///   degraded, 503 when unhealthy.
    /// - `GET /health/live` — always 200 `{"status":"alive"}`; runs no check.
    /// - `GET /health/ready` — 200 `{"status":"ready"}` when the readiness switch is on and
    ///   the report is serving; otherwise 503 `{"status":"not_ready","reason":"…"}`.
    ///
    /// Responses are `application/json` and marked `Cache-Control: no-store`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .with_state(self.clone())
    }
}

async fn health(State(monitor): State<ServiceHealthMonitor>) -> Response {
    let report = monitor.check().await;
    let code = if report.status.is_serving() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    no_store((code, Json(report)))
}

async fn live() -> Response {
    no_store((
        StatusCode::OK,
        Json(ProbeBody {
            status: "alive",
            reason: None,
        }),
    ))
}

async fn ready(State(monitor): State<ServiceHealthMonitor>) -> Response {
    let not_ready = |reason: String| {
        no_store((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(ProbeBody {
                status: "not_ready",
                reason: Some(reason),
            }),
        ))
    };
    if !monitor.is_ready() {
        return not_ready("readiness switched off (starting or draining)".to_owned());
    }
    let report = monitor.check().await;
    if !report.status.is_serving() {
        let failing = report
            .failing()
            .filter(|c| c.critical)
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return not_ready(format!(
            "{}: critical checks failing: {failing}",
            report.status
        ));
    }
    no_store((
        StatusCode::OK,
        Json(ProbeBody {
            status: "ready",
            reason: None,
        }),
    ))
}

fn no_store(response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
