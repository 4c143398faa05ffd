//! The monitor's evaluation: aggregation, timeouts, panics, caching and single flight.
//! Time is paused and advanced by hand; nothing waits on the wall clock.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use trellis_health::{CheckOptions, HealthCheck, HealthStatus, ServiceHealthMonitor, check_fn};

fn ok() -> impl HealthCheck {
    check_fn(|| async { Ok(()) })
}

fn failing(message: &'static str) -> impl HealthCheck {
    check_fn(move || async move { Err(message.to_owned()) })
}

/// A check that counts its runs and takes `takes` (of paused time) to pass.
fn counting(runs: &Arc<AtomicUsize>, takes: Duration) -> impl HealthCheck {
    let runs = Arc::clone(runs);
    check_fn(move || {
        let runs = Arc::clone(&runs);
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(takes).await;
            Ok(())
        }
    })
}

fn non_critical() -> CheckOptions {
    CheckOptions::default().critical(false)
}

#[tokio::test]
async fn no_checks_is_healthy() {
    let report = ServiceHealthMonitor::builder("empty").build().check().await;
    assert_eq!(report.service, "empty");
    assert_eq!(report.status, HealthStatus::Healthy);
    assert!(report.checks.is_empty());
    assert!(report.checked_at_ms > 0);
}

#[tokio::test]
async fn all_passing_is_healthy() {
    let report = ServiceHealthMonitor::builder("svc")
        .check("a", ok())
        .check_with("b", non_critical(), ok())
        .build()
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Healthy);
    let names: Vec<_> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "registration order is kept");
    for check in &report.checks {
        assert_eq!(check.status, HealthStatus::Healthy);
        assert_eq!(check.error, None);
        assert!(check.duration_ms >= 0.0);
    }
    assert!(report.checks[0].critical);
    assert!(!report.checks[1].critical);
}

#[tokio::test]
async fn only_non_critical_failures_is_degraded() {
    let report = ServiceHealthMonitor::builder("svc")
        .check("database", ok())
        .check_with("recommendations", non_critical(), failing("503 from recs"))
        .build()
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Degraded);
    assert!(report.status.is_serving());
    assert_eq!(report.checks[0].status, HealthStatus::Healthy);
    assert_eq!(report.checks[1].status, HealthStatus::Unhealthy);
    assert_eq!(report.checks[1].error.as_deref(), Some("503 from recs"));
}

#[tokio::test]
async fn a_critical_failure_is_unhealthy() {
    let report = ServiceHealthMonitor::builder("svc")
        .check("database", failing("connection refused"))
        .check_with("recommendations", non_critical(), failing("down"))
        .check("cache", ok())
        .build()
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Unhealthy);
    assert!(!report.status.is_serving());
    assert_eq!(report.failing().count(), 2);
    assert_eq!(
        report.checks[0].error.as_deref(),
        Some("connection refused")
    );
}

#[tokio::test]
async fn a_name_registered_twice_replaces_the_first_check() {
    let report = ServiceHealthMonitor::builder("svc")
        .check("db", failing("old"))
        .check("other", ok())
        .check_with("db", non_critical(), ok())
        .build()
        .check()
        .await;
    let names: Vec<_> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["db", "other"]);
    assert_eq!(report.status, HealthStatus::Healthy);
    assert!(!report.checks[0].critical);
}

#[tokio::test(start_paused = true)]
async fn checks_run_concurrently() {
    let runs = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let report = ServiceHealthMonitor::builder("svc")
        .check("a", counting(&runs, Duration::from_millis(500)))
        .check("b", counting(&runs, Duration::from_millis(500)))
        .check("c", counting(&runs, Duration::from_millis(500)))
        .build()
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Healthy);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(started.elapsed(), Duration::from_millis(500));
    for check in &report.checks {
        assert!((500.0..501.0).contains(&check.duration_ms), "{check:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_exceeding_its_timeout_is_unhealthy() {
    let monitor = ServiceHealthMonitor::builder("svc")
        .check(
            "hangs",
            check_fn(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }),
        )
        .check_with(
            "slow-optional",
            CheckOptions::default()
                .critical(false)
                .timeout(Duration::from_millis(250)),
            check_fn(|| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }),
        )
        .build();
    let started = tokio::time::Instant::now();
    let report = monitor.check().await;
    assert_eq!(started.elapsed(), CheckOptions::DEFAULT_TIMEOUT);
    assert_eq!(report.status, HealthStatus::Unhealthy);

    let hangs = &report.checks[0];
    assert_eq!(hangs.status, HealthStatus::Unhealthy);
    assert_eq!(hangs.error.as_deref(), Some("timed out after 2s"));
    assert!((2000.0..2001.0).contains(&hangs.duration_ms), "{hangs:?}");

    let slow = &report.checks[1];
    assert_eq!(slow.error.as_deref(), Some("timed out after 250ms"));
    assert!((250.0..251.0).contains(&slow.duration_ms), "{slow:?}");
}

