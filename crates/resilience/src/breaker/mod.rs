//! Circuit breakers: stop sending requests to an upstream that keeps failing.
//!
//! A [`CircuitBreaker`] is **closed** (requests flow) until either
//!
//! - `threshold` requests in a row failed (the seed's `threshold: 5`), or
//! - over the sliding `window` (10 s), at least `minimum_requests` (20) were seen and the
//!   share of failures reached `failure_rate` (50 %) — this catches an upstream that fails
//!   every other request, which never makes five failures in a row.
//!
//! It then **opens**: every request fails at once with [`BreakerOpen`] (a gateway answers
//! 503) for `open_timeout` (the seed's `timeout: 60000`). After that it is **half-open**:
//! up to `half_open_probes` requests (1) go through as probes; if they all succeed it
//! closes, and if one fails it opens again for another `open_timeout`.
//!
//! Breakers are keyed — one per upstream instance and one per route — through
//! [`CircuitBreakers`], and a [`CircuitBreakerLayer`] finds the breaker of each request
//! with a [`SelectBreaker`]. What counts as a failure is a [`Classify`]: every error by
//! default, every error and 5xx response with [`http::ServerErrors`](crate::http::ServerErrors).
//! [`CircuitBreaker::snapshot`] gives the state, counts and `opened_at` for admin endpoints.
//!
//! Time is tokio's, so tests drive transitions with `tokio::time::pause()`.
//!
//! ```
//! use std::sync::Arc;
//! use trellis_resilience::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
//!
//! let breaker = Arc::new(CircuitBreaker::new("orders", BreakerConfig::default().threshold(2)).unwrap());
//! breaker.try_acquire().unwrap().failure();
//! breaker.try_acquire().unwrap().failure();
//! assert_eq!(breaker.state(), BreakerState::Open);
//! let refused = breaker.try_acquire().unwrap_err();
//! assert!(refused.to_string().starts_with("circuit breaker orders is open"));
//! ```

mod error;
mod future;
mod layer;
mod registry;

pub use self::error::BreakerOpen;
pub use self::future::ResponseFuture;
pub use self::layer::{
    CircuitBreakerLayer, CircuitBreakerService, Classify, ErrorsFail, KeyedBreakers, SelectBreaker,
};
pub use self::registry::CircuitBreakers;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use crate::ConfigError;
use crate::sync::{SlidingWindow, lock, ms};

/// The three states of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests flow; failures are counted.
    Closed,
    /// Requests fail at once until the open timeout has passed.
    Open,
    /// A limited number of probe requests decide whether to close or open again.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

/// When a breaker opens and how it recovers. Defaults follow the seed: threshold 5,
/// open timeout 60 s.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct BreakerConfig {
    threshold: u32,
    failure_rate: f64,
    minimum_requests: u32,
    window: Duration,
    open_timeout: Duration,
    half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: 5,
            failure_rate: 0.5,
            minimum_requests: 20,
            window: Duration::from_secs(10),
            open_timeout: Duration::from_secs(60),
            half_open_probes: 1,
        }
    }
}

impl BreakerConfig {
    /// Consecutive failures that open the breaker. Defaults to 5.
    pub fn threshold(mut self, failures: u32) -> Self {
        self.threshold = failures;
        self
    }

    /// Share of failures over the window (0 < rate ≤ 1) that opens the breaker.
    /// Defaults to 0.5.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// Requests that must be seen in the window before the failure rate applies.
    /// Defaults to 20.
    pub fn minimum_requests(mut self, requests: u32) -> Self {
        self.minimum_requests = requests;
        self
    }

    /// The sliding window the failure rate is measured over (100 ms to 1 h).
    /// Defaults to 10 s.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// How long the breaker stays open before it lets a probe through. Defaults to 60 s.
    pub fn open_timeout(mut self, timeout: Duration) -> Self {
        self.open_timeout = timeout;
        self
    }

