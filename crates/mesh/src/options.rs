//! The seed's `ServiceMesh` options, read from TOML and validated in one place.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_core::HumanDuration;

use crate::error::{MeshError, invalid};
use crate::names::{check_dns_label, check_dns_subdomain};

/// Which service mesh the resources and annotations are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshProvider {
    /// Istio: `VirtualService`, `DestinationRule` and `Telemetry` resources.
    Istio,
    /// Linkerd 2.16 or later: a Gateway API `HTTPRoute` with Linkerd's retry and timeout
    /// annotations, failure-accrual annotations on the `Service`.
    Linkerd,
    /// Consul service mesh: `service-defaults`, `service-resolver` and `service-router`
    /// config entries.
    Consul,
}

impl MeshProvider {
    /// Every provider, in the order detection prefers them.
    pub const ALL: [MeshProvider; 3] = [
        MeshProvider::Istio,
        MeshProvider::Linkerd,
        MeshProvider::Consul,
    ];

    /// The lower-case name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            MeshProvider::Istio => "istio",
            MeshProvider::Linkerd => "linkerd",
            MeshProvider::Consul => "consul",
        }
    }
}

impl fmt::Display for MeshProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MeshProvider {
    type Err = MeshError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MeshProvider::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| MeshError::UnknownProvider(s.to_owned()))
    }
}

/// What the sidecar proxy adds to a workload (the seed's `sidecarConfig`). How each flag maps
/// onto each provider is in the crate docs; every flag defaults to `true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SidecarConfig {
    /// Let the proxy report spans. Defaults to `true`.
    pub inject_tracing: bool,
    /// Let the proxy expose (and merge) Prometheus metrics. Defaults to `true`.
    pub inject_metrics: bool,
    /// Let the proxy write access logs. Defaults to `true`.
    pub inject_logging: bool,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            inject_tracing: true,
            inject_metrics: true,
            inject_logging: true,
        }
    }
}

/// How the mesh retries a failed request (the seed's `retryPolicy`).
///
/// `attempts` counts retries after the first try, as Istio's `retries.attempts`, Linkerd's
/// `retry.linkerd.io/limit` and Consul's `NumRetries` do. The whole request, retries
/// included, is bounded by [`MeshPolicy::request_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try, 0 (no retries) to 10. Defaults to 3. Signed so that a
    /// negative value reaches validation, which names the key.
    pub attempts: i32,
    /// Time limit of each try, 1 ms to 1 h, whole milliseconds. Defaults to 10 s.
    pub per_try_timeout: HumanDuration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            per_try_timeout: HumanDuration(Duration::from_secs(10)),
        }
    }
}

/// When the mesh stops sending to a failing endpoint (the seed's `circuitBreaker`): after
/// `consecutive_errors` 5xx answers or connection failures in a row, the endpoint is ejected
/// for `interval` (longer on repeated ejections, as each provider does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive failures that eject an endpoint, 1 to 1000. Defaults to 5.
    pub consecutive_errors: i32,
    /// How often endpoints are analysed and the base ejection time, 1 ms to 1 h, whole
    /// milliseconds. Defaults to 30 s.
    pub interval: HumanDuration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            consecutive_errors: 5,
            interval: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// Connection limits towards the service (Istio `connectionPool`, Consul `Limits`; Linkerd
/// has no per-service equivalent). Not in the seed; the defaults are Envoy's own, so leaving
/// this section out changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionPool {
    /// Most connections to the service at once, at least 1. Defaults to 1024.
    pub max_connections: i32,
    /// Most requests waiting for a connection, at least 1. Defaults to 1024.
    pub max_pending_requests: i32,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            max_connections: 1024,
            max_pending_requests: 1024,
        }
    }
}

/// The traffic policy rendered for each provider (the seed's `policies`). Every section is
/// optional and defaults to the seed's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshPolicy {
    /// Retries and per-try timeout.
    pub retry_policy: RetryPolicy,
    /// Outlier detection / failure accrual.
    pub circuit_breaker: CircuitBreaker,
    /// Connection limits.
    pub connection_pool: ConnectionPool,
}

