//! What can go wrong: a step ([`StepError`]), a definition or a run ([`SagaError`]).

use std::time::Duration;

use trellis_client::ClientError;
use trellis_core::format_duration;
use trellis_store::StoreError;

/// A step's action or compensation failed.
///
/// `retryable` says whether trying the same call again may succeed (a timeout, a 503); the
/// orchestrator retries a forward step only when it is retryable *and* the step is marked
/// idempotent, and retries a compensation whatever the error (compensations must be
/// idempotent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    message: String,
    retryable: bool,
    in_doubt: bool,
}

impl StepError {
    /// A failure that another attempt would not fix (payment declined, bad request).
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: false,
            in_doubt: false,
        }
    }

    /// A failure that another attempt may fix (service unavailable, connection refused).
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: true,
            in_doubt: false,
        }
    }

    /// The step ran out of time: whether its effect happened is unknown.
    pub fn timed_out(step: &str, after: Duration) -> Self {
        StepError {
            message: format!(
                "step {step} did not finish within {}",
                format_duration(after)
            ),
            retryable: true,
            in_doubt: true,
        }
    }

    /// Marks the outcome as unknown: the effect may have happened (a request timed out after
    /// it was sent). A forward step that fails in doubt is compensated too.
    #[must_use]
    pub fn in_doubt(mut self) -> Self {
        self.in_doubt = true;
        self
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Whether the effect may have happened despite the error.
    pub fn is_in_doubt(&self) -> bool {
        self.in_doubt
    }
}

impl From<ClientError> for StepError {
    /// Keeps the client's message and its retryability; a timeout or a broken connection
    /// after the request was sent leaves the outcome in doubt.
    fn from(error: ClientError) -> Self {
        let in_doubt = matches!(
            error,
            ClientError::Timeout { .. } | ClientError::Body { .. }
        );
        StepError {
            retryable: error.is_retryable(),
            message: error.to_string(),
            in_doubt,
        }
    }
}

impl From<serde_json::Error> for StepError {
    fn from(error: serde_json::Error) -> Self {
        StepError::permanent(format!("saga data: {error}"))
    }
}

/// A saga could not be defined, started, driven or looked up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// A definition or an option is invalid; the message names it.
    #[error("invalid saga definition or option: {0}")]
    Invalid(String),
    /// No saga of that name (and version) is registered with this orchestrator.
    #[error("no saga named {name:?} is registered with this orchestrator")]
    UnknownSaga {
        /// The name asked for.
        name: String,
    },
    /// No saga with that id is in the log.
    #[error("saga {id} is not in the saga log")]
    NotFound {
        /// The saga id.
        id: String,
    },
    /// The saga is not in a state that allows the operation.
    #[error("saga {id} is {state}; {operation} needs a saga in state {expected}")]
    WrongState {
        /// The saga id.
        id: String,
        /// Its state.
        state: String,
        /// What was asked.
        operation: &'static str,
        /// The state the operation needs.
        expected: &'static str,
    },
    /// Another orchestrator changed the saga's log entry meanwhile (it took the saga over
    /// after this one's lease ran out); this one stopped driving it.
    #[error("saga {id}: another orchestrator took over (log entry changed under us)")]
    LostOwnership {
        /// The saga id.
        id: String,
    },
    /// The saga data could not be (de)serialized.
    #[error("saga {name}: data is not valid: {source}")]
    Data {
        /// The saga name.
        name: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// A log entry in the store is not a saga record this version understands.
    #[error("saga log entry {id} is corrupt: {reason}")]
    CorruptLog {
        /// The saga id.
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// The store failed.
    #[error("saga log: {0}")]
    Store(#[from] StoreError),
    /// The orchestrator was shut down.
    #[error("the saga orchestrator is shut down")]
    Shutdown,
}

/// Result alias of this crate.
pub type Result<T, E = SagaError> = std::result::Result<T, E>;
