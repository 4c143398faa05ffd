//! Route matching, path safety and prefix stripping.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use percent_encoding::percent_decode_str;
use trellis_resilience::balance::LoadBalancer as Balancer;
use trellis_resilience::breaker::{BreakerConfig, CircuitBreaker};
use trellis_resilience::ratelimit::{Quota, RateLimiter};

use crate::config::{GatewayConfig, RateLimitConfig, RouteConfig};
use crate::cors::Cors;
use crate::metrics::{GatewayMetrics, InstanceMetrics, RouteMetrics};

/// What a route forwards to: one instance's authority (`host:port`), with its metric
/// handles.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) authority: http::uri::Authority,
    /// `authority` as a `Host` header value.
    pub(crate) host: HeaderValue,
    pub(crate) metrics: Option<InstanceMetrics>,
}

/// A route ready for matching.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) config: RouteConfig,
    /// `config.path` and `config.service`, shared with the spans that record them.
    pub(crate) path_tag: Arc<str>,
    pub(crate) service_tag: Arc<str>,
    /// The path pattern without a trailing `/*` (empty for `/*`).
    prefix: String,
    wildcard: bool,
    methods: Vec<Method>,
    host: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Picks among the service's instances; rebuilt when the registry's view changes.
    pub(crate) balancer: Balancer<Upstream>,
    /// The registry generation `balancer` was last built from.
    pub(crate) synced: AtomicU64,
    pub(crate) breaker: Option<Arc<CircuitBreaker>>,
    pub(crate) hash_header: Option<HeaderName>,
    /// Rate-limit class, when rate limiting applies.
    pub(crate) rate_class: Option<String>,
    pub(crate) authenticate: bool,
    pub(crate) authorize: bool,
    /// The route's CORS, or the gateway's.
    pub(crate) cors: Option<Cors>,
    pub(crate) metrics: Option<RouteMetrics>,
}

/// All routes, most specific first, with the rate limiter their quotas live in.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    pub(crate) routes: Vec<Route>,
    pub(crate) limiter: Option<RateLimiter>,
}

fn quota(config: &RateLimitConfig) -> Option<Quota> {
    Quota::new(config.requests, config.window.get()).ok()
}

impl RouteTable {
    /// Compiles a validated gateway configuration's routes.
    pub(crate) fn from_config(config: &GatewayConfig, metrics: Option<&GatewayMetrics>) -> Self {
        Self::build(config, &config.routes, metrics)
    }

    /// Compiles validated route configs with the gateway's defaults.
    pub(crate) fn new(configs: &[RouteConfig], default_lb: crate::config::LoadBalancer) -> Self {
        let gateway = GatewayConfig {
            load_balancer: default_lb,
            ..GatewayConfig::default()
        };
        Self::build(&gateway, configs, None)
    }

