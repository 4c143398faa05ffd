use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use trellis_core::format_duration;

use super::{Quota, RateLimitInfo};

/// A request was over its rate limit. A gateway answers 429 with the headers from
/// [`http::rate_limited_headers`](crate::http::rate_limited_headers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RateLimited {
    quota: Quota,
    info: RateLimitInfo,
    retry_after: Duration,
    class: Option<Arc<str>>,
}

impl RateLimited {
    pub(crate) fn new(quota: Quota, info: RateLimitInfo, retry_after: Duration) -> Self {
        RateLimited {
            quota,
            info,
            retry_after,
            class: None,
        }
    }

    pub(crate) fn with_class(mut self, class: Option<Arc<str>>) -> Self {
        self.class = class;
        self
    }

    /// The quota that was exceeded.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Limit, remaining (0) and reset, for the `RateLimit-*` headers.
    pub fn info(&self) -> RateLimitInfo {
        self.info
    }

    /// How long until one more request would be admitted.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The key class whose quota applied (`None` for the default quota).
    pub fn class(&self) -> Option<&str> {
        self.class.as_deref()
    }

    /// Always false: the caller is over its own limit.
    pub const fn is_retryable(&self) -> bool {
        false
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limit of {} requests per {} exceeded",
            self.quota.requests(),
            format_duration(self.quota.window())
        )?;
        if let Some(class) = &self.class {
            write!(f, " (class {class})")?;
        }
        write!(f, "; retry after {}", format_duration(self.retry_after))
    }
}
