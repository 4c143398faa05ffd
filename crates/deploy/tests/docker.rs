#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![cfg(feature = "docker")]
//! The docker platform against a real Engine API: podman's service
//! (`scripts/services up podman`). The image is built here with nothing pulled (see
//! `support/docker.rs`). Skipped with a notice when the engine is not running, unless
//! `TRELLIS_REQUIRE_ENGINES=1`.

#[path = "support/docker.rs"]
mod docker_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use docker_support::engine;

use trellis_deploy::{DeployError, DeploySpec, DockerOptions};
use trellis_registry::{RegistryOptions, ServiceRegistry};
use trellis_store::Store;

const IMAGE: &str = "localhost/trellis-test/busybox-httpd:1";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn httpd_spec(health_path: &str, replicas: i32) -> DeploySpec {
    DeploySpec::from_toml(&format!(
        r#"
        image = "{IMAGE}"
        command = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
        replicas = {replicas}
        [resources]
        memory = "64Mi"
        [environment]
        GREETING = "hello"
        [health_check]
        path = "{health_path}"
        port = 8080
        "#
    ))
    .unwrap()
}

fn options(version: &str) -> DockerOptions {
    DockerOptions::new()
        .version(version)
        .health_interval(Duration::from_secs(1))
        .ready_timeout(Duration::from_secs(60))
        .stop_timeout(Duration::from_secs(1))
}

async fn registry(dir: &tempfile::TempDir) -> ServiceRegistry {
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    let store = Store::open(&url).await.unwrap();
    ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap()
}

