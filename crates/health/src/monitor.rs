//! [`ServiceHealthMonitor`]: runs the registered checks, aggregates, caches.
//!
//! # Why one evaluation is shared and runs in its own task
//!
//! Load balancers, orchestrators and peers probe `/health` often and in bursts. Running every
//! dependency check for every probe would turn a burst of probes into a burst of database
//! pings and HTTP calls — exactly when a dependency is slow. So a report is cached for
//! `cache_ttl`, and when it has expired the first caller starts **one** evaluation that every
//! caller arriving meanwhile waits for (single flight), including when caching is disabled.
//!
//! The evaluation runs in a spawned task rather than in the first caller's future: probe
//! clients give up early (Kubernetes' default probe timeout is 1s, shorter than the default
//! check timeout of 2s) and a dropped probe must not cancel the evaluation, or a slow
//! dependency would be re-probed from scratch forever without a report ever being cached.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, join_all};
use tokio::time::Instant;
use tracing::Instrument;

use crate::check::{CheckOptions, HealthCheck};
use crate::report::{CheckResult, HealthReport, HealthStatus};

/// Why a check failed without returning its own error.
#[derive(Debug, thiserror::Error)]
enum CheckFailure {
    /// The check did not finish within its timeout.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The check panicked; the monitor caught it.
    #[error("check panicked: {0}")]
    Panicked(String),
    /// The evaluation task ended without a report (runtime shutting down).
    #[error("health evaluation did not complete: {0}")]
    Aborted(String),
}

/// A check as registered with the builder.
struct Registered {
    name: String,
    options: CheckOptions,
    check: Arc<dyn HealthCheck>,
}

type InFlight = Shared<BoxFuture<'static, HealthReport>>;

/// The cache and the evaluation in progress, if any.
#[derive(Default)]
struct CacheState {
    /// The last finished report and when it finished.
    last: Option<(HealthReport, Instant)>,
    /// The running evaluation, which callers clone and await.
    in_flight: Option<InFlight>,
}

struct Inner {
    service: String,
    checks: Vec<Registered>,
    cache_ttl: Duration,
    ready: AtomicBool,
    state: Mutex<CacheState>,
}

