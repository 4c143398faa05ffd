use std::convert::Infallible;
use std::error::Error as StdError;
use std::time::Duration;

use crate::BoxError;
use crate::breaker::BreakerOpen;
use crate::ratelimit::RateLimited;
use crate::timeout::Elapsed;

/// What a [`Policy`] makes of one attempt's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Return this result to the caller.
    Accept,
    /// Try again after the backoff.
    Retry,
    /// Try again, but not before this long (the upstream's `Retry-After`). When it is
    /// longer than the backoff cap the result is returned instead.
    RetryAfter(Duration),
}

/// Decides which requests may be retried and which results are worth retrying.
///
/// The [`Retry`](super::Retry) service asks [`clone_request`](Policy::clone_request) once
/// per attempt, before sending it: a request that cannot be copied (a streaming body, a
/// non-idempotent method) is never retried. It asks [`decide`](Policy::decide) when an
/// attempt completes — for HTTP, when the response *head* has arrived and before any byte
/// of the body went to the caller, so a retried response is simply dropped.
pub trait Policy<Req, Res, E> {
    /// A copy of `request` for a later attempt, or `None` if it must not be retried.
    fn clone_request(&self, request: &Req) -> Option<Req>;

    /// Whether `result` should be returned or retried.
    fn decide(&self, result: &Result<Res, E>) -> Decision;
}

/// Errors that say whether trying again may help.
pub trait RetryableError {
    /// True when another attempt (later, or on another endpoint) may succeed.
    fn is_retryable(&self) -> bool;
}

impl RetryableError for Infallible {
    fn is_retryable(&self) -> bool {
        match *self {}
    }
}

impl RetryableError for std::io::Error {
    /// Connection refused, reset, timed out… all retryable.
    fn is_retryable(&self) -> bool {
        true
    }
}

impl RetryableError for Elapsed {
    fn is_retryable(&self) -> bool {
        true
    }
}

impl RetryableError for BreakerOpen {
    /// Retryable: the next attempt may go to another endpoint.
    fn is_retryable(&self) -> bool {
        true
    }
}

impl RetryableError for RateLimited {
    /// Not retryable: the caller is over its own limit.
    fn is_retryable(&self) -> bool {
        false
    }
}

impl RetryableError for BoxError {
    /// Walks the `source()` chain: not retryable if a [`RateLimited`] is in it, retryable
    /// otherwise (a transport error of a request that may be sent twice).
    fn is_retryable(&self) -> bool {
        let mut next: Option<&(dyn StdError + 'static)> = Some(&**self);
        while let Some(err) = next {
            if err.is::<RateLimited>() {
                return false;
            }
            next = err.source();
        }
        true
    }
}

/// A policy for any clonable request that retries retryable errors and accepts every
/// response. For HTTP, use [`HttpRetryPolicy`](crate::http::HttpRetryPolicy).
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryErrors;

impl<Req: Clone, Res, E: RetryableError> Policy<Req, Res, E> for RetryErrors {
    fn clone_request(&self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }

    fn decide(&self, result: &Result<Res, E>) -> Decision {
        match result {
            Err(e) if e.is_retryable() => Decision::Retry,
            _ => Decision::Accept,
        }
    }
}
