//! The gateway's configuration: the `[gateway]` table of `trellis up --config FILE` (the
//! seed's options in snake_case), parsed and validated here and nowhere else.
//!
//! ```toml
//! [gateway]
//! listen = "127.0.0.1:8080"
//! load_balancer = "round_robin"
//!
//! [[gateway.routes]]
//! path = "/api/users/*"
//! service = "user-service"
//! strip_prefix = "/api/users"
//! timeout = "30s"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use trellis_core::{HumanDuration, NameKind, validate_name};

/// Why a gateway configuration was rejected; names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse into the expected shape.
    #[error("gateway config: {0}")]
    Parse(String),
    /// A value was out of range; `key` is dotted (`routes[2].path`).
    #[error("gateway config {key}: {reason}")]
    Invalid {
        /// Where.
        key: String,
        /// Why.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// How an upstream instance is chosen for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Power of two choices on requests in flight.
    LeastRequest,
    /// In proportion to each instance's `weight` metadata (default 1) — blue-green splits.
    /// Under every balancer, weight 0 means no traffic, unless every instance has weight
    /// 0, in which case all count as 1.
    Weighted,
    /// By the hash of the route's `hash_header` value: one client sticks to one instance.
    ConsistentHash,
}

impl LoadBalancer {
    pub(crate) fn strategy(self) -> trellis_resilience::balance::Strategy {
        use trellis_resilience::balance::Strategy;
        match self {
            LoadBalancer::RoundRobin => Strategy::RoundRobin,
            LoadBalancer::Random => Strategy::Random,
            LoadBalancer::LeastRequest => Strategy::LeastRequest,
            LoadBalancer::Weighted => Strategy::Weighted,
            LoadBalancer::ConsistentHash => Strategy::ConsistentHash,
        }
    }
}

/// Which threads serve the gateway's connections: `workers = "auto"`, a number, or
/// `"runtime"`.
///
/// With threads, each one runs its own single-threaded tokio runtime and accepts
/// connections on its own listening socket (`SO_REUSEPORT`: the kernel spreads new
/// connections over them; the port is still refused when another process holds it), like
/// nginx's worker processes or Envoy's `--concurrency`: a connection and the upstream
/// connections its requests use stay on one thread, with no work stealing or cross-thread
/// wake-ups on the way. The gateway's own upstream HTTP/1.1 keep-alive connections are
/// pooled per thread (hyper-util's client, used for h2c, upgrades and
/// `inline_upstream_connections = false`, keeps one pool for all). Routes, balancers,
/// breakers, rate limits and metrics are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One thread per CPU the process may run on (`std::thread::available_parallelism`,
    /// which honours CPU affinity and cgroup quotas). The default.
    #[default]
    Auto,
    /// This many threads (1 to [`Workers::MAX`]).
    Threads(usize),
    /// No threads of its own: connections are tasks of the tokio runtime that started
    /// the gateway (spread over that runtime's threads). For embedding beside other work,
    /// and for tests that control time with `tokio::time::pause()`.
    Runtime,
}

impl Workers {
    /// The most threads a gateway runs.
    pub const MAX: usize = 1024;

