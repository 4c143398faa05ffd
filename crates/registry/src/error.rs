//! Errors of the registry.

use trellis_core::NameError;
use trellis_store::StoreError;

/// What can go wrong registering, deregistering or renewing an instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A service name or instance id was rejected.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The instance description was rejected; the message names the field.
    #[error("invalid instance: {field}: {reason}")]
    InvalidInstance {
        /// Which field (`port`, `health_check.interval`, …).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The options were rejected.
    #[error("invalid registry options: {0}")]
    InvalidOptions(String),
    /// No such instance is registered through this process.
    #[error("instance {id} of {service} is not registered through this process")]
    NotRegistered {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
    },
    /// The store failed; the local snapshot keeps answering `discover`.
    #[error("registry store: {0}")]
    Store(#[from] StoreError),
    /// A stored instance could not be encoded.
    #[error("instance encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

impl RegistryError {
    /// True for errors caused by the caller's input (an HTTP 400).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            RegistryError::Name(_) | RegistryError::InvalidInstance { .. }
        )
    }
}
