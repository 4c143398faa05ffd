use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
use std::time::Duration;

use tokio::time::Instant;

use crate::ConfigError;
use crate::sync::lock;

/// Passive outlier ejection: an endpoint that fails `consecutive_failures` requests in a
/// row (5xx responses, connect errors) is taken out of rotation for an ejection period.
///
/// The period is `base_ejection` the first time and doubles each time the endpoint is
/// ejected again soon after, up to `max_ejection`; every `base_ejection` spent without
/// being ejected forgives one doubling. Never more than `max_ejected_percent` of the
/// endpoints are ejected at once (rounded down: a lone endpoint is never ejected), so a
/// failure of everything degrades to errors rather than to an empty pool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct OutlierDetection {
    consecutive_failures: u32,
    base_ejection: Duration,
    max_ejection: Duration,
    max_ejected_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl OutlierDetection {
    /// Failures in a row that eject an endpoint. Defaults to 5.
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = failures;
        self
    }

    /// The first ejection period. Defaults to 30 s.
    pub fn base_ejection(mut self, period: Duration) -> Self {
        self.base_ejection = period;
        self
    }

    /// The longest ejection period. Defaults to 300 s.
    pub fn max_ejection(mut self, period: Duration) -> Self {
        self.max_ejection = period;
        self
    }

    /// The largest share of endpoints ejected at once, in percent. Defaults to 50.
    pub fn max_ejected_percent(mut self, percent: u8) -> Self {
        self.max_ejected_percent = percent;
        self
    }

    /// Checks every setting, naming the first one out of range.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.consecutive_failures == 0 {
            return Err(ConfigError::out_of_range(
                "consecutive_failures",
                "at least 1",
                0,
            ));
        }
        if self.base_ejection.is_zero() {
            return Err(ConfigError::out_of_range(
                "base_ejection",
                "above zero",
                "0s",
            ));
        }
        if self.max_ejection < self.base_ejection {
            return Err(ConfigError::out_of_range(
                "max_ejection",
                "at least base_ejection",
                format!("{:?}", self.max_ejection),
            ));
        }
        if self.max_ejected_percent > 100 {
            return Err(ConfigError::out_of_range(
                "max_ejected_percent",
                "at most 100",
                self.max_ejected_percent,
            ));
        }
        Ok(self)
    }

    pub(super) fn threshold(&self) -> u32 {
        self.consecutive_failures
    }

    pub(super) fn max_ejected(&self, endpoints: usize) -> usize {
        endpoints * usize::from(self.max_ejected_percent) / 100
    }

    /// The period of the next ejection of an endpoint ejected `times` times before.
    pub(super) fn period(&self, times: u32) -> Duration {
        1u32.checked_shl(times)
            .and_then(|f| self.base_ejection.checked_mul(f))
            .map_or(self.max_ejection, |d| d.min(self.max_ejection))
    }

    pub(super) fn base(&self) -> Duration {
        self.base_ejection
    }
}

/// Counters and ejection state of one endpoint; kept across updates of the endpoint set.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) in_flight: AtomicUsize,
    pub(super) requests: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) consecutive_failures: AtomicU32,
    pub(super) ejection: Mutex<Ejection>,
}

#[derive(Debug, Default)]
pub(super) struct Ejection {
    /// Ejected until then.
    pub(super) until: Option<Instant>,
    /// Doublings of the next period (decays over time).
    pub(super) level: u32,
    /// When the last ejection ended.
    pub(super) last_end: Option<Instant>,
    /// Ejections since the endpoint was first seen.
    pub(super) total: u64,
}

impl Stats {
    pub(super) fn ejected_until(&self, now: Instant) -> Option<Instant> {
        lock(&self.ejection).until.filter(|u| *u > now)
    }

    /// Ends an ejection that is over; returns the end of one still running.
    pub(super) fn expire(&self, now: Instant) -> Option<Instant> {
        let mut e = lock(&self.ejection);
        match e.until {
            Some(until) if until <= now => {
                e.until = None;
                e.last_end = Some(until);
                None
            }
            other => other,
        }
    }

    /// Ejects the endpoint; returns the period.
    pub(super) fn eject(&self, config: &OutlierDetection, now: Instant) -> Duration {
        let mut e = lock(&self.ejection);
        if let Some(end) = e.last_end {
            let quiet = now.saturating_duration_since(end);
            let forgiven = quiet.as_nanos() / config.base().as_nanos().max(1);
            e.level = e
                .level
                .saturating_sub(u32::try_from(forgiven).unwrap_or(u32::MAX));
        }
        let period = config.period(e.level);
        e.until = Some(now + period);
        e.level = e.level.saturating_add(1);
        e.total += 1;
        period
    }
}
