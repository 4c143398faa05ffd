//! The configuration manager: typed reads with defaults, validated versioned writes,
//! history and rollback.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_core::{NameError, NameKind, validate_name};
use trellis_store::{Batch, BatchOutcome, Row, ScanQuery, Store, Table};

use crate::error::ConfigError;
use crate::options::ConfigOptions;
use crate::schema::{self, Rejection, Schemas};
use crate::version::{
    self, ConfigVersion, HEAD_KEY, Head, VERSION_PREFIX, partition_key, version_key,
};
use crate::watch::{ConfigWatch, WatchHandle};

/// How many times a write re-reads the head and tries again after other writers won.
/// Every lost attempt means another write succeeded, so this only runs out under a storm of
/// writes to one service and environment.
const WRITE_ATTEMPTS: usize = 256;

/// How many partitions the manager remembers the head of after finding none there, so that
/// reads of made-up names cannot grow its memory without bound.
const MAX_KNOWN_EMPTY: usize = 4096;

/// How many versions a watcher reads from the store at once.
pub(crate) const WATCH_PAGE: usize = 64;

/// Versioned, validated configuration per service and environment, kept in a
/// [`Store`] — the seed's `ConfigurationManager`.
///
/// Cheap to clone; clones share the registered types, the watchers' wake-ups and the
/// poller that notices other processes' writes.
///
/// Every version of every service's configuration is an immutable [`ConfigVersion`];
/// writes add version N+1 atomically (see the [storage layout](crate#storage-layout)), so
/// concurrent writers from any number of processes never lose an update and never
/// produce gaps.
#[derive(Clone)]
pub struct ConfigurationManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for ConfigurationManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigurationManager")
            .field("table", &self.inner.table.name())
            .field("environment", &self.inner.environment)
            .field("refresh_interval", &self.inner.refresh_interval)
            .finish_non_exhaustive()
    }
}

/// What this manager last knew of one partition, so that [`ConfigurationManager::watch`]
/// (which cannot wait) can pin "the current version" when it is called.
#[derive(Debug, Clone, Copy, Default)]
struct Known {
    /// The highest head version seen by a read or written.
    head: u64,
    /// The first version written through this manager.
    first_local: Option<u64>,
}

/// State shared by the clones of a manager, its watches and its poller.
pub(crate) struct Inner {
    pub(crate) table: Table,
    pub(crate) environment: String,
    pub(crate) refresh_interval: Duration,
    schemas: Schemas,
    /// Bumped whenever a version may have been written: at once by this manager's writes,
    /// and by the poller when the table changed (another process wrote).
    pub(crate) changes: watch::Sender<u64>,
    known: Mutex<HashMap<String, Known>>,
    poller: Mutex<Option<JoinHandle<()>>>,
    /// The runtime the manager was created in, for tasks started outside of one.
    pub(crate) runtime: Option<Handle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(poller) = lock(&self.poller).take() {
            poller.abort();
        }
    }
}

impl ConfigurationManager {
    /// A manager keeping configuration in `options.config_table` of `store`.
    ///
    /// Fails when the table name, the environment name or the refresh interval is
    /// invalid. Nothing is read or written yet.
    pub fn new(store: &Store, options: ConfigOptions) -> Result<Self, ConfigError> {
        let table = store.table(&options.config_table)?;
        validate_name(NameKind::Environment, &options.environment)?;
        if options.refresh_interval.is_zero() {
            return Err(ConfigError::Options {
                field: "refresh_interval",
                reason: "must be more than zero".to_owned(),
            });
        }
        let (changes, _) = watch::channel(0);
        Ok(ConfigurationManager {
            inner: Arc::new(Inner {
                table,
                environment: options.environment,
                refresh_interval: options.refresh_interval,
                schemas: Schemas::default(),
                changes,
                known: Mutex::new(HashMap::new()),
                poller: Mutex::new(None),
                runtime: Handle::try_current().ok(),
            }),
        })
    }

