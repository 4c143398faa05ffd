//! The one error type of the event bus.

use trellis_store::StoreError;

/// A boxed error, what handlers return and what transports wrap.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong publishing or consuming events.
///
/// [`EventError::is_retryable`] tells a caller whether the same call may succeed later
/// (the store or broker was unreachable, a concurrent writer won a race) or not (bad input).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// A topic, group or key was rejected before anything was written.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// `topic`, `group`, `header name`, ….
        what: &'static str,
        /// The value as given.
        value: String,
        /// The rule it broke.
        reason: String,
    },
    /// Options that do not make sense together.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// Which option.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// A payload could not be serialized, or a stored envelope could not be read back.
    #[error("event {what}: {source}")]
    Codec {
        /// What was being encoded or decoded.
        what: String,
        /// The serde error, naming the field.
        #[source]
        source: serde_json::Error,
    },
    /// The store failed.
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    /// Appending to a partition kept losing the race against other writers.
    #[error(
        "topic {topic} partition {partition}: gave up appending after {attempts} conflicting attempts"
    )]
    Contention {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// How often it tried.
        attempts: u32,
    },
    /// This member no longer owns the partition (its lease ran out and another member took
    /// it over): the commit was refused, and the events will be processed by the new owner.
    #[error("group {group} lost partition {partition} of {topic}: {reason}")]
    Fenced {
        /// Topic.
        topic: String,
        /// Consumer group.
        group: String,
        /// Partition.
        partition: u32,
        /// What was found instead.
        reason: String,
    },
    /// An operation that needs the group idle found active members.
    #[error("group {group} on {topic} has active members ({members}); stop them first")]
    GroupActive {
        /// Topic.
        topic: String,
        /// Consumer group.
        group: String,
        /// Who holds partitions.
        members: String,
    },
    /// The topic does not exist (nothing was ever published to it).
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    /// The transport failed in a way specific to it (Kafka broker errors, …).
    #[error("{transport} transport: {message}")]
    Transport {
        /// Transport name.
        transport: &'static str,
        /// What happened.
        message: String,
        /// Whether retrying may help.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The bus or subscription was shut down.
    #[error("event bus is shut down")]
    Closed,
    /// Writing the CLI's output failed.
    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
}

impl EventError {
    /// True when the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            EventError::Store(e) => e.is_retryable(),
            EventError::Contention { .. } => true,
            EventError::Transport { retryable, .. } => *retryable,
            _ => false,
        }
    }

    pub(crate) fn codec(what: impl Into<String>, source: serde_json::Error) -> Self {
        EventError::Codec {
            what: what.into(),
            source,
        }
    }
}

/// Result alias of the event bus.
pub type Result<T, E = EventError> = std::result::Result<T, E>;

/// Checks a topic or group name: 1 to 200 characters of `[A-Za-z0-9._-]` (Kafka's rule, a
/// little shorter so `<topic>.dlq` still fits Kafka's 249).
pub fn validate_name(what: &'static str, value: &str) -> Result<()> {
    let bad_char = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
    let reason = if value.is_empty() {
        Some("is empty".to_owned())
    } else if value.len() > 200 {
        Some(format!("is {} characters long; at most 200", value.len()))
    } else if value == "." || value == ".." {
        Some("cannot be \".\" or \"..\"".to_owned())
    } else {
        bad_char.map(|c| format!("contains {c:?}; use letters, digits, '.', '_' and '-'"))
    };
    match reason {
        Some(reason) => Err(EventError::InvalidName {
            what,
            value: value.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("topic", "user.created").is_ok());
        assert!(validate_name("topic", "a-b_c.9").is_ok());
        for bad in ["", ".", "a/b", "a b", "ü", &"x".repeat(201)] {
            let err = validate_name("topic", bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid topic"), "{err}");
        }
    }
}
