#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `trellis deploy` as users run it: the real binary, dry runs of every platform, bad input
//! (exit code 2, nothing started), and a local deploy that starts busybox httpd replicas,
//! registers them in a real SQLite store (read here from this second process) and stops
//! cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_registry::{RegistryOptions, ServiceRegistry};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// Runs `trellis ARGS` to the end: exit code, stdout, stderr.
fn trellis(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(TRELLIS)
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("TRELLIS_STORE")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write(dir: &Path, file: &str, text: &str) -> String {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

const IMAGE_SPEC: &str = r#"
image = "user-service:1.2.0"
command = ["/bin/user-service", "--serve"]
replicas = 2
[resources]
cpu = "500m"
memory = "1Gi"
[environment]
NODE_ENV = "production"
[health_check]
path = "/health"
port = 3000
"#;

#[test]
fn dry_run_kubernetes_prints_the_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.toml", IMAGE_SPEC);
    let (code, out, err) = trellis(&[
        "deploy",
        "user-service",
        "--platform",
        "kubernetes",
        "--spec",
        &spec,
        "--dry-run",
        "--namespace",
        "production",
        "--version",
        "1.2.0",
        "--registry",
        "docker.io/myorg",
    ]);
    assert_eq!(code, 0, "{err}");
    let documents: Vec<&str> = out.split("\n---\n").collect();
    assert_eq!(documents.len(), 2, "{out}");
    assert!(documents[0].contains("kind: Deployment"), "{out}");
    assert!(documents[0].contains("name: user-service-1-2-0"), "{out}");
    assert!(
        documents[0].contains("image: docker.io/myorg/user-service:1.2.0"),
        "{out}"
    );
    assert!(documents[0].contains("namespace: production"), "{out}");
    assert!(documents[1].contains("kind: Service"), "{out}");
}

#[test]
fn dry_run_docker_prints_the_engine_api_calls() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.toml", IMAGE_SPEC);
    let (code, out, err) = trellis(&[
        "deploy",
        "user-service",
        "--platform",
        "docker",
        "--spec",
        &spec,
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    let calls: Value = serde_json::from_str(&out).unwrap();
    let calls = calls.as_array().unwrap();
    // Create and start, per replica; the version is the image's tag.
    assert_eq!(calls.len(), 4, "{out}");
    assert_eq!(calls[0]["method"], "POST");
    assert_eq!(
        calls[0]["path"],
        "/containers/create?name=user-service-1.2.0-0"
    );
    assert_eq!(calls[1]["path"], "/containers/user-service-1.2.0-0/start");
    let body = &calls[0]["body"];
    assert_eq!(body["Image"], "user-service:1.2.0");
    assert!(
        body["Env"]
            .as_array()
            .unwrap()
            .contains(&Value::from("NODE_ENV=production"))
    );
    assert_eq!(
        body["HostConfig"]["PortBindings"]["3000/tcp"][0]["HostIp"],
        "127.0.0.1"
    );
}

#[test]
fn dry_run_ecs_prints_task_and_service_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.toml", IMAGE_SPEC);
    let (code, out, err) = trellis(&[
        "deploy",
        "user-service",
        "--platform",
        "ecs",
        "--spec",
        &spec,
        "--dry-run",
        "--cluster",
        "production",
        "--subnet",
        "subnet-1",
        "--subnet",
        "subnet-2",
    ]);
    assert_eq!(code, 0, "{err}");
    let defs: Value = serde_json::from_str(&out).unwrap();
    let task = &defs["taskDefinition"];
    assert_eq!(task["family"], "user-service");
    assert_eq!(task["cpu"], "512");
    assert_eq!(task["memory"], "1024");
    assert_eq!(
        task["containerDefinitions"][0]["portMappings"][0]["containerPort"],
        3000
    );
    let service = &defs["service"];
    assert_eq!(service["serviceName"], "user-service");
    assert_eq!(service["cluster"], "production");
    assert_eq!(service["desiredCount"], 2);
    assert_eq!(
        service["networkConfiguration"]["awsvpcConfiguration"]["subnets"],
        serde_json::json!(["subnet-1", "subnet-2"])
    );
}

#[test]
fn dry_run_local_prints_the_processes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "spec.toml",
        "command = [\"./shop\", \"--quiet\"]\nreplicas = 2\n[environment]\nMODE = \"x\"\n[health_check]\npath = \"/health\"\nport = 8080\n",
    );
    let (code, out, err) = trellis(&[
        "deploy",
        "shop",
        "--platform",
        "local",
        "--spec",
        &spec,
        "--dry-run",
        "--version",
        "1.0.0",
    ]);
    assert_eq!(code, 0, "{err}");
    let processes: Value = serde_json::from_str(&out).unwrap();
    let processes = processes.as_array().unwrap();
    assert_eq!(processes.len(), 2);
    assert_eq!(processes[1]["instance_id"], "shop-1.0.0-1");
    assert_eq!(
        processes[1]["command"],
        serde_json::json!(["./shop", "--quiet"])
    );
    assert_eq!(processes[1]["port"], 8081);
    assert_eq!(processes[1]["environment"]["MODE"], "x");
    assert_eq!(processes[1]["environment"]["PORT"], "8081");
    assert_eq!(processes[1]["environment"]["TRELLIS_NAMESPACE"], "default");
}