    /// How many threads of its own the gateway runs; `None` for [`Workers::Runtime`].
    pub fn threads(self) -> Option<usize> {
        match self {
            Workers::Auto => Some(std::thread::available_parallelism().map_or(1, usize::from)),
            Workers::Threads(n) => Some(n),
            Workers::Runtime => None,
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Workers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "a number of threads (1 to {}), \"auto\" or \"runtime\"",
                    Workers::MAX
                )
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Workers, E> {
                match usize::try_from(n) {
                    Ok(n @ 1..=Workers::MAX) => Ok(Workers::Threads(n)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Workers, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Workers, E> {
                match text {
                    "auto" => Ok(Workers::Auto),
                    "runtime" => Ok(Workers::Runtime),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(text), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `rate_limiting = { enabled = true, requests = 1000, window = "1m" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Defaults to `true`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Requests admitted per window (also the burst).
    pub requests: u32,
    /// The window, e.g. `"1m"`.
    pub window: HumanDuration,
}

/// `circuit_breaker = { enabled = true, threshold = 5, timeout = "60s" }` — the seed's options.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Defaults to `true`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Consecutive failures (5xx, connect errors, timeouts) that open it. Defaults to 5.
    #[serde(default = "five")]
    pub threshold: u32,
    /// How long it stays open before letting a probe through. Defaults to 60 s.
    #[serde(default = "sixty_seconds")]
    pub timeout: HumanDuration,
}

fn yes() -> bool {
    true
}

fn five() -> u32 {
    5
}

fn sixty_seconds() -> HumanDuration {
    Duration::from_secs(60).into()
}

/// How the gateway talks to a route's upstream instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections (the default).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (no `Upgrade: h2c` dance): one
    /// multiplexed connection per instance. For gRPC and h2-only servers. Upgrade
    /// requests (WebSocket) still use HTTP/1.1.
    H2c,
}

/// `cors = { allowed_origins = ["https://app.example.com"], ... }` — Cross-Origin
/// Resource Sharing, at the gateway level or per route (a route's replaces the gateway's).
///
/// The gateway answers preflights (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`) itself — before authentication, which browsers do
/// not send on preflights — with 204 when the origin, method and headers are allowed and
/// 403 otherwise. On other requests from an allowed origin it adds
/// `Access-Control-Allow-Origin` (and `-Allow-Credentials`, `-Expose-Headers`); a
/// request from any other origin gets no CORS header at all (the upstream's own are
/// removed too, so the gateway is the one place CORS is decided).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed to call (`"https://app.example.com"`, scheme and host and optional
    /// port, compared case-insensitively), or `["*"]` for any.
    pub allowed_origins: Vec<String>,
    /// Methods a preflight may ask for. Defaults to `GET`, `HEAD`, `POST`.
    #[serde(default = "default_cors_methods")]
    pub allowed_methods: Vec<String>,
    /// Request headers a preflight may ask for (case-insensitive); `["*"]` allows any.
    /// Defaults to none beyond the CORS-safelisted ones.
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// Response headers scripts may read (`Access-Control-Expose-Headers`). Defaults to none.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether cookies and `Authorization` may be sent (`Access-Control-Allow-Credentials:
    /// true`); not allowed with the `"*"` origin. Defaults to `false`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight answer (`Access-Control-Max-Age`). Defaults
    /// to none (the browser's default, 5 s).
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
}

fn default_cors_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}

impl CorsConfig {
    /// CORS for `origins` with the defaults for everything else.
    pub fn new(origins: &[&str]) -> Self {
        CorsConfig {
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            allowed_methods: default_cors_methods(),
            allowed_headers: Vec::new(),
            expose_headers: Vec::new(),
            allow_credentials: false,
            max_age: None,
        }
    }

    /// Methods a preflight may ask for.
    #[must_use]
    pub fn allowed_methods(mut self, methods: &[&str]) -> Self {
        self.allowed_methods = methods.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    /// Request headers a preflight may ask for.
    #[must_use]
    pub fn allowed_headers(mut self, headers: &[&str]) -> Self {
        self.allowed_headers = headers.iter().map(|h| (*h).to_owned()).collect();
        self
    }

    /// Response headers scripts may read.
    #[must_use]
    pub fn expose_headers(mut self, headers: &[&str]) -> Self {
        self.expose_headers = headers.iter().map(|h| (*h).to_owned()).collect();
        self
    }

    /// Allows credentials.
    #[must_use]
    pub fn allow_credentials(mut self, allow: bool) -> Self {
        self.allow_credentials = allow;
        self
    }

    /// How long browsers may cache a preflight answer.
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age.into());
        self
    }

    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let any = self.allowed_origins.iter().any(|o| o == "*");
        if self.allowed_origins.is_empty() {
            return Err(invalid(
                format!("{key}.allowed_origins"),
                "is empty; list origins or \"*\"",
            ));
        }
        if any && self.allow_credentials {
            return Err(invalid(
                format!("{key}.allow_credentials"),
                "cannot be true with the \"*\" origin; list the origins",
            ));
        }
        for origin in self.allowed_origins.iter().filter(|o| *o != "*") {
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let ok = rest.is_some_and(|host| {
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            });
            if !ok {
                return Err(invalid(
                    format!("{key}.allowed_origins"),
                    format!("{origin:?} is not an origin like \"https://app.example.com\""),
                ));
            }
        }
        for method in &self.allowed_methods {
            if http::Method::from_bytes(method.as_bytes()).is_err()
                || method.to_ascii_uppercase() != *method
            {
                return Err(invalid(
                    format!("{key}.allowed_methods"),
                    format!("{method:?} is not an upper-case HTTP method"),
                ));
            }
        }
        for (field, names) in [
            ("allowed_headers", &self.allowed_headers),
            ("expose_headers", &self.expose_headers),
        ] {
            for name in names {
                if name != "*" && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(invalid(
                        format!("{key}.{field}"),
                        format!("{name:?} is not a header name"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Middleware a route can name in `middleware = [...]`.
pub const MIDDLEWARE: [&str; 3] = ["authentication", "authorization", "rate_limiting"];

/// The `[gateway]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address to listen on. Defaults to `127.0.0.1:8080`.
    pub listen: String,
    /// Default load balancer of the routes. Defaults to `round_robin`.
    pub load_balancer: LoadBalancer,
    /// Limits on what clients may send.
    pub limits: Limits,
    /// Rate limiting for every route that uses it; keyed by JWT subject, else the
    /// `x-api-key` header, else the client IP. Defaults to none.
    pub rate_limiting: Option<RateLimitConfig>,
    /// JWT authentication for every route that uses it. Defaults to none.
    pub authentication: Option<trellis_auth::JwtConfig>,
    /// CORS for every route without its own `cors`. Defaults to none (no CORS headers,
    /// `OPTIONS` forwarded like any request).
    pub cors: Option<CorsConfig>,
    /// Largest request body held in memory so that a retryable request can be sent again
    /// to another instance; larger bodies stream through and are never retried.
    /// Defaults to 64 KiB.
    pub retry_buffer_bytes: usize,
    /// Whether upstream HTTP/1.1 connections are spoken by the gateway's own client and
    /// driven by the task serving the request (no hand-off to a connection task; faster).
    /// `false` uses hyper-util's pooled client,
    /// one task per upstream connection. Upgrades and h2c always use the latter.
    /// Defaults to `true`.
    pub inline_upstream_connections: bool,
    /// Which threads serve connections (see [`Workers`]). Defaults to `"auto"`: one
    /// thread per CPU.
    pub workers: Workers,
    /// The routes, tried most specific first.
    pub routes: Vec<RouteConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            load_balancer: LoadBalancer::default(),
            limits: Limits::default(),
            rate_limiting: None,
            authentication: None,
            cors: None,
            retry_buffer_bytes: 64 * 1024,
            inline_upstream_connections: true,
            workers: Workers::Auto,
            routes: Vec::new(),
        }
    }
}

/// `[gateway.limits]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line and headers) in bytes; larger is answered 431.
    /// Defaults to 64 KiB.
    pub max_header_bytes: usize,
    /// Largest request body in bytes; larger is answered 413. Defaults to 10 MiB.
    pub max_body_bytes: u64,
    /// How long a client may take to send its request head. Defaults to 30 s.
    pub header_read_timeout: HumanDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30).into(),
        }
    }
}

/// One `[[gateway.routes]]` entry — the seed's `gateway.addRoute(path, options)`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `/exact/path`, or a prefix ending in `/*` (`/api/users/*` matches `/api/users` and
    /// everything below it).
    pub path: String,
    /// Registry service the route forwards to.
    pub service: String,
    /// Removed from the front of the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Only these methods (upper case); empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Only requests for this `Host` (port ignored).
    #[serde(default)]
    pub host: Option<String>,
    /// Only requests carrying these headers with these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Time limit of one upstream attempt. Defaults to 30 s.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Load balancer of this route; defaults to the gateway's.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Header whose value the `consistent_hash` balancer hashes.
    #[serde(default)]
    pub hash_header: Option<String>,
    /// Extra attempts on another instance after a connect error, a timeout or a
    /// 502/503/504, within the gateway's retry budget (20% of requests), for idempotent
    /// requests, requests carrying `x-trellis-retryable: true`, and any request when
    /// `retry_non_idempotent` is set — whose bodies fit in the gateway's
    /// `retry_buffer_bytes`. Defaults to 0.
    #[serde(default)]
    pub retries: u32,
    /// The route's circuit breaker.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Which of `authentication`, `authorization`, `rate_limiting` apply. Empty means every
    /// one configured at the gateway level (and `authorization` when the route has a rule).
    #[serde(default)]
    pub middleware: Vec<String>,
    /// Who may call the route (roles/scopes claims of the JWT); 403 otherwise.
    #[serde(default)]
    pub authorization: Option<trellis_auth::AuthzRule>,
    /// This route's own rate limit instead of the gateway's.
    #[serde(default)]
    pub rate_limiting: Option<RateLimitConfig>,
    /// Lets `retries` apply to non-idempotent requests (`POST`, `PATCH`) too, as if each
    /// carried `x-trellis-retryable: true`. Only for upstreams that deduplicate (an
    /// idempotency key). Defaults to `false`.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// HTTP/1.1 or h2c towards the upstream instances. Defaults to `http1`.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// This route's CORS instead of the gateway's.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
}

impl RouteConfig {
    /// A route forwarding `path` to `service`.
    pub fn new(path: impl Into<String>, service: impl Into<String>) -> Self {
        RouteConfig {
            path: path.into(),
            service: service.into(),
            strip_prefix: None,
            methods: Vec::new(),
            host: None,
            headers: BTreeMap::new(),
            timeout: None,
            load_balancer: None,
            hash_header: None,
            retries: 0,
            circuit_breaker: None,
            middleware: Vec::new(),
            authorization: None,
            rate_limiting: None,
            retry_non_idempotent: false,
            upstream_protocol: UpstreamProtocol::Http1,
            cors: None,
        }
    }

