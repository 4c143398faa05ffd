use std::time::Duration;

use crate::ConfigError;

/// Exponential backoff with **full jitter**: before retry `n` (counting from 0) the wait is
/// drawn uniformly from `[0, min(cap, base × 2ⁿ)]`.
///
/// Full jitter spreads the retries of many clients that failed together over the whole
/// interval instead of sending them back in synchronized waves (see "Exponential Backoff
/// and Jitter", AWS Architecture Blog, 2015).
///
/// ```
/// use std::time::Duration;
/// use trellis_resilience::retry::Backoff;
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
/// assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
/// assert_eq!(backoff.ceiling(3), Duration::from_millis(800));
/// assert_eq!(backoff.ceiling(4), Duration::from_secs(1)); // capped
/// assert!(backoff.delay(2) <= Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    /// Base 100 ms, cap 10 s.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// Backoff starting at `base` and never waiting more than `cap`; `base` must not exceed
    /// `cap`.
    pub fn new(base: Duration, cap: Duration) -> Result<Self, ConfigError> {
        if base > cap {
            return Err(ConfigError::out_of_range(
                "backoff base",
                "at most the backoff cap",
                format!("{base:?} > cap {cap:?}"),
            ));
        }
        Ok(Backoff { base, cap })
    }

    /// The first ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest wait; also the longest `Retry-After` a retry policy honours.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The upper bound of the wait before retry `retry` (0-based): `min(cap, base × 2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        1u32.checked_shl(retry)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// A random wait before retry `retry` (0-based), uniform in `[0, ceiling(retry)]`.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry).as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(fastrand::u64(0..=ceiling))
    }

    /// The wait for a given draw: `unit` in `[0, 1]` maps linearly onto
    /// `[0, ceiling(retry)]` (values outside are clamped). [`Backoff::delay`] is this with a
    /// random `unit`; tests use it to check the bounds.
    pub fn delay_with(&self, retry: u32, unit: f64) -> Duration {
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        self.ceiling(retry).mul_f64(unit)
    }
}
