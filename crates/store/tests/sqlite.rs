//! The store conformance suite on the SQLite backend, plus SQLite-specific behaviour:
//! several processes' worth of writers on one file, a removed file.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::OnceLock;

use trellis_store::{Store, conformance_tests};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

async fn open() -> Store {
    // One file per case, as a fresh machine would have.
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Store::open(&format!("sqlite://{}/conf-{id}.db", dir().path().display()))
        .await
        .unwrap()
}

conformance_tests!(open);

/// Child half of `eight_processes_write_one_file`: when the variable is set, this test does
/// 1,000 compare-and-set increments of one counter and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_child() {
    let Ok(url) = std::env::var("TRELLIS_STORE_WRITER_CHILD") else {
        return;
    };
    let store = Store::open(&url).await.unwrap();
    let t = store.table("counters").unwrap();
    let mut done = 0;
    let mut attempts = 0u64;
    while done < 1_000 {
        attempts += 1;
        // Any error here — "database is locked" included — fails the child and the test.
        let row = t.get("c", "n").await.unwrap().unwrap();
        let n: u64 = std::str::from_utf8(&row.value).unwrap().parse().unwrap();
        let next = (n + 1).to_string().into_bytes();
        if t.update_if_version("c", "n", row.version, next, None)
            .await
            .unwrap()
            .applied()
        {
            done += 1;
            // And a blind write of this writer's own row, mixing conditional and plain writes.
            t.put(
                "c",
                &format!("w{}", std::process::id()),
                done.to_string().into_bytes(),
                None,
            )
            .await
            .unwrap();
        }
    }
    println!("WRITER DONE attempts={attempts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_write_one_file() {
    if std::env::var("TRELLIS_STORE_WRITER_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/shared.db", dir.path().display());
    let store = Store::open(&url).await.unwrap();
    let t = store.table("counters").unwrap();
    t.put("c", "n", b"0".to_vec(), None).await.unwrap();

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..8)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
                .env("TRELLIS_STORE_WRITER_CHILD", &url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "writer failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("WRITER DONE"),
            "writer did not finish:\n{stdout}\n{stderr}"
        );
        assert!(
            !stderr.contains("locked") && !stdout.contains("locked"),
            "{stderr}"
        );
    }
    let row = t.get("c", "n").await.unwrap().unwrap();
    assert_eq!(
        std::str::from_utf8(&row.value).unwrap(),
        "8000",
        "lost updates"
    );
    assert_eq!(row.version, 8_001);
    let own_rows = t.scan_all("c", Some("w")).await.unwrap();
    assert_eq!(own_rows.len(), 8);
    assert!(
        own_rows
            .iter()
            .all(|r| r.value == b"1000" && r.version == 1_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_file_is_an_outage_not_a_silent_success() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let t = store.table("things").unwrap();
    t.put("p", "a", b"1".to_vec(), None).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    let err = t.put("p", "b", b"2".to_vec(), None).await.unwrap_err();
    assert!(err.is_unavailable() && err.is_retryable(), "{err}");
    assert!(err.to_string().contains("gone.db"), "names the file: {err}");
    assert!(t.get("p", "a").await.unwrap_err().is_unavailable());
    assert!(store.ping().await.is_err());
    assert!(
        !path.exists(),
        "a removed database must not be recreated empty behind the user's back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_rejected_with_the_reason() {
    for (url, needle) in [
        ("trellis.db", "expected SCHEME://"),
        ("postgres://x", "unknown scheme \"postgres\""),
        ("sqlite://", "path is empty"),
        ("sqlite://x.db?mode=fast", "unknown parameter"),
    ] {
        let err = Store::open(url).await.unwrap_err().to_string();
        assert!(err.contains(needle), "{url}: {err}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), b"this is not a database, just some text long enough to matter..........................................................................").unwrap();
    let err = Store::open(&format!("sqlite://{}", file.path().display()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&file.path().display().to_string()),
        "{err}"
    );
}