    /// Lets `retries` apply to non-idempotent requests.
    #[must_use]
    pub fn retry_non_idempotent(mut self, retry: bool) -> Self {
        self.retry_non_idempotent = retry;
        self
    }

    /// HTTP/1.1 or h2c towards the upstream.
    #[must_use]
    pub fn upstream_protocol(mut self, protocol: UpstreamProtocol) -> Self {
        self.upstream_protocol = protocol;
        self
    }

    /// This route's CORS.
    #[must_use]
    pub fn cors(mut self, cors: CorsConfig) -> Self {
        self.cors = Some(cors);
        self
    }

    /// Whether `middleware` applies to this route, given what the gateway configures.
    pub(crate) fn uses(&self, middleware: &str, configured_at_gateway: bool) -> bool {
        if self.middleware.is_empty() {
            configured_at_gateway
        } else {
            self.middleware.iter().any(|m| m == middleware)
        }
    }

    /// Extra attempts for retryable requests.
    #[must_use]
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The route's circuit breaker.
    #[must_use]
    pub fn circuit_breaker(mut self, threshold: u32, timeout: Duration) -> Self {
        self.circuit_breaker = Some(CircuitBreakerConfig {
            enabled: true,
            threshold,
            timeout: timeout.into(),
        });
        self
    }

