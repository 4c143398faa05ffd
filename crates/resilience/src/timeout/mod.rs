//! Fails a request that takes longer than a fixed duration.
//!
//! The same as tower's `timeout`, except that the error is a typed [`Elapsed`] that says how
//! long the limit was, so a gateway can answer 504 and a client can report "timed out after
//! 30s". Place one under the retry layer for a per-attempt limit and one above it for the
//! whole request.
//!
//! The timer covers the response future only — up to the response head for HTTP, not the
//! streaming of its body — and not the wait for the inner service to become ready.

mod error;
mod future;
mod layer;

pub use self::error::Elapsed;
pub use self::future::ResponseFuture;
pub use self::layer::TimeoutLayer;

use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

use crate::BoxError;

/// Applies a timeout to each request sent to the inner service.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner` so that each call fails with [`Elapsed`] after `timeout`.
    pub const fn new(inner: S, timeout: Duration) -> Self {
        Timeout { inner, timeout }
    }

    /// The limit applied to each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the wrapper, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Request> Service<Request> for Timeout<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let response = self.inner.call(request);
        ResponseFuture::new(response, self.timeout)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{ErrorKind, error_kind};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    #[tokio::test(start_paused = true)]
    async fn slow_call_fails_with_the_duration_in_the_message() {
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_secs(30)))
            .service(service_fn(|()| async {
                tokio::time::sleep(Duration::from_secs(31)).await;
                Ok::<_, std::io::Error>("late")
            }));
        let started = tokio::time::Instant::now();
        let err = svc.oneshot(()).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(error_kind(&*err), Some(ErrorKind::Timeout));
        assert_eq!(err.to_string(), "request timed out after 30s");
        assert_eq!(
            err.downcast_ref::<Elapsed>().unwrap().after(),
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fast_call_and_inner_errors_pass_through() {
        let svc = Timeout::new(
            service_fn(|ok: bool| async move {
                tokio::time::sleep(Duration::from_secs(29)).await;
                if ok {
                    Ok("on time")
                } else {
                    Err(std::io::Error::other("upstream reset"))
                }
            }),
            Duration::from_secs(30),
        );
        assert_eq!(svc.clone().oneshot(true).await.unwrap(), "on time");
        let err = svc.oneshot(false).await.unwrap_err();
        assert_eq!(error_kind(&*err), None);
        assert_eq!(err.to_string(), "upstream reset");
    }
}
