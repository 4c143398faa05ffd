//! The operations a backend executes: the request and response types of the store's tower
//! [`Service`](tower::Service). Middleware layers see every operation as a [`StoreRequest`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One stored row.
///
/// Every write bumps `version` (starting at 1 for a new row); compare-and-set operations test
/// it. `expires_at` is set when the row was written with a TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Partition key.
    pub partition: String,
    /// Clustering key; rows of one partition are ordered by it (byte order of UTF-8).
    pub clustering: String,
    /// The stored bytes.
    pub value: Vec<u8>,
    /// Write counter of the row, 1 for a fresh row.
    pub version: u64,
    /// When the row disappears, if it was written with a TTL.
    pub expires_at: Option<SystemTime>,
}

/// A write, on its own or inside a [`StoreRequest::Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Write the row whatever its state.
    Put {
        /// Table name.
        table: Arc<str>,
        /// Partition key.
        partition: String,
        /// Clustering key.
        clustering: String,
        /// New value.
        value: Vec<u8>,
        /// Time to live; `None` keeps the row until deleted.
        ttl: Option<Duration>,
    },
    /// Remove the row (no error when it is absent).
    Delete {
        /// Table name.
        table: Arc<str>,
        /// Partition key.
        partition: String,
        /// Clustering key.
        clustering: String,
    },
    /// Write only when no live row exists.
    InsertIfAbsent {
        /// Table name.
        table: Arc<str>,
        /// Partition key.
        partition: String,
        /// Clustering key.
        clustering: String,
        /// New value.
        value: Vec<u8>,
        /// Time to live.
        ttl: Option<Duration>,
    },
    /// Write only when the live row has version `expected`.
    UpdateIfVersion {
        /// Table name.
        table: Arc<str>,
        /// Partition key.
        partition: String,
        /// Clustering key.
        clustering: String,
        /// The version the caller read.
        expected: u64,
        /// New value.
        value: Vec<u8>,
        /// Time to live.
        ttl: Option<Duration>,
    },
}

impl Mutation {
    /// Table the mutation writes to.
    pub fn table(&self) -> &str {
        match self {
            Mutation::Put { table, .. }
            | Mutation::Delete { table, .. }
            | Mutation::InsertIfAbsent { table, .. }
            | Mutation::UpdateIfVersion { table, .. } => table,
        }
    }

    /// Partition and clustering key of the row written.
    pub fn key(&self) -> (&str, &str) {
        match self {
            Mutation::Put {
                partition,
                clustering,
                ..
            }
            | Mutation::Delete {
                partition,
                clustering,
                ..
            }
            | Mutation::InsertIfAbsent {
                partition,
                clustering,
                ..
            }
            | Mutation::UpdateIfVersion {
                partition,
                clustering,
                ..
            } => (partition, clustering),
        }
    }

    /// Whether the mutation carries a condition (insert-if-absent, update-if-version).
    pub fn is_conditional(&self) -> bool {
        matches!(
            self,
            Mutation::InsertIfAbsent { .. } | Mutation::UpdateIfVersion { .. }
        )
    }

    /// Short operation name, for metrics and spans.
    pub fn operation(&self) -> &'static str {
        match self {
            Mutation::Put { .. } => "put",
            Mutation::Delete { .. } => "delete",
            Mutation::InsertIfAbsent { .. } => "insert_if_absent",
            Mutation::UpdateIfVersion { .. } => "update_if_version",
        }
    }
}

/// Which rows of a partition a scan returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanQuery {
    /// Only clustering keys that start with this prefix.
    pub prefix: Option<String>,
    /// Only clustering keys strictly after this one (the cursor of the previous page).
    pub after: Option<String>,
    /// At most this many rows; 0 means the backend's default page size (1,000).
    pub limit: usize,
}

impl ScanQuery {
    /// Default page size when `limit` is 0.
    pub const DEFAULT_LIMIT: usize = 1_000;

