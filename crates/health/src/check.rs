//! The [`HealthCheck`] trait, [`check_fn`] for closures, and per-check [`CheckOptions`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

/// One named dependency probe of a service: the database answers, a peer's `/health` is 2xx,
/// a port accepts connections.
///
/// A check returns `Ok(())` when healthy and `Err(message)` when not; the message ends up in
/// the report's `error` field, so make it say what failed and where ("connect to
/// db:5432 failed: connection refused"). The monitor bounds every call with the check's
/// timeout and survives a check that panics, so a check need not do either itself.
///
/// Closures are checks through [`check_fn`]; for a type of your own, box the future:
///
/// ```
/// use futures_util::future::BoxFuture;
/// use trellis_health::HealthCheck;
///
/// struct QueueDepth { limit: usize }
///
/// impl HealthCheck for QueueDepth {
///     fn check(&self) -> BoxFuture<'_, Result<(), String>> {
///         Box::pin(async move {
///             let depth = 3; // ask the queue
///             if depth <= self.limit { Ok(()) } else { Err(format!("{depth} queued > {}", self.limit)) }
///         })
///     }
/// }
/// ```
pub trait HealthCheck: Send + Sync + 'static {
    /// Runs the probe once: `Ok(())` healthy; `Err(message)` unhealthy.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

impl<T: HealthCheck + ?Sized> HealthCheck for Arc<T> {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        (**self).check()
    }
}

impl<T: HealthCheck + ?Sized> HealthCheck for Box<T> {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        (**self).check()
    }
}

/// Turns an async closure into a [`HealthCheck`].
///
/// ```
/// use trellis_health::{HealthCheck, check_fn};
///
/// let always_fine = check_fn(|| async { Ok(()) });
/// let cache_warm = check_fn(|| async { Err::<(), _>("cache is cold".to_owned()) });
/// # let _ = (always_fine, cache_warm);
/// ```
pub fn check_fn<F, Fut>(f: F) -> impl HealthCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    FnCheck(f)
}

struct FnCheck<F>(F);

impl<F, Fut> HealthCheck for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin((self.0)())
    }
}

/// How one check is run and weighed.
///
/// ```
/// use std::time::Duration;
/// use trellis_health::CheckOptions;
///
/// let options = CheckOptions::default().critical(false).timeout(Duration::from_millis(500));
/// assert!(!options.critical);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Whether a failure makes the whole service [`Unhealthy`](crate::HealthStatus::Unhealthy)
    /// (`true`) or only [`Degraded`](crate::HealthStatus::Degraded) (`false`).
    /// Defaults to `true`.
    pub critical: bool,
    /// How long one run may take before it counts as failed ("timed out after 2s").
    /// Defaults to 2 seconds.
    pub timeout: Duration,
}

impl CheckOptions {
    /// The default timeout of a check: 2 seconds.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    /// Sets whether a failure makes the service unhealthy (`true`) or degraded (`false`).
    /// Defaults to `true`.
    #[must_use]
    pub fn critical(mut self, critical: bool) -> Self {
        self.critical = critical;
        self
    }

    /// Sets how long one run may take. Defaults to 2 seconds.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            critical: true,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}
