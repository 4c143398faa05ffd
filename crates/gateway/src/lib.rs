//! # trellis-gateway
//!
//! The API gateway (the seed's `APIGateway`): routes configured in TOML or with
//! [`RouteConfig`], upstream instances from the [`ServiceRegistry`](trellis_registry::ServiceRegistry)
//! snapshot, a load balancer per route, prefix stripping, `X-Forwarded-For`/`-Proto`/`-Host`,
//! request ids, limits on heads and bodies, per-route timeouts, and JSON errors
//! (`{"error": "...", "detail": "..."}`): 400 unsafe path, 404 no route, 413 too large,
//! 502 upstream unreachable, 503 no healthy instance, 504 upstream timeout.
//!
//! Built on hyper: HTTP/1.1 and HTTP/2 (h2c) towards clients, pooled keep-alive connections
//! towards upstreams, streaming bodies.
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
mod metrics;
mod proxy;
mod route;
mod server;

pub use config::{
    CircuitBreakerConfig, ConfigError, GatewayConfig, Limits, LoadBalancer, MIDDLEWARE,
    RateLimitConfig, RouteConfig,
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

    /// Checks `path`, routes it, and returns the path that would be forwarded upstream
    /// (`None` when refused or unrouted).
    pub fn route_and_strip(method: &str, path: &str) -> Option<String> {
        check_path(path).ok()?;
        let method = http::Method::from_bytes(method.as_bytes()).ok()?;
        let route = table().find(&method, None, path, &http::HeaderMap::new())?;
        Some(route.upstream_path(path).into_owned())
    }
}
