use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::ConfigError;
use crate::sync::{SlidingWindow, lock};

/// Limits retries to a fraction of the requests seen over a sliding window.
///
/// Why a budget and not only a maximum number of attempts: with `max_retries = 3`, an
/// upstream that fails every request receives four times the load exactly when it is least
/// able to take it. A budget keeps the extra load bounded — by default retries are at most
/// 20 % of the requests of the last 10 s, plus a small reserve of 10 retries per second so
/// that a quiet client can still retry at all. When the budget is spent, failed requests
/// are returned as they are.
///
/// Every request deposits one unit ([`RetryBudget::deposit`]); every retry must withdraw
/// one ([`RetryBudget::withdraw`]). One budget is meant to be shared (in an `Arc`) by all
/// the requests to one upstream service.
#[derive(Debug)]
pub struct RetryBudget {
    window: Duration,
    ratio: f64,
    min_per_sec: u32,
    reserve: u64,
    counts: Mutex<SlidingWindow>,
}

/// What a [`RetryBudget`] has seen over its window, for admin endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BudgetSnapshot {
    /// Requests deposited over the window.
    pub requests: u64,
    /// Retries withdrawn over the window.
    pub retries: u64,
    /// Retries that would still be allowed now.
    pub remaining: u64,
}

impl Default for RetryBudget {
    /// 20 % of the requests over 10 s, plus 10 retries per second.
    fn default() -> Self {
        Self::build(Duration::from_secs(10), 0.2, 10)
    }
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request (0.2 = 20 %) over `window`, plus
    /// `min_per_sec` retries per second of the window whatever the traffic. `window` must
    /// be between 1 s and 1 h; `ratio` between 0 and 10.
    pub fn new(window: Duration, ratio: f64, min_per_sec: u32) -> Result<Self, ConfigError> {
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&window) {
            return Err(ConfigError::out_of_range(
                "retry budget window",
                "between 1s and 1h",
                format!("{window:?}"),
            ));
        }
        if !(0.0..=10.0).contains(&ratio) {
            return Err(ConfigError::out_of_range(
                "retry budget ratio",
                "between 0 and 10",
                ratio,
            ));
        }
        Ok(Self::build(window, ratio, min_per_sec))
    }

    fn build(window: Duration, ratio: f64, min_per_sec: u32) -> Self {
        RetryBudget {
            window,
            ratio,
            min_per_sec,
            reserve: u64::from(min_per_sec).saturating_mul(window.as_secs()),
            counts: Mutex::new(SlidingWindow::new(window, Instant::now())),
        }
    }

    /// The window retries are counted over.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Retries allowed per request.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Retries allowed per second whatever the traffic.
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// Records one request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Records one request that started at `now`, a time (on tokio's clock) the caller has
    /// read already: a gateway serving a request reads the clock once for its timeout, its
    /// latency and this, as a clock read costs tens of nanoseconds in a virtual machine.
    pub fn deposit_at(&self, now: Instant) {
        lock(&self.counts).add(now, 1, 0);
    }

    /// Takes one retry from the budget; false (and nothing taken) when it is spent.
    pub fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut counts = lock(&self.counts);
        let sum = counts.sum(now);
        if sum.marked < self.allowed(sum.total) {
            counts.add(now, 0, 1);
            true
        } else {
            false
        }
    }

    fn allowed(&self, requests: u64) -> u64 {
        ((requests as f64) * self.ratio).floor() as u64 + self.reserve
    }

    /// Requests, retries and remaining retries over the current window.
    pub fn snapshot(&self) -> BudgetSnapshot {
        let sum = lock(&self.counts).sum(Instant::now());
        BudgetSnapshot {
            requests: sum.total,
            retries: sum.marked,
            remaining: self.allowed(sum.total).saturating_sub(sum.marked),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn twenty_percent_of_requests_and_no_more() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0.2, 0).unwrap();
        assert!(!budget.withdraw(), "nothing deposited, no reserve");
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..50).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 20);
        assert_eq!(
            budget.snapshot(),
            BudgetSnapshot {
                requests: 100,
                retries: 20,
                remaining: 0
            }
        );
        // Once the window has passed, both deposits and withdrawals are forgotten.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!budget.withdraw());
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!((0..10).filter(|_| budget.withdraw()).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_at_a_time_read_before_count_as_deposits_now() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0.5, 0).unwrap();
        let started = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        for _ in 0..4 {
            budget.deposit_at(started);
        }
        assert_eq!(budget.snapshot().requests, 4);
        assert_eq!((0..5).filter(|_| budget.withdraw()).count(), 2);
        // They leave the window as deposits made at `started` would.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budget.snapshot().requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_allows_a_few_retries_without_traffic() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0.2, 1).unwrap();
        assert_eq!((0..100).filter(|_| budget.withdraw()).count(), 10);
    }

    #[test]
    fn rejects_out_of_range_settings() {
        assert!(RetryBudget::new(Duration::from_millis(10), 0.2, 0).is_err());
        let err = RetryBudget::new(Duration::from_secs(10), -0.1, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "retry budget ratio must be between 0 and 10, got -0.1"
        );
    }
}