    /// Probes let through at once when half-open; all must succeed to close.
    /// Defaults to 1.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.half_open_probes = probes;
        self
    }

    /// Checks every setting, naming the first one out of range.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.threshold == 0 {
            return Err(ConfigError::out_of_range("threshold", "at least 1", 0));
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(ConfigError::out_of_range(
                "failure_rate",
                "above 0 and at most 1",
                self.failure_rate,
            ));
        }
        if self.minimum_requests == 0 {
            return Err(ConfigError::out_of_range(
                "minimum_requests",
                "at least 1",
                0,
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&self.window) {
            return Err(ConfigError::out_of_range(
                "window",
                "between 100ms and 1h",
                format!("{:?}", self.window),
            ));
        }
        if self.open_timeout.is_zero() {
            return Err(ConfigError::out_of_range(
                "open timeout",
                "above zero",
                "0s",
            ));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::out_of_range(
                "half_open_probes",
                "at least 1",
                0,
            ));
        }
        Ok(self)
    }
}

/// A breaker's state and counters, for admin endpoints (times serialize as milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: String,
    /// Current state (an open breaker whose timeout passed shows as half-open).
    pub state: BreakerState,
    /// Failures in a row, up to now.
    pub consecutive_failures: u32,
    /// Requests counted over the window.
    pub window_requests: u64,
    /// Of those, failures.
    pub window_failures: u64,
    /// When the breaker last opened, if it is not closed (Unix milliseconds in JSON).
    #[serde(serialize_with = "ms::opt_system_time")]
    pub opened_at: Option<SystemTime>,
    /// Time left until a probe is let through, when open (milliseconds in JSON).
    #[serde(serialize_with = "ms::opt_duration")]
    pub retry_in: Option<Duration>,
    /// Times the breaker opened since it was created.
    pub times_opened: u64,
    /// Requests refused since it was created.
    pub rejected: u64,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// Bumped on every transition, so late results of older permits change nothing.
    generation: u64,
    consecutive_failures: u32,
    window: SlidingWindow,
    open_until: Instant,
    opened_at: Option<SystemTime>,
    probes_in_flight: u32,
    probe_successes: u32,
    times_opened: u64,
    rejected: u64,
}

