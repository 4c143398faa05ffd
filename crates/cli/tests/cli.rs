//! The `trellis` binary as users run it: real processes on one SQLite file, killed for real.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// A `trellis up` child process, killed when dropped.
struct Up {
    child: Child,
    addr: String,
    gateway: Option<String>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn settings(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("trellis.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[store]
url = "sqlite://{}/trellis.db"
[admin]
listen = "127.0.0.1:0"
[registry]
ttl = "1s"
health_check_interval = "200ms"
refresh_interval = "50ms"
"#,
            dir.display()
        ),
    )
    .unwrap();
    file
}

fn up(config: &Path) -> Up {
    let mut child = Command::new(TRELLIS)
        .args(["up", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let rest = line
        .trim()
        .strip_prefix("trellis up: admin API on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
    let (addr, gateway) = match rest.split_once(", gateway on http://") {
        Some((admin, gateway)) => (admin.to_owned(), Some(gateway.to_owned())),
        None => (rest.to_owned(), None),
    };
    Up {
        child,
        addr,
        gateway,
    }
}

async fn http(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn instances(addr: &str, service: &str) -> Vec<Value> {
    let (_, body) = http(
        reqwest::Method::GET,
        format!("http://{addr}/v1/services/{service}/instances"),
        None,
    )
    .await;
    body["instances"].as_array().cloned().unwrap_or_default()
}

async fn health_server() -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_registry_and_a_killed_one_loses_its_instances() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings(dir.path());
    let a = up(&config);
    let b = up(&config);
    let (port, hits) = health_server().await;

    let body = json!({"host": "127.0.0.1", "port": port, "version": "1.0.0",
        "health_check": {"endpoint": "/health", "interval": "200ms"}});
    let (status, _) = http(
        reqwest::Method::PUT,
        format!("http://{}/v1/services/web/instances/w1", a.addr),
        Some(body),
    )
    .await;
    assert_eq!(status, 201);

    // Discovered through the other process, healthy once A has checked it.
    let start = Instant::now();
    loop {
        let found = instances(&b.addr, "web").await;
        if found.first().is_some_and(|i| i["status"] == "healthy") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "B never saw w1 healthy: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A keeps the lease: still there after three ttls.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        instances(&b.addr, "web").await.len(),
        1,
        "lease lapsed while A was alive"
    );
    assert!(hits.load(Ordering::SeqCst) >= 5, "A did not keep checking");

    // SIGKILL: no graceful deregistration. B must drop w1 within ttl + interval.
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    loop {
        if instances(&b.addr, "web").await.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "w1 outlived its dead owner"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone_after = killed.elapsed();
    // ttl 1 s + interval 200 ms, plus B's refresh (50 ms) and polling slack.
    assert!(
        gone_after <= Duration::from_millis(1_500),
        "vanished after {gone_after:?}"
    );
    eprintln!(
        "instance vanished {gone_after:?} after its owner was killed (ttl 1s, interval 200ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings(dir.path());
    let a = up(&config);
    let b = up(&config);
    let body = json!({"host": "127.0.0.1", "port": 9, "ttl": "30s"});
    let (status, _) = http(
        reqwest::Method::PUT,
        format!("http://{}/v1/services/db/instances/d1", a.addr),
        Some(body),
    )
    .await;
    assert_eq!(status, 201);
    let start = Instant::now();
    while instances(&b.addr, "db").await.len() != 1 {
        assert!(start.elapsed() < Duration::from_secs(5), "B never saw d1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut a = a;
    let pid = a.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = a.child.wait().unwrap();
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
    // Gone long before its 30 s lease would lapse.
    let start = Instant::now();
    while !instances(&b.addr, "db").await.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "not deregistered on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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
async fn cli_commands_talk_to_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = up(&settings(dir.path()));
    let admin = node.addr.as_str();
    http(
        reqwest::Method::PUT,
        format!("http://{admin}/v1/services/users/instances/u1"),
        Some(json!({"host": "127.0.0.1", "port": 3001})),
    )
    .await;

    let (code, out, err) = trellis(&["services", "ls", "--admin", admin]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("users") && l.trim_end().ends_with('1')),
        "{out}"
    );

    let (code, out, err) = trellis(&[
        "config",
        "set",
        "users",
        r#"{"cache":{"ttl":60}}"#,
        "--env",
        "prod",
        "--admin",
        admin,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["version"], 1);
    let file = dir.path().join("v2.json");
    std::fs::write(&file, r#"{"cache":{"ttl":120}}"#).unwrap();
    let (code, _, err) = trellis(&[
        "config",
        "set",
        "users",
        "--file",
        file.to_str().unwrap(),
        "--env",
        "prod",
        "--admin",
        admin,
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = trellis(&["config", "get", "users", "--env", "prod", "--admin", admin]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["config"]["cache"]["ttl"],
        120
    );
    let (code, out, _) = trellis(&[
        "config", "rollback", "users", "1", "--env", "prod", "--admin", admin,
    ]);
    assert_eq!(code, 0);
    let rolled: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            rolled["version"].as_u64(),
            rolled["config"]["cache"]["ttl"].as_u64()
        ),
        (Some(3), Some(60))
    );
    let (code, out, _) = trellis(&[
        "config", "history", "users", "--env", "prod", "--admin", admin,
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["versions"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Bad input: a clear message, a failing exit code, nothing changed.
    let (code, _, err) = trellis(&[
        "config",
        "set",
        "users",
        "{not json",
        "--env",
        "prod",
        "--admin",
        admin,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not valid JSON"), "{err}");
    let (code, _, err) = trellis(&[
        "config", "set", "users", "[1]", "--env", "prod", "--admin", admin,
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("400 invalid_request") && err.contains("JSON object"),
        "{err}"
    );
    let (code, _, err) = trellis(&["config", "rollback", "users", "nine", "--admin", admin]);
    assert_eq!(code, 2, "clap rejects the argument");
    assert!(err.contains("<VERSION>") && err.contains("nine"), "{err}");
    let (code, _, err) = trellis(&["services", "ls", "--admin", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("unreachable"), "{err}");
    let (code, _, err) = trellis(&["servics", "ls"]);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand"), "{err}");
    let (_, out, _) = trellis(&[
        "config", "history", "users", "--env", "prod", "--admin", admin,
    ]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["versions"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn up_rejects_bad_settings_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[registry]\nttl = \"-1s\"\n", "negative"),
        ("[admin]\nlisten = \"everywhere\"\n", "admin.listen"),
        ("[gatewya]\n", "unknown field `gatewya`"),
    ];
    for (text, needle) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let (code, _, err) = trellis(&["up", "--config", file.to_str().unwrap()]);
        assert_eq!(code, 1, "{text}");
        assert!(err.contains(needle), "{text}: {err}");
    }
    let (code, _, err) = trellis(&[
        "up",
        "--store",
        "postgres://nowhere",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown scheme"), "{err}");
    let (code, _, err) = trellis(&["up", "--config", "/nonexistent/trellis.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/trellis.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_gateway_of_its_settings_and_gateway_runs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n[[gateway.routes]]\npath = \"/api/web/*\"\nservice = \"web\"\nstrip_prefix = \"/api/web\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let node = up(&config);
    let gateway = node
        .gateway
        .clone()
        .expect("a gateway address on the first line");
    let (port, hits) = health_server().await;
    let (status, _) = http(
        reqwest::Method::PUT,
        format!("http://{}/v1/services/web/instances/w1", node.addr),
        Some(json!({"host": "127.0.0.1", "port": port})),
    )
    .await;
    assert_eq!(status, 201);
    let response = reqwest::get(format!("http://{gateway}/api/web/health"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // The admin API shows the gateway's routes, upstreams and metrics.
    let (status, routes) = http(
        reqwest::Method::GET,
        format!("http://{}/v1/gateway/routes", node.addr),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(routes["routes"][0]["path"], "/api/web/*");
    let (_, upstreams) = http(
        reqwest::Method::GET,
        format!("http://{}/v1/gateway/upstreams", node.addr),
        None,
    )
    .await;
    assert_eq!(
        upstreams["routes"][0]["instances"][0]["id"], "w1",
        "{upstreams}"
    );
    assert_eq!(
        upstreams["routes"][0]["instances"][0]["requests"], 1,
        "{upstreams}"
    );
    let (status, _) = http(
        reqwest::Method::GET,
        format!("http://{}/v1/gateway/nothing", node.addr),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let metrics = reqwest::get(format!("http://{}/metrics", node.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "trellis_gateway_requests_total{route=\"/api/web/*\",service=\"web\",status=\"200\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_gateway_request_duration_seconds_bucket"),
        "{metrics}"
    );

    // The same settings, gateway alone, sharing the store: it routes to the same instance.
    let mut alone = Command::new(TRELLIS)
        .args(["gateway", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(alone.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("trellis gateway: on http://")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();
    let response = reqwest::get(format!("http://{addr}/api/web/health"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = alone.kill();
    let _ = alone.wait();

    std::fs::create_dir_all(dir.path().join("x")).unwrap();
    let no_gateway = settings(&dir.path().join("x"));
    let (code, _, err) = trellis(&["gateway", "--config", no_gateway.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no [gateway] table"), "{err}");
}

#[test]
fn events_publish_and_consume_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/events.db", dir.path().display());
    for (i, key) in ["u1", "u2", "u1"].iter().enumerate() {
        let json = format!(r#"{{"userId":"{key}","n":{i}}}"#);
        let (code, out, err) = trellis(&[
            "events",
            "publish",
            "user.created",
            &json,
            "--key",
            key,
            "--store",
            &store,
        ]);
        assert_eq!(code, 0, "{err}");
        let published: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(published["topic"], "user.created");
    }
    let (code, out, err) = trellis(&[
        "events",
        "consume",
        "user.created",
        "--group",
        "g1",
        "--from-beginning",
        "--max",
        "3",
        "--store",
        &store,
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    let mut seen: Vec<u64> = lines
        .iter()
        .map(|e| e["payload"]["n"].as_u64().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, [0, 1, 2]);
    assert!(
        lines
            .iter()
            .all(|e| e["topic"] == "user.created" && e["id"].is_string())
    );
    // The group committed: a new publish is the next thing it reads.
    trellis(&[
        "events",
        "publish",
        "user.created",
        r#"{"n":3}"#,
        "--store",
        &store,
    ]);
    let (code, out, _) = trellis(&[
        "events",
        "consume",
        "user.created",
        "--group",
        "g1",
        "--max",
        "1",
        "--store",
        &store,
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["payload"]["n"],
        3
    );

    let (code, _, err) = trellis(&[
        "events",
        "publish",
        "user.created",
        "{not json",
        "--store",
        &store,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("payload"), "{err}");
    let (code, _, err) = trellis(&["events", "publish", "bad topic!", "{}", "--store", &store]);
    assert_eq!(code, 1);
    assert!(err.contains("topic"), "{err}");
    let (code, _, err) = trellis(&[
        "events",
        "publish",
        "t",
        "{}",
        "--bus",
        "rabbitmq://x",
        "--store",
        &store,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("neither `embedded` nor a kafka"), "{err}");
}

#[test]
fn mesh_render_and_deploy_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    for (provider, kind) in [
        ("istio", "kind: DestinationRule"),
        ("linkerd", "kind: HTTPRoute"),
        ("consul", "kind: ServiceResolver"),
    ] {
        let (code, out, err) = trellis(&[
            "mesh",
            "render",
            "--provider",
            provider,
            "--service",
            "user-service",
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(kind), "{provider}: {out}");
    }
    let (code, _, err) = trellis(&["mesh", "render", "--provider", "envoy", "--service", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("--provider") && err.contains("envoy"), "{err}");

    let spec = dir.path().join("spec.toml");
    std::fs::write(&spec, "image = \"user-service:1.2.0\"\nreplicas = 3\n[resources]\ncpu = \"500m\"\nmemory = \"1Gi\"\n[health_check]\npath = \"/health\"\nport = 3000\n").unwrap();
    let spec = spec.to_str().unwrap();
    let (code, out, err) = trellis(&[
        "deploy",
        "user-service",
        "--platform",
        "kubernetes",
        "--spec",
        spec,
        "--dry-run",
        "--namespace",
        "production",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("kind: Deployment")
            && out.contains("kind: Service")
            && out.contains("namespace: production"),
        "{out}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "replicas = -1\n[resources]\nmemory = \"1Gx\"\n[health_check]\npath = \"/h\"\nport = 70000\n").unwrap();
    let (code, out, err) = trellis(&[
        "deploy",
        "user-service",
        "--platform",
        "kubernetes",
        "--spec",
        bad.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(code, 2, "bad input exits 2");
    assert!(out.is_empty(), "nothing rendered: {out}");
    for field in ["replicas", "resources.memory", "health_check.port", "image"] {
        assert!(err.contains(field), "{field}: {err}");
    }
    let (code, _, err) = trellis(&[
        "deploy",
        "user-service",
        "--platform",
        "docker",
        "--spec",
        spec,
    ]);
    // No Docker socket at the default path here: a deploy failure (1) naming the flag.
    assert_eq!(code, 1);
    assert!(err.contains("--docker-socket"), "{err}");
}