/// A plain HTTP/1.0 GET on 127.0.0.1: the status line and body.
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_healthy_registered_containers_and_removes_them() {
    let Some(deployer) = engine().await else {
        return;
    };
    docker_support::build_image(IMAGE);
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(&dir).await;
    let deployer = deployer.with_registry(registry.clone());
    let service = unique("dk-ok");
    let spec = httpd_spec("/health", 2);

    let deployment = deployer
        .deploy(&service, &spec, &options("1.0.0"))
        .await
        .unwrap();
    assert_eq!(deployment.version, "1.0.0");
    assert_eq!(deployment.containers.len(), 2);
    let names: Vec<_> = deployment
        .containers
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        names,
        [format!("{service}-1.0.0-0"), format!("{service}-1.0.0-1")]
    );

    for container in &deployment.containers {
        // Served on the published port, on 127.0.0.1 only.
        let port = container.host_port.expect("published port");
        let response = http_get(port, "/health");
        assert!(response.starts_with("HTTP/1."), "{response}");
        assert!(
            response.lines().next().unwrap().contains(" 200 "),
            "{response}"
        );
        assert!(response.ends_with("ok\n"), "{response}");

        let inspect = deployer
            .client()
            .inspect_container(&container.name, None)
            .await
            .unwrap();
        assert_eq!(inspect.id.as_deref(), Some(container.id.as_str()));
        let config = inspect.config.unwrap();
        let labels = config.labels.unwrap();
        assert_eq!(labels["trellis.service"], service);
        assert_eq!(labels["trellis.version"], "1.0.0");
        assert!(
            config.env.unwrap().contains(&"GREETING=hello".to_owned()),
            "environment"
        );
        assert_eq!(
            config.healthcheck.unwrap().test.unwrap(),
            [
                "CMD",
                "wget",
                "-q",
                "-O",
                "/dev/null",
                "http://127.0.0.1:8080/health"
            ]
        );
        let host = inspect.host_config.unwrap();
        let policy = host.restart_policy.unwrap();
        assert_eq!(policy.name.unwrap().to_string(), "on-failure");
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        let bindings = inspect.network_settings.unwrap().ports.unwrap();
        let binding = bindings["8080/tcp"].as_ref().unwrap();
        assert_eq!(binding[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            binding[0].host_port.as_deref(),
            Some(port.to_string().as_str())
        );
    }

    // The registry sees both, at their published ports, and its own health checks (HTTP
    // from the host) find them healthy.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = registry.discover(&service);
        let healthy: Vec<_> = found.healthy().map(|r| r.instance.port).collect();
        if healthy.len() == 2 {
            let mut expected: Vec<_> = deployment
                .containers
                .iter()
                .map(|c| c.host_port.unwrap())
                .collect();
            let mut healthy = healthy;
            healthy.sort_unstable();
            expected.sort_unstable();
            assert_eq!(healthy, expected);
            assert_eq!(found.with_version("1.0.0").count(), 2);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "registry never saw 2 healthy instances: {:?}",
            found.to_vec()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Remove: stopped, removed, deregistered.
    assert_eq!(deployer.remove(&service, None).await.unwrap(), 2);
    assert!(
        deployer
            .containers(&service, None)
            .await
            .unwrap()
            .is_empty()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !registry.discover(&service).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still registered after removal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Removing again finds nothing and is not an error.
    assert_eq!(deployer.remove(&service, None).await.unwrap(), 0);
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_removes_everything_it_created() {
    let Some(deployer) = engine().await else {
        return;
    };
    docker_support::build_image(IMAGE);
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(&dir).await;
    let deployer = deployer.with_registry(registry.clone());
    let service = unique("dk-sick");
    let spec = httpd_spec("/missing", 1);
    let err = deployer
        .deploy(
            &service,
            &spec,
            &options("2.0.0").ready_timeout(Duration::from_secs(4)),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DeployError::NotReady { .. }), "{err:?}");
    assert!(text.contains(&format!("{service}-2.0.0-0")), "{text}");
    assert!(text.contains("not healthy within 4s"), "{text}");
    assert!(text.contains("wget"), "{text}");
    // Nothing left behind: no container, no registration.
    assert!(
        deployer
            .containers(&service, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(registry.discover(&service).is_empty());
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spec_creates_nothing() {
    let Some(deployer) = engine().await else {
        return;
    };
    let service = unique("dk-bad");
    let mut spec = httpd_spec("/health", 1);
    spec.replicas = -1;
    spec.resources.memory = Some("64Mx".to_owned());
    let err = deployer
        .deploy(&service, &spec, &options("1.0.0"))
        .await
        .unwrap_err();
    assert_eq!(err.fields(), ["replicas", "resources.memory"]);
    assert!(
        deployer
            .containers(&service, None)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The facade: `ServiceDeployer` on the docker platform with a `DockerBackend` starts
/// healthy registered containers, reports them, and undeploys every version.
#[cfg(feature = "local")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_deployer_runs_containers_through_the_backend() {
    use std::sync::Arc;
    use trellis_deploy::{DockerBackend, Platform, ReplicaPhase, ServiceDeployer};

    if engine().await.is_none() {
        return;
    }
    docker_support::build_image(IMAGE);
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(&dir).await;
    let backend = DockerBackend::connect_unix(&docker_support::socket(), registry.clone())
        .unwrap()
        .options(options("ignored"));
    let deployer = ServiceDeployer::builder(Platform::Docker, registry.clone())
        .backend(Arc::new(backend))
        .build()
        .unwrap();
    let service = unique("dk-facade");

    let deployment = deployer
        .deploy_version(&service, "2.0.0", &httpd_spec("/health", 2))
        .await
        .unwrap();
    assert_eq!(deployment.platform, Platform::Docker);
    assert_eq!(deployment.replicas.len(), 2);
    for (i, replica) in deployment.replicas.iter().enumerate() {
        assert_eq!(replica.instance_id, format!("{service}-2.0.0-{i}"));
        assert_eq!(replica.index, u32::try_from(i).unwrap());
        assert_eq!(replica.version, "2.0.0");
        assert_eq!(replica.phase, ReplicaPhase::Running);
        assert!(replica.registered);
        // The published port serves the health endpoint.
        let response = http_get(replica.port, "/health");
        assert!(
            response.lines().next().unwrap().contains(" 200 "),
            "{response}"
        );
    }
    // Registered at the published ports.
    let mut registered: Vec<u16> = registry
        .discover(&service)
        .to_vec()
        .iter()
        .map(|r| r.instance.port)
        .collect();
    registered.sort_unstable();
    let mut ports: Vec<u16> = deployment.replicas.iter().map(|r| r.port).collect();
    ports.sort_unstable();
    assert_eq!(registered, ports);

    let status = deployer.status(&service).await.unwrap();
    assert_eq!(status, deployment.replicas);

    let stopped = deployer.undeploy(&service).await.unwrap();
    assert_eq!(stopped.len(), 2);
    assert!(stopped.iter().all(|r| r.phase == ReplicaPhase::Stopped));
    assert!(deployer.status(&service).await.unwrap().is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !registry.discover(&service).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still registered after undeploy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = deployer.undeploy(&service).await.unwrap_err();
    assert!(matches!(err, DeployError::NotDeployed { .. }), "{err}");
    registry.shutdown().await.unwrap();
}
