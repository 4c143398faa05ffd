use std::time::Duration;

use serde::Serialize;
use trellis_core::parse_duration;

use super::RateLimited;
use crate::ConfigError;

/// `requests` per `window`, with a `burst`: the seed's `rate_limiting = { requests = 1000,
/// window = "1m" }`.
///
/// GCRA spaces requests `window / requests` apart on average and lets up to `burst`
/// through at once; over any interval `t` at most `burst + t × requests / window` are
/// admitted. The burst defaults to `requests`, so "1000 per minute" lets a quiet client
/// send 1000 at once, then about 16 per second (the same as a token bucket of 1000 tokens
/// refilled at 1000/min).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Quota {
    requests: u32,
    #[serde(with = "window_ms")]
    window: Duration,
    burst: u32,
}

mod window_ms {
    use std::time::Duration;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

impl Quota {
    /// `requests` per `window`, burst `requests`.
    pub fn new(requests: u32, window: Duration) -> Result<Self, ConfigError> {
        if requests == 0 {
            return Err(ConfigError::out_of_range("requests", "at least 1", 0));
        }
        if window.is_zero() {
            return Err(ConfigError::out_of_range("window", "above zero", "0s"));
        }
        if window.as_nanos() < u128::from(requests) {
            return Err(ConfigError::out_of_range(
                "requests",
                "at most one per nanosecond of the window",
                format!("{requests} per {window:?}"),
            ));
        }
        Quota {
            requests,
            window,
            burst: requests,
        }
        .checked()
    }

    /// Reads the config form: `requests` a whole number (`"1000"`), `window` a duration
    /// (`"1m"`, `"30s"`, or milliseconds).
    pub fn parse(requests: &str, window: &str) -> Result<Self, ConfigError> {
        let count: u32 = requests.trim().parse().map_err(|_| {
            ConfigError::out_of_range("requests", "a whole number from 1 to 4294967295", requests)
        })?;
        let window = parse_duration(window).map_err(|source| ConfigError::Duration {
            setting: "window",
            source,
        })?;
        Quota::new(count, window)
    }

    /// Sets how many requests may go through at once (at least 1). Defaults to `requests`.
    pub fn with_burst(self, burst: u32) -> Result<Self, ConfigError> {
        if burst == 0 {
            return Err(ConfigError::out_of_range("burst", "at least 1", 0));
        }
        Quota { burst, ..self }.checked()
    }

    fn checked(self) -> Result<Self, ConfigError> {
        // The burst capacity in nanoseconds must fit comfortably in a u64.
        let capacity = u128::from(self.emission_nanos()) * u128::from(self.burst);
        if capacity > u128::from(u64::MAX / 4) {
            return Err(ConfigError::out_of_range(
                "burst",
                "small enough that burst × window / requests is under 146 years",
                self.burst,
            ));
        }
        Ok(self)
    }

    /// Requests per window.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Requests that may go through at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The average spacing of requests: `window / requests`.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.emission_nanos())
    }

    fn emission_nanos(&self) -> u64 {
        (self.window.as_nanos() / u128::from(self.requests)).min(u128::from(u64::MAX)) as u64
    }
}

/// What a client may still do, for the `RateLimit-*` response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimitInfo {
    /// The quota (`RateLimit-Limit`): the burst, which is `requests` unless set otherwise.
    pub limit: u32,
    /// Requests that could be sent right now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Time until the full quota is available again (`RateLimit-Reset`).
    #[serde(with = "window_ms")]
    pub reset: Duration,
}

impl RateLimitInfo {
    /// `RateLimit-Reset`: whole seconds until the full quota is back, rounded up (a
    /// client is never told to come back too early).
    pub fn reset_secs(&self) -> u64 {
        ceil_secs(self.reset)
    }
}

/// Whole seconds, rounded up: headers never tell a client to come back too early.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The Generic Cell Rate Algorithm on explicit timestamps, for one key.
///
/// State is one number per key, its *theoretical arrival time* (TAT). A request at `now`
/// is admitted when `max(TAT, now) + T − now ≤ burst × T` (with `T = window / requests`),
/// and then `TAT = max(TAT, now) + T`. A key whose TAT is in the past is indistinguishable
/// from a key never seen, which is what lets the keyed [`RateLimiter`](super::RateLimiter)
/// forget idle keys without changing any decision.
///
/// ```
/// use std::time::Duration;
/// use trellis_resilience::ratelimit::{Gcra, Quota};
/// let gcra = Gcra::new(Quota::new(2, Duration::from_secs(1)).unwrap());
/// let mut tat = 0;
/// assert!(gcra.check(&mut tat, 0).is_ok());
/// assert!(gcra.check(&mut tat, 0).is_ok());
/// let limited = gcra.check(&mut tat, 0).unwrap_err();
/// assert_eq!(limited.retry_after(), Duration::from_millis(500));
/// assert!(gcra.check(&mut tat, 500_000_000).is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    quota: Quota,
    interval: u64,
    capacity: u64,
}