/// One circuit breaker. Share it in an `Arc`; [`CircuitBreaker::try_acquire`] hands out a
/// [`Permit`] for each request that may go through.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: Arc<str>,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker named `name` (used in errors and logs: the upstream and route).
    pub fn new(name: impl Into<Arc<str>>, config: BreakerConfig) -> Result<Self, ConfigError> {
        Ok(Self::from_valid(name.into(), config.validate()?))
    }

    pub(crate) fn from_valid(name: Arc<str>, config: BreakerConfig) -> Self {
        let now = Instant::now();
        CircuitBreaker {
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                generation: 0,
                consecutive_failures: 0,
                window: SlidingWindow::new(config.window, now),
                open_until: now,
                opened_at: None,
                probes_in_flight: 0,
                probe_successes: 0,
                times_opened: 0,
                rejected: 0,
            }),
            name,
            config,
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The config it was built with.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Lets a request through (returning a permit to report its outcome on) or refuses it.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, BreakerOpen> {
        let mut inner = lock(&self.inner);
        if inner.state == BreakerState::Closed {
            // The common case needs no clock.
            return Ok(Permit::new(self.clone(), inner.generation, false));
        }
        let now = Instant::now();
        self.refresh(&mut inner, now);
        match inner.state {
            BreakerState::Closed => Ok(Permit::new(self.clone(), inner.generation, false)),
            BreakerState::Open => {
                inner.rejected += 1;
                Err(BreakerOpen::new(
                    self.name.clone(),
                    BreakerState::Open,
                    inner.open_until.saturating_duration_since(now),
                ))
            }
            BreakerState::HalfOpen if inner.probes_in_flight < self.config.half_open_probes => {
                inner.probes_in_flight += 1;
                Ok(Permit::new(self.clone(), inner.generation, true))
            }
            BreakerState::HalfOpen => {
                inner.rejected += 1;
                Err(BreakerOpen::new(
                    self.name.clone(),
                    BreakerState::HalfOpen,
                    Duration::ZERO,
                ))
            }
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        let mut inner = lock(&self.inner);
        self.refresh(&mut inner, Instant::now());
        inner.state
    }

    /// State and counters.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        self.refresh(&mut inner, now);
        let counts = inner.window.sum(now);
        BreakerSnapshot {
            name: self.name.to_string(),
            state: inner.state,
            consecutive_failures: inner.consecutive_failures,
            window_requests: counts.total,
            window_failures: counts.marked,
            opened_at: inner.opened_at,
            retry_in: (inner.state == BreakerState::Open)
                .then(|| inner.open_until.saturating_duration_since(now)),
            times_opened: inner.times_opened,
            rejected: inner.rejected,
        }
    }

    /// Closes the breaker and forgets its counts (an operator's override).
    pub fn reset(&self) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        self.close(&mut inner, now);
        inner.consecutive_failures = 0;
    }

    /// Moves an open breaker whose timeout passed to half-open.
    fn refresh(&self, inner: &mut Inner, now: Instant) {
        if inner.state == BreakerState::Open && now >= inner.open_until {
            inner.state = BreakerState::HalfOpen;
            inner.generation += 1;
            inner.probes_in_flight = 0;
            inner.probe_successes = 0;
            tracing::info!(breaker = %self.name, "circuit breaker half-open: probing");
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        inner.state = BreakerState::Open;
        inner.generation += 1;
        inner.open_until = now + self.config.open_timeout;
        inner.opened_at = Some(SystemTime::now());
        inner.times_opened += 1;
        inner.probes_in_flight = 0;
        inner.probe_successes = 0;
        tracing::warn!(
            breaker = %self.name,
            consecutive_failures = inner.consecutive_failures,
            open_for = ?self.config.open_timeout,
            "circuit breaker opened"
        );
    }

    fn close(&self, inner: &mut Inner, now: Instant) {
        if inner.state != BreakerState::Closed {
            tracing::info!(breaker = %self.name, "circuit breaker closed");
        }
        inner.state = BreakerState::Closed;
        inner.generation += 1;
        inner.window.clear(now);
        inner.opened_at = None;
        inner.probes_in_flight = 0;
        inner.probe_successes = 0;
    }

    fn record(&self, generation: u64, probe: bool, failed: bool) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        self.refresh(&mut inner, now);
        if failed {
            inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        } else {
            inner.consecutive_failures = 0;
        }
        if generation != inner.generation {
            // The outcome of a request let through before the last transition: it is
            // counted above but decides nothing.
            return;
        }
        match inner.state {
            BreakerState::Closed => {
                inner.window.add(now, 1, u64::from(failed));
                let counts = inner.window.sum(now);
                let by_count = inner.consecutive_failures >= self.config.threshold;
                let by_rate = counts.total >= u64::from(self.config.minimum_requests)
                    && (counts.marked as f64) >= self.config.failure_rate * counts.total as f64;
                if failed && (by_count || by_rate) {
                    self.open(&mut inner, now);
                }
            }
            BreakerState::HalfOpen if probe => {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                if failed {
                    self.open(&mut inner, now);
                } else {
                    inner.probe_successes += 1;
                    if inner.probe_successes >= self.config.half_open_probes {
                        self.close(&mut inner, now);
                    }
                }
            }
            BreakerState::HalfOpen | BreakerState::Open => {}
        }
    }

    fn release_probe(&self, generation: u64) {
        let mut inner = lock(&self.inner);
        if inner.generation == generation && inner.state == BreakerState::HalfOpen {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
    }
}

/// Permission for one request. Report how it went with [`Permit::success`],
/// [`Permit::failure`] or [`Permit::record`]; dropping it unreported (a cancelled request)
/// counts nothing and frees its probe slot.
#[derive(Debug)]
#[must_use = "report the outcome, or the request is not counted"]
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    generation: u64,
    probe: bool,
    reported: bool,
}

impl Permit {
    fn new(breaker: Arc<CircuitBreaker>, generation: u64, probe: bool) -> Self {
        Permit {
            breaker,
            generation,
            probe,
            reported: false,
        }
    }

    /// True when this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The request succeeded.
    pub fn success(self) {
        self.record(false);
    }

    /// The request failed.
    pub fn failure(self) {
        self.record(true);
    }

