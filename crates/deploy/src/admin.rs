//! The deployments' admin HTTP API, for the Trellis admin server: the
//! [records](crate::records) every [`ServiceDeployer`](crate::ServiceDeployer) sharing the
//! store writes, as the dashboard's Deployments page reads them.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/deployments?namespace=NS` | `{"deployments": [record…]}`, most recently updated first; without `namespace`, every namespace |
//! | `GET /v1/deployments/{service}?namespace=NS` | the service's record; without `namespace`, the one namespace it is deployed in (400 naming them when several) |
//!
//! A record is `{"service", "namespace", "platform", "strategy", "state", "current_version",
//! "new_version", "traffic": [{"version", "weight"}], "decisions": [{"at_ms", "action",
//! "version", "requests", "errors", "error_rate", "p99_ms", "reason"}], "error",
//! "started_at_ms", "updated_at_ms"}`.
//!
//! Errors are `{"error": KIND, "detail": MESSAGE}` like the rest of the admin API: a stored
//! value that is not a record is `500 malformed_record` naming its key; a store that cannot
//! be reached is `503 unavailable`.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use trellis_store::{Store, StoreError};

use crate::error::DeployError;
use crate::records::{DeploymentRecord, DeploymentRecords, decode};

/// The routes above, with full paths (`/v1/deployments…`): merge them into the admin router
/// (`AdminState::with_routes`), behind its authentication.
pub fn admin_router(store: Store) -> Router {
    Router::new()
        .route("/v1/deployments", get(list))
        .route("/v1/deployments/{service}", get(show))
        .with_state(DeploymentRecords::new(store))
}

/// An error answer.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1, "detail": self.2}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let (status, kind) = if error.is_unavailable() {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        } else {
            (StatusCode::INTERNAL_SERVER_ERROR, "store")
        };
        ApiError(
            status,
            kind,
            format!("reading the deployment records: {error}"),
        )
    }
}

impl From<DeployError> for ApiError {
    fn from(error: DeployError) -> Self {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "malformed_record",
            error.to_string(),
        )
    }
}

fn bad(detail: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_request", detail)
}

/// The `namespace` parameter, the only one known.
fn namespace(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Option<String>, ApiError> {
    let Query(query) = query.map_err(|e| bad(format!("query string: {e}")))?;
    if let Some(unknown) = query.keys().find(|k| k.as_str() != "namespace") {
        return Err(bad(format!(
            "unknown query parameter {unknown:?}; known: namespace"
        )));
    }
    Ok(query.get("namespace").cloned())
}

async fn records(
    records: &DeploymentRecords,
    namespace: Option<&str>,
) -> Result<Vec<DeploymentRecord>, ApiError> {
    let mut found = Vec::new();
    for row in records.rows().await? {
        let record = decode(&row)?;
        if namespace.is_none_or(|ns| ns == record.namespace) {
            found.push(record);
        }
    }
    Ok(found)
}

async fn list(
    State(store): State<DeploymentRecords>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let namespace = namespace(query)?;
    let mut found = records(&store, namespace.as_deref()).await?;
    found.sort_by(|a, b| {
        b.updated_at_ms
            .cmp(&a.updated_at_ms)
            .then_with(|| a.key().cmp(&b.key()))
    });
    Ok(Json(json!({ "deployments": found })))
}

async fn show(
    State(store): State<DeploymentRecords>,
    Path(service): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let namespace = namespace(query)?;
    let mut found: Vec<DeploymentRecord> = records(&store, namespace.as_deref())
        .await?
        .into_iter()
        .filter(|r| r.service == service)
        .collect();
    match found.len() {
        0 => Err(ApiError(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no deployment of {service:?}{} is recorded",
                namespace
                    .map(|ns| format!(" in namespace {ns:?}"))
                    .unwrap_or_default()
            ),
        )),
        1 => Ok(Json(json!(found.remove(0)))),
        _ => Err(bad(format!(
            "{service:?} is deployed in several namespaces ({}); add ?namespace=NS",
            found
                .iter()
                .map(|r| r.namespace.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
