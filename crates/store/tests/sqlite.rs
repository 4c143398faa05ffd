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
