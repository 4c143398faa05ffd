//! The orchestrator with in-process steps on a real SQLite file: timeouts, the concurrency
//! limit, ownership between orchestrators, recovery decisions, events, validation, and the
//! admin API's listing and bad input. (The OrderCreationSaga over real HTTP services, the
//! crash tests with real processes, and the Cassandra runs live in examples/order-saga.)

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;
use trellis_events::{EventBus, SubscribeOptions};
use trellis_saga::{
    Saga, SagaError, SagaLog, SagaOptions, SagaOrchestrator, SagaState, Step, StepError, StepStatus,
};
use trellis_store::Store;

const DEADLINE: Duration = Duration::from_secs(20);

async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/saga.db", dir.path().display()))
        .await
        .unwrap();
    (store, dir)
}

type Trail = Arc<Mutex<Vec<String>>>;

fn noting(trail: &Trail, name: &'static str) -> Step<u32> {
    let (a, c) = (trail.clone(), trail.clone());
    Step::new(
        name,
        move |_, n: u32| {
            let a = a.clone();
            async move {
                a.lock().unwrap().push(format!("do {name}"));
                Ok(n + 1)
            }
        },
        move |_, _| {
            let c = c.clone();
            async move {
                c.lock().unwrap().push(format!("undo {name}"));
                Ok(())
            }
        },
    )
}

