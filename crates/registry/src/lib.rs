//! # trellis-registry
//!
//! The service registry (the seed's `ServiceRegistry`): services register their instances,
//! find each other with [`ServiceRegistry::discover`], and follow changes with
//! [`ServiceRegistry::watch`].
//!
//! - **Leases.** An instance is stored with a TTL (`ttl`, default 60 s) and renewed by the
//!   process that registered it (every `health_check_interval`, default 30 s, at most ttl/2).
//!   When that process dies, the instance disappears within the ttl; on graceful shutdown
//!   it is removed at once.
//! - **Health.** An instance's status is `healthy`, `unhealthy` or `unknown`. With an HTTP
//!   `health_check` the registering process polls it: from `unknown` the first result
//!   decides, then `unhealthy_threshold` consecutive failures (default 3) turn it unhealthy
//!   and `healthy_threshold` consecutive successes (default 2) healthy again. With a
//!   [`trellis_health::ServiceHealthMonitor`] the monitor's report is the status. Otherwise
//!   heartbeats decide (a TTL check).
//! - **Snapshot.** Discovery never touches the store: every process keeps a snapshot,
//!   refreshed when the table's change marker moves (polled every `refresh_interval`, default
//!   100 ms), and keeps serving it — marked stale — when the store is unreachable.
//!
//! It is not a DNS server and does no load balancing: the gateway and the service client do.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}/doc.db", dir.path().display());
//! use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
//! use trellis_store::Store;
//!
//! let store = Store::open(&url).await?;
//! let registry = ServiceRegistry::start(&store, RegistryOptions::default()).await?;
//! registry
//!     .register("user-service", Instance::new("user-service-1", "127.0.0.1", 3001).version("1.2.0"))
//!     .await?;
//! let found = registry.discover("user-service");
//! assert_eq!(found.with_version("1.2.0").count(), 1);
//! registry.shutdown().await?;
//! # Ok(()) }
//! ```

mod error;
mod instance;
mod registry;
mod snapshot;

pub use error::RegistryError;
pub use instance::{HealthCheckSpec, Instance, InstanceRecord, InstanceStatus};
pub use registry::{Registration, RegistryOptions, ServiceRegistry};
pub use snapshot::{Discovery, RegistryWatch};