    /// The effective page size.
    pub fn page_size(&self) -> usize {
        if self.limit == 0 {
            Self::DEFAULT_LIMIT
        } else {
            self.limit
        }
    }
}

/// One page of a partition scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Rows in clustering-key order.
    pub rows: Vec<Row>,
    /// Cursor for the next page (`ScanQuery::after`), `None` on the last page.
    pub next: Option<String>,
}

/// Outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The write happened; the row now has this version.
    Applied {
        /// New version of the row.
        version: u64,
    },
    /// The condition failed; nothing was written. `current` is the live row, if any.
    Rejected {
        /// The row as it is now.
        current: Option<Row>,
    },
}

impl CasOutcome {
    /// True when the write happened.
    pub fn applied(&self) -> bool {
        matches!(self, CasOutcome::Applied { .. })
    }
}

/// Outcome of an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every mutation was applied; versions in mutation order (0 for deletes).
    Applied {
        /// New row versions, in the order of the mutations.
        versions: Vec<u64>,
    },
    /// A condition failed; nothing at all was written.
    Rejected {
        /// Index of the first mutation whose condition failed.
        index: usize,
        /// The live row that failed it, if any.
        current: Option<Row>,
    },
}

impl BatchOutcome {
    /// True when the batch was applied.
    pub fn applied(&self) -> bool {
        matches!(self, BatchOutcome::Applied { .. })
    }
}

/// One operation sent through the middleware chain to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreRequest {
    /// Read one row.
    Get {
        /// Table name.
        table: Arc<str>,
        /// Partition key.
        partition: String,
        /// Clustering key.
        clustering: String,
    },
    /// Read a page of one partition, ordered by clustering key.
    Scan {
        /// Table name.
        table: Arc<str>,
        /// Partition key.
        partition: String,
        /// Which rows.
        query: ScanQuery,
    },
    /// One write.
    Write(Mutation),
    /// Several writes applied atomically: all or none.
    Batch(Vec<Mutation>),
    /// A number that changes whenever the table changes (from any process), for cheap
    /// change detection; backends that cannot tell return `None`.
    TableVersion {
        /// Table name.
        table: Arc<str>,
    },
    /// Check that the backend answers (the health check's probe).
    Ping,
}

impl StoreRequest {
    /// Short operation name, for metrics and spans.
    pub fn operation(&self) -> &'static str {
        match self {
            StoreRequest::Get { .. } => "get",
            StoreRequest::Scan { .. } => "scan",
            StoreRequest::Write(m) => m.operation(),
            StoreRequest::Batch(_) => "batch",
            StoreRequest::TableVersion { .. } => "table_version",
            StoreRequest::Ping => "ping",
        }
    }

    /// Table the operation touches (the first one for a batch).
    pub fn table(&self) -> Option<&str> {
        match self {
            StoreRequest::Get { table, .. }
            | StoreRequest::Scan { table, .. }
            | StoreRequest::TableVersion { table } => Some(table),
            StoreRequest::Write(m) => Some(m.table()),
            StoreRequest::Batch(ms) => ms.first().map(Mutation::table),
            StoreRequest::Ping => None,
        }
    }
}

/// What the backend answered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreResponse {
    /// Answer to [`StoreRequest::Get`].
    Row(Option<Row>),
    /// Answer to [`StoreRequest::Scan`].
    Page(Page),
    /// Answer to an unconditional [`StoreRequest::Write`]: the new version (0 after a
    /// delete), and whether a live row existed before.
    Written {
        /// New row version; 0 for a delete.
        version: u64,
        /// Whether a live row existed before the write.
        existed: bool,
    },
    /// Answer to a conditional [`StoreRequest::Write`].
    Cas(CasOutcome),
    /// Answer to [`StoreRequest::Batch`].
    Batch(BatchOutcome),
    /// Answer to [`StoreRequest::TableVersion`].
    TableVersion(Option<u64>),
    /// Answer to [`StoreRequest::Ping`].
    Pong,
}
