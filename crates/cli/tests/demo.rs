//! `trellis demo`: the real binary runs the whole scenario headless (`--check`) — a node,
//! the four example services as child processes on the local platform, every step — and
//! exits 0 with every step narrated; bad flags exit 2 and change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_trellis");

/// Runs `trellis ARGS`, killing it after `limit`: (exit code, stdout, stderr).
fn run(args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.is_some(),
        "trellis {args:?} still running after {limit:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    (status.and_then(|s| s.code()), out, err)
}

/// Pids of live processes whose environment mentions `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ"))
            && environ
                .split(|b| *b == 0)
                .any(|kv| kv.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn demo_check_runs_every_step_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    // A taken admin port: the demo says so and takes another.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let started = Instant::now();
    let (code, out, err) = run(
        &[
            "demo",
            "--check",
            "--data-dir",
            data.to_str().unwrap(),
            "--admin-listen",
            &taken_addr,
        ],
        Duration::from_secs(110),
    );
    let took = started.elapsed();
    println!("{out}");
    eprintln!("{err}");
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(took < Duration::from_secs(110), "took {took:?}");
    assert!(
        out.contains(&format!("{taken_addr} is taken")),
        "the fallback is said"
    );

    let steps = [
        "node",
        "registry+health",
        "gateway",
        "service-calls",
        "events",
        "saga",
        "trace",
        "config",
        "blue-green",
        "mesh",
    ];
    for (i, step) in steps.iter().enumerate() {
        let held = format!("ok     step {} {step} held", i + 1);
        assert!(out.contains(&held), "missing {held:?}");
    }
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.contains("demo check: all 10 steps held"), "{out}");

    // What each step showed, as narrated.
    for expected in [
        "timing first step after",
        "all healthy",
        "user-service sees {\"order-service\":1}",
        "got    401",
        "got    403",
        "429",
        "\"welcome_order\"",
        "\"kind\":\"welcome\"",
        "\"last_event\":\"user.updated\"",
        "\"state\":\"completed\"",
        "\"state\":\"compensated\"",
        "card declined",
        "state \"compensated\"",
        "\"express_shipping\":true",
        "Promoted",
        "\"version\":\"1.2.0\"",
        "kind: VirtualService",
        "/dashboard/#/traces/",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // One trace with spans of all three processes.
    let trace_line = out
        .lines()
        .find(|l| l.contains("spans from"))
        .expect("the trace step lists its spans");
    for service in ["trellis-gateway", "user-service", "order-service"] {
        assert!(trace_line.contains(service), "{trace_line}");
    }

    // Every child process was stopped.
    let store = data.to_str().unwrap().to_owned();
    assert!(
        processes_with(&store).is_empty(),
        "service processes left behind"
    );
    assert!(data.join(".trellis-demo").exists());
    drop(taken);
}

#[test]
fn bad_flags_exit_2_and_touch_nothing() {
    let (code, _, err) = run(
        &["demo", "--check", "--admin-listen", "not-an-address"],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--admin-listen"), "{err}");

    let (code, _, err) = run(
        &["demo", "--check", "--admin-listen", "0.0.0.0:7070"],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("loopback"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
    let (code, _, err) = run(
        &[
            "demo",
            "--check",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:0",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("refusing to wipe"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
        "keep me"
    );

    let (code, _, err) = run(&["demo", "--no-such-flag"], Duration::from_secs(20));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");

    let (code, _, err) = run(
        &["demo", "serve", "no-such-service"],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no-such-service"), "{err}");
}

#[test]
fn a_service_without_its_port_says_so() {
    let (code, _, err) = {
        let output = Command::new(BIN)
            .args(["demo", "serve", "inventory-service"])
            .env_remove("PORT")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("PORT"), "{err}");
}
