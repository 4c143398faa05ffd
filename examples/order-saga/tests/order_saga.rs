//! The OrderCreationSaga end to end, on SQLite and on Cassandra: success and both failures
//! (with the order of compensations), a compensation that keeps failing (needs attention,
//! seen in the admin API, then retried), and the orchestrator process killed at every call
//! boundary and restarted — real processes, the services in this test process so their
//! idempotency counters survive the crashes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use order_saga::services::{self, SagaLedger, Services};
use order_saga::{FailAt, OrderData, SAGA_NAME, SagaConfig, order_saga};
use serde_json::Value;
use tower::ServiceExt;
use trellis_registry::{RegistryOptions, ServiceRegistry};
use trellis_saga::{SagaLog, SagaOptions, SagaOrchestrator, SagaState};
use trellis_store::Store;

const DEFAULT_CASSANDRA: &str = "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test";
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Cassandra,
}

struct Env {
    url: String,
    store: Store,
    registry: ServiceRegistry,
    services: Services,
    _dir: tempfile::TempDir,
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{nanos:x}")
}

/// A fresh store (a new SQLite file, or a new Cassandra keyspace) with the three services
/// running in this process and registered in it. `None` when Cassandra is not running and
/// not required.
async fn env(backend: Backend) -> Option<Env> {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}/saga.db", dir.path().display()),
        Backend::Cassandra => {
            let base = std::env::var("TRELLIS_CASSANDRA_URL")
                .unwrap_or_else(|_| DEFAULT_CASSANDRA.to_owned());
            let base = base
                .rsplit_once('/')
                .map_or(base.as_str(), |(b, _)| b)
                .to_owned();
            format!("{base}/{}", unique("saga"))
        }
    };
    let store = match Store::open(&url).await {
        Ok(store) => store,
        Err(e) if e.is_unavailable() => {
            if std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() == Ok("1") {
                panic!("Cassandra is required (TRELLIS_REQUIRE_ENGINES=1) but unreachable: {e}");
            }
            eprintln!(
                "SKIPPED: no Cassandra node ({e}); start it with scripts/services up cassandra"
            );
            return None;
        }
        Err(e) => panic!("cannot open {url}: {e}"),
    };
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    let services = services::start(&registry).await.unwrap();
    Some(Env {
        url,
        store,
        registry,
        services,
        _dir: dir,
    })
}

fn options(node: &str) -> SagaOptions {
    SagaOptions::default()
        .node_id(node)
        .compensation_retries(2)
        .backoff(
            trellis_resilience::retry::Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(20),
            )
            .unwrap(),
        )
        .poll_interval(Duration::from_millis(50))
}

fn saga_ledger(env: &Env, id: &str) -> SagaLedger {
    env.services
        .ledger()
        .snapshot()
        .sagas
        .get(id)
        .cloned()
        .unwrap_or_default()
}

const FORWARD: [&str; 3] = ["inventory.reserve", "payment.charge", "order.create"];