    /// The request failed (`true`) or succeeded.
    pub fn record(mut self, failed: bool) {
        self.reported = true;
        self.breaker.record(self.generation, self.probe, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.release_probe(self.generation);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::time::advance;

    fn breaker(config: BreakerConfig) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new("user-service/a", config).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_then_half_open_then_closed() {
        let b = breaker(BreakerConfig::default());
        for _ in 0..4 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);

        let err = b.try_acquire().unwrap_err();
        assert_eq!(err.state(), BreakerState::Open);
        assert_eq!(err.retry_in(), Duration::from_secs(60));
        assert_eq!(
            err.to_string(),
            "circuit breaker user-service/a is open; failing fast, next probe in 1m"
        );
        let snap = b.snapshot();
        assert!(snap.opened_at.is_some());
        assert_eq!(snap.consecutive_failures, 5);
        assert_eq!(snap.times_opened, 1);
        assert_eq!(snap.rejected, 1);

        advance(Duration::from_secs(59)).await;
        assert_eq!(
            b.try_acquire().unwrap_err().retry_in(),
            Duration::from_secs(1)
        );
        advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);

        // One probe at a time.
        let probe = b.try_acquire().unwrap();
        assert!(probe.is_probe());
        let busy = b.try_acquire().unwrap_err();
        assert_eq!(busy.state(), BreakerState::HalfOpen);
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().opened_at, None);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_another_timeout() {
        let b = breaker(
            BreakerConfig::default()
                .threshold(1)
                .open_timeout(Duration::from_secs(10)),
        );
        b.try_acquire().unwrap().failure();
        advance(Duration::from_secs(10)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot().times_opened, 2);
        advance(Duration::from_secs(9)).await;
        assert_eq!(b.state(), BreakerState::Open);
        advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_probe_frees_its_slot() {
        let b = breaker(
            BreakerConfig::default()
                .threshold(1)
                .open_timeout(Duration::from_secs(1)),
        );
        b.try_acquire().unwrap().failure();
        advance(Duration::from_secs(1)).await;
        drop(b.try_acquire().unwrap());
        let probe = b.try_acquire().expect("slot freed by the cancelled probe");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn several_probes_must_all_succeed() {
        let b = breaker(
            BreakerConfig::default()
                .threshold(1)
                .half_open_probes(3)
                .open_timeout(Duration::from_secs(1)),
        );
        b.try_acquire().unwrap().failure();
        advance(Duration::from_secs(1)).await;
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert!(b.try_acquire().is_err(), "a fourth probe is refused");
        let mut probes = probes.into_iter();
        probes.next().unwrap().success();
        probes.next().unwrap().success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probes.next().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_opens_without_consecutive_failures() {
        let b = breaker(
            BreakerConfig::default()
                .minimum_requests(20)
                .failure_rate(0.5),
        );
        // Alternate success and failure: never 5 in a row, but 50 % failures.
        for i in 0..19 {
            let p = b.try_acquire().unwrap();
            p.record(i % 2 == 1);
        }
        assert_eq!(b.state(), BreakerState::Closed, "below minimum_requests");
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot().consecutive_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_window_forgets_old_failures() {
        let b = breaker(
            BreakerConfig::default()
                .minimum_requests(10)
                .failure_rate(0.5),
        );
        for i in 0..9 {
            b.try_acquire().unwrap().record(i % 2 == 0);
        }
        advance(Duration::from_secs(11)).await;
        // The old 5 failures are out of the window: 10 fresh requests with 4 failures stay closed.
        for i in 0..10 {
            b.try_acquire().unwrap().record(i % 5 < 2);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().window_failures, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn late_results_of_old_permits_change_nothing() {
        let b = breaker(
            BreakerConfig::default()
                .threshold(2)
                .open_timeout(Duration::from_secs(1)),
        );
        let slow = b.try_acquire().unwrap();
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        advance(Duration::from_secs(1)).await;
        let probe = b.try_acquire().unwrap();
        // A success of a request let through while closed does not close the breaker.
        slow.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn config_errors_name_the_setting() {
        let err = BreakerConfig::default()
            .threshold(0)
            .validate()
            .unwrap_err();
        assert_eq!(err.to_string(), "threshold must be at least 1, got 0");
        let err = BreakerConfig::default()
            .failure_rate(1.5)
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "failure_rate must be above 0 and at most 1, got 1.5"
        );
        assert!(CircuitBreaker::new("x", BreakerConfig::default().half_open_probes(0)).is_err());
    }

    #[test]
    fn snapshot_serializes_for_admin() {
        let b = breaker(BreakerConfig::default());
        let json = serde_json::to_value(b.snapshot()).unwrap();
        assert_eq!(json["state"], "closed");
        assert_eq!(json["opened_at"], serde_json::Value::Null);
        assert_eq!(json["name"], "user-service/a");
    }
}