    fn build(
        gateway: &GatewayConfig,
        configs: &[RouteConfig],
        metrics: Option<&GatewayMetrics>,
    ) -> Self {
        let global_rate = gateway
            .rate_limiting
            .as_ref()
            .filter(|r| r.enabled)
            .and_then(quota);
        let auth_enabled = gateway.authentication.as_ref().is_some_and(|a| a.enabled);
        let mut classes: Vec<(String, Quota)> = Vec::new();
        let default_lb = gateway.load_balancer;
        let mut routes: Vec<Route> = configs
            .iter()
            .enumerate()
            .map(|(index, config)| {
                let own_rate = config
                    .rate_limiting
                    .as_ref()
                    .filter(|r| r.enabled)
                    .and_then(quota);
                let rate_class =
                    if config.uses("rate_limiting", global_rate.is_some() || own_rate.is_some()) {
                        match own_rate {
                            Some(q) => {
                                let class = format!("route{index}");
                                classes.push((class.clone(), q));
                                Some(class)
                            }
                            None => global_rate.map(|_| "default".to_owned()),
                        }
                    } else {
                        None
                    };
                let load_balancer = config.load_balancer.unwrap_or(default_lb);
                let balancer = Balancer::builder(load_balancer.strategy())
                    .build()
                    .unwrap_or_else(|_| Balancer::new(load_balancer.strategy()));
                let breaker = config
                    .circuit_breaker
                    .as_ref()
                    .filter(|b| b.enabled)
                    .and_then(|b| {
                        let settings = BreakerConfig::default()
                            .threshold(b.threshold)
                            .open_timeout(b.timeout.get());
                        CircuitBreaker::new(format!("route {}", config.path), settings).ok()
                    })
                    .map(Arc::new);
                let (prefix, wildcard) = match config.path.strip_suffix("/*") {
                    Some(prefix) => (prefix.to_owned(), true),
                    None => (config.path.clone(), false),
                };
                Route {
                    path_tag: Arc::from(config.path.as_str()),
                    service_tag: Arc::from(config.service.as_str()),
                    prefix,
                    wildcard,
                    methods: config
                        .methods
                        .iter()
                        .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                        .collect(),
                    host: config.host.as_ref().map(|h| h.to_ascii_lowercase()),
                    headers: config
                        .headers
                        .iter()
                        .filter_map(|(k, v)| {
                            Some((
                                HeaderName::from_bytes(k.as_bytes()).ok()?,
                                HeaderValue::from_str(v).ok()?,
                            ))
                        })
                        .collect(),
                    balancer,
                    synced: AtomicU64::new(u64::MAX),
                    breaker,
                    hash_header: config
                        .hash_header
                        .as_ref()
                        .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                    rate_class,
                    authenticate: config.uses("authentication", auth_enabled),
                    authorize: config.authorization.is_some() && config.uses("authorization", true),
                    cors: config
                        .cors
                        .as_ref()
                        .or(gateway.cors.as_ref())
                        .map(Cors::new),
                    metrics: metrics.map(|m| m.route(&config.path, &config.service)),
                    config: config.clone(),
                }
            })
            .collect();
        // Longest prefix first; at equal length exact before wildcard, then routes with more
        // conditions first. The sort is stable: configuration order breaks remaining ties.
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(a.wildcard.cmp(&b.wildcard))
                .then(b.conditions().cmp(&a.conditions()))
        });
        let uses_limits = routes.iter().any(|r| r.rate_class.is_some());
        // The default quota is the gateway's; routes with their own use a class. When the
        // gateway sets none, no route uses the default, so any quota stands in for it.
        let default = global_rate.or_else(|| classes.first().map(|(_, q)| *q));
        let limiter = match default {
            Some(default) if uses_limits => {
                let mut builder = RateLimiter::builder(default);
                for (class, q) in classes {
                    builder = builder.class(class, q);
                }
                Some(builder.build())
            }
            _ => None,
        };
        RouteTable { routes, limiter }
    }

    /// The route for a request, if any.
    pub(crate) fn find(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&Route> {
        self.find_index(method, host, path, headers).map(|(_, r)| r)
    }

    /// The route for a request and its index in `routes`, if any.
    pub(crate) fn find_index(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(method, host, path, headers))
    }
}

impl Route {
    fn conditions(&self) -> usize {
        usize::from(!self.methods.is_empty())
            + usize::from(self.host.is_some())
            + self.headers.len()
    }

    fn matches(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> bool {
        let path_ok = if self.wildcard {
            path == self.prefix
                || (path.starts_with(self.prefix.as_str())
                    && path.as_bytes().get(self.prefix.len()) == Some(&b'/'))
        } else {
            path == self.prefix
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        if let Some(want) = &self.host {
            let got = host.map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name));
            if !got.is_some_and(|h| h.eq_ignore_ascii_case(want)) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, value)| headers.get(name) == Some(value))
    }

    /// The path forwarded upstream: `path` with the route's prefix stripped.
    pub(crate) fn upstream_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.config.strip_prefix {
            Some(strip) => {
                let strip = strip.trim_end_matches('/');
                match path.strip_prefix(strip) {
                    Some("") => "/".into(),
                    Some(rest) if rest.starts_with('/') => rest.into(),
                    // Not on a segment boundary: leave the path alone.
                    _ => path.into(),
                }
            }
            None => path.into(),
        }
    }
}

/// Why a request path is refused before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnsafePath(pub(crate) String);

/// Refuses paths that could escape a route's prefix or confuse an upstream: `.` and `..`
/// segments (in any percent-encoding), encoded `/` or `\` inside a segment, NUL and control
/// characters, and anything not starting with `/`.
pub(crate) fn check_path(path: &str) -> Result<(), UnsafePath> {
    if !path.starts_with('/') {
        return Err(UnsafePath(format!("path {path:?} must start with '/'")));
    }
    if is_plain(path) {
        return Ok(());
    }
    check_segments(path)
}

/// Most paths: printable ASCII without escapes (so each segment decodes to itself) and no
/// segment starting with '.' (each follows a '/'): nothing in [`check_segments`] can refuse
/// them.
fn is_plain(path: &str) -> bool {
    path.bytes().all(|b| b.is_ascii_graphic() && b != b'%') && !path.contains("/.")
}

