//! Deployment records end to end: a local blue-green deployment (real child processes, a
//! real gateway and its metrics) writes its record to a SQLite store at each state change,
//! and `admin_router` — served on 127.0.0.1 from a second `Store` on the same file, as the
//! admin node would — returns it, while it runs and after. A malformed stored record gives
//! a clear error naming it.

#![cfg(feature = "local")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Harness, SERVICE, child_spec, eventually, fast_options};
use trellis_deploy::{
    AnalysisOptions, BlueGreenOptions, DEPLOYMENTS_TABLE, DeploymentRecords, DeploymentState,
    Outcome, admin_router,
};
use trellis_store::Store;

/// Not a test: the child service when run by the deployer (see support::child_main).
#[test]
fn child_service() {
    support::child_main();
}

/// Serves `admin_router` on 127.0.0.1 from its own store on the harness' file.
async fn admin(h: &Harness) -> (String, Store) {
    let url = format!("sqlite://{}/registry.db", h.dir.path().display());
    let store = Store::open(&url).await.unwrap();
    let app = admin_router(store.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, store)
}

async fn get(h: &Harness, url: &str) -> (u16, Value) {
    let response = h.http.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_records_are_served_by_the_admin_router() {
    let h = Harness::start(fast_options()).await;
    let (base, store) = admin(&h).await;
    let marker = format!("records-{}", std::process::id());

    let (code, body) = get(&h, &format!("{base}/v1/deployments")).await;
    assert_eq!(code, 200);
    assert_eq!(body, serde_json::json!({"deployments": []}));

    // A plain deploy of blue: recorded as deployed.
    let blue = child_spec("child_service", "1.0.0", 1, false, &marker);
    h.deployer
        .deploy_version(SERVICE, "1.0.0", &blue)
        .await
        .unwrap();
    let (code, record) = get(&h, &format!("{base}/v1/deployments/{SERVICE}")).await;
    assert_eq!(code, 200, "{record}");
    assert_eq!(record["state"], "deployed");
    assert_eq!(record["strategy"], "deploy");
    assert_eq!(record["namespace"], "test");
    assert_eq!(
        record["traffic"],
        serde_json::json!([{"version": "1.0.0", "weight": 100}])
    );
    eventually(
        "blue answering through the gateway",
        Duration::from_secs(10),
        async || (h.get("/x").await.0 == 200).then_some(()),
    )
    .await;

    // Blue-green with load through the gateway; the record is read while it runs.
    let load_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = support::spawn_load(
        h.url("/work"),
        load_stop.clone(),
        50_000,
        Duration::from_secs(60),
    );
    let options = BlueGreenOptions::new("1.0.0", "2.0.0")
        .spec(child_spec("child_service", "2.0.0", 1, false, &marker))
        .traffic_split(80, 20)
        .analysis(AnalysisOptions {
            window: Duration::from_secs(3),
            interval: Duration::from_millis(250),
            max_error_rate: 0.01,
            max_p99_latency: Duration::from_millis(500),
            min_requests: 10,
        });
    let deployer = h.deployer.clone();
    let run = tokio::spawn(async move { deployer.blue_green_deploy(SERVICE, options).await });
    let during = eventually(
        "the record in state analysing",
        Duration::from_secs(20),
        async || {
            let (code, record) = get(&h, &format!("{base}/v1/deployments/{SERVICE}")).await;
            (code == 200 && record["state"] == "analysing").then_some(record)
        },
    )
    .await;
    assert_eq!(during["strategy"], "blue_green");
    assert_eq!(
        during["traffic"],
        serde_json::json!([{"version": "1.0.0", "weight": 80}, {"version": "2.0.0", "weight": 20}])
    );
    let actions: Vec<&str> = during["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions[..2], ["start", "split"]);

    let report = run.await.unwrap().unwrap();
    load_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let load = load.await.unwrap();
    assert_eq!(report.outcome, Outcome::Promoted, "{:#?}", report.decisions);
    assert_eq!(load.failed, 0, "{:?}", load.failures);

    let (code, list) = get(&h, &format!("{base}/v1/deployments")).await;
    assert_eq!(code, 200);
    let deployments = list["deployments"].as_array().unwrap();
    assert_eq!(deployments.len(), 1, "{list}");
    let record = &deployments[0];
    println!("record after promotion: {record:#}");
    assert_eq!(record["service"], SERVICE);
    assert_eq!(record["state"], "promoted");
    assert_eq!(
        record["traffic"],
        serde_json::json!([{"version": "2.0.0", "weight": 100}])
    );
    assert!(record["updated_at_ms"].as_u64().unwrap() >= record["started_at_ms"].as_u64().unwrap());
    // Every decision, with its figures, as the report has them.
    let decisions = record["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), report.decisions.len());
    for (stored, taken) in decisions.iter().zip(&report.decisions) {
        assert_eq!(stored["action"], taken.action.as_str());
        assert_eq!(stored["requests"], taken.requests);
        assert_eq!(stored["errors"], taken.errors);
        assert_eq!(stored["reason"], taken.reason.as_str());
    }
    let promote = decisions.last().unwrap();
    assert_eq!(promote["action"], "promote");
    assert!(promote["requests"].as_u64().unwrap() >= 10, "{promote}");
    assert!(promote["p99_ms"].as_f64().is_some(), "{promote}");

    // The typed reader agrees.
    let records = DeploymentRecords::new(store.clone());
    let typed = records.get("test", SERVICE).await.unwrap().unwrap();
    assert_eq!(typed.state, DeploymentState::Promoted);
    assert_eq!(typed.decisions.len(), report.decisions.len());

    // Undeploy: recorded, no traffic.
    h.deployer.undeploy(SERVICE).await.unwrap();
    let (_, record) = get(&h, &format!("{base}/v1/deployments/{SERVICE}")).await;
    assert_eq!(record["state"], "undeployed");
    assert_eq!(record["traffic"], serde_json::json!([]));

    // Bad requests are named.
    let (code, body) = get(&h, &format!("{base}/v1/deployments/nothing")).await;
    assert_eq!(code, 404);
    assert!(
        body["detail"].as_str().unwrap().contains("\"nothing\""),
        "{body}"
    );
    let (code, body) = get(&h, &format!("{base}/v1/deployments?limit=3")).await;
    assert_eq!(code, 400);
    assert!(
        body["detail"].as_str().unwrap().contains("\"limit\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/records.db", dir.path().display()))
        .await
        .unwrap();
    store
        .table(DEPLOYMENTS_TABLE)
        .unwrap()
        .put(
            "all",
            "prod/users",
            br#"{"service":"users","state":"promoted"}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
    store
        .table(DEPLOYMENTS_TABLE)
        .unwrap()
        .put("all", "prod/orders", b"\xff not json".to_vec(), None)
        .await
        .unwrap();
    let app = admin_router(store.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::new();
    for path in ["/v1/deployments", "/v1/deployments/users"] {
        let response = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 500, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "malformed_record", "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.starts_with("deployment record prod/"), "{detail}");
        assert!(detail.contains("is not a deployment record"), "{detail}");
        println!("{path}: {detail}");
    }
    let err = DeploymentRecords::new(store.clone())
        .get("prod", "users")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing field"), "{err}");
    // The server is still up and the stored bytes untouched.
    let row = store
        .table(DEPLOYMENTS_TABLE)
        .unwrap()
        .get("all", "prod/orders")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.value, b"\xff not json");
}
