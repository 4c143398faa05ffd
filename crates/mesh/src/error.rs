//! The one error type of this crate.

/// Why a mesh config, policy or render was rejected. Every message names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// A value is out of range or malformed; `field` is its path in the config, such as
    /// `policies.retry_policy.attempts`.
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the offending key.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TOML text could not be read into the config (syntax, unknown key, wrong type);
    /// the message carries the line and the key.
    #[error("mesh config: {0}")]
    Parse(String),
    /// A provider name other than `istio`, `linkerd` or `consul`.
    #[error("unknown mesh provider {0:?}; expected istio, linkerd or consul")]
    UnknownProvider(String),
    /// The YAML or JSON emitter failed (a bug: every rendered value is a plain string,
    /// number, boolean, list or map).
    #[error("could not write the rendered resources: {0}")]
    Emit(String),
}

impl MeshError {
    /// The path of the offending key, when the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            MeshError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> MeshError {
    MeshError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}