async fn success_and_failures(backend: Backend) {
    let Some(env) = env(backend).await else {
        return;
    };
    let orchestrator = SagaOrchestrator::start(&env.store, options("t1"))
        .await
        .unwrap();
    orchestrator
        .register(order_saga(&env.registry, SagaConfig::default()).unwrap())
        .unwrap();

    let ok = orchestrator
        .run(SAGA_NAME, &OrderData::sample(FailAt::None))
        .await
        .unwrap();
    assert_eq!(ok.state, SagaState::Completed, "{:?}", ok.error);
    let data: OrderData = ok.data_as().unwrap();
    assert_eq!(
        data.order_id.as_deref(),
        Some(format!("ord-{}", ok.saga_id).as_str())
    );
    assert!(data.reservation_id.is_some() && data.transaction_id.is_some());
    let l = saga_ledger(&env, &ok.saga_id);
    assert_eq!(l.effects, FORWARD);
    assert!(l.reserved && l.charged && l.ordered);

    let declined = orchestrator
        .run(SAGA_NAME, &OrderData::sample(FailAt::Payment))
        .await
        .unwrap();
    assert_eq!(declined.state, SagaState::Compensated);
    assert!(
        declined.error.as_deref().unwrap().contains("card declined"),
        "{:?}",
        declined.error
    );
    let l = saga_ledger(&env, &declined.saga_id);
    // The failed charge is not compensated: only the reservation is released.
    assert_eq!(
        l.effects,
        ["inventory.reserve", "payment.charge", "inventory.unreserve"]
    );
    assert!(!l.reserved && !l.charged && !l.ordered);

    let blocked = orchestrator
        .run(SAGA_NAME, &OrderData::sample(FailAt::Order))
        .await
        .unwrap();
    assert_eq!(blocked.state, SagaState::Compensated);
    let l = saga_ledger(&env, &blocked.saga_id);
    // Refund, then unreserve: reverse order.
    assert_eq!(
        l.effects,
        [
            "inventory.reserve",
            "payment.charge",
            "order.create",
            "payment.refund",
            "inventory.unreserve"
        ]
    );
    assert!(!l.reserved && !l.charged && !l.ordered);

    // The log tells the same story, with timings.
    let record = orchestrator
        .log()
        .get(&blocked.saga_id)
        .await
        .unwrap()
        .unwrap();
    let events: Vec<(&str, Option<&str>)> = record
        .history
        .iter()
        .map(|h| (h.event.as_str(), h.step.as_deref()))
        .filter(|(e, _)| e.starts_with("compensation.done"))
        .collect();
    assert_eq!(
        events,
        [
            ("compensation.done", Some("charge-payment")),
            ("compensation.done", Some("reserve-inventory"))
        ]
    );
    assert!(record.steps.iter().all(|s| s.started_at_ms.is_some()));
    assert_eq!(
        record.steps[2].error.as_deref().map(|e| e.contains("422")),
        Some(true)
    );
    assert_no_active(&env.store).await;
    orchestrator.shutdown();
    env.services.stop().await;
}

