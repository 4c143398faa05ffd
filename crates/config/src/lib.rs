//! # trellis-config
//!
//! The seed's `ConfigurationManager`: versioned JSON configuration per **service** and
//! **environment**, kept in a [`trellis_store::Store`] so that every process sharing the
//! store sees the same configuration.
//!
//! - **Typed reads with defaults**: [`ConfigurationManager::get_config`] merges the stored
//!   document over your defaults (RFC 7386 merge patch, so a document only holds what
//!   differs) and deserializes it into your type.
//! - **Validated writes**: documents are JSON objects; with
//!   [`ConfigurationManager::register_type`], a write whose document does not fit the
//!   service's type is rejected with the field path (`cache.ttl: invalid type: …`) and
//!   changes nothing.
//! - **History and rollback**: every write is a new immutable [`ConfigVersion`] 1, 2, 3, …;
//!   [`ConfigurationManager::rollback`] restores an old document as a new version.
//!   [`ConfigurationManager::set_config_if`] writes only on top of an expected version.
//! - **Watch**: [`ConfigWatch::next`] delivers every version in order, with no gaps and no
//!   repeats — at once for writes made through the same manager, within
//!   [`ConfigOptions::refresh_interval`] for writes made by other processes.
//!   [`ConfigurationManager::watch_with`] is the seed's callback form.
//!
//! It is not a secret store (documents are stored as plain JSON), not a file or
//! environment-variable loader for a process's own startup settings, and it does not
//! restart services: watchers decide what a new version means for them.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}/doc.db", dir.path().display());
//! use serde::{Deserialize, Serialize};
//! use serde_json::json;
//! use trellis_config::{ConfigOptions, ConfigurationManager};
//! use trellis_store::Store;
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Cache { enabled: bool, ttl: u64 }
//! #[derive(Debug, Serialize, Deserialize)]
//! struct UserService { keyspace: String, cache: Cache }
//!
//! let defaults = || UserService {
//!     keyspace: "users".into(),
//!     cache: Cache { enabled: true, ttl: 3600 },
//! };
//! let store = Store::open(&url).await?;
//! let configs = ConfigurationManager::new(&store, ConfigOptions::for_environment("production"))?;
//! configs.register_type("user-service", defaults());
//!
//! // Nothing stored yet: the defaults.
//! let config = configs.get_config("user-service", defaults()).await?;
//! assert_eq!(config.cache.ttl, 3600);
//!
//! let mut watch = configs.watch("user-service");
//! configs.set_config("user-service", "production", json!({"cache": {"ttl": 60}})).await?;
//! // Merged over the defaults: `cache.enabled` and `keyspace` keep their default.
//! let config = configs.get_config("user-service", defaults()).await?;
//! assert_eq!((config.cache.ttl, config.cache.enabled), (60, true));
//! assert_eq!(watch.next().await?.version, 1);
//!
//! // A document that does not fit the registered type changes nothing.
//! let err = configs
//!     .set_config("user-service", "production", json!({"cache": {"ttl": "soon"}}))
//!     .await
//!     .unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     r#"config for user-service rejected at cache.ttl: invalid type: string "soon", expected u64"#
//! );
//!
//! configs.set_config("user-service", "production", json!({"cache": {"ttl": 5}})).await?;
//! let restored = configs.rollback("user-service", "production", 1).await?;
//! assert_eq!((restored.version, restored.rolled_back_from), (3, Some(1)));
//! assert_eq!(configs.history("user-service", "production").await?.len(), 3);
//! assert_eq!(watch.next().await?.version, 2);
//! assert_eq!(watch.next().await?.version, 3);
//! # Ok(()) }
//! ```
//!
//! # Storage layout
//!
//! One table ([`ConfigOptions::config_table`]); one partition per service and environment,
//! `"{service}/{environment}"` (names are checked with [`trellis_core::validate_name`], so
//! they never contain `/`). In it, clustering key `v{version:020}` holds each
//! [`ConfigVersion`] as JSON and `head` holds `{"version": N}`. A write is one atomic,
//! conditional [`Store::batch`](trellis_store::Store::batch) inside that partition — move
//! the head from N to N+1 if nobody else did, insert version N+1 if absent — which works
//! the same on SQLite and on Cassandra's lightweight transactions. A writer that lost the
//! race re-reads the head and tries again.

mod error;
mod manager;
mod options;
mod schema;
mod version;
mod watch;

pub use error::ConfigError;
pub use manager::ConfigurationManager;
pub use options::{
    ConfigOptions, DEFAULT_ENVIRONMENT, DEFAULT_REFRESH_INTERVAL, DEFAULT_TABLE, ENV_VAR,
};
pub use version::ConfigVersion;
pub use watch::{ConfigWatch, WatchHandle};
