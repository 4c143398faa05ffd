//! Errors shared by every layer: bad configuration, and finding a layer's error in a chain.

use std::error::Error as StdError;

use crate::breaker::BreakerOpen;
use crate::ratelimit::RateLimited;
use crate::timeout::Elapsed;

/// A boxed error, the error type of the layers in this crate (as in tower), so that stacks of
/// layers compose. The concrete errors ([`Elapsed`], [`BreakerOpen`], [`RateLimited`]) are
/// found again with [`error_kind`] or by downcasting.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A setting was rejected when a limiter, breaker, budget or balancer was built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value is outside the range the setting accepts.
    #[error("{setting} must be {expected}, got {got}")]
    OutOfRange {
        /// The setting, as named in config files (`failure_rate`, `requests`, …).
        setting: &'static str,
        /// What it must be (`"at least 1"`, `"between 0 and 1"`).
        expected: &'static str,
        /// The value given.
        got: String,
    },
    /// A duration could not be read.
    #[error("{setting}: {source}")]
    Duration {
        /// The setting that held it.
        setting: &'static str,
        /// Why it was rejected.
        #[source]
        source: trellis_core::DurationError,
    },
}

impl ConfigError {
    pub(crate) fn out_of_range(
        setting: &'static str,
        expected: &'static str,
        got: impl ToString,
    ) -> Self {
        ConfigError::OutOfRange {
            setting,
            expected,
            got: got.to_string(),
        }
    }
}

/// Which resilience layer failed a request, as found by [`error_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A [`Timeout`](crate::timeout::Timeout) elapsed (a gateway answers 504).
    Timeout,
    /// A circuit breaker was open (a gateway answers 503 at once).
    CircuitOpen,
    /// A rate limit was exceeded (a gateway answers 429 with `Retry-After`).
    RateLimited,
}

/// Walks `error` and its `source()` chain and says which resilience layer, if any, produced
/// it. The first match wins, so an outer layer's error is found before an inner one's.
///
/// ```
/// use std::time::Duration;
/// use trellis_resilience::{BoxError, ErrorKind, error_kind, timeout::Elapsed};
/// let err: BoxError = Elapsed::new(Duration::from_secs(30)).into();
/// assert_eq!(error_kind(&*err), Some(ErrorKind::Timeout));
/// ```
pub fn error_kind(error: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    let mut next = Some(error);
    while let Some(err) = next {
        if err.is::<Elapsed>() {
            return Some(ErrorKind::Timeout);
        }
        if err.is::<BreakerOpen>() {
            return Some(ErrorKind::CircuitOpen);
        }
        if err.is::<RateLimited>() {
            return Some(ErrorKind::RateLimited);
        }
        next = err.source();
    }
    None
}