impl Inner {
    /// Locks the cache state. Nothing panics while holding the lock, but a poisoned lock
    /// would still hold a consistent state, so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs a service's named health checks concurrently, each bounded by its timeout, and
/// aggregates them into a [`HealthReport`] (the seed's `ServiceHealthMonitor`).
///
/// Cheap to clone: clones share the checks, the cache and the readiness switch. Build one
/// with [`ServiceHealthMonitor::builder`]; serve it with [`ServiceHealthMonitor::router`].
///
/// Invariants: checks never crash the monitor (a panic is reported as an unhealthy check);
/// at most one evaluation runs at a time; a report younger than the cache TTL is reused.
#[derive(Clone)]
pub struct ServiceHealthMonitor {
    inner: Arc<Inner>,
}

impl fmt::Debug for ServiceHealthMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHealthMonitor")
            .field("service", &self.inner.service)
            .field(
                "checks",
                &self
                    .inner
                    .checks
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("cache_ttl", &self.inner.cache_ttl)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl ServiceHealthMonitor {
    /// Starts building a monitor for the service named `service_name`.
    pub fn builder(service_name: impl Into<String>) -> HealthMonitorBuilder {
        HealthMonitorBuilder {
            service: service_name.into(),
            checks: Vec::new(),
            cache_ttl: HealthMonitorBuilder::DEFAULT_CACHE_TTL,
        }
    }

    /// The service the reports are about.
    pub fn service_name(&self) -> &str {
        &self.inner.service
    }

    /// Sets the readiness switch that `/health/ready` reports: `false` while the service is
    /// starting up or draining, so that no new traffic is sent to it. Starts as `true`.
    ///
    /// Readiness does not change the [`HealthReport`] of [`check`](Self::check).
    pub fn set_ready(&self, ready: bool) {
        let was = self.inner.ready.swap(ready, Ordering::AcqRel);
        if was != ready {
            tracing::info!(service = %self.inner.service, ready, "readiness changed");
        }
    }

    /// The readiness switch as last set with [`set_ready`](Self::set_ready).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Evaluates the service's health.
    ///
    /// Returns the cached report while it is younger than the cache TTL. Otherwise runs every
    /// check concurrently, each bounded by its timeout; callers arriving while that
    /// evaluation runs wait for it and get the same report instead of starting their own.
    /// The evaluation runs in a spawned task, so it completes (and is cached) even if every
    /// caller stops waiting. Must be called within a tokio runtime.
    pub async fn check(&self) -> HealthReport {
        let in_flight = {
            let mut state = self.inner.state();
            if let Some((report, finished)) = &state.last
                && finished.elapsed() < self.inner.cache_ttl
            {
                return report.clone();
            }
            match &state.in_flight {
                Some(running) => running.clone(),
                None => {
                    let started = self.start_evaluation();
                    state.in_flight = Some(started.clone());
                    started
                }
            }
        };
        in_flight.await
    }

    /// Spawns one evaluation that stores its report in the cache when done.
    fn start_evaluation(&self) -> InFlight {
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(
            async move {
                let report = evaluate(&inner).await;
                let mut state = inner.state();
                let previous = state.last.as_ref().map(|(r, _)| r.status);
                log_transition(&inner.service, previous, &report);
                state.last = Some((report.clone(), Instant::now()));
                state.in_flight = None;
                report
            }
            .instrument(tracing::debug_span!("health_evaluation", service = %self.inner.service)),
        );
        let inner = Arc::clone(&self.inner);
        async move {
            match task.await {
                Ok(report) => report,
                Err(e) => {
                    // The task never reached the cache update: clear the slot ourselves so
                    // that the next caller starts afresh instead of reusing this failure.
                    inner.state().in_flight = None;
                    aborted_report(&inner, &CheckFailure::Aborted(e.to_string()))
                }
            }
        }
        .boxed()
        .shared()
    }
}

/// Runs every check of `inner` concurrently and aggregates the results.
async fn evaluate(inner: &Inner) -> HealthReport {
    let checks = join_all(inner.checks.iter().map(run_check)).await;
    HealthReport {
        service: inner.service.clone(),
        status: HealthStatus::aggregate(&checks),
        checks,
        checked_at_ms: unix_ms(),
    }
}

/// Runs one check under its timeout, catching a panic.
async fn run_check(registered: &Registered) -> CheckResult {
    let timeout = registered.options.timeout;
    let started = Instant::now();
    // The call to `check()` is inside the async block so that a panic while building the
    // future is caught as well as one while polling it.
    let guarded = AssertUnwindSafe(async { registered.check.check().await }).catch_unwind();
    let outcome = tokio::time::timeout(timeout, guarded)
        .instrument(tracing::debug_span!("health_check", check = %registered.name))
        .await;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let error = match outcome {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(message))) => Some(message),
        Ok(Err(panic)) => Some(CheckFailure::Panicked(panic_message(panic.as_ref())).to_string()),
        Err(_elapsed) => Some(CheckFailure::TimedOut(timeout).to_string()),
    };
    if let Some(error) = &error {
        tracing::debug!(check = %registered.name, %error, duration_ms, "health check failed");
    }
    CheckResult {
        name: registered.name.clone(),
        status: if error.is_none() {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        },
        critical: registered.options.critical,
        duration_ms,
        error,
    }
}

/// A report marking every check failed with `failure`, when no evaluation result exists.
fn aborted_report(inner: &Inner, failure: &CheckFailure) -> HealthReport {
    let checks: Vec<CheckResult> = inner
        .checks
        .iter()
        .map(|c| CheckResult {
            name: c.name.clone(),
            status: HealthStatus::Unhealthy,
            critical: c.options.critical,
            duration_ms: 0.0,
            error: Some(failure.to_string()),
        })
        .collect();
    HealthReport {
        service: inner.service.clone(),
        status: HealthStatus::aggregate(&checks),
        checks,
        checked_at_ms: unix_ms(),
    }
}

