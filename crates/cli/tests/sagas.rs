//! `trellis sagas …` against a running `trellis up` node, with a saga stuck in
//! needs_attention written by an orchestrator in this process on the node's SQLite file.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use trellis_saga::{Saga, SagaOptions, SagaOrchestrator, SagaState, Step, StepError};
use trellis_store::Store;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn trellis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(TRELLIS).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_ls_show_retry_and_abort_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/trellis.db", dir.path().display());
    let config = dir.path().join("trellis.toml");
    std::fs::write(
        &config,
        format!("[store]\nurl = \"{db}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let mut child = Command::new(TRELLIS)
        .args(["up", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _node = Up(child);
    let admin = line
        .trim()
        .strip_prefix("trellis up: admin API on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();

    // A saga whose only compensation fails while `down` is set: needs_attention.
    let store = Store::open(&db).await.unwrap();
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let saga = Saga::builder("cli-demo", 1)
        .add_step(Step::new(
            "reserve",
            |_, n: u32| async move { Ok(n + 1) },
            move |_, _| {
                let flag = flag.clone();
                async move {
                    if flag.load(Ordering::SeqCst) {
                        Err(StepError::retryable("inventory-service is down"))
                    } else {
                        Ok(())
                    }
                }
            },
        ))
        .add_step(Step::new(
            "charge",
            |_, _: u32| async move { Err(StepError::permanent("card declined")) },
            |_, _| async move { Ok(()) },
        ))
        .build()
        .unwrap();
    let options = SagaOptions::default()
        .backoff(
            trellis_resilience::retry::Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
            )
            .unwrap(),
        )
        .compensation_retries(2)
        .poll_interval(Duration::from_millis(50));
    let orchestrator = SagaOrchestrator::start(&store, options).await.unwrap();
    orchestrator.register(saga).unwrap();
    let stuck = orchestrator.run("cli-demo", &1u32).await.unwrap();
    assert_eq!(stuck.state, SagaState::NeedsAttention);
    let id = stuck.saga_id.clone();

    let (code, out, err) = trellis(&[
        "sagas",
        "ls",
        "--state",
        "needs_attention",
        "--admin",
        &admin,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id) && out.contains("needs_attention"),
        "{out}"
    );
    let (code, out, err) = trellis(&["sagas", "show", &id, "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("reserve") && out.contains("inventory-service is down"),
        "{out}"
    );

    // The service is back: `retry` is picked up by the orchestrator owning the saga.
    down.store(false, Ordering::SeqCst);
    let (code, out, err) = trellis(&["sagas", "retry", &id, "--admin", &admin]);
    assert_eq!(code, 0, "{out} {err}");
    let log = trellis_saga::SagaLog::new(&store).unwrap();
    let start = Instant::now();
    loop {
        let record = log.get(&id).await.unwrap().unwrap();
        if record.state == SagaState::Compensated {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "retry not applied: {:?}",
            record.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Abort applies only to needs_attention: a clear refusal, nothing changed.
    let (code, _, err) = trellis(&["sagas", "abort", &id, "--admin", &admin]);
    assert_ne!(code, 0);
    assert!(
        err.contains("needs_attention") || err.contains("409"),
        "{err}"
    );
    let (code, _, err) = trellis(&["sagas", "show", "no-such-saga", "--admin", &admin]);
    assert_ne!(code, 0);
    assert!(!err.is_empty());
    orchestrator.shutdown();
}
