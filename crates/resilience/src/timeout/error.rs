use std::time::Duration;

use trellis_core::format_duration;

/// The request did not complete within the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request timed out after {}", format_duration(*.after))]
pub struct Elapsed {
    after: Duration,
}

impl Elapsed {
    /// The error for a limit of `after`.
    pub const fn new(after: Duration) -> Self {
        Elapsed { after }
    }

    /// The limit that elapsed.
    pub const fn after(&self) -> Duration {
        self.after
    }

    /// Always true: trying again (on another endpoint, or later) may succeed.
    pub const fn is_retryable(&self) -> bool {
        true
    }
}