    /// The environment of this process ([`ConfigOptions::environment`]).
    pub fn environment(&self) -> &str {
        &self.inner.environment
    }

    /// The table the configuration lives in.
    pub fn table(&self) -> &Table {
        &self.inner.table
    }

    /// The configuration of `service` in this process's environment — the seed's
    /// `configManager.getConfig(service, defaults)`.
    ///
    /// The stored document is merged over `defaults` (RFC 7386: nested objects merge key by
    /// key, so fields the document leaves out keep their default) and the result is
    /// deserialized into `T`. Without a stored document, returns `defaults`.
    pub async fn get_config<T>(&self, service: &str, defaults: T) -> Result<T, ConfigError>
    where
        T: Serialize + DeserializeOwned,
    {
        self.get_config_in(service, &self.inner.environment, defaults)
            .await
    }

    /// [`get_config`](Self::get_config) for another environment.
    pub async fn get_config_in<T>(
        &self,
        service: &str,
        env: &str,
        defaults: T,
    ) -> Result<T, ConfigError>
    where
        T: Serialize + DeserializeOwned,
    {
        let Some(current) = self.current(service, env).await? else {
            return Ok(defaults);
        };
        let defaults = schema::defaults_value(&defaults).map_err(|r| invalid(service, r))?;
        schema::merge_into(defaults, Some(&current.config)).map_err(|r| invalid(service, r))
    }

    /// The current version of `service` in `env`, or `None` before the first write.
    pub async fn current(
        &self,
        service: &str,
        env: &str,
    ) -> Result<Option<ConfigVersion>, ConfigError> {
        let partition = partition(service, env)?;
        let head = self.inner.read_head(&partition).await?;
        let Some((head, _)) = head else {
            return Ok(None);
        };
        match self.inner.read_version(&partition, head.version).await? {
            Some(version) => Ok(Some(version)),
            None => Err(ConfigError::Corrupt {
                what: self.inner.describe(&partition),
                reason: format!("the head names version {}, which is missing", head.version),
            }),
        }
    }

    /// Version `version` of `service` in `env`, if it exists.
    pub async fn version(
        &self,
        service: &str,
        env: &str,
        version: u64,
    ) -> Result<Option<ConfigVersion>, ConfigError> {
        let partition = partition(service, env)?;
        self.inner.read_version(&partition, version).await
    }

    /// Stores `document` as the next version of `service` in `env` and wakes this
    /// manager's watchers.
    ///
    /// `document` must be a JSON object; when a type is registered for `service`
    /// ([`register_type`](Self::register_type)) it must deserialize into that type once
    /// merged over the registered defaults. Otherwise [`ConfigError::Invalid`] names the
    /// field, and nothing is written. Concurrent writers are serialized: each gets its own
    /// version number.
    pub async fn set_config(
        &self,
        service: &str,
        env: &str,
        document: Value,
    ) -> Result<ConfigVersion, ConfigError> {
        self.write(service, env, document, None, None).await
    }

    /// [`set_config`](Self::set_config), only if the current version is still
    /// `expected_version` (0: no version yet) — for read-modify-write without lost
    /// updates. Fails with [`ConfigError::Conflict`] otherwise.
    pub async fn set_config_if(
        &self,
        service: &str,
        env: &str,
        document: Value,
        expected_version: u64,
    ) -> Result<ConfigVersion, ConfigError> {
        self.write(service, env, document, Some(expected_version), None)
            .await
    }

    /// Every version of `service` in `env`, oldest first.
    pub async fn history(
        &self,
        service: &str,
        env: &str,
    ) -> Result<Vec<ConfigVersion>, ConfigError> {
        let partition = partition(service, env)?;
        let rows = self
            .inner
            .table
            .scan_all(&partition, Some(VERSION_PREFIX))
            .await?;
        rows.iter()
            .map(|row| self.inner.decode_version(row))
            .collect()
    }

