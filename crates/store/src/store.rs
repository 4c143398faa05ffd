//! The [`Store`] handle, its [`Table`]s and atomic [`Batch`]es.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::error::{Result, StoreError};
use crate::request::{
    BatchOutcome, CasOutcome, Mutation, Page, Row, ScanQuery, StoreRequest, StoreResponse,
};

/// The boxed tower service every [`Store`] wraps: backend plus middleware layers.
pub type StoreService = BoxCloneSyncService<StoreRequest, StoreResponse, StoreError>;

/// Longest accepted table name (Cassandra's limit).
pub const MAX_TABLE_NAME: usize = 48;
/// Longest accepted partition or clustering key, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest accepted value, in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

/// A handle to a store: cheap to clone, safe to share between tasks.
///
/// Every operation travels as a [`StoreRequest`] through the middleware layers added with
/// [`Store::layer`] (tracing, metrics, …) down to the backend chosen by the URL given to
/// [`Store::open`].
#[derive(Clone)]
pub struct Store {
    service: StoreService,
    backend: &'static str,
    location: Arc<str>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store named by `url`.
    ///
    /// Supported:
    /// - `sqlite://PATH` (relative or absolute; parent folders are created), with optional
    ///   query parameters `busy_timeout` and `lock_timeout` (durations such as `5s`) and
    ///   `synchronous` (`normal` or `full`);
    /// - `cassandra://[USER:PASS@]HOST[:PORT],…/KEYSPACE[?…]` with the `cassandra` feature
    ///   (Apache Cassandra or ScyllaDB; see `CassandraStore` for the options).
    pub async fn open(url: &str) -> Result<Store> {
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(StoreError::InvalidUrl {
                url: url.to_owned(),
                reason: "expected SCHEME://…, for example sqlite://./trellis-data/trellis.db"
                    .into(),
            });
        };
        match scheme {
            "sqlite" => crate::sqlite::SqliteStore::open_url(url).await,
            #[cfg(feature = "cassandra")]
            "cassandra" => crate::cassandra::CassandraStore::open(url)
                .await
                .map(|cassandra| cassandra.store()),
            #[cfg(not(feature = "cassandra"))]
            "cassandra" => Err(StoreError::InvalidUrl {
                // Everything before the host could be a password.
                url: "cassandra://…".to_owned(),
                reason: "this program was built without the cassandra feature of trellis-store"
                    .into(),
            }),
            other => Err(StoreError::InvalidUrl {
                url: url.to_owned(),
                reason: format!("unknown scheme {other:?}; supported: sqlite, cassandra"),
            }),
        }
    }

    /// Wraps a backend service. Backends call this; users call [`Store::open`].
    pub fn from_service<S>(backend: &'static str, location: impl Into<Arc<str>>, service: S) -> Self
    where
        S: Service<StoreRequest, Response = StoreResponse, Error = StoreError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Store {
            service: BoxCloneSyncService::new(service),
            backend,
            location: location.into(),
        }
    }

    /// Adds a tower middleware layer around every operation — the seed's
    /// `client.use(new TracingMiddleware(tracer))`. The last layer added runs first.
    #[must_use]
    pub fn layer<L>(self, layer: L) -> Store
    where
        L: Layer<StoreService>,
        L::Service: Service<StoreRequest, Response = StoreResponse, Error = StoreError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<StoreRequest>>::Future: Send + 'static,
    {
        Store {
            service: BoxCloneSyncService::new(layer.layer(self.service)),
            backend: self.backend,
            location: self.location,
        }
    }

    /// Backend name: `sqlite`, `cassandra`, ….
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Where the data lives (file path or hosts), without credentials.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Sends one request through the middleware chain.
    pub async fn call(&self, request: StoreRequest) -> Result<StoreResponse> {
        self.service.clone().oneshot(request).await
    }

    /// A handle to table `name` (`[a-z][a-z0-9_]*`, at most 48 characters). Tables are
    /// created on first use.
    pub fn table(&self, name: &str) -> Result<Table> {
        validate_table_name(name)?;
        Ok(Table {
            store: self.clone(),
            name: Arc::from(name),
        })
    }

    /// Applies every mutation of `batch` atomically: all of them or none.
    pub async fn batch(&self, batch: Batch) -> Result<BatchOutcome> {
        if batch.mutations.is_empty() {
            return Ok(BatchOutcome::Applied {
                versions: Vec::new(),
            });
        }
        match self.call(StoreRequest::Batch(batch.mutations)).await? {
            StoreResponse::Batch(outcome) => Ok(outcome),
            other => Err(unexpected("batch", &other)),
        }
    }

    /// Checks that the backend answers.
    pub async fn ping(&self) -> Result<()> {
        match self.call(StoreRequest::Ping).await? {
            StoreResponse::Pong => Ok(()),
            other => Err(unexpected("ping", &other)),
        }
    }
}

