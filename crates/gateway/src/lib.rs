//! # trellis-gateway
//!
//! The API gateway (the seed's `APIGateway`): routes configured in TOML or with
//! [`RouteConfig`], upstream instances from the [`ServiceRegistry`](trellis_registry::ServiceRegistry)
//! snapshot, a load balancer per route, prefix stripping, `X-Forwarded-For`/`-Proto`/`-Host`,
//! request ids, limits on heads and bodies, per-route timeouts, retries within a budget,
//! circuit breakers, rate limits, JWT authentication and authorization, and JSON errors
//! (`{"error": "...", "detail": "..."}`): 400 unsafe path, 404 no route, 413 too large,
//! 502 upstream unreachable, 503 no healthy instance, 504 upstream timeout.
//!
//! HTTP/1.x towards clients is served by the gateway's own connection loop (httparse heads,
//! streaming bodies, one write per small answer); HTTP/2 with prior knowledge (h2c) and
//! protocol upgrades are handed to hyper. Towards upstreams: pooled keep-alive HTTP/1.1
//! connections spoken by the gateway's own client, driven by the task serving the request
//! with no hand-off to a connection task (`inline_upstream_connections`, on by default);
//! hyper-util's client for upgrades, h2c upstreams and when that option is off.
//!
//! ## Options beyond routing
//!
//! - **Worker threads** ([`Workers`], `workers = "auto"` by default): one thread per CPU,
//!   each with its own single-threaded tokio runtime, listening socket (`SO_REUSEPORT`) and
//!   pooled upstream connections, as nginx's workers or Envoy's `--concurrency`; routes,
//!   balancers, breakers, rate limits and metrics are shared. `workers = "runtime"` serves
//!   on the runtime that started the gateway instead.
//! - **Weights (blue-green, canary).** An instance's `weight` registry metadata (default 1)
//!   sets its share under the `weighted` balancer. `weight = "0"` takes an instance out of
//!   rotation under *every* balancer (the idle colour of a blue-green pair); when every
//!   instance of a service says 0, none is preferred and all count as 1.
//! - **Per-version upstream metrics** (with [`ApiGateway::with_metrics`]):
//!   `trellis_gateway_upstream_requests_total{service,version,status}` counts attempts sent
//!   to instances by their registry `version` (`unknown` when empty), `status` being the
//!   answer's class (`1xx`…`5xx`), `error` (no answer: refused, reset) or `timeout`;
//!   `trellis_gateway_upstream_request_duration_seconds{service,version}` is the time to
//!   the response head. The handles are looked up once per instance-set change, so a
//!   request only bumps atomics.
//! - **Distributed tracing** (with [`ApiGateway::with_tracer`]): a server span per
//!   request (route, service, instance, status; parent from incoming W3C or B3 headers, a
//!   new root when they are malformed) and a client span per upstream attempt whose context
//!   replaces the client's trace headers upstream.
//! - **CORS** ([`CorsConfig`]) at the gateway or per route: preflights answered by the
//!   gateway, no CORS header for origins not listed.
//! - **Retried bodies.** A route's `retries` apply to idempotent methods, to requests
//!   carrying `x-trellis-retryable: true` (or `1`), and to every method on routes with
//!   `retry_non_idempotent = true`. Their bodies are held in memory up to
//!   `retry_buffer_bytes` (64 KiB) so each attempt sends them whole; larger bodies stream
//!   through and are sent once.
//! - **WebSocket and other HTTP/1.1 upgrades** pass through: the upstream's `101` is relayed
//!   and bytes are copied both ways; the route `timeout` bounds the handshake only.
//! - **h2c upstreams**: `upstream_protocol = "h2c"` on a route speaks HTTP/2 with prior
//!   knowledge to its instances (gRPC, h2-only servers).
//! - **Request smuggling**: a request with both `Content-Length` and `Transfer-Encoding`
//!   is answered 400 and never forwarded, and the connection is closed.
//!
//! ```toml
//! [gateway]
//! listen = "127.0.0.1:8080"
//! retry_buffer_bytes = 65536
//! cors = { allowed_origins = ["https://app.example.com"], allow_credentials = true }
//!
//! [[gateway.routes]]
//! path = "/api/orders/*"
//! service = "order-service"
//! load_balancer = "weighted"
//! retries = 2
//! retry_non_idempotent = true
//!
//! [[gateway.routes]]
//! path = "/grpc/*"
//! service = "pricing"
//! upstream_protocol = "h2c"
//! ```
//!
//! It is not a TLS terminator (put it behind one or use the mesh), does not cache
//! responses, and does not translate between protocols (gRPC-Web, HTTP/1 ↔ h2 upgrades).
//!
//! ```no_run
//! # async fn run(registry: trellis_registry::ServiceRegistry) -> Result<(), trellis_gateway::GatewayError> {
//! use trellis_gateway::{ApiGateway, GatewayConfig, RouteConfig};
//! let mut config = GatewayConfig::default();
//! config.routes.push(RouteConfig::new("/api/users/*", "user-service").strip_prefix("/api/users"));
//! let gateway = ApiGateway::new(config, registry)?.start().await?;
//! println!("gateway on http://{}", gateway.local_addr());
//! # Ok(()) }
//! ```

mod config;
mod cors;
mod deadline;
mod h1;
mod metrics;
mod pool;
mod proxy;
mod route;
mod server;

pub use config::{
    CircuitBreakerConfig, ConfigError, CorsConfig, GatewayConfig, Limits, LoadBalancer, MIDDLEWARE,
    RateLimitConfig, RouteConfig, UpstreamProtocol, Workers,
};
pub use metrics::{GatewayInspector, GatewayMetrics};
pub use proxy::{Body, BoxError};
pub use server::{ApiGateway, GatewayError, RunningGateway};

/// Entry points for the fuzz targets in `fuzz/`; not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::OnceLock;

    use crate::config::{LoadBalancer, RouteConfig};
    use crate::route::{RouteTable, check_path};

    fn table() -> &'static RouteTable {
        static TABLE: OnceLock<RouteTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            let routes = [
                RouteConfig::new("/api/users/*", "users").strip_prefix("/api/users"),
                RouteConfig::new("/api/orders/*", "orders").strip_prefix("/api/orders/"),
                RouteConfig::new("/api/*", "api")
                    .strip_prefix("/api")
                    .methods(&["GET", "POST"]),
                RouteConfig::new("/exact", "exact").strip_prefix("/exact"),
                RouteConfig::new("/*", "fallback"),
            ];
            RouteTable::new(&routes, LoadBalancer::RoundRobin)
        })
    }

    /// Follows HTTP/1.1 request framing over `input` read in pieces of `step` bytes, as the
    /// gateway's HTTP/1 server does; returns the position of the first request carrying both
    /// `Content-Length` and `Transfer-Encoding`.
    pub fn ambiguous_request(input: &[u8], step: usize) -> Option<u64> {
        crate::h1::ambiguous_position(input, step)
    }

    /// Checks `path`, routes it, and returns the path that would be forwarded upstream
    /// (`None` when refused or unrouted).
    pub fn route_and_strip(method: &str, path: &str) -> Option<String> {
        check_path(path).ok()?;
        let method = http::Method::from_bytes(method.as_bytes()).ok()?;
        let route = table().find(&method, None, path, &http::HeaderMap::new())?;
        Some(route.upstream_path(path).into_owned())
    }
}