#[test]
fn bad_specs_and_flags_exit_2_naming_what_was_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        "replicas = -1\n[resources]\nmemory = \"1Gx\"\n[health_check]\npath = \"/h\"\nport = 70000\n",
    );
    let store = format!("sqlite://{}/trellis.db", dir.path().display());
    for platform in ["local", "kubernetes", "docker", "ecs"] {
        // Without --dry-run too: nothing is started or opened.
        for dry_run in [true, false] {
            let mut args = vec![
                "deploy",
                "user-service",
                "--platform",
                platform,
                "--spec",
                &bad,
                "--store",
                &store,
            ];
            if dry_run {
                args.push("--dry-run");
            }
            let (code, out, err) = trellis(&args);
            assert_eq!(code, 2, "{platform}: {err}");
            assert!(out.is_empty(), "{platform}: nothing printed: {out}");
            for field in ["replicas", "resources.memory", "health_check.port"] {
                assert!(err.contains(field), "{platform}: {field}: {err}");
            }
            assert!(
                err.contains("bad.toml"),
                "{platform}: names the file: {err}"
            );
        }
    }
    assert!(
        !dir.path().join("trellis.db").exists(),
        "the store was opened for a bad spec"
    );

    // Syntax errors and unknown keys name the line or the key.
    let unknown = write(dir.path(), "unknown.toml", "image = \"x:1\"\nreplica = 3\n");
    let (code, _, err) = trellis(&[
        "deploy",
        "x",
        "--platform",
        "kubernetes",
        "--spec",
        &unknown,
        "--dry-run",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("replica"), "{err}");

    // A missing file, an unknown platform, a bad duration.
    let (code, _, err) = trellis(&[
        "deploy",
        "x",
        "--platform",
        "local",
        "--spec",
        "/nonexistent/spec.toml",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--spec") && err.contains("/nonexistent/spec.toml"),
        "{err}"
    );
    let good = write(dir.path(), "good.toml", IMAGE_SPEC);
    let (code, _, err) = trellis(&["deploy", "x", "--platform", "nomad", "--spec", &good]);
    assert_eq!(code, 2);
    assert!(err.contains("nomad") && err.contains("--platform"), "{err}");
    let (code, _, err) = trellis(&[
        "deploy",
        "x",
        "--platform",
        "kubernetes",
        "--spec",
        &good,
        "--timeout",
        "soon",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--timeout"), "{err}");
    // Missing required flags.
    let (code, _, err) = trellis(&["deploy", "x", "--spec", &good]);
    assert_eq!(code, 2);
    assert!(err.contains("--platform"), "{err}");
    // A version that cannot be an instance id.
    let (code, _, err) = trellis(&[
        "deploy",
        "x",
        "--platform",
        "local",
        "--spec",
        &good,
        "--version",
        "1 0",
        "--dry-run",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("1 0"), "{err}");
    // A kubeconfig that does not exist: nothing applied.
    let (code, _, err) = trellis(&[
        "deploy",
        "x",
        "--platform",
        "kubernetes",
        "--spec",
        &good,
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--kubeconfig") && err.contains("/nonexistent/kubeconfig"),
        "{err}"
    );
}

#[test]
fn blue_green_bad_options_exit_2_naming_each() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "spec.toml",
        "command = [\"/bin/true\"]\n[health_check]\npath = \"/health\"\nport = 8080\n",
    );
    let store = format!("sqlite://{}/trellis.db", dir.path().display());
    let (code, out, err) = trellis(&[
        "deploy",
        "blue-green",
        "shop",
        "--current-version",
        "1.0.0",
        "--new-version",
        "1.0.0",
        "--split",
        "90:20",
        "--spec",
        &spec,
        "--metrics-url",
        "http://127.0.0.1:1/metrics",
        "--max-error-rate",
        "1.5",
        "--store",
        &store,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty(), "{out}");
    for field in ["new_version", "traffic_split", "analysis.max_error_rate"] {
        assert!(err.contains(field), "{field}: {err}");
    }
    assert!(!dir.path().join("trellis.db").exists());
    let (code, _, err) = trellis(&[
        "deploy",
        "blue-green",
        "shop",
        "--current-version",
        "1.0.0",
        "--new-version",
        "1.1.0",
        "--split",
        "ninety",
        "--spec",
        &spec,
        "--metrics-url",
        "http://127.0.0.1:1/metrics",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--split") && err.contains("BLUE:GREEN"),
        "{err}"
    );
}

/// A `trellis deploy` child, stopped when dropped (the test failed before SIGTERM):
/// SIGTERM first, so that it stops the replicas it supervises, then SIGKILL after 10 s.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_deploy_registers_in_the_store_and_stops_on_sigterm() {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox is needed to serve HTTP in this test");
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("health"), "ok\n").unwrap();
    let spec = write(
        dir.path(),
        "spec.toml",
        &format!(
            r#"
command = ["/bin/sh", "-c", "exec {busybox} httpd -f -p 127.0.0.1:$PORT -h {}"]
replicas = 2
[health_check]
path = "/health"
port = 18480
"#,
            www.display()
        ),
    );
    let data = dir.path().join("data");
    let service = format!("bb{}", std::process::id());
    let mut child = Running(
        Command::new(TRELLIS)
            .args(["deploy", &service, "--platform", "local", "--spec", &spec])
            .args(["--version", "1.0.0", "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "warn")
            .env_remove("TRELLIS_STORE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The ready line, then one line per replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while lines.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines_rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("trellis deploy never got ready: {lines:?}"));
        lines.push(line);
    }
    assert!(
        lines[0].contains(&format!(
            "{service} 1.0.0 on local, 2 replicas ready and registered"
        )),
        "{lines:?}"
    );
    let ports: Vec<u16> = lines[1..]
        .iter()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "port").unwrap();
            words[at + 1].parse().unwrap()
        })
        .collect();
    assert!(
        lines[1].contains(&format!("{service}-1.0.0-0")),
        "{lines:?}"
    );
    assert!(lines[1].contains("registered"), "{lines:?}");

    // A second process (this one) sees both replicas in the node's store.
    let store = trellis_store::Store::open(&format!("sqlite://{}/trellis.db", data.display()))
        .await
        .unwrap();
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    registry.refresh().await.unwrap();
    let mut seen: Vec<u16> = registry
        .discover(&service)
        .to_vec()
        .iter()
        .map(|r| r.instance.port)
        .collect();
    seen.sort_unstable();
    let mut expected = ports.clone();
    expected.sort_unstable();
    assert_eq!(seen, expected);
    for port in &ports {
        assert!(accepts(*port), "replica on {port} does not answer");
    }

    // SIGTERM: deregistered, processes stopped, exit 0.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "trellis deploy did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    // The rest of stdout, until the pipe closes.
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(line) = lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        rest.push(line);
    }
    assert!(
        rest.iter()
            .any(|l| l.contains(&format!("{service} stopped (2 replicas)"))),
        "{rest:?}"
    );
    registry.refresh().await.unwrap();
    assert!(registry.discover(&service).is_empty());
    for port in &ports {
        assert!(!accepts(*port), "replica on {port} still answers");
    }
    registry.shutdown().await.unwrap();
}

#[test]
fn ecs_without_credentials_sends_nothing_and_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.toml", IMAGE_SPEC);
    let output = Command::new(TRELLIS)
        .args([
            "deploy",
            "user-service",
            "--platform",
            "ecs",
            "--spec",
            &spec,
        ])
        .env_clear()
        .env("HOME", dir.path())
        .env("AWS_REGION", "eu-west-1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(output.stdout.is_empty());
    assert!(err.contains("find AWS credentials"), "{err}");
    assert!(err.contains("nothing was sent"), "{err}");
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    assert!(
        err.contains(&dir.path().join(".aws/credentials").display().to_string()),
        "{err}"
    );
}

/// Against the real kube-apiserver of `scripts/services up kube` (no controller-manager):
/// the objects are applied, and the rollout wait fails clearly after --timeout.
#[test]
fn kubernetes_applies_then_reports_the_rollout_timeout() {
    let kubeconfig = std::env::var_os("TRELLIS_SERVICES_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.services"))
        .join("kube/kubeconfig");
    let reachable = std::fs::read_to_string(&kubeconfig).is_ok_and(|text| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("server: https://"))
            .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
    });
    if !reachable {
        assert!(
            std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() != Ok("1"),
            "kube-apiserver is required (TRELLIS_REQUIRE_ENGINES=1) but {} does not lead to one; \
             start it with scripts/services up kube",
            kubeconfig.display()
        );
        eprintln!("SKIPPED: no kube-apiserver; start it with scripts/services up kube");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.toml", IMAGE_SPEC);
    let service = format!("cli-k{}", std::process::id());
    let (code, out, err) = trellis(&[
        "deploy",
        &service,
        "--platform",
        "kubernetes",
        "--spec",
        &spec,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--timeout",
        "1s",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "applied Deployment default/{service} and Service default/{service}"
        )),
        "{out}"
    );
    assert!(
        err.contains(&format!(
            "Deployment default/{service} did not roll out within 1s"
        )),
        "{err}"
    );
    assert!(err.contains("0 of 2 replicas updated"), "{err}");
}

