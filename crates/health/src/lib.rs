//! # trellis-health
//!
//! Health monitoring for a Trellis service (the seed's `ServiceHealthMonitor`): named async
//! checks of the service's dependencies, run concurrently, each bounded by a timeout,
//! aggregated into one [`HealthReport`] and served over HTTP.
//!
//! - A check is anything implementing [`HealthCheck`] — a closure via [`check_fn`], or the
//!   built-ins [`StoreCheck`] (the store answers a ping), [`HttpCheck`] (a URL returns 2xx)
//!   and [`TcpCheck`] (a port accepts connections).
//! - Each check is **critical** or not ([`CheckOptions`]): all passing is
//!   [`Healthy`](HealthStatus::Healthy), only non-critical failures is
//!   [`Degraded`](HealthStatus::Degraded), any critical failure is
//!   [`Unhealthy`](HealthStatus::Unhealthy). A check that times out or panics counts as
//!   failed; it never takes the monitor down.
//! - Reports are cached for a short TTL and concurrent callers share one evaluation, so a
//!   burst of probes does not become a burst of database pings.
//! - [`ServiceHealthMonitor::router`] serves `GET /health` (200 when serving, 503 when
//!   unhealthy, the report as JSON), `GET /health/live` (no checks) and `GET /health/ready`
//!   (the readiness switch [`ServiceHealthMonitor::set_ready`] plus the report).
//!
//! It is not a metrics system, an alerting system or a watchdog: it keeps no history, runs
//! checks only when asked (by a probe or by [`ServiceHealthMonitor::check`]), and does not
//! restart anything. It does not register services either — the registry asks it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use trellis_health::{CheckOptions, HealthStatus, ServiceHealthMonitor, check_fn};
//!
//! let monitor = ServiceHealthMonitor::builder("orders")
//!     .check("database", check_fn(|| async { Ok(()) }))
//!     .check_with(
//!         "recommendations",
//!         CheckOptions::default().critical(false).timeout(Duration::from_millis(500)),
//!         check_fn(|| async { Err("recommendations: 503 Service Unavailable".to_owned()) }),
//!     )
//!     .build();
//!
//! let report = monitor.check().await;
//! assert_eq!(report.status, HealthStatus::Degraded); // only a non-critical check failed
//! assert!(report.status.is_serving()); // so GET /health answers 200
//! assert_eq!(report.checks[1].error.as_deref(), Some("recommendations: 503 Service Unavailable"));
//!
//! // Serve it next to the service's own routes:
//! let app = axum::Router::new().merge(monitor.router());
//! // axum::serve(tokio::net::TcpListener::bind("0.0.0.0:8080").await?, app).await?;
//! # drop(app);
//! # }
//! ```

mod builtin;
mod check;
mod monitor;
mod report;
mod routes;

pub use builtin::{HttpCheck, StoreCheck, TcpCheck};
pub use check::{CheckOptions, HealthCheck, check_fn};
pub use monitor::{HealthMonitorBuilder, ServiceHealthMonitor};
pub use report::{CheckResult, HealthReport, HealthStatus};
