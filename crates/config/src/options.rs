//! Options of a [`ConfigurationManager`](crate::ConfigurationManager), and the one place
//! this crate reads the process environment.

use std::time::Duration;

/// Environment variable naming the environment a process runs in (`production`,
/// `staging`, …): the seed's `process.env.NODE_ENV`. Read only by
/// [`ConfigOptions::default`].
pub const ENV_VAR: &str = "TRELLIS_ENV";

/// The environment used when [`ENV_VAR`] is unset or empty.
pub const DEFAULT_ENVIRONMENT: &str = "development";

/// The table used by default.
pub const DEFAULT_TABLE: &str = "service_configs";

/// The refresh interval used by default.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How a [`ConfigurationManager`](crate::ConfigurationManager) stores and watches
/// configuration: the seed's `{ configTable, environment, refreshInterval }`.
///
/// Checked by [`ConfigurationManager::new`](crate::ConfigurationManager::new).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOptions {
    /// Table holding every service's configuration versions (`[a-z][a-z0-9_]*`).
    /// Defaults to `service_configs`.
    pub config_table: String,
    /// The environment of this process, used by
    /// [`get_config`](crate::ConfigurationManager::get_config) and
    /// [`watch`](crate::ConfigurationManager::watch). Defaults to `$TRELLIS_ENV`, or
    /// `development` when that is unset or empty.
    pub environment: String,
    /// How often writes made by other processes are looked for, while something watches.
    /// Writes made through the same manager wake watchers at once. Must be more than zero.
    /// Defaults to 1 s.
    pub refresh_interval: Duration,
}

impl Default for ConfigOptions {
    /// The defaults listed on each field; reads [`ENV_VAR`] once.
    fn default() -> Self {
        let environment = std::env::var(ENV_VAR)
            .ok()
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
        ConfigOptions {
            config_table: DEFAULT_TABLE.to_owned(),
            environment,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
        }
    }
}

impl ConfigOptions {
    /// The defaults, with the environment given explicitly instead of read from
    /// [`ENV_VAR`].
    pub fn for_environment(environment: impl Into<String>) -> Self {
        ConfigOptions {
            config_table: DEFAULT_TABLE.to_owned(),
            environment: environment.into(),
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        // The environment comes from TRELLIS_ENV, which tests leave alone.
        let options = ConfigOptions::default();
        assert_eq!(options.config_table, "service_configs");
        assert_eq!(options.refresh_interval, Duration::from_secs(1));
        assert!(!options.environment.is_empty());
        let explicit = ConfigOptions::for_environment("production");
        assert_eq!(explicit.environment, "production");
        assert_eq!(explicit.config_table, options.config_table);
    }
}
