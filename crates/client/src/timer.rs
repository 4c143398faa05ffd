//! Attempt timers that are reused instead of created for each attempt.
//!
//! Why: registering a new tokio timer whose deadline is earlier than any the runtime is
//! already waiting for makes tokio wake its driver (an `eventfd` write and one more turn of
//! the event loop) — about 1.5 µs per call on the development VM, a twentieth of a loopback
//! round trip, and paid on every call of a client that calls one service at a time. A
//! timer given back to the pool stays registered at its old deadline; resetting it to a
//! later deadline for the next attempt needs no wake-up. Idle timers fire once at their
//! old deadline, harmlessly.
//!
//! Timers belong to the runtime that created them, so the pool holds timers of one runtime
//! at a time, and starts afresh when a client is used from another.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::runtime::Id;
use tokio::time::{Instant, Sleep};

/// Most idle timers kept per client.
const MAX_IDLE: usize = 64;

#[derive(Debug, Default)]
struct Pool {
    runtime: Option<Id>,
    idle: Vec<Pin<Box<Sleep>>>,
}

/// A client's pool of idle timers.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    pool: Mutex<Pool>,
}

impl Timers {
    /// A timer firing at `deadline`, on the runtime `runtime` (the current one).
    pub(crate) fn start(&self, runtime: Id, deadline: Instant) -> Timer<'_> {
        let reused = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.runtime == Some(runtime) {
                pool.idle.pop()
            } else {
                None
            }
        };
        let sleep = match reused {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Timer {
            timers: self,
            runtime,
            sleep: Some(sleep),
        }
    }
}

/// A running timer; completes at its deadline, and goes back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Timer<'a> {
    timers: &'a Timers,
    runtime: Id,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Future for Timer<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        let Some(sleep) = self.sleep.take() else {
            return;
        };
        let mut pool = self
            .timers
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pool.runtime != Some(self.runtime) {
            pool.idle.clear();
            pool.runtime = Some(self.runtime);
        }
        if pool.idle.len() < MAX_IDLE {
            pool.idle.push(sleep);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reused_timers_fire_at_their_new_deadline() {
        let timers = Timers::default();
        let runtime = tokio::runtime::Handle::current().id();
        let start = Instant::now();
        timers
            .start(runtime, start + Duration::from_millis(100))
            .await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(
            timers
                .pool
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .idle
                .len(),
            1
        );

        // The pooled timer (already fired) is reset to a later deadline and fires then.
        let again = Instant::now();
        timers.start(runtime, again + Duration::from_secs(2)).await;
        assert_eq!(again.elapsed(), Duration::from_secs(2));

        // Two at once: the second is new; both go back.
        let a = timers.start(runtime, Instant::now() + Duration::from_secs(10));
        let b = timers.start(runtime, Instant::now() + Duration::from_secs(10));
        drop((a, b));
        assert_eq!(
            timers
                .pool
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .idle
                .len(),
            2
        );

        // A timer not yet due does not complete.
        let pending = timers.start(runtime, Instant::now() + Duration::from_secs(10));
        let raced = tokio::time::timeout(Duration::from_secs(9), pending).await;
        assert!(raced.is_err());
    }

    #[test]
    fn another_runtime_starts_a_fresh_pool() {
        let timers = Timers::default();
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            let id = rt.handle().id();
            rt.block_on(async {
                timers
                    .start(id, Instant::now() + Duration::from_millis(5))
                    .await;
            });
            let pool = timers.pool.lock().unwrap_or_else(PoisonError::into_inner);
            assert_eq!((pool.runtime, pool.idle.len()), (Some(id), 1));
        }
    }
}
