use std::fmt::Display;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{CircuitBreaker, CircuitBreakers, ResponseFuture};
use crate::BoxError;

/// Finds the breaker that guards a request.
pub trait SelectBreaker<Req> {
    /// The breaker for `request`, or `None` to let it through unguarded.
    fn select(&self, request: &Req) -> Option<Arc<CircuitBreaker>>;
}

impl<Req> SelectBreaker<Req> for Arc<CircuitBreaker> {
    /// The same breaker for every request.
    fn select(&self, _request: &Req) -> Option<Arc<CircuitBreaker>> {
        Some(self.clone())
    }
}

/// Selects a breaker from a [`CircuitBreakers`] registry by a key read from the request
/// (the upstream instance the balancer picked, the route, or both).
pub struct KeyedBreakers<K, F> {
    breakers: Arc<CircuitBreakers<K>>,
    key: F,
}

impl<K, F> KeyedBreakers<K, F> {
    /// Breakers from `breakers`, keyed by `key(&request)`.
    pub fn new(breakers: Arc<CircuitBreakers<K>>, key: F) -> Self {
        KeyedBreakers { breakers, key }
    }
}

impl<K, F: Clone> Clone for KeyedBreakers<K, F> {
    fn clone(&self) -> Self {
        KeyedBreakers {
            breakers: self.breakers.clone(),
            key: self.key.clone(),
        }
    }
}

impl<K, F> std::fmt::Debug for KeyedBreakers<K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedBreakers").finish_non_exhaustive()
    }
}

impl<K, F, Req> SelectBreaker<Req> for KeyedBreakers<K, F>
where
    K: Hash + Eq + Clone + Display,
    F: Fn(&Req) -> Option<K>,
{
    fn select(&self, request: &Req) -> Option<Arc<CircuitBreaker>> {
        (self.key)(request).map(|key| self.breakers.get(&key))
    }
}

/// Says whether a result counts as a failure for the breaker.
pub trait Classify<Res, E> {
    /// True when `result` is a failure of the upstream.
    fn is_failure(&self, result: &Result<Res, E>) -> bool;
}

/// Every error is a failure, every response a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsFail;

impl<Res, E> Classify<Res, E> for ErrorsFail {
    fn is_failure(&self, result: &Result<Res, E>) -> bool {
        result.is_err()
    }
}

/// Guards services with circuit breakers.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use trellis_resilience::breaker::{BreakerConfig, CircuitBreaker, CircuitBreakerLayer};
/// use trellis_resilience::{ErrorKind, error_kind};
///
/// let breaker = Arc::new(CircuitBreaker::new("inventory", BreakerConfig::default().threshold(1)).unwrap());
/// let svc = ServiceBuilder::new()
///     .layer(CircuitBreakerLayer::new(breaker))
///     .service(service_fn(|_: ()| async { Err::<(), _>(std::io::Error::other("refused")) }));
/// assert!(svc.clone().oneshot(()).await.is_err()); // fails, opens the breaker
/// let err = svc.oneshot(()).await.unwrap_err();    // refused at once
/// assert_eq!(error_kind(&*err), Some(ErrorKind::CircuitOpen));
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct CircuitBreakerLayer<B, C = ErrorsFail> {
    select: B,
    classify: C,
}

impl<B> CircuitBreakerLayer<B, ErrorsFail> {
    /// Guards each request with the breaker `select` finds; errors count as failures.
    pub fn new(select: B) -> Self {
        CircuitBreakerLayer {
            select,
            classify: ErrorsFail,
        }
    }
}

impl<B, C> CircuitBreakerLayer<B, C> {
    /// Decides what counts as a failure. Defaults to [`ErrorsFail`]; for HTTP use
    /// [`ServerErrors`](crate::http::ServerErrors) so that 5xx responses count too.
    pub fn classify<C2>(self, classify: C2) -> CircuitBreakerLayer<B, C2> {
        CircuitBreakerLayer {
            select: self.select,
            classify,
        }
    }
}

impl<S, B: Clone, C: Clone> Layer<S> for CircuitBreakerLayer<B, C> {
    type Service = CircuitBreakerService<S, B, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            select: self.select.clone(),
            classify: self.classify.clone(),
            _marker: PhantomData,
        }
    }
}

/// A service guarded by circuit breakers; built by [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerService<S, B, C> {
    inner: S,
    select: B,
    classify: C,
    _marker: PhantomData<fn()>,
}

impl<S, B, C, Req> Service<Req> for CircuitBreakerService<S, B, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    B: SelectBreaker<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.select.select(&request) {
            None => ResponseFuture::unguarded(self.inner.call(request)),
            Some(breaker) => match breaker.try_acquire() {
                Ok(permit) => {
                    ResponseFuture::guarded(self.inner.call(request), permit, self.classify.clone())
                }
                Err(open) => ResponseFuture::rejected(open),
            },
        }
    }
}
