//! Keyed rate limiting with GCRA: `requests` per `window` per key.
//!
//! - [`Quota`]: `requests` per `window` with a burst (the seed's `requests: 1000,
//!   window: '1m'`), parsed from config with [`Quota::parse`].
//! - [`Gcra`]: the algorithm on explicit timestamps — one `u64` of state per key, no
//!   background refill, exact to the nanosecond.
//! - [`RateLimiter`]: GCRA per key (JWT subject, API key, client IP — any string), a
//!   default quota with per-class overrides (per route, per plan), bounded memory.
//! - [`RateLimitLayer`]: the tower layer; a [`KeyExtractor`] reads the key from each
//!   request. Refused requests fail with [`RateLimited`], which carries what the
//!   `Retry-After` and `RateLimit-*` headers need; [`http::rate_limited_headers`]
//!   renders them.
//!
//! Why GCRA rather than a fixed window counter: a counter lets a client send twice its
//! quota across a window boundary, and needs a timer to reset. GCRA spreads the quota
//! evenly, needs no timer, and its state of a key that went idle equals no state, which
//! makes forgetting keys free.
//!
//! It is not a distributed limiter: each process limits on its own (a gateway running on
//! N machines admits up to N × the quota).
//!
//! [`http::rate_limited_headers`]: crate::http::rate_limited_headers

mod error;
mod layer;
mod limiter;
mod quota;
pub(crate) use quota::ceil_secs;

pub use self::error::RateLimited;
pub use self::layer::{
    KeyExtractor, KeyFn, RateKey, RateLimit, RateLimitLayer, ResponseFuture, key_fn,
};
pub use self::limiter::{ClassStats, DEFAULT_MAX_KEYS, RateLimiter, RateLimiterBuilder};
pub use self::quota::{Gcra, Quota, RateLimitInfo};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::time::Duration;
    use tokio::time::advance;

    #[tokio::test(start_paused = true)]
    async fn keyed_limiter_refills_with_tokio_time() {
        let limiter = RateLimiter::new(Quota::parse("10", "1s").unwrap());
        for _ in 0..10 {
            limiter.check(None, "k").unwrap();
        }
        let denied = limiter.check(None, "k").unwrap_err();
        assert_eq!(denied.retry_after(), Duration::from_millis(100));
        assert_eq!(
            denied.to_string(),
            "rate limit of 10 requests per 1s exceeded; retry after 100ms"
        );
        advance(Duration::from_millis(100)).await;
        assert_eq!(limiter.check(None, "k").unwrap().remaining, 0);
        advance(Duration::from_secs(1)).await;
        assert_eq!(limiter.peek(None, "k").remaining, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn classes_override_the_default_and_unknown_classes_fall_back() {
        let limiter = RateLimiter::builder(Quota::parse("1", "1m").unwrap())
            .class("premium", Quota::parse("3", "1m").unwrap())
            .build();
        assert_eq!(limiter.quota(Some("premium")).requests(), 3);
        assert_eq!(limiter.quota(Some("nope")).requests(), 1);
        for _ in 0..3 {
            limiter.check(Some("premium"), "k").unwrap();
        }
        let denied = limiter.check(Some("premium"), "k").unwrap_err();
        assert_eq!(denied.class(), Some("premium"));
        assert!(denied.to_string().contains("(class premium)"));
        limiter.check(Some("nope"), "k").unwrap();
        assert!(
            limiter.check(None, "k").is_err(),
            "unknown class used the default table"
        );
        let stats = limiter.stats();
        assert_eq!(stats[0].class, None);
        assert_eq!((stats[0].admitted, stats[0].limited), (1, 1));
        assert_eq!(stats[1].class.as_deref(), Some("premium"));
        assert_eq!((stats[1].admitted, stats[1].limited), (3, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_and_idle_keys_go_first() {
        let limiter = RateLimiter::builder(Quota::parse("10", "1s").unwrap())
            .max_keys(160)
            .build();
        // A heavy key, then a flood of one-off keys.
        for _ in 0..10 {
            limiter.check(None, "heavy").unwrap();
        }
        for i in 0..10_000 {
            limiter.check(None, &format!("flood-{i}")).unwrap();
        }
        assert!(limiter.len() <= 160, "{} keys remembered", limiter.len());
        // The heavy key is still limited: it was never the one forgotten.
        assert!(limiter.check(None, "heavy").is_err());
        assert!(limiter.stats()[0].evicted > 0);

        // After a second every key has its burst back; sweep forgets them all.
        advance(Duration::from_secs(1)).await;
        let remembered = limiter.len();
        assert_eq!(limiter.sweep(), remembered);
        assert!(limiter.is_empty());
    }

    #[test]
    fn max_keys_below_shards_is_refused_by_try_build() {
        let err = RateLimiter::builder(Quota::parse("1", "1s").unwrap())
            .max_keys(3)
            .try_build()
            .unwrap_err();
        assert_eq!(err.to_string(), "max_keys must be at least 16, got 3");
    }
}