/// [`check_path`]'s rules, segment by segment.
fn check_segments(path: &str) -> Result<(), UnsafePath> {
    for segment in path.split('/') {
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        if decoded == "." || decoded == ".." {
            return Err(UnsafePath(format!(
                "path segment {segment:?} ({decoded:?}) is not allowed"
            )));
        }
        if segment.contains('%') && (decoded.contains('/') || decoded.contains('\\')) {
            return Err(UnsafePath(format!(
                "path segment {segment:?} hides a path separator"
            )));
        }
        if decoded.chars().any(char::is_control) {
            return Err(UnsafePath(format!(
                "path segment {segment:?} contains a control character"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: Vec<RouteConfig>) -> RouteTable {
        RouteTable::new(&routes, crate::config::LoadBalancer::RoundRobin)
    }

    fn find<'a>(t: &'a RouteTable, method: &str, path: &str) -> Option<&'a str> {
        t.find(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            None,
            path,
            &HeaderMap::new(),
        )
        .map(|r| r.config.service.as_str())
    }

    #[test]
    fn most_specific_route_wins() {
        let t = table(vec![
            RouteConfig::new("/*", "fallback"),
            RouteConfig::new("/api/*", "api"),
            RouteConfig::new("/api/users/*", "users"),
            RouteConfig::new("/api/users/me", "me"),
            RouteConfig::new("/api/orders/*", "orders-write").methods(&["POST"]),
            RouteConfig::new("/api/orders/*", "orders"),
        ]);
        assert_eq!(find(&t, "GET", "/api/users/42"), Some("users"));
        assert_eq!(find(&t, "GET", "/api/users"), Some("users"));
        assert_eq!(find(&t, "GET", "/api/users/me"), Some("me"));
        assert_eq!(
            find(&t, "GET", "/api/usersx"),
            Some("api"),
            "prefix only on a segment boundary"
        );
        assert_eq!(find(&t, "POST", "/api/orders/1"), Some("orders-write"));
        assert_eq!(find(&t, "GET", "/api/orders/1"), Some("orders"));
        assert_eq!(find(&t, "GET", "/other"), Some("fallback"));
        let none = table(vec![RouteConfig::new("/api/*", "api")]);
        assert_eq!(find(&none, "GET", "/"), None);
    }

    #[test]
    fn host_and_header_conditions() {
        let mut by_host = RouteConfig::new("/*", "admin");
        by_host.host = Some("admin.example.com".into());
        let mut by_header = RouteConfig::new("/*", "canary");
        by_header.headers.insert("x-canary".into(), "1".into());
        let t = table(vec![RouteConfig::new("/*", "web"), by_host, by_header]);
        let get = Method::GET;
        let mut headers = HeaderMap::new();
        assert_eq!(
            t.find(&get, Some("Admin.Example.com:8080"), "/", &headers)
                .unwrap()
                .config
                .service,
            "admin"
        );
        assert_eq!(
            t.find(&get, Some("www.example.com"), "/", &headers)
                .unwrap()
                .config
                .service,
            "web"
        );
        headers.insert("x-canary", HeaderValue::from_static("1"));
        assert_eq!(
            t.find(&get, None, "/", &headers).unwrap().config.service,
            "canary"
        );
    }

    #[test]
    fn prefix_stripping() {
        let t = table(vec![
            RouteConfig::new("/api/users/*", "users").strip_prefix("/api/users"),
        ]);
        let route = &t.routes[0];
        assert_eq!(route.upstream_path("/api/users/42"), "/42");
        assert_eq!(route.upstream_path("/api/users"), "/");
        assert_eq!(route.upstream_path("/api/users/"), "/");
        assert_eq!(route.upstream_path("/api/users/a/b"), "/a/b");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for ok in ["/", "/api/users/42", "/a%20b", "/a/b.c/..d", "/%2e%2e.txt"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "/api/users/../admin",
            "/api/users/%2e%2e/admin",
            "/api/users/%2E%2e/admin",
            "/api/users/.%2e/admin",
            "/api/users/./x",
            "/api/users/..%2f..%2fadmin",
            "/api/users/a%5cb",
            "/api/%00",
            "relative",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    /// The shortcut for plain paths agrees with the segment-by-segment rules on paths
    /// made of the characters that matter to them.
    #[test]
    fn plain_path_shortcut_agrees_with_the_rules() {
        let alphabet = [
            "/", ".", "%", "2", "e", "E", "f", "F", "5", "c", "0", "a", " ", "\\", "\u{1}",
            "\u{7f}", "é", "\u{85}", "~",
        ];
        // A fixed xorshift sequence: the same paths on every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut shortcut_taken = 0;
        for _ in 0..50_000 {
            let mut path = String::from("/");
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for i in 0..(x % 9) {
                path.push_str(alphabet[((x >> (6 + 5 * i)) % alphabet.len() as u64) as usize]);
            }
            let expected = check_segments(&path).is_ok();
            assert_eq!(check_path(&path).is_ok(), expected, "{path:?}");
            if is_plain(&path) {
                shortcut_taken += 1;
            }
        }
        assert!(shortcut_taken > 1_000, "{shortcut_taken}");
    }
}