    /// Which middleware apply.
    #[must_use]
    pub fn middleware(mut self, names: &[&str]) -> Self {
        self.middleware = names.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    /// Removes `prefix` before forwarding.
    #[must_use]
    pub fn strip_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.strip_prefix = Some(prefix.into());
        self
    }

    /// Time limit of one upstream attempt.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout.into());
        self
    }

    /// Only these methods.
    #[must_use]
    pub fn methods(mut self, methods: &[&str]) -> Self {
        self.methods = methods.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    /// The effective upstream timeout.
    pub fn upstream_timeout(&self) -> Duration {
        self.timeout.map_or(Duration::from_secs(30), |t| t.get())
    }
}

impl GatewayConfig {
    /// Parses a TOML document whose top level is the gateway table's content.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str::<GatewayConfig>(text)
            .map_err(|e| ConfigError::Parse(e.to_string().trim_end().to_owned()))?
            .validate()
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not an IP:PORT address: {e}", self.listen),
            )
        })
    }

    /// Checks every value; the error names the key.
    pub fn validate(self) -> Result<Self, ConfigError> {
        self.listen_addr()?;
        if let Some(rate) = &self.rate_limiting {
            check_rate("rate_limiting", rate)?;
        }
        if let Some(auth) = &self.authentication {
            auth.clone()
                .validate()
                .map_err(|e| invalid("authentication", e.to_string()))?;
        }
        if let Some(cors) = &self.cors {
            cors.validate("cors")?;
        }
        if let Workers::Threads(n) = self.workers
            && !(1..=Workers::MAX).contains(&n)
        {
            return Err(invalid(
                "workers",
                format!(
                    "{n} threads; give 1 to {}, \"auto\" or \"runtime\"",
                    Workers::MAX
                ),
            ));
        }
        if self.retry_buffer_bytes > 16 << 20 {
            return Err(invalid("retry_buffer_bytes", "at most 16777216 (16 MiB)"));
        }
        if self.limits.max_header_bytes < 8192 || self.limits.max_header_bytes > 1 << 20 {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("routes[{i}].{field}");
            let pattern = route.path.strip_suffix("/*").unwrap_or(&route.path);
            if !route.path.starts_with('/') || pattern.contains('*') || pattern.contains("..") {
                return Err(invalid(
                    key("path"),
                    format!(
                        "{:?} must start with '/' and may only end in '/*'",
                        route.path
                    ),
                ));
            }
            validate_name(NameKind::Service, &route.service)
                .map_err(|e| invalid(key("service"), e.to_string()))?;
            if let Some(prefix) = &route.strip_prefix
                && (!prefix.starts_with('/') || !pattern.starts_with(prefix.trim_end_matches('/')))
            {
                return Err(invalid(
                    key("strip_prefix"),
                    format!(
                        "{prefix:?} must start with '/' and be a prefix of the path {:?}",
                        route.path
                    ),
                ));
            }
            for method in &route.methods {
                if http::Method::from_bytes(method.as_bytes()).is_err()
                    || method.to_ascii_uppercase() != *method
                {
                    return Err(invalid(
                        key("methods"),
                        format!("{method:?} is not an upper-case HTTP method"),
                    ));
                }
            }
            for (name, value) in &route.headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || http::HeaderValue::from_str(value).is_err()
                {
                    return Err(invalid(
                        key("headers"),
                        format!("{name:?}: {value:?} is not a valid header"),
                    ));
                }
            }
            if route.upstream_timeout().is_zero() {
                return Err(invalid(key("timeout"), "must be greater than zero"));
            }
            if route.retries > 10 {
                return Err(invalid(key("retries"), "at most 10"));
            }
            for name in &route.middleware {
                if !MIDDLEWARE.contains(&name.as_str()) {
                    return Err(invalid(
                        key("middleware"),
                        format!("{name:?} is not one of {}", MIDDLEWARE.join(", ")),
                    ));
                }
            }
            if route.uses("authentication", self.authentication.is_some())
                && !route.middleware.is_empty()
                && self.authentication.as_ref().is_none_or(|a| !a.enabled)
            {
                return Err(invalid(
                    key("middleware"),
                    "uses authentication but the gateway has no enabled [gateway.authentication]",
                ));
            }
            if route.middleware.iter().any(|m| m == "authorization")
                && route.authorization.is_none()
            {
                return Err(invalid(
                    key("authorization"),
                    "the route uses authorization but has no rule",
                ));
            }
            if let Some(rule) = &route.authorization {
                rule.clone()
                    .validate()
                    .map_err(|e| invalid(key("authorization"), e.to_string()))?;
                if self.authentication.is_none() {
                    return Err(invalid(
                        key("authorization"),
                        "needs [gateway.authentication] to know who calls",
                    ));
                }
            }
            if let Some(rate) = &route.rate_limiting {
                check_rate(&key("rate_limiting"), rate)?;
            }
            if let Some(cors) = &route.cors {
                cors.validate(&key("cors"))?;
            }
            if let Some(breaker) = &route.circuit_breaker
                && (breaker.threshold == 0 || breaker.timeout.get().is_zero())
            {
                return Err(invalid(
                    key("circuit_breaker"),
                    "threshold and timeout must be greater than zero",
                ));
            }
            if route.load_balancer == Some(LoadBalancer::ConsistentHash)
                && route
                    .hash_header
                    .as_ref()
                    .is_none_or(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err())
            {
                return Err(invalid(
                    key("hash_header"),
                    "consistent_hash needs a valid header name to hash",
                ));
            }
        }
        Ok(self)
    }
}