impl Gcra {
    /// The algorithm for `quota`.
    pub fn new(quota: Quota) -> Self {
        let interval = quota.emission_nanos();
        Gcra {
            quota,
            interval,
            capacity: interval.saturating_mul(u64::from(quota.burst)),
        }
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Decides a request at `now` (nanoseconds on any monotonic clock) for a key whose TAT
    /// is `tat` (0 for a new key), updating `tat` when the request is admitted.
    pub fn check(&self, tat: &mut u64, now: u64) -> Result<RateLimitInfo, RateLimited> {
        let start = (*tat).max(now);
        let debt = (start - now).saturating_add(self.interval);
        if debt > self.capacity {
            return Err(RateLimited::new(
                self.quota,
                RateLimitInfo {
                    limit: self.quota.burst,
                    remaining: 0,
                    reset: Duration::from_nanos(start - now),
                },
                Duration::from_nanos(debt - self.capacity),
            ));
        }
        *tat = now.saturating_add(debt);
        Ok(RateLimitInfo {
            limit: self.quota.burst,
            remaining: ((self.capacity - debt) / self.interval.max(1)).min(u64::from(u32::MAX))
                as u32,
            reset: Duration::from_nanos(debt),
        })
    }

    /// What a request at `now` would be told, without counting it.
    pub fn peek(&self, tat: u64, now: u64) -> RateLimitInfo {
        let debt = tat.saturating_sub(now);
        RateLimitInfo {
            limit: self.quota.burst,
            remaining: (self.capacity.saturating_sub(debt) / self.interval.max(1))
                .min(u64::from(u32::MAX)) as u32,
            reset: Duration::from_nanos(debt),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn seed_quota_parses() {
        let q = Quota::parse("1000", "1m").unwrap();
        assert_eq!(q.requests(), 1000);
        assert_eq!(q.window(), Duration::from_secs(60));
        assert_eq!(q.burst(), 1000);
        assert_eq!(q.emission_interval(), Duration::from_millis(60));
    }

    #[test]
    fn bad_quotas_say_what_is_wrong() {
        assert_eq!(
            Quota::parse("0", "1m").unwrap_err().to_string(),
            "requests must be at least 1, got 0"
        );
        assert_eq!(
            Quota::parse("lots", "1m").unwrap_err().to_string(),
            "requests must be a whole number from 1 to 4294967295, got lots"
        );
        assert!(
            Quota::parse("10", "soon")
                .unwrap_err()
                .to_string()
                .starts_with("window: \"soon\" is not a duration")
        );
        assert!(Quota::new(10, Duration::ZERO).is_err());
        assert!(Quota::new(10, Duration::from_nanos(5)).is_err());
        assert!(
            Quota::new(1, Duration::from_secs(60))
                .unwrap()
                .with_burst(0)
                .is_err()
        );
    }

    #[test]
    fn burst_then_spacing_with_headers() {
        let g = Gcra::new(
            Quota::new(10, Duration::from_secs(1))
                .unwrap()
                .with_burst(3)
                .unwrap(),
        );
        let mut tat = 0;
        let now = 5 * SEC;
        let a = g.check(&mut tat, now).unwrap();
        assert_eq!(
            (a.limit, a.remaining, a.reset),
            (3, 2, Duration::from_millis(100))
        );
        let b = g.check(&mut tat, now).unwrap();
        assert_eq!((b.remaining, b.reset), (1, Duration::from_millis(200)));
        let c = g.check(&mut tat, now).unwrap();
        assert_eq!((c.remaining, c.reset), (0, Duration::from_millis(300)));
        let denied = g.check(&mut tat, now).unwrap_err();
        assert_eq!(denied.retry_after(), Duration::from_millis(100));
        assert_eq!(denied.info().reset, Duration::from_millis(300));
        assert_eq!(denied.info().remaining, 0);
        // A denied request costs nothing: exactly at retry_after it is admitted.
        assert!(g.check(&mut tat, now + SEC / 10 - 1).is_err());
        assert!(g.check(&mut tat, now + SEC / 10).is_ok());
        assert_eq!(g.peek(tat, now + 10 * SEC).remaining, 3);
    }
}
