//! The node's settings: one TOML file (`trellis up --config FILE`), parsed and validated
//! here and nowhere else. Command-line flags and `TRELLIS_*` environment variables override
//! single fields (the CLI applies them).
//!
//! ```toml
//! [store]
//! url = "sqlite://./trellis-data/trellis.db"
//!
//! [admin]
//! listen = "127.0.0.1:9901"
//! # token = "…"            # required when listen is not a loopback address
//!
//! [registry]
//! ttl = "60s"
//! health_check_interval = "30s"
//!
//! [config]
//! environment = "production"
//! refresh_interval = "1s"
//!
//! [events]
//! bus = "embedded"          # or "kafka://127.0.0.1:9092" (needs the `kafka` feature)
//!
//! [tracing]                 # see trellis_tracing::TracingConfig
//! service_name = "trellis-node"
//! endpoint = "http://127.0.0.1:4318"
//! sampling_rate = 0.1
//! ```

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use trellis_core::{HumanDuration, NameKind, validate_name};
use trellis_registry::RegistryOptions;
use trellis_tracing::{TracingConfig, TracingError};

/// Default store: a SQLite file under the working directory.
pub const DEFAULT_STORE_URL: &str = "sqlite://./trellis-data/trellis.db";
/// Default admin address.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9901";

/// Why settings were rejected; names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML was malformed or had unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// File path.
        path: String,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// A value was out of range.
    #[error("config {key}: {reason}")]
    Invalid {
        /// Dotted key (`admin.listen`).
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// Everything `trellis up` needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where state lives.
    pub store: StoreSettings,
    /// The admin HTTP server.
    pub admin: AdminSettings,
    /// The service registry.
    pub registry: RegistrySettings,
    /// The configuration manager.
    pub config: ConfigSettings,
    /// The API gateway; absent means no gateway runs.
    pub gateway: Option<trellis_gateway::GatewayConfig>,
    /// Distributed tracing (`[tracing]`): spans of the gateway, the store and the node's
    /// own work, kept in memory for `/v1/traces` and exported over OTLP when `endpoint` is
    /// set. The standard `OTEL_*` variables override it (see
    /// [`Settings::tracing_config`]). Without the table tracing is off (`enabled = false`:
    /// no cost, trace headers pass through); a `[tracing]` table, even empty, turns it on
    /// with [`TracingConfig::default`] for the keys it leaves out.
    #[serde(default = "tracing_off")]
    pub tracing: TracingConfig,
    /// The event bus whose topics `/v1/events/topics` lists.
    pub events: EventsSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            store: StoreSettings::default(),
            admin: AdminSettings::default(),
            registry: RegistrySettings::default(),
            config: ConfigSettings::default(),
            gateway: None,
            tracing: tracing_off(),
            events: EventsSettings::default(),
        }
    }
}

/// `[tracing]` when the table is absent: off.
fn tracing_off() -> TracingConfig {
    TracingConfig {
        enabled: false,
        ..TracingConfig::default()
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Store URL. Defaults to `sqlite://./trellis-data/trellis.db`.
    pub url: String,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            url: DEFAULT_STORE_URL.into(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address to listen on. Defaults to `127.0.0.1:9901`.
    pub listen: String,
    /// Bearer token every request must carry (except liveness and readiness probes).
    /// Required when `listen` is not a loopback address. Defaults to none.
    pub token: Option<String>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: DEFAULT_ADMIN_ADDR.into(),
            token: None,
        }
    }
}

/// `[registry]`: see [`RegistryOptions`] for each knob.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Defaults to `service_registry`.
    pub registry_table: String,
    /// Defaults to 30 s.
    pub health_check_interval: HumanDuration,
    /// Defaults to 60 s.
    pub ttl: HumanDuration,
    /// Defaults to 100 ms.
    pub refresh_interval: HumanDuration,
    /// Defaults to 2.
    pub healthy_threshold: u32,
    /// Defaults to 3.
    pub unhealthy_threshold: u32,
    /// Defaults to 2 s.
    pub check_timeout: HumanDuration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        let d = RegistryOptions::default();
        RegistrySettings {
            registry_table: d.registry_table,
            health_check_interval: d.health_check_interval.into(),
            ttl: d.ttl.into(),
            refresh_interval: d.refresh_interval.into(),
            healthy_threshold: d.healthy_threshold,
            unhealthy_threshold: d.unhealthy_threshold,
            check_timeout: d.check_timeout.into(),
        }
    }
}

