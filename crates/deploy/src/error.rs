//! The one error type of this crate.

use std::fmt;

/// One rejected value: the key's path in the spec (`resources.memory`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the key, as written in the spec file: `replicas`, `health_check.port`,
    /// `environment.DATABASE_URL`.
    pub field: String,
    /// What is wrong with the value.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Why a deploy spec was rejected or could not be rendered. Nothing is started or applied
/// when any of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// The spec has values that cannot be deployed; every problem found is listed, each
    /// naming its key.
    #[error("deploy spec for {name:?} is invalid: {}", join(errors))]
    Invalid {
        /// The service being deployed.
        name: String,
        /// Every problem, in spec order.
        errors: Vec<FieldError>,
    },
    /// The TOML text could not be read into a spec (syntax, unknown key, wrong type); the
    /// message carries the line and the key.
    #[error("deploy spec: {0}")]
    Parse(String),
    /// A platform name other than `local`, `kubernetes`, `docker` or `ecs`.
    #[error("unknown platform {0:?}; expected local, kubernetes, docker or ecs")]
    UnknownPlatform(String),
    /// The mesh configuration passed in the options was rejected.
    #[error(transparent)]
    Mesh(#[from] trellis_mesh::MeshError),
    /// The YAML emitter failed (a bug: every rendered value is a plain string, number,
    /// list or map).
    #[error("could not write the manifests: {0}")]
    Emit(String),
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl DeployError {
    /// The keys this error is about (empty for parse and emit errors).
    pub fn fields(&self) -> Vec<&str> {
        match self {
            DeployError::Invalid { errors, .. } => {
                errors.iter().map(|e| e.field.as_str()).collect()
            }
            DeployError::Mesh(e) => e.field().into_iter().collect(),
            _ => Vec::new(),
        }
    }
}