    /// Makes the document of `version` current again, as a new version whose
    /// `rolled_back_from` is `Some(version)`; history is never rewritten.
    ///
    /// Fails with [`ConfigError::NotFound`] when `version` does not exist, and with
    /// [`ConfigError::Invalid`] when its document no longer fits the registered type.
    pub async fn rollback(
        &self,
        service: &str,
        env: &str,
        version: u64,
    ) -> Result<ConfigVersion, ConfigError> {
        let Some(old) = self.version(service, env, version).await? else {
            return Err(ConfigError::NotFound {
                what: format!("version {version} of {service}/{env}"),
            });
        };
        self.write(service, env, old.config, None, Some(version))
            .await
    }

    /// Attaches a type to `service` (in every environment): from now on
    /// [`set_config`](Self::set_config) and [`rollback`](Self::rollback) accept only
    /// documents that deserialize into `T` once merged over `defaults`. Replaces an earlier
    /// registration for the same service; applies to this manager and its clones only.
    pub fn register_type<T>(&self, service: &str, defaults: T)
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.inner.schemas.register(service, defaults);
    }

    /// Watches `service` in this process's environment: the versions written after the
    /// one current when this is called, in order.
    ///
    /// "Current" is the latest version this manager has read or written; when it has seen
    /// none for that service yet, the version found by the first
    /// [`next`](ConfigWatch::next) (plus any written through this manager in between).
    /// Use [`watch_in`](Self::watch_in) with an explicit version to leave no doubt.
    pub fn watch(&self, service: &str) -> ConfigWatch {
        self.watch_in(service, &self.inner.environment, None)
    }

    /// Watches `service` in `env`. With `after: Some(n)`, delivers every version above `n`
    /// (`Some(0)`: all of them, from the first); with `None`, as [`watch`](Self::watch).
    ///
    /// Invalid names are reported by the first [`next`](ConfigWatch::next).
    pub fn watch_in(&self, service: &str, env: &str, after: Option<u64>) -> ConfigWatch {
        let target = partition(service, env).map(|partition| {
            let start = after.or_else(|| self.inner.known_head(&partition));
            (partition, start)
        });
        ConfigWatch::new(self.inner.clone(), target)
    }

    /// Calls `callback` with every new version of `service` in this process's environment,
    /// from a background task — the seed's `configManager.watch(service, callback)`.
    ///
    /// Dropping the returned handle stops the task. Errors reading the store are logged
    /// and retried every refresh interval; an invalid service name is logged and ends the
    /// task.
    ///
    /// # Panics
    ///
    /// When neither this call nor [`ConfigurationManager::new`] ran inside a Tokio runtime,
    /// like [`tokio::spawn`].
    pub fn watch_with<F>(&self, service: &str, callback: F) -> WatchHandle
    where
        F: FnMut(ConfigVersion) + Send + 'static,
    {
        WatchHandle::spawn(self.watch(service), callback)
    }

    /// Validates and writes the next version.
    async fn write(
        &self,
        service: &str,
        env: &str,
        document: Value,
        expected: Option<u64>,
        rolled_back_from: Option<u64>,
    ) -> Result<ConfigVersion, ConfigError> {
        let partition = partition(service, env)?;
        self.inner
            .schemas
            .check(service, &document)
            .map_err(|r| invalid(service, r))?;
        let inner = &self.inner;
        let table = &inner.table;
        let mut record = ConfigVersion {
            service: service.to_owned(),
            environment: env.to_owned(),
            version: 0,
            config: document,
            created_at_ms: 0,
            rolled_back_from,
        };
        let mut based_on = 0;
        for _ in 0..WRITE_ATTEMPTS {
            let head = inner.read_head(&partition).await?;
            based_on = head.map_or(0, |(h, _)| h.version);
            if let Some(expected) = expected
                && expected != based_on
            {
                return Err(conflict(service, env, expected, based_on));
            }
            let Some(next) = based_on.checked_add(1) else {
                return Err(ConfigError::Corrupt {
                    what: inner.describe(&partition),
                    reason: "the version counter is exhausted".to_owned(),
                });
            };
            record.version = next;
            record.created_at_ms = version::now_ms();
            let version_key = version_key(next);
            let head_bytes =
                version::encode(table.name(), &partition, HEAD_KEY, &Head { version: next })?;
            let head_write = match head {
                Some((_, row_version)) => table.mutation_update_if_version(
                    &partition,
                    HEAD_KEY,
                    row_version,
                    head_bytes,
                    None,
                )?,
                None => table.mutation_insert_if_absent(&partition, HEAD_KEY, head_bytes, None)?,
            };
            let version_bytes = version::encode(table.name(), &partition, &version_key, &record)?;
            let version_write =
                table.mutation_insert_if_absent(&partition, &version_key, version_bytes, None)?;
            let batch = Batch::new().push(head_write).push(version_write);
            // Before the write lands: a watch created earlier that reads the head between
            // the commit and `note_write` must still start before this version.
            inner.note_intent(&partition, next);
            match table.store().batch(batch).await? {
                BatchOutcome::Applied { .. } => {
                    inner.note_write(&partition, next);
                    inner.changes.send_modify(|n| *n = n.wrapping_add(1));
                    tracing::info!(
                        service,
                        environment = env,
                        version = next,
                        rolled_back_from,
                        "config version written"
                    );
                    return Ok(record);
                }
                BatchOutcome::Rejected { index: 0, current } => {
                    // Another writer moved the head first.
                    if let Some(expected) = expected {
                        let current = match current {
                            Some(row) => version::decode::<Head>(table.name(), &row)?.version,
                            None => 0,
                        };
                        return Err(conflict(service, env, expected, current));
                    }
                    tokio::task::yield_now().await;
                }
                BatchOutcome::Rejected { .. } => {
                    return Err(ConfigError::Corrupt {
                        what: inner.describe(&partition),
                        reason: format!(
                            "version {next} exists while the head names version {based_on}"
                        ),
                    });
                }
            }
        }
        let current = inner
            .read_head(&partition)
            .await?
            .map_or(0, |(h, _)| h.version);
        Err(conflict(service, env, based_on, current))
    }
}

