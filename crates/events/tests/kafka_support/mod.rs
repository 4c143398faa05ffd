//! Shared by the Kafka test binaries: where the broker is, skipping when it is not there,
//! and restarting it through `scripts/services`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use trellis_events::{EventBus, KafkaOptions};

/// The broker URL: `TRELLIS_KAFKA_URL`, or the one `scripts/services up kafka` starts.
pub(crate) fn url() -> String {
    std::env::var("TRELLIS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_owned())
}

fn required() -> bool {
    std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() == Ok("1")
}

/// True when the first broker of [`url`] accepts connections. Otherwise prints a notice and
/// returns false, or panics when `TRELLIS_REQUIRE_ENGINES=1`.
pub(crate) fn broker_up() -> bool {
    let options = KafkaOptions::from_url(&url()).unwrap();
    let first = &options.brokers[0];
    let reachable = first
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if reachable {
        return true;
    }
    assert!(
        !required(),
        "Kafka is required (TRELLIS_REQUIRE_ENGINES=1) but {first} does not answer; \
         start it with scripts/services up kafka"
    );
    // Straight to stderr, past the test harness's output capture, so the notice shows.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: no Kafka broker at {first}; start it with scripts/services up kafka"
    );
    false
}

/// A new bus (its own producer and clients) on the shared cluster. When no broker runs and
/// none is required, the test binary ends here with a notice and success: the contract
/// macro's cases have no other way to skip.
pub(crate) async fn open() -> EventBus {
    if !broker_up() {
        std::process::exit(0);
    }
    EventBus::kafka(&url()).await.unwrap()
}

/// The repository root (for `scripts/services`).
pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `scripts/services ACTION kafka`, panicking with its output when it fails.
pub(crate) fn services(action: &str) {
    let out = Command::new(repo_root().join("scripts/services"))
        .args([action, "kafka"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/services {action} kafka failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A name unique to this run.
pub(crate) fn unique(prefix: &str) -> String {
    trellis_events::contract::nonce(prefix)
}
