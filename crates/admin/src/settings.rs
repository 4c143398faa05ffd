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
//! ```

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use trellis_core::{HumanDuration, NameKind, validate_name};
use trellis_registry::RegistryOptions;

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
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
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
        let gateway = match self.gateway {
            Some(gateway) => Some(gateway.validate().map_err(|e| SettingsError::Invalid {
                key: "gateway",
                reason: e.to_string(),
            })?),
            None => None,
        };
        Ok(Settings { gateway, ..self })
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
        ] {
            let err = Settings::from_toml(text, "trellis.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