/// A handle to one table of a [`Store`].
#[derive(Clone, Debug)]
pub struct Table {
    store: Store,
    name: Arc<str>,
}

impl Table {
    /// The table name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store this table lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Reads one live row.
    pub async fn get(&self, partition: &str, clustering: &str) -> Result<Option<Row>> {
        validate_keys(partition, clustering)?;
        let request = StoreRequest::Get {
            table: self.name.clone(),
            partition: partition.to_owned(),
            clustering: clustering.to_owned(),
        };
        match self.store.call(request).await? {
            StoreResponse::Row(row) => Ok(row),
            other => Err(unexpected("get", &other)),
        }
    }

    /// Writes a row whatever its state; returns its new version.
    pub async fn put(
        &self,
        partition: &str,
        clustering: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<u64> {
        let mutation = self.mutation_put(partition, clustering, value, ttl)?;
        match self.store.call(StoreRequest::Write(mutation)).await? {
            StoreResponse::Written { version, .. } => Ok(version),
            other => Err(unexpected("put", &other)),
        }
    }

    /// Deletes a row; returns whether a live row existed.
    pub async fn delete(&self, partition: &str, clustering: &str) -> Result<bool> {
        let mutation = self.mutation_delete(partition, clustering)?;
        match self.store.call(StoreRequest::Write(mutation)).await? {
            StoreResponse::Written { existed, .. } => Ok(existed),
            other => Err(unexpected("delete", &other)),
        }
    }

    /// Reads one page of a partition, ordered by clustering key.
    pub async fn scan(&self, partition: &str, query: ScanQuery) -> Result<Page> {
        validate_key("partition key", partition)?;
        let request = StoreRequest::Scan {
            table: self.name.clone(),
            partition: partition.to_owned(),
            query,
        };
        match self.store.call(request).await? {
            StoreResponse::Page(page) => Ok(page),
            other => Err(unexpected("scan", &other)),
        }
    }

    /// Reads every live row of a partition (page by page), optionally only those whose
    /// clustering key starts with `prefix`.
    pub async fn scan_all(&self, partition: &str, prefix: Option<&str>) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .scan(
                    partition,
                    ScanQuery {
                        prefix: prefix.map(str::to_owned),
                        after,
                        limit: 0,
                    },
                )
                .await?;
            rows.extend(page.rows);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(rows),
            }
        }
    }

    /// Writes the row only if no live row exists under its key.
    pub async fn insert_if_absent(
        &self,
        partition: &str,
        clustering: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<CasOutcome> {
        let mutation = self.mutation_insert_if_absent(partition, clustering, value, ttl)?;
        self.cas(mutation).await
    }

    /// Writes the row only if its live version is `expected`.
    pub async fn update_if_version(
        &self,
        partition: &str,
        clustering: &str,
        expected: u64,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<CasOutcome> {
        let mutation =
            self.mutation_update_if_version(partition, clustering, expected, value, ttl)?;
        self.cas(mutation).await
    }

    async fn cas(&self, mutation: Mutation) -> Result<CasOutcome> {
        match self.store.call(StoreRequest::Write(mutation)).await? {
            StoreResponse::Cas(outcome) => Ok(outcome),
            other => Err(unexpected("compare-and-set", &other)),
        }
    }

    /// A number that changes whenever this table changes, from any process sharing the
    /// store; `None` when the backend cannot tell (then callers re-read on a timer).
    pub async fn change_marker(&self) -> Result<Option<u64>> {
        let request = StoreRequest::TableVersion {
            table: self.name.clone(),
        };
        match self.store.call(request).await? {
            StoreResponse::TableVersion(version) => Ok(version),
            other => Err(unexpected("table_version", &other)),
        }
    }

    /// Builds (and validates) a put for a [`Batch`].
    pub fn mutation_put(
        &self,
        partition: &str,
        clustering: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<Mutation> {
        validate_write(partition, clustering, &value, ttl)?;
        Ok(Mutation::Put {
            table: self.name.clone(),
            partition: partition.to_owned(),
            clustering: clustering.to_owned(),
            value,
            ttl,
        })
    }

    /// Builds (and validates) a delete for a [`Batch`].
    pub fn mutation_delete(&self, partition: &str, clustering: &str) -> Result<Mutation> {
        validate_keys(partition, clustering)?;
        Ok(Mutation::Delete {
            table: self.name.clone(),
            partition: partition.to_owned(),
            clustering: clustering.to_owned(),
        })
    }

    /// Builds (and validates) an insert-if-absent for a [`Batch`].
    pub fn mutation_insert_if_absent(
        &self,
        partition: &str,
        clustering: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<Mutation> {
        validate_write(partition, clustering, &value, ttl)?;
        Ok(Mutation::InsertIfAbsent {
            table: self.name.clone(),
            partition: partition.to_owned(),
            clustering: clustering.to_owned(),
            value,
            ttl,
        })
    }

    /// Builds (and validates) an update-if-version for a [`Batch`].
    pub fn mutation_update_if_version(
        &self,
        partition: &str,
        clustering: &str,
        expected: u64,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<Mutation> {
        validate_write(partition, clustering, &value, ttl)?;
        Ok(Mutation::UpdateIfVersion {
            table: self.name.clone(),
            partition: partition.to_owned(),
            clustering: clustering.to_owned(),
            expected,
            value,
            ttl,
        })
    }
}

/// Mutations to apply atomically with [`Store::batch`].
///
/// Build the mutations with the `Table::mutation_*` methods. A batch with a conditional
/// mutation is applied only if every condition holds. (On Cassandra, a batch with
/// conditions must stay within one partition of one table.)
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Batch {
    mutations: Vec<Mutation>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a mutation.
    pub fn push(mut self, mutation: Mutation) -> Self {
        self.mutations.push(mutation);
        self
    }

    /// Adds a mutation in place.
    pub fn add(&mut self, mutation: Mutation) {
        self.mutations.push(mutation);
    }

    /// Number of mutations.
    pub fn len(&self) -> usize {
        self.mutations.len()
    }

    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.mutations.is_empty()
    }
}

pub(crate) fn unexpected(operation: &str, response: &StoreResponse) -> StoreError {
    StoreError::Backend {
        backend: "store",
        message: format!("unexpected response to {operation}: {response:?}"),
        source: None,
    }
}

/// Checks a table name: `[a-z][a-z0-9_]*`, at most 48 characters.
pub fn validate_table_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !ok_first
        || name.len() > MAX_TABLE_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(StoreError::invalid(
            "table name",
            format!(
                "{:?}: use a lowercase letter then lowercase letters, digits or '_', at most {MAX_TABLE_NAME} characters",
                truncate(name)
            ),
        ));
    }
    Ok(())
}

fn validate_key(what: &'static str, key: &str) -> Result<()> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::invalid(
            what,
            format!("{} bytes long; at most {MAX_KEY_BYTES}", key.len()),
        ));
    }
    if key.contains('\0') {
        return Err(StoreError::invalid(what, "contains a NUL character"));
    }
    Ok(())
}

fn validate_keys(partition: &str, clustering: &str) -> Result<()> {
    validate_key("partition key", partition)?;
    validate_key("clustering key", clustering)
}

fn validate_write(
    partition: &str,
    clustering: &str,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<()> {
    validate_keys(partition, clustering)?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::invalid(
            "value",
            format!("{} bytes long; at most {MAX_VALUE_BYTES}", value.len()),
        ));
    }
    if let Some(ttl) = ttl {
        if ttl.is_zero() {
            return Err(StoreError::invalid("ttl", "must be greater than zero"));
        }
        if ttl > Duration::from_secs(20 * 365 * 24 * 3600) {
            return Err(StoreError::invalid("ttl", "must be at most 20 years"));
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_owned();
    }
    let mut end = 64;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}
