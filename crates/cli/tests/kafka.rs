//! `trellis events … --bus kafka://127.0.0.1:9092` against the real broker.
//!
//! Needs `scripts/services up kafka`; without a broker the test prints a notice and passes,
//! unless `TRELLIS_REQUIRE_ENGINES=1` (the project's test command), where it fails.

#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn trellis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn events_over_kafka() {
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:9092".parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_ok();
    if !up {
        if std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() == Ok("1") {
            panic!(
                "Kafka is required (TRELLIS_REQUIRE_ENGINES=1) but 127.0.0.1:9092 is closed; start it with scripts/services up kafka"
            );
        }
        eprintln!("SKIPPED: no Kafka broker; start it with scripts/services up kafka");
        return;
    }
    let topic = format!("cli-test-{}", std::process::id());
    let bus = "kafka://127.0.0.1:9092";
    for n in 0..3 {
        let (code, out, err) = trellis(&[
            "events",
            "publish",
            &topic,
            &format!(r#"{{"n":{n}}}"#),
            "--key",
            "k",
            "--bus",
            bus,
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            serde_json::from_str::<Value>(out.trim()).unwrap()["topic"],
            topic.as_str()
        );
    }
    let (code, out, err) = trellis(&[
        "events",
        "consume",
        &topic,
        "--group",
        "cli",
        "--from-beginning",
        "--max",
        "3",
        "--bus",
        bus,
    ]);
    assert_eq!(code, 0, "{err}");
    let seen: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["payload"]["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seen, [0, 1, 2], "one key keeps its order");
    let (code, _, err) = trellis(&[
        "events",
        "publish",
        &topic,
        "{}",
        "--bus",
        "kafka://127.0.0.1:9092?partitions=zero",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("partitions"), "{err}");
}
