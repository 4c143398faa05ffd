//! The sagas' admin HTTP API, for the Trellis admin server: list sagas by state, show one
//! saga's step history, retry or abort a saga that needs attention.
//!
//! It needs only the store (the admin node does not have the saga definitions): `abort` is
//! a conditional write to the saga's record; `retry` records the request durably in the
//! log, and the orchestrator that has the saga's name registered picks it up within its
//! `poll_interval` (or at its next start-up).
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/sagas?state=S&limit=N&after=ID` | `{"sagas": [summary…], "next": ID or null}`; without `state`, every state (first page only) |
//! | `GET /v1/sagas/{id}` | the saga's record, each step with `duration_ms` and `compensation_duration_ms` |
//! | `POST /v1/sagas/{id}/retry` | 202 `{"saga_id", "state", "requested": "retry"}`; 409 unless `needs_attention` |
//! | `POST /v1/sagas/{id}/abort` | 200 `{"saga_id", "state": "aborted"}`; 409 unless `needs_attention` |
//!
//! Errors are `{"error": KIND, "detail": MESSAGE}` like the rest of the admin API.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use trellis_store::Store;

use crate::error::SagaError;
use crate::log::{SagaLog, SagaRecord, SagaState, validate_id};

/// Default page size of the list.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page size of the list.
pub const MAX_LIMIT: usize = 1000;

/// The routes above, with full paths (`/v1/sagas…`): merge them into the admin router
/// (`Router::merge`), behind its authentication.
pub fn router(store: Store) -> Result<Router, SagaError> {
    let log = SagaLog::new(&store)?;
    Ok(Router::new()
        .route("/v1/sagas", get(list))
        .route("/v1/sagas/{id}", get(show))
        .route("/v1/sagas/{id}/retry", post(retry))
        .route("/v1/sagas/{id}/abort", post(abort))
        .with_state(log))
}

/// An error answer.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1, "detail": self.2}))).into_response()
    }
}

impl From<SagaError> for ApiError {
    fn from(error: SagaError) -> Self {
        let (status, kind) = match &error {
            SagaError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            SagaError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            SagaError::WrongState { .. } | SagaError::LostOwnership { .. } => {
                (StatusCode::CONFLICT, "conflict")
            }
            SagaError::Store(e) if e.is_unavailable() => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError(status, kind, error.to_string())
    }
}

fn bad(detail: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_request", detail)
}

/// One line of the list.
pub fn summary(record: &SagaRecord) -> Value {
    let current = record
        .steps
        .iter()
        .rev()
        .find(|s| s.status != crate::log::StepStatus::Pending)
        .map(|s| s.name.clone());
    json!({
        "id": record.id,
        "name": record.name,
        "version": record.version,
        "state": record.state,
        "step": current,
        "error": record.error,
        "owner": record.owner,
        "created_at_ms": record.created_at_ms,
        "updated_at_ms": record.updated_at_ms,
        "elapsed_ms": record.elapsed_ms(),
    })
}

/// The record as the API shows it: with step durations.
pub fn detail(record: &SagaRecord) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(steps) = value.get_mut("steps").and_then(Value::as_array_mut) {
        for (step, record) in steps.iter_mut().zip(&record.steps) {
            let duration = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => json!(b.saturating_sub(a)),
                _ => Value::Null,
            };
            step["duration_ms"] = duration(record.started_at_ms, record.finished_at_ms);
            step["compensation_duration_ms"] = duration(
                record.compensation_started_at_ms,
                record.compensation_finished_at_ms,
            );
        }
    }
    value
}

async fn list(
    State(log): State<SagaLog>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| bad(format!("query string: {e}")))?;
    if let Some(unknown) = query
        .keys()
        .find(|k| !matches!(k.as_str(), "state" | "limit" | "after"))
    {
        return Err(bad(format!(
            "unknown query parameter {unknown:?}; known: state, limit, after"
        )));
    }
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(bad(format!(
                    "limit {text:?} is not a number from 1 to {MAX_LIMIT}"
                )));
            }
        },
    };
    let after = query.get("after").cloned();
    if let Some(after) = &after {
        validate_id(after).map_err(|e| bad(format!("after: {e}")))?;
    }
    let one_state = query.contains_key("state");
    let states: Vec<SagaState> = match query.get("state") {
        Some(state) => vec![state.parse::<SagaState>()?],
        None if after.is_some() => {
            return Err(bad("after needs a state (the cursor is per state)".into()));
        }
        None => SagaState::ALL.to_vec(),
    };
    let mut sagas = Vec::new();
    let mut next = None;
    for state in states {
        let room = limit - sagas.len();
        if room == 0 {
            break;
        }
        let (records, cursor) = log.list(state, room, after.clone()).await?;
        sagas.extend(records.iter().map(summary));
        if one_state {
            next = cursor;
        }
    }
    Ok(Json(json!({"sagas": sagas, "next": next})))
}

async fn show(State(log): State<SagaLog>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    validate_id(&id)?;
    let record = log
        .get(&id)
        .await?
        .ok_or(SagaError::NotFound { id: id.clone() })?;
    Ok(Json(detail(&record)))
}

async fn retry(
    State(log): State<SagaLog>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    validate_id(&id)?;
    let record = log.request_retry(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"saga_id": record.id, "state": record.state, "requested": "retry"})),
    ))
}

async fn abort(
    State(log): State<SagaLog>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    validate_id(&id)?;
    let record = log.abort(&id).await?;
    Ok(Json(json!({"saga_id": record.id, "state": record.state})))
}
