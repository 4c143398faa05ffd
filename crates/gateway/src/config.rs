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
}

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
    /// The routes, tried most specific first.
    pub routes: Vec<RouteConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            load_balancer: LoadBalancer::default(),
            limits: Limits::default(),
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
        }
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
        }
        Ok(self)
    }
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
        ] {
            let err = GatewayConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