fn fast() -> SagaOptions {
    SagaOptions::default()
        .backoff(
            trellis_resilience::retry::Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
            )
            .unwrap(),
        )
        .compensation_retries(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_timeout_is_in_doubt_and_compensated_with_the_ones_before() {
    let (store, _dir) = store().await;
    let trail = Trail::default();
    let slow = {
        let t = trail.clone();
        Step::new(
            "slow",
            move |_, n: u32| {
                let t = t.clone();
                async move {
                    t.lock().unwrap().push("do slow".into());
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(n)
                }
            },
            {
                let t = trail.clone();
                move |_, _| {
                    let t = t.clone();
                    async move {
                        t.lock().unwrap().push("undo slow".into());
                        Ok(())
                    }
                }
            },
        )
        .timeout(Duration::from_millis(100))
    };
    let saga = Saga::builder("timeouts", 1)
        .add_step(noting(&trail, "first"))
        .add_step(slow)
        .add_step(noting(&trail, "never"))
        .build()
        .unwrap();
    let o = SagaOrchestrator::start(&store, fast()).await.unwrap();
    o.register(saga).unwrap();
    let started = Instant::now();
    let outcome = o.run("timeouts", &0u32).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(outcome.state, SagaState::Compensated);
    assert!(
        outcome
            .error
            .as_deref()
            .unwrap()
            .contains("did not finish within 100ms"),
        "{:?}",
        outcome.error
    );
    assert_eq!(
        *trail.lock().unwrap(),
        ["do first", "do slow", "undo slow", "undo first"]
    );
    let record = o.log().get(&outcome.saga_id).await.unwrap().unwrap();
    assert_eq!(record.steps[1].status, StepStatus::Compensated);
    assert_eq!(record.steps[2].status, StepStatus::Pending);
    assert_eq!(outcome.data, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_bounds_the_sagas_running_at_once() {
    let (store, _dir) = store().await;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let saga = Saga::builder("limited", 1)
        .step(
            "work",
            move |_, n: u32| {
                let (r, p) = (r.clone(), p.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    Ok(n)
                }
            },
            |_, _| async { Ok(()) },
        )
        .build()
        .unwrap();
    let o = SagaOrchestrator::start(&store, fast().max_concurrent(3))
        .await
        .unwrap();
    o.register(saga).unwrap();
    let runs: Vec<_> = (0..12)
        .map(|i| {
            let o = o.clone();
            tokio::spawn(async move { o.run("limited", &i).await.unwrap() })
        })
        .collect();
    for run in runs {
        assert_eq!(run.await.unwrap().state, SagaState::Completed);
    }
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}

/// Leaves one saga of `name` stuck in its second step (its orchestrator "dies").
async fn strand(store: &Store, node: &str, lease: Duration) -> String {
    let entered = Arc::new(AtomicUsize::new(0));
    let e = entered.clone();
    let saga = Saga::builder("stranded", 1)
        .step(
            "one",
            |_, n: u32| async move { Ok(n + 1) },
            |_, _| async { Ok(()) },
        )
        .add_step(
            Step::new(
                "two",
                move |_, n: u32| {
                    let e = e.clone();
                    async move {
                        e.fetch_add(1, Ordering::SeqCst);
                        std::future::pending::<()>().await;
                        Ok(n)
                    }
                },
                |_, _| async { Ok(()) },
            )
            .idempotent(),
        )
        .build()
        .unwrap();
    let options = fast().node_id(node).lease(lease).step_timeout(lease / 2);
    let o = SagaOrchestrator::start(store, options).await.unwrap();
    o.register(saga).unwrap();
    let task = tokio::spawn({
        let o = o.clone();
        async move { o.run("stranded", &0u32).await }
    });
    let start = Instant::now();
    while entered.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    o.shutdown();
    let (running, _) = SagaLog::new(store)
        .unwrap()
        .list(SagaState::Running, 10, None)
        .await
        .unwrap();
    assert_eq!(running.len(), 1);
    running[0].id.clone()
}

fn resumable(count: Arc<AtomicUsize>) -> Saga<u32> {
    Saga::builder("stranded", 1)
        .step(
            "one",
            |_, n: u32| async move { Ok(n + 1) },
            |_, _| async { Ok(()) },
        )
        .add_step(
            Step::new(
                "two",
                move |_, n: u32| {
                    let c = count.clone();
                    async move {
                        c.fetch_add(1, Ordering::SeqCst);
                        Ok(n + 10)
                    }
                },
                |_, _| async { Ok(()) },
            )
            .idempotent(),
        )
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_orchestrator_waits_for_the_lease_and_only_one_takes_the_saga_over() {
    let (store, _dir) = store().await;
    let lease = Duration::from_millis(600);
    let id = strand(&store, "dead-node", lease).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let options = |node: &str| fast().node_id(node).lease(lease).step_timeout(lease / 2);
    let b = SagaOrchestrator::start(&store, options("node-b"))
        .await
        .unwrap();
    b.register(resumable(runs.clone())).unwrap();
    let c = SagaOrchestrator::start(&store, options("node-c"))
        .await
        .unwrap();
    c.register(resumable(runs.clone())).unwrap();
    // The owner's lease still holds: nobody touches the saga.
    let report = b.recover().await.unwrap();
    assert!(
        report.outcomes.is_empty() && report.skipped == 1,
        "{report:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Once it ran out, two orchestrators race; exactly one drives the saga.
    let record = b.log().get(&id).await.unwrap().unwrap();
    let start = Instant::now();
    while trellis_now_ms() <= record.lease_until_ms {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (rb, rc) = tokio::join!(b.recover(), c.recover());
    let (rb, rc) = (rb.unwrap(), rc.unwrap());
    let outcomes: Vec<_> = rb.outcomes.iter().chain(&rc.outcomes).collect();
    assert_eq!(outcomes.len(), 1, "{rb:?} {rc:?}");
    assert_eq!(outcomes[0].state, SagaState::Completed);
    assert_eq!(outcomes[0].data, 11);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let record = b.log().get(&id).await.unwrap().unwrap();
    assert!(record.owner == "node-b" || record.owner == "node-c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_sweep_takes_over_a_saga_whose_owner_died() {
    let (store, _dir) = store().await;
    let lease = Duration::from_millis(400);
    let id = strand(&store, "dead-node", lease).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let o = SagaOrchestrator::start(
        &store,
        fast()
            .node_id("sweeper")
            .lease(lease)
            .step_timeout(lease / 2)
            .recovery_interval(Duration::from_millis(100))
            .poll_interval(Duration::from_millis(20)),
    )
    .await
    .unwrap();
    o.register(resumable(runs.clone())).unwrap();
    let start = Instant::now();
    loop {
        let record = o.log().get(&id).await.unwrap().unwrap();
        if record.state == SagaState::Completed {
            assert_eq!(record.owner, "sweeper");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "still {}", record.state);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn trellis_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_published_on_the_event_bus() {
    let (store, _dir) = store().await;
    let bus = EventBus::embedded(&store).unwrap();
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let s = seen.clone();
    let subscription = bus
        .subscribe_with(
            "sagas",
            "test",
            SubscribeOptions::default()
                .start(trellis_events::StartFrom::Earliest)
                .poll_interval(Duration::from_millis(10)),
            move |event: trellis_events::Event<Value>| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push((
                        event.event_type.clone(),
                        event.payload["saga_id"].as_str().unwrap_or("").to_owned(),
                    ));
                    Ok::<(), std::convert::Infallible>(())
                }
            },
        )
        .await
        .unwrap();
    let saga = Saga::builder("evented", 1)
        .step(
            "one",
            |_, n: u32| async move { Ok(n) },
            |_, _| async { Ok(()) },
        )
        .step(
            "two",
            |_, n: u32| async move {
                if n > 0 {
                    Err(StepError::permanent("no"))
                } else {
                    Ok(n)
                }
            },
            |_, _| async { Ok(()) },
        )
        .build()
        .unwrap();
    let o = SagaOrchestrator::start(&store, fast().events(bus.clone()))
        .await
        .unwrap();
    o.register(saga).unwrap();
    let ok = o.run("evented", &0u32).await.unwrap();
    let failed = o.run("evented", &1u32).await.unwrap();
    let expected = vec![
        ("saga.started".to_owned(), ok.saga_id.clone()),
        ("saga.completed".to_owned(), ok.saga_id.clone()),
        ("saga.started".to_owned(), failed.saga_id.clone()),
        ("saga.failed".to_owned(), failed.saga_id.clone()),
        ("saga.compensated".to_owned(), failed.saga_id.clone()),
    ];
    let start = Instant::now();
    loop {
        let mut got = seen.lock().unwrap().clone();
        // Events of one saga are ordered (keyed by saga id); across sagas they may interleave.
        got.sort_by_key(|(_, id)| id.clone());
        if got.len() >= expected.len() {
            let mut want = expected.clone();
            want.sort_by_key(|(_, id)| id.clone());
            assert_eq!(got, want);
            break;
        }
        assert!(start.elapsed() < DEADLINE, "events so far: {got:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    subscription.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_definitions_and_names_are_refused_with_what_was_wrong() {
    let (store, _dir) = store().await;
    let err = SagaOrchestrator::start(
        &store,
        SagaOptions::default().step_timeout(Duration::from_secs(90)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step_timeout") && err.contains("lease"),
        "{err}"
    );
    let err = SagaOrchestrator::start(&store, SagaOptions::default().max_concurrent(0))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_concurrent"), "{err}");
    let err = SagaOrchestrator::start(&store, SagaOptions::default().event_topic("bad topic"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("topic"), "{err}");

    let o = SagaOrchestrator::start(&store, SagaOptions::default())
        .await
        .unwrap();
    let saga = || {
        Saga::builder("s", 1)
            .step(
                "a",
                |_, n: u32| async move { Ok(n) },
                |_, _| async { Ok(()) },
            )
            .build()
            .unwrap()
    };
    o.register(saga()).unwrap();
    assert!(
        o.register(saga())
            .unwrap_err()
            .to_string()
            .contains("already registered")
    );
    let too_slow = Saga::builder("slow", 1)
        .add_step(
            Step::new(
                "a",
                |_, n: u32| async move { Ok(n) },
                |_, _| async { Ok(()) },
            )
            .timeout(Duration::from_secs(600)),
        )
        .build()
        .unwrap();
    assert!(
        o.register(too_slow)
            .unwrap_err()
            .to_string()
            .contains("shorter than the lease")
    );
    assert!(matches!(
        o.run("nope", &1u32).await,
        Err(SagaError::UnknownSaga { .. })
    ));
    // Data that is not what the steps expect fails the step, not the process.
    let outcome = o.run("s", &"not a number").await.unwrap();
    assert_eq!(outcome.state, SagaState::Compensated);
    assert!(outcome.error.unwrap().contains("saga data"));
}

async fn get(router: &axum::Router, uri: &str) -> (StatusCode, Value) {
    let response = router
        .clone()
        .oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_pages_through_sagas_and_names_bad_input() {
    let (store, _dir) = store().await;
    let o = SagaOrchestrator::start(&store, SagaOptions::default())
        .await
        .unwrap();
    o.register(
        Saga::builder("s", 1)
            .step(
                "a",
                |_, n: u32| async move { Ok(n) },
                |_, _| async { Ok(()) },
            )
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..5u32 {
        ids.push(o.run("s", &i).await.unwrap().saga_id);
    }
    let router = trellis_saga::admin::router(store.clone()).unwrap();
    let mut listed = Vec::new();
    let mut uri = "/v1/sagas?state=completed&limit=2".to_owned();
    for _ in 0..10 {
        let (status, page) = get(&router, &uri).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        listed.extend(
            page["sagas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => uri = format!("/v1/sagas?state=completed&limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(listed, ids);
    let (_, all) = get(&router, "/v1/sagas").await;
    assert_eq!(all["sagas"].as_array().unwrap().len(), 5);
    let (status, one) = get(&router, &format!("/v1/sagas/{}", ids[0])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["steps"][0]["status"], "done");
    assert!(one["history"].as_array().unwrap().len() >= 3);
    for (uri, expected) in [
        ("/v1/sagas?limit=0", "limit"),
        ("/v1/sagas?limit=abc", "limit"),
        ("/v1/sagas?colour=red", "colour"),
        ("/v1/sagas?after=0192", "after needs a state"),
        ("/v1/sagas?state=finished", "finished"),
    ] {
        let (status, body) = get(&router, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(
            body["detail"].as_str().unwrap().contains(expected),
            "{uri}: {body}"
        );
    }
    let (status, _) = get(&router, "/v1/sagas/0192f0c1-7c1a-7aa0-b1c2-0123456789ab").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A step failing `failures` times with `error`, then succeeding; counts its calls.
fn flaky(
    name: &'static str,
    failures: usize,
    calls: Arc<AtomicUsize>,
    comp_failures: usize,
    comp_calls: Arc<AtomicUsize>,
) -> Step<u32> {
    Step::new(
        name,
        move |_, n: u32| {
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) < failures {
                    Err(StepError::retryable("503 try later"))
                } else {
                    Ok(n + 1)
                }
            }
        },
        move |_, _| {
            let comp_calls = comp_calls.clone();
            async move {
                if comp_calls.fetch_add(1, Ordering::SeqCst) < comp_failures {
                    Err(StepError::retryable("refund service down"))
                } else {
                    Ok(())
                }
            }
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_forward_only_for_idempotent_steps_and_compensations_retry_with_backoff() {
    let (store, _dir) = store().await;
    let o = SagaOrchestrator::start(&store, fast()).await.unwrap();
    let counters: Vec<Arc<AtomicUsize>> = (0..6).map(|_| Arc::default()).collect();
    // Idempotent with 2 retries: one transient failure is absorbed.
    o.register(
        Saga::builder("forward", 1)
            .add_step(
                flaky("a", 1, counters[0].clone(), 0, counters[1].clone())
                    .idempotent()
                    .retries(2),
            )
            .build()
            .unwrap(),
    )
    .unwrap();
    let ok = o.run("forward", &0u32).await.unwrap();
    assert_eq!(
        (ok.state, counters[0].load(Ordering::SeqCst)),
        (SagaState::Completed, 2)
    );
    let record = o.log().get(&ok.saga_id).await.unwrap().unwrap();
    assert_eq!(record.steps[0].attempts, 2);
    assert!(record.history.iter().any(|h| h.event == "step.retry"));

    // Not idempotent: the same failure is not retried; the compensation of the step before
    // fails twice, then succeeds within its 2 retries.
    o.register(
        Saga::builder("unsafe", 1)
            .add_step(flaky("first", 0, Arc::default(), 2, counters[2].clone()))
            .add_step(flaky("second", 1, counters[3].clone(), 0, counters[4].clone()).retries(2))
            .build()
            .unwrap(),
    )
    .unwrap();
    let out = o.run("unsafe", &0u32).await.unwrap();
    assert_eq!(out.state, SagaState::Compensated, "{:?}", out.error);
    assert_eq!(counters[3].load(Ordering::SeqCst), 1, "no forward retry");
    assert_eq!(
        counters[4].load(Ordering::SeqCst),
        0,
        "a failed step is not compensated"
    );
    assert_eq!(counters[2].load(Ordering::SeqCst), 3);
    let record = o.log().get(&out.saga_id).await.unwrap().unwrap();
    assert_eq!(record.steps[0].compensation_attempts, 3);
    assert_eq!(record.steps[0].status, StepStatus::Compensated);
    assert_eq!(record.steps[1].status, StepStatus::Failed);
}