fn services_home() -> std::path::PathBuf {
    std::env::var_os("TRELLIS_SERVICES_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.services"))
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .env(
            "CONTAINERS_CONF",
            services_home().join("podman/containers.conf"),
        )
        .args(args)
        .output()
        .unwrap()
}

/// Against podman's Docker API (`scripts/services up podman`): a busybox httpd image is
/// imported (nothing pulled), deployed by the CLI, healthy and served on 127.0.0.1.
#[test]
fn docker_deploys_healthy_containers_through_the_engine_api() {
    let socket = services_home().join("podman/podman.sock");
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() != Ok("1"),
            "the podman API service is required (TRELLIS_REQUIRE_ENGINES=1) but {} does not \
             answer; start it with scripts/services up podman",
            socket.display()
        );
        eprintln!("SKIPPED: no podman API service; start it with scripts/services up podman");
        return;
    }
    // The image: Debian's static busybox in an otherwise empty rootfs.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "wget", "httpd"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/health"), "ok\n").unwrap();
    let tar = dir.path().join("rootfs.tar");
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-cf", tar.to_str().unwrap(), "."])
            .status()
            .unwrap()
            .success()
    );
    let image = "localhost/trellis-test/busybox-httpd-cli:1";
    let imported = podman(&[
        "import",
        "--change",
        "ENV PATH=/bin",
        tar.to_str().unwrap(),
        image,
    ]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let spec = write(
        dir.path(),
        "spec.toml",
        &format!(
            r#"
image = "{image}"
command = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
replicas = 1
[health_check]
path = "/health"
port = 8080
"#
        ),
    );
    let service = format!("cli-d{}", std::process::id());
    let (code, out, err) = trellis(&[
        "deploy",
        &service,
        "--platform",
        "docker",
        "--spec",
        &spec,
        "--version",
        "1.0.0",
        "--docker-socket",
        socket.to_str().unwrap(),
        "--timeout",
        "60s",
    ]);
    let container = format!("{service}-1.0.0-0");
    let removed = podman(&["rm", "-f", "-t", "1", &container]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{service} 1.0.0 on docker, 1 containers healthy")),
        "{out}"
    );
    let line = out.lines().find(|l| l.contains(&container)).unwrap();
    assert!(line.contains("127.0.0.1:"), "{out}");
    assert!(
        removed.status.success(),
        "the container was not there to remove"
    );
}

