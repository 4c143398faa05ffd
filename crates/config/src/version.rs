//! What is stored, and where.
//!
//! One partition per service and environment, `"{service}/{environment}"` (names never
//! contain `/`), so that the conditional batch of a write stays inside one partition — as
//! Cassandra requires. In it:
//!
//! - `v00000000000000000001`, `v…2`, …: one immutable [`ConfigVersion`] each, as JSON; the
//!   zero padding makes clustering-key order the version order;
//! - `head`: `{"version": N}`, the current version. A write moves the head from N to N+1
//!   and inserts version N+1 in one atomic batch, conditional on the head's row version and
//!   on version N+1 being absent, so versions have no gaps and no duplicates.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use trellis_store::{Row, StoreError};

/// One stored version of a service's configuration in one environment.
///
/// Versions are numbered from 1 without gaps and never change once written; a rollback
/// writes a new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigVersion {
    /// The service, e.g. `user-service`.
    pub service: String,
    /// The environment, e.g. `production`.
    pub environment: String,
    /// 1 for the first version, then 2, 3, …
    pub version: u64,
    /// The stored document: a JSON object, merged (RFC 7386) over the defaults when read
    /// with [`get_config`](crate::ConfigurationManager::get_config).
    pub config: serde_json::Value,
    /// When the version was written, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// For a version written by a rollback, the version whose document it restored.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rolled_back_from: Option<u64>,
}

/// The `head` row: the current version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Head {
    pub(crate) version: u64,
}

/// Clustering key of the head row.
pub(crate) const HEAD_KEY: &str = "head";
/// Prefix of every version's clustering key.
pub(crate) const VERSION_PREFIX: &str = "v";

/// The partition of one service in one environment (both names already validated).
pub(crate) fn partition_key(service: &str, environment: &str) -> String {
    format!("{service}/{environment}")
}

/// Clustering key of `version`.
pub(crate) fn version_key(version: u64) -> String {
    format!("{VERSION_PREFIX}{version:020}")
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Decodes a JSON row, naming the row on failure.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    table: &str,
    row: &Row,
) -> Result<T, StoreError> {
    serde_json::from_slice(&row.value).map_err(|source| StoreError::Codec {
        table: table.to_owned(),
        partition: row.partition.clone(),
        clustering: row.clustering.clone(),
        source,
    })
}

/// Encodes a value as JSON, naming the row on failure.
pub(crate) fn encode<T: Serialize>(
    table: &str,
    partition: &str,
    clustering: &str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Codec {
        table: table.to_owned(),
        partition: partition.to_owned(),
        clustering: clustering.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_sort_like_versions() {
        let mut keys: Vec<String> = [10, 9, 1, 100, u64::MAX]
            .into_iter()
            .map(version_key)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [1, 9, 10, 100, u64::MAX]
                .into_iter()
                .map(version_key)
                .collect::<Vec<_>>()
        );
        assert_eq!(version_key(3), "v00000000000000000003");
        assert!(!HEAD_KEY.starts_with(VERSION_PREFIX));
    }

    #[test]
    fn rolled_back_from_is_omitted_when_absent() {
        let v = ConfigVersion {
            service: "s".into(),
            environment: "e".into(),
            version: 1,
            config: serde_json::json!({}),
            created_at_ms: 5,
            rolled_back_from: None,
        };
        let json = serde_json::to_value(&v).unwrap();
        assert!(json.get("rolled_back_from").is_none());
        let back: ConfigVersion = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
    }
}