/// Logs when the aggregate status changes (and on the first evaluation if not healthy), so
/// that a steady state does not repeat a line per evaluation.
fn log_transition(service: &str, previous: Option<HealthStatus>, report: &HealthReport) {
    if previous == Some(report.status)
        || (previous.is_none() && report.status == HealthStatus::Healthy)
    {
        return;
    }
    let failing = report
        .failing()
        .map(|c| format!("{}: {}", c.name, c.error.as_deref().unwrap_or("failed")))
        .collect::<Vec<_>>()
        .join("; ");
    match report.status {
        HealthStatus::Healthy => {
            tracing::info!(service, status = %report.status, "service health changed");
        }
        HealthStatus::Degraded | HealthStatus::Unhealthy => {
            tracing::warn!(service, status = %report.status, %failing, "service health changed");
        }
    }
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Builds a [`ServiceHealthMonitor`]: register checks, set the cache TTL, then
/// [`build`](Self::build).
///
/// ```
/// use std::time::Duration;
/// use trellis_health::{CheckOptions, ServiceHealthMonitor, TcpCheck, check_fn};
///
/// let monitor = ServiceHealthMonitor::builder("orders")
///     .check("broker", TcpCheck::new("127.0.0.1:4222"))
///     .check_with(
///         "recommendations",
///         CheckOptions::default().critical(false),
///         check_fn(|| async { Ok(()) }),
///     )
///     .cache_ttl(Duration::from_millis(500))
///     .build();
/// assert_eq!(monitor.service_name(), "orders");
/// ```
#[must_use]
pub struct HealthMonitorBuilder {
    service: String,
    checks: Vec<Registered>,
    cache_ttl: Duration,
}

impl fmt::Debug for HealthMonitorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthMonitorBuilder")
            .field("service", &self.service)
            .field(
                "checks",
                &self
                    .checks
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("cache_ttl", &self.cache_ttl)
            .finish()
    }
}

impl HealthMonitorBuilder {
    /// The default cache TTL of reports: 1 second.
    pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);

    /// Registers a critical check with the default timeout (2 seconds).
    ///
    /// Defaults to no checks (a monitor without checks is always healthy). A check registered
    /// under a name already taken replaces the earlier one, keeping its position.
    pub fn check(self, name: impl Into<String>, check: impl HealthCheck) -> Self {
        self.check_with(name, CheckOptions::default(), check)
    }

    /// Registers a check with explicit [`CheckOptions`] (criticality, timeout).
    ///
    /// Defaults to no checks. A check registered under a name already taken replaces the
    /// earlier one, keeping its position.
    pub fn check_with(
        mut self,
        name: impl Into<String>,
        options: CheckOptions,
        check: impl HealthCheck,
    ) -> Self {
        let registered = Registered {
            name: name.into(),
            options,
            check: Arc::new(check),
        };
        match self.checks.iter_mut().find(|c| c.name == registered.name) {
            Some(existing) => *existing = registered,
            None => self.checks.push(registered),
        }
        self
    }

    /// Sets how long a report is reused before the checks run again.
    /// [`Duration::ZERO`] disables caching (concurrent callers still share one evaluation).
    ///
    /// Defaults to 1 second.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Builds the monitor. It starts ready (see [`ServiceHealthMonitor::set_ready`]) and runs
    /// no check until [`ServiceHealthMonitor::check`] is first called.
    #[must_use]
    pub fn build(self) -> ServiceHealthMonitor {
        ServiceHealthMonitor {
            inner: Arc::new(Inner {
                service: self.service,
                checks: self.checks,
                cache_ttl: self.cache_ttl,
                ready: AtomicBool::new(true),
                state: Mutex::new(CacheState::default()),
            }),
        }
    }
}
