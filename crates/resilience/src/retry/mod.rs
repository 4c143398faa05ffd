//! Retries failed requests with exponential backoff and full jitter, within a budget.
//!
//! A [`Retry`] service sends a request, asks its [`Policy`] whether the result is worth
//! another attempt, waits a [`Backoff`] delay, draws one unit from the shared
//! [`RetryBudget`], and sends a copy. It stops after `max_retries`, when the budget is
//! spent, or when the policy says no.
//!
//! Three rules make retrying safe:
//!
//! - **Only copies are re-sent.** The policy copies the request *before* the first attempt;
//!   a request it cannot copy (a non-idempotent HTTP method not marked retryable, a body
//!   that was not buffered) is sent once.
//! - **Never after the caller got bytes.** The decision is made on the result of the
//!   service's future — for HTTP, the response head. The body has not been read yet; a
//!   retried response is dropped whole. Errors that happen while the caller streams the
//!   body are the caller's, and are never retried here.
//! - **Bounded extra load.** Retries draw from a [`RetryBudget`] (20 % of requests by
//!   default), so a failing upstream sees at most 1.2× its normal load, not 4×.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use trellis_resilience::retry::{RetryErrors, RetryLayer};
//!
//! let calls = Arc::new(AtomicUsize::new(0));
//! let seen = calls.clone();
//! let flaky = service_fn(move |_req: &'static str| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move { if n < 2 { Err(std::io::Error::other("reset")) } else { Ok("done") } }
//! });
//! let svc = ServiceBuilder::new().layer(RetryLayer::new(RetryErrors)).service(flaky);
//! assert_eq!(svc.oneshot("GET /orders").await.unwrap(), "done");
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```

mod backoff;
mod budget;
mod future;
mod layer;
mod policy;

pub use self::backoff::Backoff;
pub use self::budget::{BudgetSnapshot, RetryBudget};
pub use self::future::ResponseFuture;
pub use self::layer::RetryLayer;
pub use self::policy::{Decision, Policy, RetryErrors, RetryableError};

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

/// Settings shared by a [`Retry`] service and its futures.
#[derive(Debug)]
struct Shared<P> {
    policy: P,
    max_retries: u32,
    backoff: Backoff,
    budget: Arc<RetryBudget>,
}

/// Retries requests that its policy allows; built by [`RetryLayer`].
#[derive(Debug)]
pub struct Retry<S, P> {
    inner: S,
    shared: Arc<Shared<P>>,
}

impl<S: Clone, P> Clone for Retry<S, P> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, P> Retry<S, P> {
    /// The budget retries are drawn from.
    pub fn budget(&self) -> &Arc<RetryBudget> {
        &self.shared.budget
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, P, Req> Service<Req> for Retry<S, P>
where
    S: Service<Req> + Clone,
    P: Policy<Req, S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, P, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.shared.budget.deposit();
        let spare = if self.shared.max_retries > 0 {
            self.shared.policy.clone_request(&request)
        } else {
            None
        };
        // The clone is made ready again before a retry; this one is ready now.
        let next = spare.map(|spare| (self.inner.clone(), spare));
        let future = self.inner.call(request);
        ResponseFuture::new(self.shared.clone(), future, next)
    }
}
