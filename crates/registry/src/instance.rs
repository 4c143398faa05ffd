//! What an instance is: the description given to `register` and the record `discover` returns.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_core::{HumanDuration, NameKind, validate_name};

use crate::error::RegistryError;

/// Health of an instance as the registry knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Its checks pass.
    Healthy,
    /// Its checks fail.
    Unhealthy,
    /// Nothing known yet (no check configured and no heartbeat received).
    #[default]
    Unknown,
}

impl InstanceStatus {
    /// The lowercase name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Healthy => "healthy",
            InstanceStatus::Unhealthy => "unhealthy",
            InstanceStatus::Unknown => "unknown",
        }
    }
}

/// The seed's `healthCheck: { endpoint, interval }`: an HTTP endpoint the registering process
/// polls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// A path on the instance (`/health`) or a full `http://` URL.
    pub endpoint: String,
    /// How often to check; defaults to the registry's `health_check_interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
}

/// An instance to register — the seed's `register('user-service', { id, host, port, … })`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Unique id within the service.
    pub id: String,
    /// Host name or IP address clients connect to.
    pub host: String,
    /// TCP port, 1–65535.
    pub port: u16,
    /// Version of the running code (`1.2.0`), for version-filtered discovery.
    #[serde(default)]
    pub version: String,
    /// Free-form labels (`region`, `database`, …).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Active HTTP health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// Lease length for this instance; defaults to the registry's `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<HumanDuration>,
}

/// Longest accepted host, version, metadata key or value, in bytes.
const MAX_FIELD: usize = 253;
/// Most metadata entries per instance.
const MAX_METADATA: usize = 64;

impl Instance {
    /// An instance with an id, host and port; other fields empty.
    pub fn new(id: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        Instance {
            id: id.into(),
            host: host.into(),
            port,
            version: String::new(),
            metadata: BTreeMap::new(),
            health_check: None,
            ttl: None,
        }
    }

    /// Sets the version.
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds a metadata label.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the active HTTP health check.
    #[must_use]
    pub fn health_check(mut self, endpoint: impl Into<String>, interval: Duration) -> Self {
        self.health_check = Some(HealthCheckSpec {
            endpoint: endpoint.into(),
            interval: Some(HumanDuration(interval)),
        });
        self
    }

    /// Sets this instance's lease length.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(HumanDuration(ttl));
        self
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let invalid = |field: &'static str, reason: String| {
            Err(RegistryError::InvalidInstance { field, reason })
        };
        validate_name(NameKind::Instance, &self.id)?;
        if self.host.is_empty() {
            return invalid("host", "is empty".into());
        }
        if self.host.len() > MAX_FIELD
            || !self.host.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_' | '[' | ']')
            })
        {
            return invalid(
                "host",
                format!("{:?} is not a host name or IP address", cut(&self.host)),
            );
        }
        if self.port == 0 {
            return invalid("port", "0 is not a usable port; use 1-65535".into());
        }
        if self.version.len() > MAX_FIELD {
            return invalid(
                "version",
                format!("{} bytes long; at most {MAX_FIELD}", self.version.len()),
            );
        }
        if self.metadata.len() > MAX_METADATA {
            return invalid(
                "metadata",
                format!("{} entries; at most {MAX_METADATA}", self.metadata.len()),
            );
        }
        for (key, value) in &self.metadata {
            if key.is_empty() || key.len() > MAX_FIELD || value.len() > MAX_FIELD {
                return invalid(
                    "metadata",
                    format!(
                        "entry {:?}: keys must be 1-{MAX_FIELD} bytes, values at most {MAX_FIELD}",
                        cut(key)
                    ),
                );
            }
        }
        if let Some(check) = &self.health_check {
            let endpoint = &check.endpoint;
            if !(endpoint.starts_with('/') || endpoint.starts_with("http://"))
                || endpoint.len() > 2048
            {
                return invalid(
                    "health_check.endpoint",
                    format!(
                        "{:?} must be a path starting with '/' or an http:// URL",
                        cut(endpoint)
                    ),
                );
            }
            if let Some(interval) = check.interval
                && interval.get() < Duration::from_millis(10)
            {
                return invalid(
                    "health_check.interval",
                    format!("{interval} is too short; at least 10ms"),
                );
            }
        }
        if let Some(ttl) = self.ttl
            && ttl.get() < Duration::from_millis(100)
        {
            return invalid("ttl", format!("{ttl} is too short; at least 100ms"));
        }
        Ok(())
    }

    /// The URL the active health check polls, if any.
    pub fn health_url(&self) -> Option<String> {
        let check = self.health_check.as_ref()?;
        if check.endpoint.starts_with("http://") {
            return Some(check.endpoint.clone());
        }
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        Some(format!("http://{host}:{}{}", self.port, check.endpoint))
    }
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A registered instance as stored and discovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Service name.
    pub service: String,
    /// The instance as registered.
    #[serde(flatten)]
    pub instance: Instance,
    /// Health as last determined.
    pub status: InstanceStatus,
    /// When the instance was registered (ms since the epoch).
    pub registered_at_ms: u64,
    /// When the row was last written (ms since the epoch).
    pub updated_at_ms: u64,
    /// Which process keeps the lease (`host:pid`).
    pub owner: String,
    /// When the lease runs out unless renewed (ms since the epoch); 0 when unknown.
    #[serde(default)]
    pub expires_at_ms: u64,
}