impl RegistrySettings {
    /// As registry options.
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            registry_table: self.registry_table.clone(),
            health_check_interval: self.health_check_interval.get(),
            ttl: self.ttl.get(),
            refresh_interval: self.refresh_interval.get(),
            healthy_threshold: self.healthy_threshold,
            unhealthy_threshold: self.unhealthy_threshold,
            check_timeout: self.check_timeout.get(),
        }
    }
}

/// `[events]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSettings {
    /// `embedded` (the log inside the node's store, shared by every service on the same
    /// SQLite file) or `kafka://host:port,…` (only in a build with the `kafka` feature of
    /// trellis-admin). Defaults to `embedded`.
    pub bus: String,
}

impl Default for EventsSettings {
    fn default() -> Self {
        EventsSettings {
            bus: "embedded".into(),
        }
    }
}

/// `[config]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigSettings {
    /// Defaults to `service_configs`.
    pub config_table: String,
    /// Environment used when a request names none. Defaults to `TRELLIS_ENV`, else
    /// `development`.
    pub environment: Option<String>,
    /// How often other processes' config writes are polled. Defaults to 1 s.
    pub refresh_interval: HumanDuration,
}

impl Default for ConfigSettings {
    fn default() -> Self {
        ConfigSettings {
            config_table: "service_configs".into(),
            environment: None,
            refresh_interval: std::time::Duration::from_secs(1).into(),
        }
    }
}

impl Settings {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Settings, SettingsError> {
        toml::from_str::<Settings>(text)
            .map_err(|e| SettingsError::Parse {
                path: origin.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            })?
            .validate()
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Settings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Checks every value; the error names the key.
    pub fn validate(self) -> Result<Settings, SettingsError> {
        self.admin_addr()?;
        if self.store.url.is_empty() {
            return Err(SettingsError::Invalid {
                key: "store.url",
                reason: "is empty".into(),
            });
        }
        if let Some(token) = &self.admin.token
            && token.len() < 16
        {
            return Err(SettingsError::Invalid {
                key: "admin.token",
                reason: "is shorter than 16 characters".into(),
            });
        }
        if let Some(env) = &self.config.environment {
            validate_name(NameKind::Environment, env).map_err(|e| SettingsError::Invalid {
                key: "config.environment",
                reason: e.to_string(),
            })?;
        }
        trellis_store::validate_table_name(&self.config.config_table).map_err(|e| {
            SettingsError::Invalid {
                key: "config.config_table",
                reason: e.to_string(),
            }
        })?;
        self.registry
            .options()
            .validate()
            .map_err(|e| SettingsError::Invalid {
                key: "registry",
                reason: e.to_string(),
            })?;
        if self.events.bus != "embedded" && !self.events.bus.starts_with("kafka://") {
            return Err(SettingsError::Invalid {
                key: "events.bus",
                reason: format!(
                    "{:?} is neither `embedded` nor a kafka://host:port URL",
                    self.events.bus
                ),
            });
        }
        if self.events.bus.starts_with("kafka://") && !cfg!(feature = "kafka") {
            return Err(SettingsError::Invalid {
                key: "events.bus",
                reason: "Kafka needs the `kafka` feature of trellis-admin, which this program was built without".into(),
            });
        }
        let tracing = self.tracing.validate().map_err(tracing_error)?;
        let gateway = match self.gateway {
            Some(gateway) => Some(gateway.validate().map_err(|e| SettingsError::Invalid {
                key: "gateway",
                reason: e.to_string(),
            })?),
            None => None,
        };
        Ok(Settings {
            gateway,
            tracing,
            ..self
        })
    }

    /// The `[tracing]` table with the process's `OTEL_*` variables applied
    /// ([`TracingConfig::with_env`]), validated; errors name `tracing.<field>` (or the
    /// variable).
    pub fn tracing_config(&self) -> Result<TracingConfig, SettingsError> {
        self.tracing_config_from(|key| std::env::var(key).ok())
    }