async fn assert_no_active(store: &Store) {
    let log = SagaLog::new(store).unwrap();
    for state in [SagaState::Running, SagaState::Compensating] {
        let (left, _) = log.list(state, 100, None).await.unwrap();
        assert!(
            left.is_empty(),
            "sagas left {state}: {:?}",
            left.iter().map(|r| &r.id).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_success_and_failures_compensate_in_reverse_order() {
    success_and_failures(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_success_and_failures_compensate_in_reverse_order() {
    success_and_failures(Backend::Cassandra).await;
}

async fn admin(router: &axum::Router, method: &str, uri: &str) -> (StatusCode, Value) {
    let response = router
        .clone()
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

async fn needs_attention_then_retry(backend: Backend) {
    let Some(env) = env(backend).await else {
        return;
    };
    let orchestrator = SagaOrchestrator::start(&env.store, options("t2"))
        .await
        .unwrap();
    orchestrator
        .register(order_saga(&env.registry, SagaConfig::default()).unwrap())
        .unwrap();
    // The admin node has only the store.
    let router = trellis_saga::admin::router(Store::open(&env.url).await.unwrap()).unwrap();

    env.services.ledger().set_outage("payment.refund", true);
    let stuck = orchestrator
        .run(SAGA_NAME, &OrderData::sample(FailAt::Order))
        .await
        .unwrap();
    assert_eq!(stuck.state, SagaState::NeedsAttention);
    let error = stuck.error.clone().unwrap();
    assert!(
        error.contains("charge-payment") && error.contains("3 attempts") && error.contains("503"),
        "{error}"
    );
    let l = saga_ledger(&env, &stuck.saga_id);
    // Nothing else was attempted: the reservation is still held, no unreserve.
    assert_eq!(l.effects, FORWARD);
    assert!(l.reserved && l.charged);

    let (status, list) = admin(&router, "GET", "/v1/sagas?state=needs_attention").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [stuck.saga_id.as_str()]);
    let (status, shown) = admin(&router, "GET", &format!("/v1/sagas/{}", stuck.saga_id)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["state"], "needs_attention");
    assert_eq!(shown["steps"][1]["status"], "compensation_failed");
    assert_eq!(shown["steps"][1]["compensation_attempts"], 3);
    assert!(
        shown["steps"][1]["compensation_error"]
            .as_str()
            .unwrap()
            .contains("503")
    );
    assert!(shown["steps"][0]["duration_ms"].is_u64());
    // Bad input is named.
    let (status, body) = admin(&router, "GET", "/v1/sagas?state=stuck").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"].as_str().unwrap().contains("\"stuck\""),
        "{body}"
    );
    let (status, _) = admin(&router, "POST", "/v1/sagas/not..an..id/retry").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Nothing is attempted on its own: neither a poll nor a recovery touches it.
    assert_eq!(orchestrator.poll_requests().await, 0);
    let report = orchestrator.recover().await.unwrap();
    assert!(
        report.outcomes.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );
    assert_eq!(saga_ledger(&env, &stuck.saga_id).effects, FORWARD);

    // The service is back; an operator retries; the orchestrator picks the request up.
    env.services.ledger().set_outage("payment.refund", false);
    let (status, body) = admin(
        &router,
        "POST",
        &format!("/v1/sagas/{}/retry", stuck.saga_id),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let start = Instant::now();
    let log = SagaLog::new(&env.store).unwrap();
    loop {
        let record = log.get(&stuck.saga_id).await.unwrap().unwrap();
        if record.state == SagaState::Compensated {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "still {} after retry",
            record.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let l = saga_ledger(&env, &stuck.saga_id);
    assert_eq!(
        l.effects,
        [
            "inventory.reserve",
            "payment.charge",
            "order.create",
            "payment.refund",
            "inventory.unreserve"
        ]
    );
    assert!(!l.reserved && !l.charged);
    // Retrying a compensated saga is refused.
    let (status, _) = admin(
        &router,
        "POST",
        &format!("/v1/sagas/{}/retry", stuck.saga_id),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Abort: another stuck saga, given up by the operator, stays as it is.
    env.services
        .ledger()
        .set_outage("inventory.unreserve", true);
    let stuck = orchestrator
        .run(SAGA_NAME, &OrderData::sample(FailAt::Payment))
        .await
        .unwrap();
    assert_eq!(stuck.state, SagaState::NeedsAttention);
    let (status, body) = admin(
        &router,
        "POST",
        &format!("/v1/sagas/{}/abort", stuck.saga_id),
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::OK, Some("aborted"))
    );
    let (_, list) = admin(&router, "GET", "/v1/sagas?state=aborted").await;
    assert_eq!(list["sagas"][0]["id"], stuck.saga_id.as_str());
    let (status, _) = admin(
        &router,
        "POST",
        &format!("/v1/sagas/{}/abort", stuck.saga_id),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_no_active(&env.store).await;
    orchestrator.shutdown();
    env.services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failing_compensation_needs_attention_and_retry_completes_it() {
    needs_attention_then_retry(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_failing_compensation_needs_attention_and_retry_completes_it() {
    needs_attention_then_retry(Backend::Cassandra).await;
}

/// Runs the binary against the store and the services of `env`; returns its exit status,
/// its JSON lines and its stderr.
async fn run_binary(
    env: &Env,
    args: &[&str],
    crash_at: Option<&str>,
) -> (std::process::ExitStatus, Vec<Value>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-saga"));
    command
        .args([
            "--store",
            &env.url,
            "--external-services",
            "--node",
            "crash-test",
        ])
        .args(args)
        .env_remove("ORDER_SAGA_CRASH_AT");
    if let Some(point) = crash_at {
        command.args(["--crash-at", point]);
    }
    // Off the runtime's workers: the services answering the child run on them.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    (
        output.status,
        lines,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct Case {
    fail_at: &'static str,
    unsafe_steps: bool,
    crashes: Vec<String>,
    expect: &'static str,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for step in ["reserve-inventory", "charge-payment", "create-order"] {
        for when in ["before", "after"] {
            // Idempotent steps: recovery runs the interrupted step again → completed.
            cases.push(Case {
                fail_at: "none",
                unsafe_steps: false,
                crashes: vec![format!("{when}:{step}")],
                expect: "completed",
            });
            // Steps not safe to repeat: recovery compensates, the interrupted one included.
            cases.push(Case {
                fail_at: "none",
                unsafe_steps: true,
                crashes: vec![format!("{when}:{step}")],
                expect: "compensated",
            });
        }
    }
    for step in ["charge-payment", "reserve-inventory"] {
        for when in ["before-compensation", "after-compensation"] {
            cases.push(Case {
                fail_at: "order",
                unsafe_steps: false,
                crashes: vec![format!("{when}:{step}")],
                expect: "compensated",
            });
        }
    }
    for when in ["before-compensation", "after-compensation"] {
        cases.push(Case {
            fail_at: "payment",
            unsafe_steps: false,
            crashes: vec![format!("{when}:reserve-inventory")],
            expect: "compensated",
        });
        // A second crash during the recovery's compensation of the interrupted last step.
        cases.push(Case {
            fail_at: "none",
            unsafe_steps: true,
            crashes: vec!["after:create-order".into(), format!("{when}:create-order")],
            expect: "compensated",
        });
    }
    cases
}

async fn crash_at_every_boundary(backend: Backend) {
    let Some(env) = env(backend).await else {
        return;
    };
    let all = order_saga::crash_points();
    let cases = cases();
    for point in &all {
        assert!(
            cases.iter().any(|c| c.crashes.contains(point)),
            "crash point {point} not covered"
        );
    }
    let mut repeats_seen = 0;
    for case in cases {
        let label = format!(
            "{backend:?} fail-at {} unsafe {} crashes {:?}",
            case.fail_at, case.unsafe_steps, case.crashes
        );
        let mut flags = vec!["--fail-at", case.fail_at];
        if case.unsafe_steps {
            flags.push("--unsafe-steps");
        }
        let (status, lines, stderr) = run_binary(&env, &flags, Some(&case.crashes[0])).await;
        assert_eq!(
            status.signal(),
            Some(9),
            "{label}: not killed by SIGKILL: {status} {lines:?} {stderr}"
        );
        assert!(stderr.contains("crash point"), "{label}: {stderr}");
        let mut recover = flags.clone();
        recover.push("--recover");
        for point in &case.crashes[1..] {
            let (status, lines, stderr) = run_binary(&env, &recover, Some(point)).await;
            assert_eq!(
                status.signal(),
                Some(9),
                "{label}: recovery not killed by SIGKILL at {point}: {status} {lines:?} {stderr}"
            );
        }
        let (status, lines, stderr) = run_binary(&env, &recover, None).await;
        assert!(status.success(), "{label}: recovery failed: {stderr}");
        let recovered: Vec<&Value> = lines.iter().filter(|l| l["recovered"] == true).collect();
        assert_eq!(
            recovered.len(),
            1,
            "{label}: one saga recovered: {lines:?} {stderr}"
        );
        let outcome = recovered[0];
        assert_eq!(outcome["state"], case.expect, "{label}: {outcome}");
        let id = outcome["saga_id"].as_str().unwrap();
        let l = saga_ledger(&env, id);
        // Effects are counted once per idempotency key; the net state proves that no
        // effect happened twice and that compensation undid exactly what was done.
        let mut sorted = l.effects.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), l.effects.len(), "{label}: {l:?}");
        match case.expect {
            "completed" => {
                assert_eq!(l.effects, FORWARD, "{label}");
                assert!(l.reserved && l.charged && l.ordered, "{label}: {l:?}");
            }
            _ => assert!(!l.reserved && !l.charged && !l.ordered, "{label}: {l:?}"),
        }
        if l.requests > l.effects.len() as u64 {
            repeats_seen += 1;
        }
        let calls = outcome["calls"].as_object().unwrap();
        assert!(calls.values().all(|c| c == 1), "{label}: {outcome}");
        let record = SagaLog::new(&env.store)
            .unwrap()
            .get(id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.state.as_str(), case.expect, "{label}");
        assert!(
            record.history.iter().any(|h| h.event == "recovered"),
            "{label}"
        );
        assert_no_active(&env.store).await;
    }
    // A call whose answer was lost in a crash was sent again with the same key and
    // deduplicated by the service.
    assert!(
        repeats_seen >= 3,
        "repeated keys seen in {repeats_seen} cases"
    );
    env.services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_orchestrator_killed_at_every_boundary_recovers_without_double_effects() {
    crash_at_every_boundary(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_orchestrator_killed_at_every_boundary_recovers_without_double_effects() {
    crash_at_every_boundary(Backend::Cassandra).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_one_json_line_and_names_bad_flags() {
    let Some(env) = env(Backend::Sqlite).await else {
        return;
    };
    let (status, _, stderr) = run_binary(&env, &[], Some("sideways:charge-payment")).await;
    assert!(!status.success());
    assert!(
        stderr.contains("\"sideways:charge-payment\"")
            && stderr.contains("before:reserve-inventory"),
        "{stderr}"
    );
    // Standalone: its own services, the default flags.
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-saga"));
    command.args([
        "--fail-at",
        "order",
        "--store",
        &format!("sqlite://{}/own.db", dir.path().display()),
    ]);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "compensated");
    assert_eq!(last["calls"]["payment.refund"], 1);
    assert_eq!(last["calls"]["inventory.unreserve"], 1);
    assert!(last["saga_id"].is_string());
    env.services.stop().await;
}
