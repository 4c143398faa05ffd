//! # trellis-admin
//!
//! The admin server and the node behind `trellis up`: a JSON HTTP API over the registry,
//! the configuration manager, health and metrics, so services written in any language can
//! register, heartbeat, discover and read their configuration.
//!
//! | method and path | what |
//! |---|---|
//! | `PUT /v1/services/{service}/instances/{id}` | register (body: `host`, `port`, `version`, `metadata`, `health_check {endpoint, interval}`, `ttl`) |
//! | `PUT /v1/services/{service}/instances/{id}/heartbeat` | heartbeat |
//! | `DELETE /v1/services/{service}/instances/{id}` | deregister |
//! | `GET /v1/services` | names with instance counts |
//! | `GET /v1/services/{service}/instances` | instances with `status` |
//! | `GET /v1/config/{service}?env=E` | `{"version": N, "config": {…}}` |
//! | `PUT /v1/config/{service}?env=E[&expected_version=N]` | store a new version |
//! | `GET /v1/config/{service}/history?env=E` | every version |
//! | `POST /v1/config/{service}/rollback?env=E&version=N` | restore N as a new version |
//! | `GET /v1/config/{service}/watch?env=E&after=N&timeout=30s` | long poll for the next version |
//! | `GET /health`, `/health/live`, `/health/ready` | health |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /dashboard/` (`/` redirects there) | the admin dashboard (see [`dashboard_router`]) |
//!
//! Durations in bodies are a number of milliseconds or a string such as `"500ms"`, `"10s"`,
//! `"1m"`, `"1h"`. Errors are `{"error": "...", "detail": "..."}`: 400 for bad input (the
//! detail names the field), 404 unknown, 409 version conflict, 503 store unavailable.
//!
//! Instances registered through a node are leased by that node while it runs (as with a
//! Consul agent): when the node dies they disappear within their ttl.
//!
//! ```no_run
//! # async fn run() -> Result<(), trellis_admin::NodeError> {
//! let node = trellis_admin::Node::start(trellis_admin::Settings::default()).await?;
//! println!("admin API on http://{}", node.admin_addr());
//! node.shutdown().await?;
//! # Ok(()) }
//! ```

mod api;
mod dashboard;
mod error;
mod metrics;
mod node;
mod settings;

pub use api::{AdminState, MAX_BODY_BYTES, router};
pub use dashboard::{DASHBOARD_PATH, dashboard_router};
pub use error::ApiError;
pub use metrics::{Metrics, StoreMetricsLayer, StoreMetricsService};
pub use node::{GatewayNode, Node, NodeError};
pub use settings::{
    AdminSettings, ConfigSettings, DEFAULT_ADMIN_ADDR, DEFAULT_STORE_URL, EventsSettings,
    RegistrySettings, Settings, SettingsError, StoreSettings,
};