fn check_rate(key: &str, rate: &RateLimitConfig) -> Result<(), ConfigError> {
    trellis_resilience::ratelimit::Quota::new(rate.requests, rate.window.get())
        .map(|_| ())
        .map_err(|e| invalid(key, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_shape() {
        let config = GatewayConfig::from_toml(
            r#"
            listen = "127.0.0.1:8080"
            load_balancer = "round_robin"
            [[routes]]
            path = "/api/users/*"
            service = "user-service"
            strip_prefix = "/api/users"
            timeout = "30s"
            [[routes]]
            path = "/api/orders/*"
            service = "order-service"
            methods = ["GET", "POST"]
            "#,
        )
        .unwrap();
        assert_eq!(config.routes.len(), 2);
        assert_eq!(config.routes[0].upstream_timeout(), Duration::from_secs(30));
    }

    #[test]
    fn workers_are_a_number_auto_or_runtime() {
        for (text, workers) in [
            ("", Workers::Auto),
            ("workers = \"auto\"", Workers::Auto),
            ("workers = 3", Workers::Threads(3)),
            ("workers = \"runtime\"", Workers::Runtime),
        ] {
            assert_eq!(
                GatewayConfig::from_toml(text).unwrap().workers,
                workers,
                "{text}"
            );
        }
        assert_eq!(Workers::Threads(3).threads(), Some(3));
        assert_eq!(Workers::Runtime.threads(), None);
        assert!(Workers::Auto.threads().is_some_and(|n| n >= 1));
        // The builder's value is checked like the file's.
        let err = GatewayConfig {
            workers: Workers::Threads(0),
            ..GatewayConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("workers") && err.contains("1 to 1024"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (text, needle) in [
            ("listen = \"x\"", "listen"),
            (
                "[[routes]]\npath = \"api\"\nservice = \"s\"",
                "routes[0].path",
            ),
            (
                "[[routes]]\npath = \"/a/*/b\"\nservice = \"s\"",
                "routes[0].path",
            ),
            (
                "[[routes]]\npath = \"/a/*\"\nservice = \"a/b\"",
                "routes[0].service",
            ),
            (
                "[[routes]]\npath = \"/a/*\"\nservice = \"s\"\nstrip_prefix = \"/b\"",
                "routes[0].strip_prefix",
            ),
            (
                "[[routes]]\npath = \"/a\"\nservice = \"s\"\nmethods = [\"get\"]",
                "routes[0].methods",
            ),
            (
                "[[routes]]\npath = \"/a\"\nservice = \"s\"\ntimeout = \"-1s\"",
                "negative",
            ),
            (
                "[[routes]]\npath = \"/a\"\nservice = \"s\"\ncolour = 1",
                "unknown field `colour`",
            ),
            ("load_balancer = \"fastest\"", "unknown variant `fastest`"),
            ("cors = { allowed_origins = [] }", "cors.allowed_origins"),
            (
                "cors = { allowed_origins = [\"app.example.com\"] }",
                "cors.allowed_origins",
            ),
            (
                "cors = { allowed_origins = [\"*\"], allow_credentials = true }",
                "cors.allow_credentials",
            ),
            (
                "[[routes]]\npath = \"/a\"\nservice = \"s\"\ncors = { allowed_origins = [\"*\"], allowed_methods = [\"get\"] }",
                "routes[0].cors.allowed_methods",
            ),
            (
                "[[routes]]\npath = \"/a\"\nservice = \"s\"\nupstream_protocol = \"h3\"",
                "unknown variant `h3`",
            ),
            ("retry_buffer_bytes = 99999999", "retry_buffer_bytes"),
            ("workers = 0", "invalid value: integer `0`"),
            ("workers = 2000", "1 to 1024"),
            ("workers = -2", "invalid value: integer `-2`"),
            ("workers = \"many\"", "invalid value: string \"many\""),
            ("workers = 1.5", "invalid type: floating point"),
        ] {
            let err = GatewayConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