impl Inner {
    /// The head of a partition and the row version it was read at.
    pub(crate) async fn read_head(
        &self,
        partition: &str,
    ) -> Result<Option<(Head, u64)>, ConfigError> {
        let row = self.table.get(partition, HEAD_KEY).await?;
        let head = match row {
            Some(row) => Some((
                version::decode::<Head>(self.table.name(), &row)?,
                row.version,
            )),
            None => None,
        };
        self.note_head(partition, head.map_or(0, |(h, _)| h.version));
        Ok(head)
    }

    /// One version of a partition.
    async fn read_version(
        &self,
        partition: &str,
        version: u64,
    ) -> Result<Option<ConfigVersion>, ConfigError> {
        match self.table.get(partition, &version_key(version)).await? {
            Some(row) => self.decode_version(&row).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` versions above `after`, in order.
    pub(crate) async fn versions_after(
        &self,
        partition: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ConfigVersion>, ConfigError> {
        let page = self
            .table
            .scan(
                partition,
                ScanQuery {
                    prefix: Some(VERSION_PREFIX.to_owned()),
                    after: Some(version_key(after)),
                    limit,
                },
            )
            .await?;
        page.rows
            .iter()
            .map(|row| self.decode_version(row))
            .collect()
    }

    fn decode_version(&self, row: &Row) -> Result<ConfigVersion, ConfigError> {
        Ok(version::decode(self.table.name(), row)?)
    }

    fn describe(&self, partition: &str) -> String {
        format!("{}/{partition}", self.table.name())
    }

    fn note_head(&self, partition: &str, head: u64) {
        let mut known = lock(&self.known);
        if head == 0 && known.len() >= MAX_KNOWN_EMPTY && !known.contains_key(partition) {
            return;
        }
        let entry = known.entry(partition.to_owned()).or_default();
        entry.head = entry.head.max(head);
    }

    fn note_write(&self, partition: &str, version: u64) {
        let mut known = lock(&self.known);
        let entry = known.entry(partition.to_owned()).or_default();
        entry.head = entry.head.max(version);
        entry.first_local.get_or_insert(version);
    }

    /// Records that this manager is about to write `version`, so watches resolving their
    /// start meanwhile do not skip it (an attempt that loses a race only makes such a watch
    /// start a little earlier).
    fn note_intent(&self, partition: &str, version: u64) {
        let mut known = lock(&self.known);
        let entry = known.entry(partition.to_owned()).or_default();
        entry.first_local.get_or_insert(version);
    }

    /// The latest version this manager knows of, if it has seen the partition at all.
    fn known_head(&self, partition: &str) -> Option<u64> {
        lock(&self.known).get(partition).map(|k| k.head)
    }

    /// Where a watch that did not know the current version when it was created starts,
    /// given the head it has just read: after that head, or before the first version this
    /// manager wrote since (which then happened after the watch was created).
    pub(crate) fn resolve_start(&self, partition: &str, head: u64) -> u64 {
        let first_local = lock(&self.known).get(partition).and_then(|k| k.first_local);
        match first_local {
            Some(first) => head.min(first.saturating_sub(1)),
            None => head,
        }
    }

    /// Starts the poller that notices other processes' writes, unless it runs already.
    pub(crate) fn ensure_poller(self: &Arc<Self>) {
        let mut slot = lock(&self.poller);
        if slot.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Some(runtime) = Handle::try_current().ok().or_else(|| self.runtime.clone()) else {
            tracing::warn!("no Tokio runtime: other processes' config writes go unnoticed");
            return;
        };
        *slot = Some(crate::watch::spawn_poller(&runtime, self));
    }
}

/// Validates both names and builds the partition key.
fn partition(service: &str, env: &str) -> Result<String, NameError> {
    validate_name(NameKind::Service, service)?;
    validate_name(NameKind::Environment, env)?;
    Ok(partition_key(service, env))
}

fn invalid(service: &str, rejection: Rejection) -> ConfigError {
    ConfigError::Invalid {
        service: service.to_owned(),
        path: rejection.path,
        message: rejection.message,
    }
}

fn conflict(service: &str, env: &str, expected: u64, current: u64) -> ConfigError {
    ConfigError::Conflict {
        service: service.to_owned(),
        environment: env.to_owned(),
        expected,
        current,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_poller_ends_with_the_last_manager_and_watch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/c.db", dir.path().display()))
            .await
            .unwrap();
        let options = ConfigOptions {
            refresh_interval: Duration::from_millis(10),
            ..ConfigOptions::for_environment("test")
        };
        let manager = ConfigurationManager::new(&store, options).unwrap();
        let mut watch = manager.watch("svc");
        // The first `next` starts the poller; nothing is written, so it times out.
        let waited = tokio::time::timeout(Duration::from_millis(50), watch.next()).await;
        assert!(waited.is_err());
        let poller = lock(&manager.inner.poller)
            .as_ref()
            .map(JoinHandle::abort_handle)
            .unwrap();
        let clone = manager.clone();
        drop((manager, watch));
        assert!(!poller.is_finished(), "a clone still holds the manager");
        drop(clone);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !poller.is_finished() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "poller still running"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_memory_of_empty_partitions_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/c.db", dir.path().display()))
            .await
            .unwrap();
        let manager =
            ConfigurationManager::new(&store, ConfigOptions::for_environment("test")).unwrap();
        for i in 0..MAX_KNOWN_EMPTY + 10 {
            manager.inner.note_head(&format!("s{i}/test"), 0);
        }
        assert_eq!(lock(&manager.inner.known).len(), MAX_KNOWN_EMPTY);
        manager.inner.note_head("more/test", 3);
        assert_eq!(manager.inner.known_head("more/test"), Some(3));
    }
}
