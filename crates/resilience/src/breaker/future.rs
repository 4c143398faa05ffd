use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::{BreakerOpen, Classify, Permit};
use crate::BoxError;

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        Rejected { error: Option<BreakerOpen> },
        Unguarded { #[pin] future: F },
        Guarded { #[pin] future: F, permit: Option<Permit>, classify: C },
    }
}

pin_project! {
    /// The response future of [`CircuitBreakerService`](super::CircuitBreakerService).
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(super) fn rejected(error: BreakerOpen) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { error: Some(error) },
        }
    }

    pub(super) fn unguarded(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Unguarded { future },
        }
    }

    pub(super) fn guarded(future: F, permit: Permit, classify: C) -> Self {
        ResponseFuture {
            kind: Kind::Guarded {
                future,
                permit: Some(permit),
                classify,
            },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Rejected { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error.into())),
                None => Poll::Pending,
            },
            KindProj::Unguarded { future } => future.poll(cx).map_err(Into::into),
            KindProj::Guarded {
                future,
                permit,
                classify,
            } => {
                let result = ready!(future.poll(cx));
                if let Some(permit) = permit.take() {
                    permit.record(classify.is_failure(&result));
                }
                Poll::Ready(result.map_err(Into::into))
            }
        }
    }
}