const MAX_ATTEMPTS: i32 = 10;
const MAX_CONSECUTIVE_ERRORS: i32 = 1000;
const MAX_POLICY_DURATION: Duration = Duration::from_secs(3600);

impl MeshPolicy {
    /// Reads a policy file: top-level `[retry_policy]`, `[circuit_breaker]` and
    /// `[connection_pool]` tables, then [validates](Self::validate) it.
    pub fn from_toml(text: &str) -> Result<Self, MeshError> {
        let policy: MeshPolicy = toml::from_str(text)
            .map_err(|e| MeshError::Parse(e.to_string().trim_end().to_owned()))?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks every value; the error names the key (`retry_policy.attempts: …`).
    pub fn validate(&self) -> Result<(), MeshError> {
        self.validate_at("")
    }

    pub(crate) fn validate_at(&self, prefix: &str) -> Result<(), MeshError> {
        let key = |k: &str| format!("{prefix}{k}");
        let retry = &self.retry_policy;
        if !(0..=MAX_ATTEMPTS).contains(&retry.attempts) {
            return Err(invalid(
                key("retry_policy.attempts"),
                format!(
                    "{} is out of range; use 0 (no retries) to {MAX_ATTEMPTS}",
                    retry.attempts
                ),
            ));
        }
        check_policy_duration(&key("retry_policy.per_try_timeout"), retry.per_try_timeout)?;
        let breaker = &self.circuit_breaker;
        if !(1..=MAX_CONSECUTIVE_ERRORS).contains(&breaker.consecutive_errors) {
            return Err(invalid(
                key("circuit_breaker.consecutive_errors"),
                format!(
                    "{} is out of range; use 1 to {MAX_CONSECUTIVE_ERRORS}",
                    breaker.consecutive_errors
                ),
            ));
        }
        check_policy_duration(&key("circuit_breaker.interval"), breaker.interval)?;
        for (name, value) in [
            (
                "connection_pool.max_connections",
                self.connection_pool.max_connections,
            ),
            (
                "connection_pool.max_pending_requests",
                self.connection_pool.max_pending_requests,
            ),
        ] {
            if value < 1 {
                return Err(invalid(key(name), format!("{value} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The bound on a whole request, retries included: `per_try_timeout × (attempts + 1)`.
    /// Rendered as Istio's route `timeout`, Linkerd's `timeout.linkerd.io/request` and
    /// Consul's `RequestTimeout`, so every provider gives up at the same moment.
    pub fn request_timeout(&self) -> Duration {
        let tries = u32::try_from(self.retry_policy.attempts.max(0)).unwrap_or(0) + 1;
        self.retry_policy.per_try_timeout.get() * tries
    }
}

fn check_policy_duration(field: &str, value: HumanDuration) -> Result<(), MeshError> {
    let d = value.get();
    if d < Duration::from_millis(1) || d > MAX_POLICY_DURATION {
        return Err(invalid(
            field,
            format!("{value} is out of range; use 1ms to 1h"),
        ));
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(invalid(
            field,
            format!("{value} is not a whole number of milliseconds"),
        ));
    }
    Ok(())
}

/// The whole `[mesh]` configuration: the seed's `ServiceMesh` options plus where the services
/// live. Build a [`ServiceMesh`](crate::ServiceMesh) from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// The mesh (`provider = "istio"`). Required.
    pub provider: MeshProvider,
    /// Kubernetes namespace of the services. Defaults to `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The cluster's DNS domain. Defaults to `cluster.local`.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// What the sidecar adds.
    #[serde(default)]
    pub sidecar_config: SidecarConfig,
    /// The traffic policy.
    #[serde(default)]
    pub policies: MeshPolicy,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_cluster_domain() -> String {
    "cluster.local".to_owned()
}

impl MeshConfig {
    /// A config for `provider` with every other option at its default.
    pub fn new(provider: MeshProvider) -> Self {
        MeshConfig {
            provider,
            namespace: default_namespace(),
            cluster_domain: default_cluster_domain(),
            sidecar_config: SidecarConfig::default(),
            policies: MeshPolicy::default(),
        }
    }

    /// Reads the table's content from TOML and [validates](Self::validate) it.
    pub fn from_toml(text: &str) -> Result<Self, MeshError> {
        let config: MeshConfig = toml::from_str(text)
            .map_err(|e| MeshError::Parse(e.to_string().trim_end().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the key (`policies.circuit_breaker.interval: …`).
    pub fn validate(&self) -> Result<(), MeshError> {
        check_dns_label(&self.namespace).map_err(|r| invalid("namespace", r))?;
        check_dns_subdomain(&self.cluster_domain).map_err(|r| invalid("cluster_domain", r))?;
        self.policies.validate_at("policies.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_defaults() {
        let config = MeshConfig::from_toml("provider = \"istio\"").unwrap();
        assert_eq!(config.namespace, "default");
        assert_eq!(config.policies.retry_policy.attempts, 3);
        assert_eq!(
            config.policies.retry_policy.per_try_timeout.get(),
            Duration::from_secs(10)
        );
        assert_eq!(config.policies.circuit_breaker.consecutive_errors, 5);
        assert_eq!(config.policies.request_timeout(), Duration::from_secs(40));
        assert!(config.sidecar_config.inject_logging);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "provider = \"istio\"\n[policies.retry_policy]\nattempts = -1",
                "policies.retry_policy.attempts",
            ),
            (
                "provider = \"istio\"\n[policies.retry_policy]\nper_try_timeout = 0",
                "policies.retry_policy.per_try_timeout",
            ),
            (
                "provider = \"istio\"\n[policies.retry_policy]\nper_try_timeout = \"1.5ms\"",
                "policies.retry_policy.per_try_timeout",
            ),
            (
                "provider = \"linkerd\"\n[policies.circuit_breaker]\nconsecutive_errors = 0",
                "policies.circuit_breaker.consecutive_errors",
            ),
            (
                "provider = \"consul\"\n[policies.circuit_breaker]\ninterval = \"2h\"",
                "policies.circuit_breaker.interval",
            ),
            (
                "provider = \"consul\"\n[policies.connection_pool]\nmax_connections = 0",
                "policies.connection_pool.max_connections",
            ),
            ("provider = \"consul\"\nnamespace = \"Prod\"", "namespace"),
            (
                "provider = \"consul\"\ncluster_domain = \"-x.local\"",
                "cluster_domain",
            ),
        ];
        for (text, field) in cases {
            let err = MeshConfig::from_toml(text).unwrap_err();
            assert_eq!(err.field(), Some(field), "{text}: {err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    #[test]
    fn parse_errors_name_the_key() {
        let err =
            MeshConfig::from_toml("provider = \"istio\"\n[sidecar_config]\ninject_tracng = true")
                .unwrap_err()
                .to_string();
        assert!(err.contains("inject_tracng"), "{err}");
        let err = MeshConfig::from_toml("provider = \"kuma\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kuma"), "{err}");
        let err = MeshConfig::from_toml("namespace = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("provider"), "{err}");
        let err = MeshPolicy::from_toml("[retry_policy]\nper_try_timeout = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a duration"), "{err}");
    }

    #[test]
    fn provider_names() {
        for p in MeshProvider::ALL {
            assert_eq!(p.as_str().parse::<MeshProvider>().unwrap(), p);
        }
        assert_eq!(
            "Istio".parse::<MeshProvider>().unwrap(),
            MeshProvider::Istio
        );
        assert_eq!(
            "kuma".parse::<MeshProvider>().unwrap_err().to_string(),
            "unknown mesh provider \"kuma\"; expected istio, linkerd or consul"
        );
    }
}
