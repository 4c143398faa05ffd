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
    /// No deployment of that service (or of that version of it) is known to this deployer.
    #[error("{name:?} is not deployed{}", version.as_ref().map(|v| format!(" at version {v:?}")).unwrap_or_default())]
    NotDeployed {
        /// The service.
        name: String,
        /// The version asked for, if any.
        version: Option<String>,
    },
    /// That version of the service is already running; undeploy it or pick another version.
    #[error("{name:?} version {version:?} is already deployed")]
    AlreadyDeployed {
        /// The service.
        name: String,
        /// The version running.
        version: String,
    },
    /// A blue-green deployment named a current version that is not the one running.
    #[error("{name:?}: current_version {expected:?} is not running (running: {})", running.join(", "))]
    VersionMismatch {
        /// The service.
        name: String,
        /// The version the options named.
        expected: String,
        /// The versions actually running.
        running: Vec<String>,
    },
    /// A replica's process could not be started; the others of the same deployment were
    /// stopped again.
    #[error("{instance}: cannot start {program:?}: {reason}")]
    Spawn {
        /// The replica's instance id.
        instance: String,
        /// The program.
        program: String,
        /// The operating system's answer.
        reason: String,
    },
    /// Replicas did not become ready (health endpoint answering 2xx, or the port accepting
    /// connections) in time; what was started was stopped again.
    #[error("{name:?} version {version:?} not ready: {detail}")]
    NotReady {
        /// The service.
        name: String,
        /// The version.
        version: String,
        /// Which replicas and why.
        detail: String,
    },
    /// The service registry refused a registration or could not be reached.
    #[error("registry, instance {instance}: {reason}")]
    Registry {
        /// The instance id.
        instance: String,
        /// The registry's error.
        reason: String,
    },
    /// This deployer has no backend for the platform (built without its feature, or none
    /// plugged in).
    #[error("platform {platform} is not available: {reason}")]
    PlatformUnavailable {
        /// The platform.
        platform: String,
        /// Why.
        reason: String,
    },
    /// Scraping or reading the metrics the analysis is based on failed.
    #[error("metrics from {source_name}: {reason}")]
    Metrics {
        /// Where the metrics come from (the URL scraped).
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// A Kubernetes API call failed: the request (`apply Deployment production/user-service`)
    /// and the API server's answer (its status code and message, or the transport error).
    #[error("kubernetes: {operation}: {reason}")]
    Kubernetes {
        /// What was being done, naming the object.
        operation: String,
        /// The API server's answer or the connection error.
        reason: String,
    },
    /// A Deployment did not finish rolling out before the deadline; it stays applied.
    #[error(
        "kubernetes: Deployment {namespace}/{deployment} did not roll out within {waited:?}: {status}"
    )]
    RolloutTimeout {
        /// The Deployment's namespace.
        namespace: String,
        /// The Deployment's name.
        deployment: String,
        /// How long was waited.
        waited: std::time::Duration,
        /// The last status seen, in words.
        status: String,
    },
    /// A Docker Engine API call failed (against Docker or podman's API service).
    #[error("docker: {operation}: {reason}")]
    Docker {
        /// What was being done, naming the container or image.
        operation: String,
        /// The engine's answer or the connection error.
        reason: String,
    },
    /// A deployment record in the store could not be written, read or decoded: which one
    /// (`{namespace}/{service}` in table `deployments`) and why.
    #[error("deployment record {key}: {reason}")]
    Record {
        /// The record's key, `{namespace}/{service}`.
        key: String,
        /// The store's error, or what is wrong with the stored JSON.
        reason: String,
    },
    /// AWS ECS could not be called: no credentials, or the call failed. Nothing was
    /// registered when the credentials are missing.
    #[error("ecs: {operation}: {reason}")]
    Ecs {
        /// What was being done.
        operation: String,
        /// Why it failed.
        reason: String,
    },
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
