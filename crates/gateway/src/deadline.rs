//! Route timeouts with timers kept by each gateway worker thread.
//!
//! `tokio::time::timeout` makes a timer for every call: it enters the runtime's timer
//! wheel on the first poll and leaves it when dropped, each under the wheel's lock. A
//! gateway worker instead keeps the timers its finished requests used and moves one to
//! each new deadline: a deadline later than the timer's (the usual case, as time goes
//! on) only updates the timer, which the wheel re-files when the earlier time comes.
//!
//! Only a gateway worker thread keeps timers: it runs one current-thread runtime for
//! its whole life, so a kept timer always belongs to the runtime polling it. Elsewhere
//! (`workers = "runtime"`, tests) each call makes its own timer, as `tokio::time::timeout`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// At most this many idle timers are kept per worker (one per request in flight at
/// once; more are dropped when their requests end).
const MAX_KEPT: usize = 256;

thread_local! {
    /// This worker thread's idle timers; `None` on threads that keep none.
    static KEPT: RefCell<Option<Vec<Pin<Box<Sleep>>>>> = const { RefCell::new(None) };
}

/// Makes this thread keep timers (a gateway worker thread, at its start).
pub(crate) fn keep_timers() {
    KEPT.with(|kept| *kept.borrow_mut() = Some(Vec::new()));
}

/// Drops this thread's timers and stops keeping them (a worker, before its runtime
/// goes).
pub(crate) fn drop_timers() {
    let kept = KEPT.with(|kept| kept.borrow_mut().take());
    drop(kept);
}

/// `future` did not finish within its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimedOut;

/// A timer taken from this thread's kept ones (or made), handed back when dropped.
struct Lease {
    sleep: Option<Pin<Box<Sleep>>>,
    keep: bool,
}

impl Lease {
    fn new(deadline: Instant) -> Lease {
        // `None`: this thread keeps no timers; `Some(None)`: it has none idle.
        let taken = KEPT
            .try_with(|kept| {
                kept.try_borrow_mut()
                    .ok()
                    .and_then(|mut kept| kept.as_mut().map(Vec::pop))
            })
            .ok()
            .flatten();
        let keep = taken.is_some();
        let sleep = match taken.flatten() {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Lease {
            sleep: Some(sleep),
            keep,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.keep {
            return;
        }
        let Some(sleep) = self.sleep.take() else {
            return;
        };
        // On a thread that no longer keeps timers (or during its teardown), the timer
        // is dropped here.
        let _ = KEPT.try_with(|kept| {
            if let Ok(mut kept) = kept.try_borrow_mut()
                && let Some(kept) = kept.as_mut()
                && kept.len() < MAX_KEPT
            {
                kept.push(sleep);
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// [`timeout_from`]'s future: a plain struct, as tokio's, so that the wrapped future is
    /// not copied again into an `async fn`'s state.
    pub(crate) struct Timeout<F> {
        #[pin]
        future: F,
        // `None`: no timeout (a duration too long to add, as tokio's `timeout` treats it).
        deadline: Option<Instant>,
        // Taken at the first poll that finds `future` pending.
        lease: Option<Lease>,
    }
}

/// `future`'s output, or [`TimedOut`] when it takes longer than `duration` (counted from
/// now, on tokio's clock).
#[cfg(test)]
pub(crate) fn timeout<F: Future>(duration: Duration, future: F) -> Timeout<F> {
    timeout_from(Instant::now(), duration, future)
}

/// `future`'s output, or [`TimedOut`] when it is not done `duration` after `start` (an
/// instant of tokio's clock the caller has read already: a clock read costs tens of
/// nanoseconds in a virtual machine, and a request makes several).
pub(crate) fn timeout_from<F: Future>(start: Instant, duration: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        deadline: start.checked_add(duration),
        lease: None,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        let lease = this.lease.get_or_insert_with(|| Lease::new(deadline));
        match lease.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx).map(|()| Err(TimedOut)),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn kept_timers_time_out_at_each_new_deadline() {
        keep_timers();
        // The first call makes a timer; later ones move it, to later and earlier
        // deadlines alike.
        for (wait, limit) in [(5, 10), (50, 100), (5, 10), (20, 10), (1, 1_000), (40, 30)] {
            let started = Instant::now();
            let result = timeout(
                Duration::from_millis(limit),
                tokio::time::sleep(Duration::from_millis(wait)),
            )
            .await;
            let took = started.elapsed();
            let (expected, ends) = if wait < limit {
                (Ok(()), wait)
            } else {
                (Err(TimedOut), limit)
            };
            assert_eq!(result, expected, "{wait} ms against a limit of {limit} ms");
            // On the paused clock, to the millisecond tick of the earlier deadline.
            let ends = Duration::from_millis(ends);
            assert!(
                took >= ends && took <= ends + Duration::from_millis(1),
                "{wait} ms against {limit} ms ended after {took:?}"
            );
            let kept = KEPT.with(|kept| kept.borrow().as_ref().map(Vec::len));
            assert_eq!(kept, Some(1), "one timer, handed back each time");
        }
        drop_timers();
        assert!(KEPT.with(|kept| kept.borrow().is_none()));
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_calls_each_get_a_timer() {
        keep_timers();
        let slow = timeout(
            Duration::from_millis(30),
            tokio::time::sleep(Duration::from_millis(60)),
        );
        let quick = timeout(
            Duration::from_millis(100),
            tokio::time::sleep(Duration::from_millis(10)),
        );
        let (slow, quick) = tokio::join!(slow, quick);
        assert_eq!((slow, quick), (Err(TimedOut), Ok(())));
        let kept = KEPT.with(|kept| kept.borrow().as_ref().map(Vec::len));
        assert_eq!(kept, Some(2));
        drop_timers();
    }

    #[tokio::test(start_paused = true)]
    async fn threads_that_keep_none_make_one_per_call() {
        let result = timeout(
            Duration::from_millis(10),
            tokio::time::sleep(Duration::from_millis(20)),
        )
        .await;
        assert_eq!(result, Err(TimedOut));
        assert!(KEPT.with(|kept| kept.borrow().is_none()));
        // An answer that is there at once.
        assert_eq!(timeout(Duration::MAX, async { 7 }).await, Ok(7));
    }
}