    /// Same as [`tracing_config`](Self::tracing_config) with the variables read through
    /// `lookup`.
    pub fn tracing_config_from(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<TracingConfig, SettingsError> {
        self.tracing
            .clone()
            .with_env_from(lookup)
            .and_then(TracingConfig::validate)
            .map_err(tracing_error)
    }

    /// The admin address, parsed.
    pub fn admin_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.admin
            .listen
            .parse()
            .map_err(|e| SettingsError::Invalid {
                key: "admin.listen",
                reason: format!("{:?} is not an IP:PORT address: {e}", self.admin.listen),
            })
    }
}

/// A tracing error as a settings error whose key is `tracing.<field>`.
fn tracing_error(error: TracingError) -> SettingsError {
    let key = match &error {
        TracingError::InvalidConfig { field, .. } => tracing_key(field),
        _ => "tracing",
    };
    let reason = match error {
        TracingError::InvalidConfig { reason, .. } => reason,
        other => other.to_string(),
    };
    SettingsError::Invalid { key, reason }
}

/// The dotted key of a `[tracing]` field (environment variables keep their own name).
fn tracing_key(field: &'static str) -> &'static str {
    match field {
        "enabled" => "tracing.enabled",
        "service_name" => "tracing.service_name",
        "endpoint" => "tracing.endpoint",
        "protocol" => "tracing.protocol",
        "sampling_rate" => "tracing.sampling_rate",
        "b3" => "tracing.b3",
        "buffer_spans" => "tracing.buffer_spans",
        "queue_size" => "tracing.queue_size",
        "max_batch" => "tracing.max_batch",
        "batch_interval" => "tracing.batch_interval",
        "export_timeout" => "tracing.export_timeout",
        other if other.starts_with("OTEL_") => other,
        _ => "tracing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        assert_eq!(Settings::from_toml("", "x").unwrap(), Settings::default());
        let s = Settings::from_toml(
            r#"
            [store]
            url = "sqlite:///tmp/x.db"
            [admin]
            listen = "127.0.0.1:9999"
            [registry]
            ttl = "10s"
            health_check_interval = 2000
            [config]
            environment = "staging"
            "#,
            "trellis.toml",
        )
        .unwrap();
        assert_eq!(s.registry.options().ttl.as_secs(), 10);
        assert_eq!(s.registry.options().health_check_interval.as_secs(), 2);
        assert_eq!(s.admin_addr().unwrap().port(), 9999);
        assert!(!s.tracing.enabled, "no [tracing] table: off");
        let on = Settings::from_toml("[tracing]", "trellis.toml").unwrap();
        assert_eq!(on.tracing, TracingConfig::default());
        assert!(on.tracing.enabled);
    }

    #[test]
    fn tracing_table_and_environment() {
        let s = Settings::from_toml(
            r#"
            [tracing]
            service_name = "edge"
            endpoint = "http://127.0.0.1:4318"
            sampling_rate = 0.1
            "#,
            "trellis.toml",
        )
        .unwrap();
        assert_eq!(s.tracing.service_name, "edge");
        assert_eq!(s.tracing.sampling_rate, 0.1);
        let env = |key: &str| match key {
            "OTEL_SERVICE_NAME" => Some("from-env".to_owned()),
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_owned()),
            _ => None,
        };
        let config = s.tracing_config_from(env).unwrap();
        assert_eq!(config.service_name, "from-env");
        assert_eq!(config.endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(config.sampling_rate, 0.1);
        let bad = |key: &str| (key == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "thrift".to_owned());
        let err = s.tracing_config_from(bad).unwrap_err().to_string();
        assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{err}");
        let bad = |key: &str| (key == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "nope".to_owned());
        let err = s.tracing_config_from(bad).unwrap_err().to_string();
        assert!(err.contains("tracing.endpoint"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        for (text, needle) in [
            ("[admin]\nlisten = \"nowhere\"", "admin.listen"),
            ("[registry]\nttl = \"-5s\"", "negative"),
            ("[registry]\nttl = \"soon\"", "not a duration"),
            ("[store]\nurl = 5", "invalid type"),
            ("[stor]\nurl = \"x\"", "unknown field `stor`"),
            ("[registry]\ncolour = 1", "unknown field `colour`"),
            ("[config]\nenvironment = \"a/b\"", "config.environment"),
            ("[registry]\nttl = \"50ms\"", "ttl"),
            ("[admin]\ntoken = \"short\"", "admin.token"),
            ("[admin", "unclosed table"),
            ("[gateway]\nlisten = \"x\"", "gateway"),
            (
                "[[gateway.routes]]\npath = \"/a/*\"\nservice = \"a/b\"",
                "routes[0].service",
            ),
            (
                "[tracing]\nsampling_rate = 1.5",
                "config tracing.sampling_rate: 1.5",
            ),
            (
                "[tracing]\nservice_name = \"\"",
                "config tracing.service_name",
            ),
            (
                "[tracing]\nendpoint = \"localhost:4318\"",
                "config tracing.endpoint",
            ),
            ("[tracing]\nqueue_size = 0", "config tracing.queue_size"),
            (
                "[tracing]\nbatch_interval = \"0s\"",
                "config tracing.batch_interval",
            ),
            (
                "[tracing]\nsample_rate = 0.5",
                "unknown field `sample_rate`",
            ),
            (
                "[tracing]\nprotocol = \"thrift\"",
                "unknown variant `thrift`",
            ),
            ("[tracing]\nsampling_rate = \"half\"", "invalid type"),
        ] {
            let err = Settings::from_toml(text, "trellis.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
