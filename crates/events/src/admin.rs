//! The admin HTTP API over a [`Transport`]: topics with their consumer groups' lag, for
//! the dashboard's Events page and for operators.
//!
//! - `GET /v1/events/topics` → [`TopicList`]: every topic with its partition count, its end
//!   offset (records ever appended, summed over partitions) and each group's lag.
//! - `GET /v1/events/topics/{topic}` → one [`TopicInfo`] with the per-partition figures
//!   ([`TopicInfo::end_offsets`], [`GroupLag::partitions`]).
//!
//! Lag of a group on a partition is `end offset − committed offset`. A partition the group
//! has committed nothing on has no lag figure (`null`, as Kafka's tools print `-`): where the
//! group starts there depends on its [`StartFrom`](crate::StartFrom), not on the log. A
//! group's `lag` sums its partitions that have one; `uncommitted_partitions` counts the
//! others.
//!
//! Errors are JSON `{"error": "..."}`: 400 for a malformed topic name, 404 for an unknown
//! topic, 503 when the transport could not answer (Kafka down), 500 otherwise.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}/doc.db", dir.path().display());
//! use std::sync::Arc;
//! use tower::ServiceExt;
//! use trellis_events::{EmbeddedTransport, Transport};
//!
//! let store = trellis_store::Store::open(&url).await?;
//! let transport = Arc::new(EmbeddedTransport::new(&store)?);
//! transport.ensure_topic("orders", 3).await?;
//! let app = trellis_events::admin_router(transport);
//! let request = http::Request::get("/v1/events/topics").body(axum::body::Body::empty())?;
//! let response = app.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! let body = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
//! let list: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(list["topics"][0]["name"], "orders");
//! assert_eq!(list["topics"][0]["partitions"], 3);
//! # Ok(()) }
//! ```

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::error::{EventError, Result, validate_name};
use crate::transport::Transport;

/// The routes above, to merge into the admin server's router.
pub fn admin_router(transport: Arc<dyn Transport>) -> Router {
    Router::new()
        .route("/v1/events/topics", get(list))
        .route("/v1/events/topics/{topic}", get(one))
        .with_state(transport)
}

/// The body of `GET /v1/events/topics`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopicList {
    /// `embedded` or `kafka`.
    pub transport: &'static str,
    /// Every topic, sorted by name.
    pub topics: Vec<TopicInfo>,
}

/// One topic.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// The next offset to be written, summed over partitions.
    pub end_offset: u64,
    /// Per partition (only in `GET /v1/events/topics/{topic}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_offsets: Option<Vec<u64>>,
    /// Consumer groups, sorted by name.
    pub groups: Vec<GroupLag>,
}

/// One consumer group's position on a topic.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupLag {
    /// Group name.
    pub group: String,
    /// Records not yet handled, summed over the partitions with a committed offset.
    pub lag: u64,
    /// Partitions the group has committed nothing on (no lag figure).
    pub uncommitted_partitions: u32,
    /// Per partition (only in `GET /v1/events/topics/{topic}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<PartitionLag>>,
}

/// One consumer group's position on one partition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionLag {
    /// Partition number.
    pub partition: u32,
    /// The next offset to be written.
    pub end_offset: u64,
    /// The group's committed next offset, if any.
    pub committed: Option<u64>,
    /// `end_offset − committed`, when committed.
    pub lag: Option<u64>,
}

/// `topic` with its groups' lag; per-partition figures when `detail`.
pub async fn topic_info(transport: &dyn Transport, topic: &str, detail: bool) -> Result<TopicInfo> {
    let ends = transport.end_offsets(topic).await?;
    let mut groups = Vec::new();
    for group in transport.groups(topic).await? {
        let committed = transport.committed(topic, &group).await?;
        let partitions: Vec<PartitionLag> = ends
            .iter()
            .enumerate()
            .map(|(p, &end)| {
                let committed = committed.get(p).copied().flatten();
                PartitionLag {
                    partition: p as u32,
                    end_offset: end,
                    committed,
                    lag: committed.map(|c| end.saturating_sub(c)),
                }
            })
            .collect();
        groups.push(GroupLag {
            group,
            lag: partitions.iter().filter_map(|p| p.lag).sum(),
            uncommitted_partitions: partitions.iter().filter(|p| p.lag.is_none()).count() as u32,
            partitions: detail.then_some(partitions),
        });
    }
    Ok(TopicInfo {
        name: topic.to_owned(),
        partitions: ends.len() as u32,
        end_offset: ends.iter().sum(),
        end_offsets: detail.then_some(ends),
        groups,
    })
}

/// Every topic of `transport` with its groups' lag.
pub async fn topic_list(transport: &dyn Transport) -> Result<TopicList> {
    let mut topics = Vec::new();
    for name in transport.topics().await? {
        match topic_info(transport, &name, false).await {
            Ok(info) => topics.push(info),
            // Deleted between the listing and the look-up.
            Err(EventError::UnknownTopic(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(TopicList {
        transport: transport.name(),
        topics,
    })
}

fn error(e: &EventError) -> Response {
    let status = match e {
        EventError::InvalidName { .. } => StatusCode::BAD_REQUEST,
        EventError::UnknownTopic(_) => StatusCode::NOT_FOUND,
        e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

async fn list(State(transport): State<Arc<dyn Transport>>) -> Response {
    match topic_list(&*transport).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => error(&e),
    }
}

async fn one(State(transport): State<Arc<dyn Transport>>, Path(topic): Path<String>) -> Response {
    if let Err(e) = validate_name("topic", &topic) {
        return error(&e);
    }
    match topic_info(&*transport, &topic, true).await {
        Ok(info) => Json(info).into_response(),
        Err(e) => error(&e),
    }
}