/// A spec serving `/v` (`{version} ok`) and `/health` with busybox httpd on `$PORT`, each
/// replica from its own directory under `dir`.
fn httpd_local_spec(dir: &Path) -> String {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox is needed to serve HTTP in this test");
    write(
        dir,
        "spec.toml",
        &format!(
            r#"
command = ["/bin/sh", "-c", "d={root}/www-$TRELLIS_INSTANCE_ID; mkdir -p $d; echo ok > $d/health; echo \"$TRELLIS_VERSION ok\" > $d/v; exec {busybox} httpd -f -p 127.0.0.1:$PORT -h $d"]
replicas = 2
[health_check]
path = "/health"
port = 18490
"#,
            root = dir.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_on_local_promotes_and_prints_every_decision() {
    let dir = tempfile::tempdir().unwrap();
    let spec = httpd_local_spec(dir.path());
    let store_url = format!("sqlite://{}/trellis.db", dir.path().display());
    let service = format!("bg{}", std::process::id());
    // A node sharing the store: its gateway routes by weight, its /metrics has the
    // gateway's per-version figures the analysis reads.
    let settings = trellis_admin::Settings::from_toml(
        &format!(
            r#"
[store]
url = "{store_url}"
[admin]
listen = "127.0.0.1:0"
[registry]
health_check_interval = "200ms"
refresh_interval = "50ms"
[gateway]
listen = "127.0.0.1:0"
[[gateway.routes]]
path = "/api/*"
service = "{service}"
strip_prefix = "/api"
load_balancer = "weighted"
"#
        ),
        "test",
    )
    .unwrap();
    let node = trellis_admin::Node::start(settings).await.unwrap();
    let gateway = node.gateway_addr().unwrap();
    let metrics_url = format!("http://{}/metrics", node.admin_addr());

    let mut child = Running(
        Command::new(TRELLIS)
            .args(["deploy", "blue-green", &service])
            .args(["--current-version", "1.0.0", "--new-version", "2.0.0"])
            .args(["--split", "70:30", "--spec", &spec])
            .args(["--metrics-url", &metrics_url])
            .args([
                "--window",
                "3s",
                "--interval",
                "500ms",
                "--min-requests",
                "10",
            ])
            .args(["--store", &store_url])
            .env("RUST_LOG", "warn")
            .env_remove("TRELLIS_STORE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // Blue ready, then answering through the gateway (the node's registry refreshes every
    // 50 ms); only then the load starts, so every request should succeed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("(blue) on local, 2 replicas ready"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines_rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("blue never got ready: {lines:#?}"));
        lines.push(line);
    }
    let probe = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = probe
            .get(format!("http://{gateway}/api/v"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blue never answered through the gateway"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A constant load through the gateway, bounded in count and time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut by_body = std::collections::BTreeMap::<String, u64>::new();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && sent < 50_000
                && Instant::now() < deadline
            {
                sent += 1;
                let body = match http.get(format!("http://{gateway}/api/v")).send().await {
                    Ok(r) => format!(
                        "{} {}",
                        r.status().as_u16(),
                        r.text().await.unwrap_or_default().trim()
                    ),
                    Err(e) => format!("error {e}"),
                };
                *by_body.entry(body).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            by_body
        }
    });

    // Every line until the outcome.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines_rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no outcome from trellis deploy blue-green: {lines:#?}"));
        let done = line.contains("trellis deploy: outcome");
        lines.push(line);
        if done {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let by_body = load.await.unwrap();
    println!("{}", lines.join("\n"));
    println!("load through the gateway: {by_body:?}");

    assert!(
        lines.iter().any(|l| l.contains(&format!(
            "{service} 1.0.0 (blue) on local, 2 replicas ready"
        ))),
        "{lines:#?}"
    );
    assert!(
        lines.last().unwrap().contains("outcome Promoted"),
        "{lines:#?}"
    );
    // The decisions, printed with their figures, in order.
    let actions: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains(" requests ") && l.contains(" error_rate "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(actions.first(), Some(&"start"), "{lines:#?}");
    assert_eq!(actions.get(1), Some(&"split"), "{lines:#?}");
    assert_eq!(actions.last(), Some(&"promote"), "{lines:#?}");
    assert!(
        actions[2..actions.len() - 1].iter().all(|a| *a == "check"),
        "{actions:?}"
    );
    let split = lines
        .iter()
        .find(|l| l.trim_start().starts_with("split"))
        .unwrap();
    assert!(
        split.contains("blue 1.0.0 70%") && split.contains("green 2.0.0 30%"),
        "{split}"
    );
    let promote = lines
        .iter()
        .find(|l| l.trim_start().starts_with("promote"))
        .unwrap();
    let requests: u64 = promote
        .split_whitespace()
        .skip_while(|w| *w != "requests")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(requests >= 10, "green judged on its own traffic: {promote}");
    // Both versions answered through the gateway, and nothing failed.
    assert!(by_body.keys().any(|b| b == "200 1.0.0 ok"), "{by_body:?}");
    assert!(by_body.keys().any(|b| b == "200 2.0.0 ok"), "{by_body:?}");
    assert!(by_body.keys().all(|b| b.starts_with("200 ")), "{by_body:?}");

    // The record another process (the admin node) reads.
    let store = trellis_store::Store::open(&store_url).await.unwrap();
    let record = trellis_deploy::DeploymentRecords::new(store)
        .get("default", &service)
        .await
        .unwrap()
        .expect("a deployment record in the store");
    assert_eq!(record.state, trellis_deploy::DeploymentState::Promoted);
    assert_eq!(record.decisions.len(), actions.len());

    // SIGTERM: green stopped and deregistered, exit 0.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "trellis deploy did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    node.shutdown().await.unwrap();
}

#[test]
fn blue_green_bad_flags_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let spec = httpd_local_spec(dir.path());
    let store = format!("sqlite://{}/trellis.db", dir.path().display());
    let base = |extra: &[&str]| {
        let mut args = vec![
            "deploy",
            "blue-green",
            "shop",
            "--current-version",
            "1.0.0",
            "--new-version",
            "2.0.0",
            "--store",
            &store,
        ];
        args.extend_from_slice(extra);
        trellis(&args)
    };
    let metrics = "http://127.0.0.1:1/metrics";
    for (extra, flag) in [
        (
            vec![
                "--spec",
                &spec,
                "--metrics-url",
                metrics,
                "--window",
                "soon",
            ],
            "--window",
        ),
        (
            vec![
                "--spec",
                &spec,
                "--metrics-url",
                metrics,
                "--max-p99",
                "fast",
            ],
            "--max-p99",
        ),
        (
            vec!["--spec", &spec, "--metrics-url", "not a url"],
            "--metrics-url",
        ),
        (
            vec!["--spec", "/nonexistent/spec.toml", "--metrics-url", metrics],
            "--spec",
        ),
        (vec!["--spec", &spec], "--metrics-url"),
        (
            vec![
                "--spec",
                &spec,
                "--metrics-url",
                metrics,
                "--window",
                "1s",
                "--interval",
                "2s",
            ],
            "analysis.window",
        ),
    ] {
        let (code, out, err) = base(&extra);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains(flag), "{extra:?} should name {flag}: {err}");
        assert!(out.is_empty(), "{extra:?}: {out}");
    }
    // Nothing was started or written.
    assert!(!dir.path().join("trellis.db").exists());
}
