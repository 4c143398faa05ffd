use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use trellis_core::format_duration;

use super::BreakerState;

/// A circuit breaker refused the request without sending it.
///
/// Either the breaker is open (the upstream failed too often; it is left alone until the
/// open timeout has passed), or it is half-open and its probe requests are already in
/// flight. A gateway answers 503 at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct BreakerOpen {
    name: Arc<str>,
    state: BreakerState,
    retry_in: Duration,
}

impl BreakerOpen {
    pub(crate) fn new(name: Arc<str>, state: BreakerState, retry_in: Duration) -> Self {
        BreakerOpen {
            name,
            state,
            retry_in,
        }
    }

    /// The breaker's name (its upstream and route).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`BreakerState::Open`] or [`BreakerState::HalfOpen`].
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// How long until the breaker lets a probe through (zero when half-open).
    pub fn retry_in(&self) -> Duration {
        self.retry_in
    }

    /// Always true: another endpoint, or the same one later, may answer.
    pub const fn is_retryable(&self) -> bool {
        true
    }
}

impl fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            BreakerState::HalfOpen => write!(
                f,
                "circuit breaker {} is half-open and its probes are in flight; failing fast",
                self.name
            ),
            _ => write!(
                f,
                "circuit breaker {} is open; failing fast, next probe in {}",
                self.name,
                format_duration(self.retry_in)
            ),
        }
    }
}
