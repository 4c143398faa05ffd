//! The one error type of the store layer.

use std::error::Error as StdError;

/// A boxed error source, kept so callers can walk the `source()` chain.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong talking to a store.
///
/// Errors carry a class: [`StoreError::is_retryable`] says whether trying the same operation
/// again later may succeed (the store was unreachable or busy) or not (the input was wrong).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store URL could not be understood.
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// An argument was rejected before anything was sent to the backend.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which argument (`table name`, `partition key`, …).
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The backend cannot be reached or refused to work (file removed, node down, locked for
    /// too long). Retrying later may succeed.
    #[error("store unavailable ({backend}): {reason}")]
    Unavailable {
        /// Backend name (`sqlite`, `cassandra`).
        backend: &'static str,
        /// What happened, naming the file or host.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend answered with an error that retrying will not fix.
    #[error("{backend} error: {message}")]
    Backend {
        /// Backend name (`sqlite`, `cassandra`).
        backend: &'static str,
        /// What the backend said.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A stored value could not be decoded into (or encoded from) the caller's type.
    #[error("value at {table}/{partition}/{clustering}: {source}")]
    Codec {
        /// Table of the row.
        table: String,
        /// Partition key of the row.
        partition: String,
        /// Clustering key of the row.
        clustering: String,
        /// The serde error, which names the field.
        #[source]
        source: serde_json::Error,
    },
    /// A conditional write found the row in another state than expected.
    #[error("conflict on {table}/{partition}/{clustering}: {reason}")]
    Conflict {
        /// Table of the row.
        table: String,
        /// Partition key of the row.
        partition: String,
        /// Clustering key of the row.
        clustering: String,
        /// What was expected and what was found.
        reason: String,
    },
    /// A middleware layer failed the operation.
    #[error("store middleware: {0}")]
    Middleware(#[source] BoxError),
}

impl StoreError {
    /// True when the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// True when the store could not be reached at all.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        StoreError::InvalidInput {
            what,
            reason: reason.into(),
        }
    }
}

/// Result alias of the store layer.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
