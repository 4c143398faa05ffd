//! The crate's typed error.

/// Why tracing could not be configured or started.
///
/// Span creation, propagation and export never fail a request: these errors come only from
/// [`TracingConfig::validate`](crate::TracingConfig::validate),
/// [`TracerBuilder::build`](crate::TracerBuilder::build) and [`install`](crate::install).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TracingError {
    /// A configuration value is out of range or malformed; `field` names it.
    #[error("tracing config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field (`sampling_rate`, `endpoint`, …).
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The program was built without the cargo feature the configuration asks for.
    #[error(
        "tracing: {what} needs the `{feature}` feature of trellis-tracing, which this program was built without"
    )]
    FeatureDisabled {
        /// What was asked for (`OTLP export`, `OTLP over gRPC`).
        what: &'static str,
        /// The missing feature.
        feature: &'static str,
    },
    /// The OTLP exporter could not be built (bad endpoint, HTTP client failure).
    #[error("tracing: OTLP exporter for {endpoint}: {reason}")]
    Exporter {
        /// The endpoint it was built for.
        endpoint: String,
        /// The exporter's own message.
        reason: String,
    },
    /// The export thread could not be started.
    #[error("tracing: starting the export thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A global tracing subscriber was already installed.
    #[error("tracing: a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Result alias for this crate.
pub type Result<T, E = TracingError> = std::result::Result<T, E>;
