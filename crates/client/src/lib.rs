//! # trellis-client
//!
//! [`ServiceClient`] — the seed's inter-service client: call another service by name, and
//! let the client find its instances in the registry, spread the load, and cope with the
//! ones that fail.
//!
//! - **Discovery.** Instances come from the [`ServiceRegistry`](trellis_registry::ServiceRegistry)
//!   snapshot on every call (a memory read): unhealthy instances are skipped, instances
//!   not checked yet (`unknown`) are used.
//! - **Load balancing.** One [`LoadBalancer`](trellis_resilience::balance::LoadBalancer) per
//!   client — round robin by default, or random, least request, weighted (the `weight`
//!   metadata of an instance) or consistent hash — with passive outlier ejection.
//! - **Circuit breakers.** One per instance; an instance whose breaker is open is passed
//!   over, and when all are open the call fails at once with [`ClientError::CircuitOpen`].
//! - **Timeouts and deadlines.** A call takes at most `timeout` (10 s), retries included,
//!   or less when the caller's [`CallContext`] deadline comes sooner; each request tells
//!   the callee how long is left (`x-trellis-deadline-ms`).
//! - **Retries.** Only idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE) or requests
//!   marked [`retryable`](RequestBuilder::retryable); on connection errors, timeouts of one
//!   attempt and 502/503/504; exponential backoff with full jitter, within a retry budget
//!   (retries ≤ 20 % of requests); never after the response was handed to the caller.
//! - **Trace context.** `traceparent`, `tracestate` and `baggage` of the request being
//!   served are passed on ([`CallContext::scope`] or [`RequestBuilder::context`]). With a
//!   [`tracer`](ServiceClientBuilder::tracer), every attempt is a client span (instance,
//!   attempt, status or failure) and its context is what the instance receives.
//! - **Errors** say what happened: [`ClientError::Timeout`], `CircuitOpen`,
//!   `NoHealthyInstance`, `Connect`, `Status` (with the start of the body), `Body`,
//!   `ResponseTooLarge`, `Decode` (serde's message), `InvalidRequest`.
//!
//! It speaks plain HTTP/1.1 to instances (no TLS, no HTTP/2: the workspace builds reqwest
//! without them), buffers request bodies (so they can be re-sent) and does not follow
//! redirects. Without a tracer it creates no trace ids or spans, and costs nothing for them.
//!
//! ## Why not a stack of tower layers
//!
//! The resilience crate's layers are generic over the request; this client uses the same
//! parts — [`LoadBalancer`](trellis_resilience::balance::LoadBalancer),
//! [`CircuitBreaker`](trellis_resilience::breaker::CircuitBreaker),
//! [`RetryBudget`](trellis_resilience::retry::RetryBudget),
//! [`Backoff`](trellis_resilience::retry::Backoff), [`is_idempotent`](trellis_resilience::http::is_idempotent) —
//! in one loop, because each attempt must pick its instance (and that instance's breaker)
//! anew, and because the loop's result is one typed [`ClientError`] rather than a boxed
//! error to downcast.
//!
//! ## Cost
//!
//! `cargo bench -p trellis-client --bench overhead` compares a `ServiceClient` GET with a
//! raw reqwest GET to the same local axum server in the same run (sequential requests,
//! body read, the clients taking turns request by request). On the shared 2-core
//! development VM the client adds 1.3–2.0 µs at the median to a ~30 µs loopback round
//! trip: 1.04–1.07× (target ≤ 1.10×); means, which the VM's scheduling outliers dominate,
//! 1.05–1.10×. Most of the difference is the snapshot check, the pick and breaker
//! bookkeeping, the deadline header, and the per-attempt timer — which would cost another
//! ~1.5 µs if each call registered a fresh tokio timer (see `timer.rs`: timers are reused).
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! use axum::{Json, Router, routing::get};
//! use trellis_client::{ClientError, ServiceClient};
//! use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
//! use trellis_store::Store;
//!
//! // An order service on 127.0.0.1, registered in the registry.
//! let app = Router::new().route("/users/{id}/orders", get(|| async { Json(vec!["o-1", "o-2"]) }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let port = listener.local_addr()?.port();
//! tokio::spawn(async move { axum::serve(listener, app).await });
//! let store = Store::open(&format!("sqlite://{}/doc.db", dir.path().display())).await?;
//! let registry = ServiceRegistry::start(&store, RegistryOptions::default()).await?;
//! registry.register("order-service", Instance::new("order-1", "127.0.0.1", port)).await?;
//!
//! // The seed's `orderServiceClient.get(`/users/${userId}/orders`)`.
//! let orders = ServiceClient::new("order-service", &registry)?;
//! let list: Vec<String> = orders.get_json("/users/42/orders").await?;
//! assert_eq!(list, ["o-1", "o-2"]);
//!
//! // Errors say what happened.
//! match orders.get("/nowhere").await {
//!     Err(ClientError::Status { status, .. }) => assert_eq!(status, 404),
//!     other => panic!("expected a 404, got {other:?}"),
//! }
//! let billing = ServiceClient::new("billing-service", &registry)?;
//! assert!(matches!(billing.get("/").await, Err(ClientError::NoHealthyInstance { .. })));
//! # registry.shutdown().await?;
//! # Ok(()) }
//! ```

mod client;
mod context;
mod endpoints;
mod error;
mod fixed;
mod request;
mod response;
mod timer;

pub use client::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_RETRIES, DEFAULT_TIMEOUT,
    ServiceClient, ServiceClientBuilder,
};
pub use context::{BAGGAGE, CallContext, DEADLINE_HEADER, TRACEPARENT, TRACESTATE};
pub use endpoints::WEIGHT_METADATA;
pub use error::{BuildError, ClientError, MAX_ERROR_BODY};
pub use fixed::{RequestHeaders, StaticEndpoint};
pub use request::RequestBuilder;
pub use response::ServiceResponse;
