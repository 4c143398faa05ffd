use std::sync::Arc;

use tower::Layer;

use super::{Backoff, Retry, RetryBudget, Shared};

/// Wraps services in [`Retry`].
///
/// Defaults: 3 retries (the seed's `retries: 3`), [`Backoff::default`] (100 ms base, 10 s
/// cap, full jitter), and a fresh [`RetryBudget::default`] (20 % of requests over 10 s)
/// shared by every service this layer wraps.
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryLayer<P> {
    policy: P,
    max_retries: u32,
    backoff: Backoff,
    budget: Arc<RetryBudget>,
}

impl<P> RetryLayer<P> {
    /// A layer retrying what `policy` allows.
    pub fn new(policy: P) -> Self {
        RetryLayer {
            policy,
            max_retries: 3,
            backoff: Backoff::default(),
            budget: Arc::new(RetryBudget::default()),
        }
    }

    /// Retries after the first attempt (so `max_retries + 1` attempts at most).
    /// Defaults to 3; 0 disables retries.
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// The wait between attempts. Defaults to [`Backoff::default`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The budget retries are drawn from; share one per upstream service.
    /// Defaults to a new [`RetryBudget::default`].
    pub fn budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// The budget this layer draws from (for admin endpoints).
    pub fn budget_ref(&self) -> &Arc<RetryBudget> {
        &self.budget
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: Arc::new(Shared {
                policy: self.policy.clone(),
                max_retries: self.max_retries,
                backoff: self.backoff,
                budget: self.budget.clone(),
            }),
        }
    }
}
