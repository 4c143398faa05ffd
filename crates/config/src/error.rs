//! The one error type of the configuration manager.

/// Everything that can go wrong reading, writing or watching configuration.
///
/// The variants map onto the usual answers of an admin API: [`Name`](ConfigError::Name),
/// [`Invalid`](ConfigError::Invalid) and [`Options`](ConfigError::Options) are the caller's
/// fault, [`NotFound`](ConfigError::NotFound) and [`Conflict`](ConfigError::Conflict)
/// describe the stored state, and [`Store`](ConfigError::Store) is the storage layer's
/// (see [`ConfigError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A service or environment name was rejected.
    #[error(transparent)]
    Name(#[from] trellis_core::NameError),
    /// A configuration document was rejected: it is not a JSON object, or, merged over the
    /// defaults, it does not deserialize into the service's type. Nothing was written.
    #[error("config for {service} rejected at {path}: {message}")]
    Invalid {
        /// The service whose configuration was rejected.
        service: String,
        /// Where in the document: a dotted path such as `cache.ttl`, or `.` for the root.
        path: String,
        /// What was wrong there, e.g. `invalid type: string "x", expected u64`.
        message: String,
    },
    /// The requested configuration version does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `version 7 of user-service/production`.
        what: String,
    },
    /// A conditional write found another current version than the caller expected (or
    /// other writers kept winning for too long). Nothing was written.
    #[error(
        "version conflict for {service}/{environment}: expected {expected}, current is {current}"
    )]
    Conflict {
        /// The service.
        service: String,
        /// The environment.
        environment: String,
        /// The current version the write was based on (0 = none yet).
        expected: u64,
        /// The current version found in the store.
        current: u64,
    },
    /// [`ConfigOptions`](crate::ConfigOptions) were rejected.
    #[error("invalid config option {field}: {reason}")]
    Options {
        /// The field, e.g. `refresh_interval`.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The stored rows contradict each other (for example the head names a version that
    /// does not exist): they were changed by something other than this crate.
    #[error("stored configuration {what} is inconsistent: {reason}")]
    Corrupt {
        /// Which rows, e.g. `service_configs/user-service/production`.
        what: String,
        /// What contradicts what.
        reason: String,
    },
    /// The store failed, or held a row that could not be decoded.
    #[error(transparent)]
    Store(#[from] trellis_store::StoreError),
}

impl ConfigError {
    /// True when the same call may succeed if tried again later (the store was unavailable).
    pub fn is_retryable(&self) -> bool {
        match self {
            ConfigError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// True when the request itself was wrong (a bad name, document or option), so that
    /// repeating it unchanged cannot succeed.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            ConfigError::Name(_) | ConfigError::Invalid { .. } | ConfigError::Options { .. }
        )
    }
}
