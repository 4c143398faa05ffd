//! # Trellis
//!
//! A toolkit for microservices that find each other, talk to each other safely, stay
//! consistent and ship — on one laptop with zero set-up (a SQLite file), and on a real
//! cluster with the same code and another URL.
//!
//! This crate re-exports the parts; each lives in a small crate of its own:
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`store`] | `trellis-store` | tables with partition/clustering keys, TTL, compare-and-set, atomic batches, typed models, tower middleware |
//! | [`registry`] | `trellis-registry` | register, heartbeat, discover, watch; leases; active health checks; stale-tolerant snapshot |
//! | [`health`] | `trellis-health` | named checks with timeouts, aggregate status, `/health` endpoints |
//! | [`config`] | `trellis-config` | versioned, typed configuration per service and environment, history, rollback, watch |
//! | [`admin`] | `trellis-admin` | the JSON admin API and the node behind `trellis up` |
//! | [`tracing`] | `trellis-tracing` | distributed tracing: spans, W3C/B3 propagation, sampling, trace buffer, OTLP export (feature `otlp`) |
//! | [`events`] | `trellis-events` | event bus (embedded log in the store; Kafka with feature `kafka`), consumer groups, transactional outbox, idempotency |
//! | [`client`] | `trellis-client` | `ServiceClient`: discovery, load balancing, breakers, retries, deadlines, trace context |
//! | [`gateway`] | `trellis-gateway` | the API gateway: routes, JWT, authorization, rate limits, weighted splits, metrics |
//! | [`auth`] | `trellis-auth` | JWT verification and authorization rules |
//! | [`resilience`] | `trellis-resilience` | circuit breakers, retries with budgets, rate limits, load balancers, timeouts |
//! | [`saga`] | `trellis-saga` | saga orchestrator with a durable log, compensation, recovery |
//! | [`deploy`] | `trellis-deploy` | deploy specs, Kubernetes/Docker/ECS rendering, the local platform, blue-green |
//! | [`mesh`] | `trellis-mesh` | Istio, Linkerd and Consul resources from one policy |
//! | [`service`] | (this crate) | a service process's environment (`PORT`, `TRELLIS_*`, `OTEL_*`), a server span per request, graceful shutdown |
//! | [`core`] | `trellis-core` | human-readable durations, validated names |
//!
//! Every module is behind a feature of the same name, all on by default; `otlp` (OTLP
//! export of spans), `kafka` (the Kafka transport) and `cassandra` (the Cassandra store
//! backend) are opt-in because they pull heavy dependencies.
//!
//! What it is not: a framework that owns `main` — services are ordinary axum/tokio
//! programs that use these parts.
//!
//! ## One service, end to end
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}/trellis.db", dir.path().display());
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use trellis::config::{ConfigOptions, ConfigurationManager};
//! use trellis::health::{ServiceHealthMonitor, StoreCheck};
//! use trellis::registry::{Instance, RegistryOptions, ServiceRegistry};
//! use trellis::store::Store;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Features { email_verification: bool, social_login: bool }
//!
//! let store = Store::open(&url).await?; // "cassandra://…" at scale
//!
//! // Health: the monitor's verdict becomes the instance's status in the registry.
//! let monitor = ServiceHealthMonitor::builder("user-service")
//!     .check("database", StoreCheck::new(store.clone()))
//!     .build();
//! let registry = ServiceRegistry::start(&store, RegistryOptions::default()).await?;
//! registry
//!     .register_with_monitor(
//!         "user-service",
//!         Instance::new("user-service-1", "127.0.0.1", 3001).version("1.2.0"),
//!         monitor,
//!     )
//!     .await?;
//! assert_eq!(registry.discover("user-service").len(), 1);
//!
//! // Configuration: typed, with defaults, versioned.
//! let config = ConfigurationManager::new(&store, ConfigOptions::for_environment("production"))?;
//! config.set_config("user-service", "production", serde_json::json!({"social_login": true})).await?;
//! let features = config
//!     .get_config("user-service", Features { email_verification: true, social_login: false })
//!     .await?;
//! assert!(features.email_verification && features.social_login);
//!
//! registry.shutdown().await?;
//! # Ok(()) }
//! ```

pub use trellis_core as core;
pub use trellis_store as store;

#[cfg(feature = "admin")]
pub use trellis_admin as admin;
#[cfg(feature = "auth")]
pub use trellis_auth as auth;
#[cfg(feature = "client")]
pub use trellis_client as client;
#[cfg(feature = "config")]
pub use trellis_config as config;
#[cfg(feature = "deploy")]
pub use trellis_deploy as deploy;
#[cfg(feature = "events")]
pub use trellis_events as events;
#[cfg(feature = "gateway")]
pub use trellis_gateway as gateway;
#[cfg(feature = "health")]
pub use trellis_health as health;
#[cfg(feature = "mesh")]
pub use trellis_mesh as mesh;
#[cfg(feature = "registry")]
pub use trellis_registry as registry;
#[cfg(feature = "resilience")]
pub use trellis_resilience as resilience;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "saga")]
pub use trellis_saga as saga;
#[cfg(feature = "tracing")]
pub use trellis_tracing as tracing;
