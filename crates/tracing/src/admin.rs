//! The admin HTTP API over a [`TraceBuffer`]: `GET /v1/traces` lists recent traces
//! (`?service=NAME&limit=N`: traces with a span of NAME or a span routed to / calling it (`trellis.service`, `peer.service` tags), newest first, limit 1–1000, default 20) and
//! `GET /v1/traces/{trace_id}` returns one trace as waterfall JSON ([`TraceView`]).
//! Errors are JSON `{"error": "..."}` with 400 (bad trace id or query) or 404.
//!
//! ```
//! # async fn demo() {
//! use tower::ServiceExt;
//! let buffer = trellis_tracing::TraceBuffer::new(1000);
//! let app = trellis_tracing::admin::router(buffer);
//! let response = app
//!     .oneshot(http::Request::get("/v1/traces?limit=5").body(axum::body::Body::empty()).unwrap())
//!     .await
//!     .unwrap();
//! assert_eq!(response.status(), 200);
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo());
//! ```

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use opentelemetry::trace::TraceId;
use serde::{Deserialize, Serialize};

use crate::buffer::{TraceBuffer, TraceSummary, TraceView};

/// Most traces one list request returns.
pub const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 20;

/// The routes above, to merge into the admin server's router.
pub fn router(buffer: TraceBuffer) -> Router {
    Router::new()
        .route("/v1/traces", get(list))
        .route("/v1/traces/{trace_id}", get(one))
        .with_state(buffer)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    service: Option<String>,
    limit: Option<usize>,
}

/// The body of `GET /v1/traces`.
#[derive(Debug, Serialize)]
pub struct TraceList {
    /// Matching traces, newest first.
    pub traces: Vec<TraceSummary>,
    /// Services seen in the buffer (for a filter menu).
    pub services: Vec<String>,
    /// Spans held / most spans held.
    pub buffered_spans: usize,
    /// Buffer capacity in spans.
    pub capacity: usize,
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn list(
    State(buffer): State<TraceBuffer>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "query: {} (accepted: service=NAME, limit=1..{MAX_LIMIT})",
                    e.body_text()
                ),
            );
        }
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit {limit} is not between 1 and {MAX_LIMIT}"),
        );
    }
    let service = query.service.as_deref().filter(|s| !s.is_empty());
    Json(TraceList {
        traces: buffer.recent(service, limit),
        services: buffer.services(),
        buffered_spans: buffer.span_count(),
        capacity: buffer.capacity(),
    })
    .into_response()
}

async fn one(State(buffer): State<TraceBuffer>, Path(trace_id): Path<String>) -> Response {
    let parsed = (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| TraceId::from_hex(&trace_id.to_ascii_lowercase()).ok())
        .flatten();
    let Some(id) = parsed else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("trace id {trace_id:?} is not 32 hex digits"),
        );
    };
    match buffer.trace(id) {
        Some(view) => Json::<TraceView>(view).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("trace {trace_id} is not in the buffer (never sampled, or evicted)"),
        ),
    }
}
