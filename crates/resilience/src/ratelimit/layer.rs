use std::borrow::Cow;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{RateLimitInfo, RateLimited, RateLimiter};
use crate::BoxError;

/// The key (and optional class) a request is limited under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateKey<'r> {
    /// The class whose quota applies (`None`: the default quota).
    pub class: Option<Cow<'r, str>>,
    /// The key: a JWT subject, an API key, a client IP.
    pub key: Cow<'r, str>,
}

impl<'r> RateKey<'r> {
    /// A key under the default quota.
    pub fn new(key: impl Into<Cow<'r, str>>) -> Self {
        RateKey {
            class: None,
            key: key.into(),
        }
    }

    /// The same key under the quota of `class`.
    #[must_use]
    pub fn with_class(mut self, class: impl Into<Cow<'r, str>>) -> Self {
        self.class = Some(class.into());
        self
    }
}

/// Reads the rate-limit key from a request. HTTP extractors are in
/// [`http`](crate::http): by header, by request extension, by client address.
pub trait KeyExtractor<Req> {
    /// The key of `request`, or `None` to let it through unlimited.
    fn extract<'r>(&'r self, request: &'r Req) -> Option<RateKey<'r>>;

    /// Called with the admitted request and what is left of its quota, so that HTTP
    /// extractors can store it for the `RateLimit-*` response headers. Does nothing by
    /// default.
    fn admitted(&self, request: &mut Req, info: RateLimitInfo) {
        let _ = (request, info);
    }
}

/// A [`KeyExtractor`] from a function; see [`key_fn`].
#[derive(Debug, Clone, Copy)]
pub struct KeyFn<F>(F);

/// Makes a [`KeyExtractor`] from a function of the request.
///
/// ```
/// use trellis_resilience::ratelimit::{KeyExtractor, RateKey, key_fn};
/// let by_user = key_fn(|req: &(String, u32)| Some(RateKey::new(req.0.as_str())));
/// let req = ("alice".to_owned(), 7);
/// assert_eq!(by_user.extract(&req).unwrap().key, "alice");
/// ```
pub fn key_fn<Req, F>(f: F) -> KeyFn<F>
where
    F: for<'r> Fn(&'r Req) -> Option<RateKey<'r>>,
{
    KeyFn(f)
}

impl<Req, F> KeyExtractor<Req> for KeyFn<F>
where
    F: for<'r> Fn(&'r Req) -> Option<RateKey<'r>>,
{
    fn extract<'r>(&'r self, request: &'r Req) -> Option<RateKey<'r>> {
        (self.0)(request)
    }
}

/// Limits requests per key; see [`RateLimiter`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use trellis_resilience::ratelimit::{Quota, RateKey, RateLimitLayer, RateLimiter, key_fn};
/// use trellis_resilience::{ErrorKind, error_kind};
///
/// let limiter = RateLimiter::new(Quota::parse("1", "1m").unwrap());
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(limiter, key_fn(|user: &String| Some(RateKey::new(user.as_str())))))
///     .service(service_fn(|_: String| async { Ok::<_, std::convert::Infallible>("ok") }));
/// assert!(svc.clone().oneshot("alice".into()).await.is_ok());
/// let err = svc.clone().oneshot("alice".into()).await.unwrap_err();
/// assert_eq!(error_kind(&*err), Some(ErrorKind::RateLimited));
/// assert!(svc.oneshot("bob".into()).await.is_ok());
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RateLimitLayer<X> {
    limiter: RateLimiter,
    extract: X,
}

impl<X> RateLimitLayer<X> {
    /// Limits requests with `limiter`, keyed by `extract`.
    pub fn new(limiter: RateLimiter, extract: X) -> Self {
        RateLimitLayer { limiter, extract }
    }
}

impl<S, X: Clone> Layer<S> for RateLimitLayer<X> {
    type Service = RateLimit<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            extract: self.extract.clone(),
        }
    }
}

/// A service whose requests are rate limited per key; built by [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S, X> {
    inner: S,
    limiter: RateLimiter,
    extract: X,
}

impl<S, X> RateLimit<S, X> {
    /// The limiter (for admin endpoints).
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }
}

impl<S, X, Req> Service<Req> for RateLimit<S, X>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    X: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        let decision = self
            .extract
            .extract(&request)
            .map(|k| self.limiter.check(k.class.as_deref(), &k.key));
        match decision {
            Some(Err(limited)) => ResponseFuture::limited(limited),
            Some(Ok(info)) => {
                self.extract.admitted(&mut request, info);
                ResponseFuture::called(self.inner.call(request))
            }
            None => ResponseFuture::called(self.inner.call(request)),
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Limited { error: Option<RateLimited> },
        Called { #[pin] future: F },
    }
}

pin_project! {
    /// The response future of [`RateLimit`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
        _marker: PhantomData<fn()>,
    }
}

impl<F> ResponseFuture<F> {
    fn limited(error: RateLimited) -> Self {
        ResponseFuture {
            kind: Kind::Limited { error: Some(error) },
            _marker: PhantomData,
        }
    }

    fn called(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Called { future },
            _marker: PhantomData,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Limited { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error.into())),
                None => Poll::Pending,
            },
            KindProj::Called { future } => future.poll(cx).map_err(Into::into),
        }
    }
}