impl InstanceRecord {
    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.instance.host, self.instance.port)
    }

    /// True when the record says the same thing (ignoring lease and write times), so
    /// watchers are not woken by heartbeats.
    pub(crate) fn same_content(&self, other: &InstanceRecord) -> bool {
        self.service == other.service
            && self.instance == other.instance
            && self.status == other.status
            && self.owner == other.owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Instance {
        Instance::new("user-service-1", "127.0.0.1", 3001)
    }

    #[test]
    fn validation_names_the_field() {
        assert!(ok().validate().is_ok());
        let cases: Vec<(Instance, &str)> = vec![
            (Instance { port: 0, ..ok() }, "port"),
            (
                Instance {
                    host: String::new(),
                    ..ok()
                },
                "host",
            ),
            (
                Instance {
                    host: "a b".into(),
                    ..ok()
                },
                "host",
            ),
            (
                Instance {
                    id: "a/b".into(),
                    ..ok()
                },
                "instance id",
            ),
            (
                Instance {
                    id: String::new(),
                    ..ok()
                },
                "instance id is empty",
            ),
            (
                ok().health_check("health", Duration::from_secs(1)),
                "health_check.endpoint",
            ),
            (
                ok().health_check("/health", Duration::from_millis(1)),
                "health_check.interval",
            ),
            (ok().ttl(Duration::from_millis(1)), "ttl"),
        ];
        for (instance, needle) in cases {
            let err = instance.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn json_shape_and_durations() {
        let json = r#"{"id":"a","host":"localhost","port":3001,"version":"1.2.0",
            "metadata":{"region":"us-east-1"},"health_check":{"endpoint":"/health","interval":30000},"ttl":"1m"}"#;
        let instance: Instance = serde_json::from_str(json).unwrap();
        assert_eq!(
            instance
                .health_check
                .as_ref()
                .unwrap()
                .interval
                .unwrap()
                .get(),
            Duration::from_secs(30)
        );
        assert_eq!(instance.ttl.unwrap().get(), Duration::from_secs(60));
        assert_eq!(
            instance.health_url().unwrap(),
            "http://localhost:3001/health"
        );
        for (bad, needle) in [
            (r#"{"id":"a","host":"h","port":70000}"#, "70000"),
            (r#"{"id":"a","host":"h","port":"80"}"#, "invalid type"),
            (r#"{"id":"a","host":"h","port":1,"ttl":"-1s"}"#, "negative"),
            (
                r#"{"id":"a","host":"h","port":1,"colour":1}"#,
                "unknown field `colour`",
            ),
        ] {
            let err = serde_json::from_str::<Instance>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