/// Panics while building its future, before any `.await`.
struct PanicsEagerly;

impl HealthCheck for PanicsEagerly {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        panic!("could not even start")
    }
}

#[tokio::test]
async fn a_panicking_check_is_unhealthy_and_the_monitor_survives() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let monitor = ServiceHealthMonitor::builder("svc")
        .check_with(
            "explodes",
            non_critical(),
            check_fn(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::task::yield_now().await;
                    if n == 0 {
                        panic!("boom {n}");
                    }
                    Ok(())
                }
            }),
        )
        .check_with("eager", non_critical(), PanicsEagerly)
        .check("fine", ok())
        .cache_ttl(Duration::ZERO)
        .build();

    let report = monitor.check().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    assert_eq!(
        report.checks[0].error.as_deref(),
        Some("check panicked: boom 0")
    );
    assert_eq!(
        report.checks[1].error.as_deref(),
        Some("check panicked: could not even start")
    );
    assert_eq!(report.checks[2].status, HealthStatus::Healthy);

    // The monitor keeps working, and the check recovers on its next run.
    let report = monitor.check().await;
    assert_eq!(report.checks[0].status, HealthStatus::Healthy);
    assert_eq!(report.checks[1].status, HealthStatus::Unhealthy);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_evaluation_and_the_cache_expires() {
    let runs = Arc::new(AtomicUsize::new(0));
    let other_runs = Arc::new(AtomicUsize::new(0));
    let monitor = ServiceHealthMonitor::builder("svc")
        .check("slow", counting(&runs, Duration::from_millis(100)))
        .check_with(
            "other",
            non_critical(),
            counting(&other_runs, Duration::from_millis(10)),
        )
        .cache_ttl(Duration::from_secs(1))
        .build();

    let callers: Vec<_> = (0..50)
        .map(|_| {
            let monitor = monitor.clone();
            tokio::spawn(async move { monitor.check().await })
        })
        .collect();
    let reports: Vec<_> = join_all(callers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(other_runs.load(Ordering::SeqCst), 1);
    assert!(
        reports.iter().all(|r| r == &reports[0]),
        "one shared report"
    );

    // Within the TTL the cached report is returned without running anything.
    tokio::time::advance(Duration::from_millis(900)).await;
    assert_eq!(monitor.check().await, reports[0]);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Once the TTL has passed, the checks run again (once, for 50 callers again).
    tokio::time::advance(Duration::from_millis(100)).await;
    let again = join_all((0..50).map(|_| monitor.check())).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(other_runs.load(Ordering::SeqCst), 2);
    assert!(again.iter().all(|r| r == &again[0]));
}

#[tokio::test(start_paused = true)]
async fn without_caching_concurrent_callers_still_share_an_evaluation() {
    let runs = Arc::new(AtomicUsize::new(0));
    let monitor = ServiceHealthMonitor::builder("svc")
        .check("slow", counting(&runs, Duration::from_millis(100)))
        .cache_ttl(Duration::ZERO)
        .build();

    join_all((0..50).map(|_| monitor.check())).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Sequential callers each get a fresh evaluation.
    monitor.check().await;
    monitor.check().await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_evaluation_still_completes_and_is_cached() {
    let runs = Arc::new(AtomicUsize::new(0));
    let monitor = ServiceHealthMonitor::builder("svc")
        .check("slow", counting(&runs, Duration::from_millis(1500)))
        .build();

    // A probe client that gives up after one second, as Kubernetes does by default.
    let gave_up = tokio::time::timeout(Duration::from_secs(1), monitor.check()).await;
    assert!(gave_up.is_err());

    // The next probe joins the evaluation still running rather than starting another.
    let report = monitor.check().await;
    assert_eq!(report.status, HealthStatus::Healthy);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(monitor.check().await, report, "and it was cached");
}

#[tokio::test]
async fn readiness_switch_and_accessors() {
    let monitor = ServiceHealthMonitor::builder("orders").build();
    assert_eq!(monitor.service_name(), "orders");
    assert!(monitor.is_ready(), "ready by default");
    let clone = monitor.clone();
    clone.set_ready(false);
    assert!(!monitor.is_ready(), "clones share the switch");
    // Readiness does not change the health report.
    assert_eq!(monitor.check().await.status, HealthStatus::Healthy);
    assert!(format!("{monitor:?}").contains("orders"));
}
