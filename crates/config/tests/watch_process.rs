//! Watching across processes: this test binary runs itself again as a child process that
//! watches the same SQLite file while the parent writes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use trellis_config::{ConfigOptions, ConfigurationManager};
use trellis_store::Store;

/// Set (to the database path) only in the child process.
const CHILD_ENV: &str = "TRELLIS_CONFIG_CHILD";
const CHILD_TEST: &str = "child_prints_every_version_it_watches";
const SERVICE: &str = "user-service";
const ENV: &str = "test";
const N: u64 = 20;
const DEADLINE: Duration = Duration::from_secs(60);

/// The child half: does nothing in a normal test run.
#[tokio::test]
async fn child_prints_every_version_it_watches() {
    let Ok(db) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(&format!("sqlite://{db}")).await.unwrap();
    let options = ConfigOptions {
        refresh_interval: Duration::from_millis(50),
        ..ConfigOptions::for_environment(ENV)
    };
    let manager = ConfigurationManager::new(&store, options).unwrap();
    // Reading the current version pins where `watch` starts: nothing is written yet.
    assert_eq!(manager.current(SERVICE, ENV).await.unwrap(), None);
    let mut watch = manager.watch(SERVICE);
    assert_eq!(watch.position(), Some(0));
    println!("READY");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for _ in 1..=N {
        let version = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("versions before the deadline")
            .unwrap();
        println!("VERSION {}", version.version);
    }
}

/// Pulls our markers out of a line that may also carry libtest's own output
/// (`test name ... READY`).
fn marker(line: &str) -> Option<&str> {
    if line.trim_end().ends_with("READY") {
        return Some("READY");
    }
    line.find("VERSION ").map(|at| line[at..].trim_end())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_in_another_process_sees_every_version_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let store = Store::open(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let manager = ConfigurationManager::new(&store, ConfigOptions::for_environment(ENV)).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let run = async {
        // Wait for the child to watch.
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("child exited early");
            if marker(&line) == Some("READY") {
                break;
            }
        }
        for i in 1..=N {
            let written = manager
                .set_config(SERVICE, ENV, json!({"i": i}))
                .await
                .unwrap();
            assert_eq!(written.version, i);
        }
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(marker) = marker(&line) {
                seen.push(marker.to_owned());
            }
        }
        seen
    };
    let seen = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the child reports every version before the deadline");
    let expected: Vec<String> = (1..=N).map(|i| format!("VERSION {i}")).collect();
    assert_eq!(seen, expected);
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "child failed: {status}");
}
