//! `trellis up --store cassandra://…`: the admin API behaves exactly as on SQLite.
//!
//! Needs a node (`scripts/services up cassandra`); without one the test prints a notice and
//! passes, unless `TRELLIS_REQUIRE_ENGINES=1` (the project's test command), where it fails.

#![cfg(feature = "cassandra")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const DEFAULT_URL: &str = "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_cli_test";

fn node_reachable() -> bool {
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:9042".parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_ok();
    if !up {
        if std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() == Ok("1") {
            panic!(
                "Cassandra is required (TRELLIS_REQUIRE_ENGINES=1) but 127.0.0.1:9042 is closed; start it with scripts/services up cassandra"
            );
        }
        eprintln!("SKIPPED: no Cassandra node; start it with scripts/services up cassandra");
    }
    up
}

/// Kills the child when the test ends, even by a panic.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_on_cassandra() {
    if !node_reachable() {
        return;
    }
    let url = std::env::var("TRELLIS_CASSANDRA_URL")
        .map(|u| format!("{}/trellis_cli_test", u.rsplit_once('/').unwrap().0))
        .unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["up", "--admin", "127.0.0.1:0", "--store", &url])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(addr) = line
        .trim()
        .strip_prefix("trellis up: admin API on http://")
        .map(str::to_owned)
    else {
        let _ = child.kill();
        panic!("trellis up on Cassandra did not start: {line:?}");
    };
    let base = format!("http://{addr}");
    // A fresh service name per run: the keyspace outlives the test.
    let run = format!("svc-{}", std::process::id());

    let (status, record) = call(
        reqwest::Method::PUT,
        format!("{base}/v1/services/{run}/instances/i1"),
        Some(json!({"host": "127.0.0.1", "port": 3001, "version": "1.0.0", "ttl": "30s"})),
    )
    .await;
    assert_eq!(status, 201, "{record}");
    assert_eq!(record["status"], "unknown");
    let (_, listed) = call(
        reqwest::Method::GET,
        format!("{base}/v1/services/{run}/instances"),
        None,
    )
    .await;
    assert_eq!(listed["instances"][0]["id"], "i1");
    assert_eq!(listed["stale"], false);

    for (i, doc) in [json!({"a": 1}), json!({"a": 2})].into_iter().enumerate() {
        let (status, v) = call(
            reqwest::Method::PUT,
            format!("{base}/v1/config/{run}?env=test"),
            Some(doc),
        )
        .await;
        assert_eq!(
            (status, v["version"].as_u64()),
            (200, Some(i as u64 + 1)),
            "{v}"
        );
    }
    let (status, conflict) = call(
        reqwest::Method::PUT,
        format!("{base}/v1/config/{run}?env=test&expected_version=1"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    let (_, rolled) = call(
        reqwest::Method::POST,
        format!("{base}/v1/config/{run}/rollback?env=test&version=1"),
        None,
    )
    .await;
    assert_eq!(
        (rolled["version"].as_u64(), rolled["config"]["a"].as_u64()),
        (Some(3), Some(1))
    );
    let (_, history) = call(
        reqwest::Method::GET,
        format!("{base}/v1/config/{run}/history?env=test"),
        None,
    )
    .await;
    assert_eq!(history["versions"].as_array().unwrap().len(), 3);
    let (status, bad) = call(
        reqwest::Method::PUT,
        format!("{base}/v1/services/{run}/instances/i2"),
        Some(json!({"host": "h", "port": 70000})),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    let (status, health) = call(reqwest::Method::GET, format!("{base}/health"), None).await;
    assert_eq!(status, 200, "{health}");

    // Graceful stop deregisters on Cassandra too.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "trellis up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
