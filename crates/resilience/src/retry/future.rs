use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::{Decision, Policy, Shared};

/// What the next attempt needs: a service to send it to and the request itself.
#[derive(Debug)]
struct Next<S, Req> {
    service: S,
    request: Req,
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwned]
    enum State<S, Req, F> {
        Called { #[pin] future: F, next: Option<Next<S, Req>> },
        Waiting { #[pin] sleep: Sleep, next: Next<S, Req> },
        Ready { next: Next<S, Req> },
        Done,
    }
}

pin_project! {
    /// The response future of [`Retry`](super::Retry).
    pub struct ResponseFuture<S, P, Req>
    where
        S: Service<Req>,
    {
        shared: Arc<Shared<P>>,
        retries: u32,
        #[pin]
        state: State<S, Req, S::Future>,
    }
}

impl<S, P, Req> ResponseFuture<S, P, Req>
where
    S: Service<Req>,
{
    pub(super) fn new(shared: Arc<Shared<P>>, future: S::Future, next: Option<(S, Req)>) -> Self {
        ResponseFuture {
            shared,
            retries: 0,
            state: State::Called {
                future,
                next: next.map(|(service, request)| Next { service, request }),
            },
        }
    }
}

impl<S, P, Req> Future for ResponseFuture<S, P, Req>
where
    S: Service<Req>,
    P: Policy<Req, S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future, .. } => {
                    let result = ready!(future.poll(cx));
                    let StateOwned::Called { next, .. } =
                        this.state.as_mut().project_replace(State::Done)
                    else {
                        return Poll::Ready(result);
                    };
                    let Some(next) = next else {
                        return Poll::Ready(result);
                    };
                    let shared = &**this.shared;
                    let retry = *this.retries;
                    let delay = match shared.policy.decide(&result) {
                        Decision::Accept => return Poll::Ready(result),
                        Decision::Retry => shared.backoff.delay(retry),
                        Decision::RetryAfter(after) if after <= shared.backoff.cap() => {
                            after.max(shared.backoff.delay(retry))
                        }
                        Decision::RetryAfter(after) => {
                            tracing::debug!(
                                ?after,
                                "retry-after beyond the backoff cap; not retrying"
                            );
                            return Poll::Ready(result);
                        }
                    };
                    if !shared.budget.withdraw() {
                        tracing::debug!(
                            retries = *this.retries,
                            "retry budget spent; returning the failure"
                        );
                        return Poll::Ready(result);
                    }
                    // Dropping the result drops the response and its unread body: nothing
                    // of it has reached the caller.
                    drop(result);
                    *this.retries += 1;
                    tracing::debug!(retry = *this.retries, ?delay, "retrying");
                    this.state.set(State::Waiting {
                        sleep: tokio::time::sleep(delay),
                        next,
                    });
                }
                StateProj::Waiting { sleep, .. } => {
                    ready!(sleep.poll(cx));
                    if let StateOwned::Waiting { next, .. } =
                        this.state.as_mut().project_replace(State::Done)
                    {
                        this.state.set(State::Ready { next });
                    }
                }
                StateProj::Ready { next } => {
                    if let Err(e) = ready!(next.service.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                    let StateOwned::Ready {
                        next:
                            Next {
                                mut service,
                                request,
                            },
                    } = this.state.as_mut().project_replace(State::Done)
                    else {
                        continue;
                    };
                    let shared = &**this.shared;
                    let spare = if *this.retries < shared.max_retries {
                        shared.policy.clone_request(&request)
                    } else {
                        None
                    };
                    let future = service.call(request);
                    this.state.set(State::Called {
                        future,
                        next: spare.map(|request| Next { service, request }),
                    });
                }
                // Polled after completion: stay pending rather than panic.
                StateProj::Done => return Poll::Pending,
            }
        }
    }
}
