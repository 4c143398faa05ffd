//! Containers through the Docker Engine API (feature `docker`): Docker itself, or podman's
//! Docker-compatible API service (`podman system service`).
//!
//! [`DockerDeployer::deploy`] creates and starts one container per replica — environment,
//! the service port published on `127.0.0.1` only (the engine picks the host port),
//! a `HEALTHCHECK` from `health_check`, restart policy `on-failure`, labels
//! `trellis.service` and `trellis.version` — waits until every one is healthy, then
//! registers each in the [`ServiceRegistry`] (when one is given) at its published port.
//! If any step fails, what was created is removed again. [`DockerDeployer::remove`] deregisters,
//! stops and removes the containers of a service (by label).
//!
//! Healthy means the engine reports `healthy`, or, while the engine still says `starting`,
//! the health-check command itself succeeds when run in the container through the exec API.
//! The second path is what makes the check work on engines that do not schedule health
//! checks themselves (podman runs them from systemd timers, absent in containers and CI).
//!
//! [`render_docker`] returns the same Engine API calls as data for `--dry-run`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::ClientVersion;
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HealthConfig,
    HealthStatusEnum, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use serde::Serialize;
use trellis_registry::{Instance, ServiceRegistry};

#[cfg(feature = "local")]
use crate::bluegreen::metrics::BoxFuture;
use crate::error::{DeployError, FieldError};
use crate::image::{ImageReference, Registry};
#[cfg(feature = "local")]
use crate::local::{ReplicaPhase, ReplicaStatus};
use crate::quantity::Quantity;
use crate::spec::{DeploySpec, Platform, check_label_value};

/// Label holding the service name on every container Trellis creates.
pub const SERVICE_LABEL: &str = "trellis.service";
/// Label holding the version on every container Trellis creates.
pub const VERSION_LABEL: &str = "trellis.version";
/// Label holding the replica index.
pub const REPLICA_LABEL: &str = "trellis.replica";
/// The instance metadata key the gateway's `weighted` balancer reads.
const WEIGHT_METADATA: &str = "weight";

/// The Docker Engine API version asked for: podman's service speaks 1.41, as do Docker
/// engines from 20.10 on.
pub const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Deployer-level settings, built with the methods below.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    registry: Option<String>,
    version: Option<String>,
    host_ip: String,
    health_command: Option<Vec<String>>,
    health_interval: Duration,
    ready_timeout: Duration,
    max_restarts: i64,
    stop_timeout: Duration,
    pub(crate) drain: Duration,
    /// The `weight` metadata of the instances registered (blue-green's share).
    weight: Option<u32>,
}

impl Default for DockerOptions {
    fn default() -> Self {
        DockerOptions {
            registry: None,
            version: None,
            host_ip: "127.0.0.1".to_owned(),
            health_command: None,
            health_interval: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(60),
            max_restarts: 3,
            stop_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(5),
            weight: None,
        }
    }
}

impl DockerOptions {
    /// Options with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registry put in front of images that name none. Defaults to none.
    #[must_use]
    pub fn registry(mut self, registry: impl Into<String>) -> Self {
        self.registry = Some(registry.into());
        self
    }

    /// Version of this release, for the `trellis.version` label, the registry and the
    /// container names (`{name}-{version}-{replica}`). Defaults to the image's tag, else
    /// `latest`, with names `{name}-{replica}`.
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Host address the ports are published on. Defaults to `127.0.0.1`.
    #[must_use]
    pub fn host_ip(mut self, host_ip: impl Into<String>) -> Self {
        self.host_ip = host_ip.into();
        self
    }

    /// The health-check command run inside the container (exec form, without `CMD`).
    /// Defaults to `wget -q -O /dev/null http://127.0.0.1:{port}{readiness path}`, which
    /// busybox- and alpine-based images have.
    #[must_use]
    pub fn health_command(mut self, command: Vec<String>) -> Self {
        self.health_command = Some(command);
        self
    }

    /// How often the engine runs the health check. Defaults to 5 s.
    #[must_use]
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// How long [`DockerDeployer::deploy`] waits for every replica to be healthy. Defaults
    /// to 60 s.
    #[must_use]
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long a container gets between SIGTERM and SIGKILL when removed (its
    /// `StopTimeout`). Defaults to 10 s.
    #[must_use]
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Blue-green: how long the losing version's containers keep running after they were
    /// deregistered, so that gateways see the registry change and requests in flight
    /// finish before the containers are stopped. Defaults to 5 s.
    #[must_use]
    pub fn drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Restarts the engine makes after a container fails (`on-failure` policy). Defaults
    /// to 3.
    #[must_use]
    pub fn max_restarts(mut self, restarts: i64) -> Self {
        self.max_restarts = restarts;
        self
    }
}

/// One Engine API request, as `--dry-run` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DockerCall {
    /// HTTP method.
    pub method: &'static str,
    /// Path and query, without the `/v1.41` prefix.
    pub path: String,
    /// JSON body, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

/// What is created for one replica.
#[derive(Debug, Clone)]
struct Plan {
    name: String,
    version: String,
    ports: Ports,
    health: Option<Vec<String>>,
    health_path: Option<String>,
    containers: Vec<(String, ContainerCreateBody)>,
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    service: Option<u16>,
    health: Option<u16>,
}

fn plan(name: &str, spec: &DeploySpec, options: &DockerOptions) -> Result<Plan, DeployError> {
    spec.validate(name, Platform::Docker)?;
    let mut errors = Vec::new();
    let mut fail = |field: &str, reason: String| {
        errors.push(FieldError {
            field: field.to_owned(),
            reason,
        })
    };
    let registry = match options.registry.as_deref().map(Registry::parse) {
        Some(Err(reason)) => {
            fail("registry", reason);
            None
        }
        Some(Ok(registry)) => Some(registry),
        None => None,
    };
    if let Some(version) = &options.version
        && let Err(reason) = check_label_value(version)
    {
        fail("version", reason);
    }
    if options.host_ip.parse::<std::net::IpAddr>().is_err() {
        fail(
            "host_ip",
            format!("{:?} is not an IP address", options.host_ip),
        );
    }
    if options.max_restarts < 0 {
        fail(
            "max_restarts",
            format!("{} is negative", options.max_restarts),
        );
    }
    if options.health_interval < Duration::from_millis(100) {
        fail(
            "health_interval",
            format!("{:?} is too short; at least 100ms", options.health_interval),
        );
    }
    if options
        .health_command
        .as_ref()
        .is_some_and(|c| c.first().is_none_or(|p| p.trim().is_empty()))
    {
        fail("health_command", "is empty".to_owned());
    }
    let image_text = spec.image.as_deref().unwrap_or_default();
    let image = match ImageReference::parse(image_text) {
        Ok(image) => Some(image),
        Err(reason) => {
            fail("image", reason);
            None
        }
    };
    if !errors.is_empty() {
        return Err(DeployError::Invalid {
            name: name.to_owned(),
            errors,
        });
    }
    let image = match (image, &registry) {
        (Some(image), Some(registry)) => image.with_registry(registry),
        (Some(image), None) => image,
        (None, _) => {
            return Err(DeployError::Invalid {
                name: name.to_owned(),
                errors: Vec::new(),
            });
        }
    };
    let version = options
        .version
        .clone()
        .or_else(|| image.tag.clone())
        .unwrap_or_else(|| "latest".to_owned());
    // Validation guarantees 1..=65535.
    let to_port = |p: i32| u16::try_from(p).ok();
    let ports = Ports {
        service: spec.service_port().and_then(to_port),
        health: spec.health_check.as_ref().and_then(|h| to_port(h.port)),
    };
    let health_path = spec.health_check.as_ref().map(|h| h.readiness().to_owned());
    let health = match (&options.health_command, &spec.health_check) {
        (Some(command), _) => Some(command.clone()),
        (None, Some(check)) => Some(vec![
            "wget".to_owned(),
            "-q".to_owned(),
            "-O".to_owned(),
            "/dev/null".to_owned(),
            format!("http://127.0.0.1:{}{}", check.port, check.readiness()),
        ]),
        (None, None) => None,
    };

    let mut exposed = Vec::new();
    let mut bindings = HashMap::new();
    for port in [ports.service, ports.health].into_iter().flatten() {
        let key = format!("{port}/tcp");
        if !exposed.contains(&key) {
            exposed.push(key.clone());
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(options.host_ip.clone()),
                    host_port: Some(String::new()),
                }]),
            );
        }
    }
    let mut memory = None;
    let mut nano_cpus = None;
    if let Some(text) = &spec.resources.memory {
        let q = Quantity::parse(text).map_err(|r| invalid(name, "resources.memory", r))?;
        memory = i64::try_from(q.milli_value() / 1000).ok();
    }
    if let Some(text) = &spec.resources.cpu {
        let q = Quantity::parse(text).map_err(|r| invalid(name, "resources.cpu", r))?;
        nano_cpus = i64::try_from(q.milli_value() * 1_000_000).ok();
    }
    let healthcheck = health.as_ref().map(|command| {
        let interval = nanos(options.health_interval);
        HealthConfig {
            test: Some(
                std::iter::once("CMD".to_owned())
                    .chain(command.iter().cloned())
                    .collect(),
            ),
            interval: Some(interval),
            timeout: Some(nanos(Duration::from_secs(3)).min(interval)),
            retries: Some(3),
            start_period: Some(0),
            start_interval: None,
        }
    });
    let replicas = usize::try_from(spec.replicas).unwrap_or_default();
    let mut containers = Vec::with_capacity(replicas);
    for replica in 0..replicas {
        let container = match &options.version {
            Some(v) => format!("{name}-{v}-{replica}"),
            None => format!("{name}-{replica}"),
        };
        let labels = HashMap::from([
            (SERVICE_LABEL.to_owned(), name.to_owned()),
            (VERSION_LABEL.to_owned(), version.clone()),
            (REPLICA_LABEL.to_owned(), replica.to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            entrypoint: spec.command.clone(),
            env: Some(
                spec.environment
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            labels: Some(labels),
            exposed_ports: (!exposed.is_empty()).then(|| exposed.clone()),
            healthcheck: healthcheck.clone(),
            stop_timeout: i64::try_from(options.stop_timeout.as_secs()).ok(),
            host_config: Some(HostConfig {
                port_bindings: (!bindings.is_empty()).then(|| bindings.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::ON_FAILURE),
                    maximum_retry_count: Some(options.max_restarts),
                }),
                memory,
                nano_cpus,
                ..Default::default()
            }),
            ..Default::default()
        };
        containers.push((container, body));
    }
    Ok(Plan {
        name: name.to_owned(),
        version,
        ports,
        health,
        health_path,
        containers,
    })
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

fn invalid(name: &str, field: &str, reason: String) -> DeployError {
    DeployError::Invalid {
        name: name.to_owned(),
        errors: vec![FieldError {
            field: field.to_owned(),
            reason,
        }],
    }
}

/// The Engine API calls [`DockerDeployer::deploy`] makes for `name` — for each replica
/// `POST /containers/create?name=…` with the container's configuration, then
/// `POST /containers/{name}/start` — validating the spec and options first. Deterministic
/// for the same input (object keys sorted).
pub fn render_docker(
    name: &str,
    spec: &DeploySpec,
    options: &DockerOptions,
) -> Result<Vec<DockerCall>, DeployError> {
    let plan = plan(name, spec, options)?;
    let mut calls = Vec::with_capacity(plan.containers.len() * 2);
    for (container, body) in plan.containers {
        let body = serde_json::to_value(&body).map_err(|e| DeployError::Emit(e.to_string()))?;
        calls.push(DockerCall {
            method: "POST",
            path: format!("/containers/create?name={container}"),
            body: Some(body),
        });
        calls.push(DockerCall {
            method: "POST",
            path: format!("/containers/{container}/start"),
            body: None,
        });
    }
    Ok(calls)
}

/// [`render_docker`] as pretty-printed JSON: what `trellis deploy --platform docker
/// --dry-run` prints.
///
/// ```
/// use trellis_deploy::{DeploySpec, DockerOptions, render_docker_json};
///
/// let spec = DeploySpec::from_toml(r#"
///     image = "user-service:1.2.0"
///     [health_check]
///     path = "/health"
///     port = 3000
/// "#)?;
/// let json = render_docker_json("user-service", &spec, &DockerOptions::new())?;
/// assert!(json.contains(r#""path": "/containers/create?name=user-service-0""#));
/// assert!(json.contains(r#""HostIp": "127.0.0.1""#));
/// # Ok::<(), trellis_deploy::DeployError>(())
/// ```
pub fn render_docker_json(
    name: &str,
    spec: &DeploySpec,
    options: &DockerOptions,
) -> Result<String, DeployError> {
    let calls = render_docker(name, spec, options)?;
    serde_json::to_string_pretty(&calls).map_err(|e| DeployError::Emit(e.to_string()))
}

/// One running replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerContainer {
    /// Container name (`{name}-{replica}` or `{name}-{version}-{replica}`), also its
    /// instance id in the registry.
    pub name: String,
    /// Engine-assigned container id.
    pub id: String,
    /// Host port the service port is published on, if the spec has a port.
    pub host_port: Option<u16>,
}

/// What [`DockerDeployer::deploy`] started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerDeployment {
    /// The service.
    pub service: String,
    /// The version label.
    pub version: String,
    /// The replicas, healthy and registered.
    pub containers: Vec<DockerContainer>,
}

/// Deploys specs as containers on one engine and keeps the registry in step.
#[derive(Debug, Clone)]
pub struct DockerDeployer {
    docker: Docker,
    pub(crate) registry: Option<ServiceRegistry>,
}

impl DockerDeployer {
    /// A deployer on an existing client.
    pub fn new(docker: Docker) -> Self {
        DockerDeployer {
            docker,
            registry: None,
        }
    }

    /// A deployer talking to the engine at the unix socket `path` (`/run/podman/podman.sock`,
    /// `/var/run/docker.sock`) with API version [`API_VERSION`] and a 120 s request timeout.
    pub fn connect_unix(path: &str) -> Result<Self, DeployError> {
        let docker = Docker::connect_with_unix(path, 120, &API_VERSION).map_err(|e| {
            DeployError::Docker {
                operation: format!("connect to {path}"),
                reason: e.to_string(),
            }
        })?;
        Ok(DockerDeployer::new(docker))
    }

    /// Registers every replica in `registry` once healthy, and deregisters on removal.
    /// Defaults to no registry.
    #[must_use]
    pub fn with_registry(mut self, registry: ServiceRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The client.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Checks that the engine answers `/_ping`.
    pub async fn ping(&self) -> Result<(), DeployError> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| docker_error("ping the engine".to_owned(), e))
    }

    /// Creates and starts one container per replica, waits until each is healthy (within
    /// [`DockerOptions::ready_timeout`]), then registers each. A bad spec or options create
    /// nothing; on any later failure every container created so far is removed and every
    /// registration made is withdrawn before the error is returned.
    pub async fn deploy(
        &self,
        name: &str,
        spec: &DeploySpec,
        options: &DockerOptions,
    ) -> Result<DockerDeployment, DeployError> {
        let plan = plan(name, spec, options)?;
        let mut created: Vec<DockerContainer> = Vec::new();
        let result = self.start_all(&plan, options, &mut created).await;
        match result {
            Ok(()) => Ok(DockerDeployment {
                service: plan.name,
                version: plan.version,
                containers: created,
            }),
            Err(error) => {
                let cleanup = self.remove_containers(&plan.name, &created).await;
                Err(match cleanup {
                    Ok(_) => error,
                    Err(cleanup) => DeployError::Docker {
                        operation: format!("deploy {name}"),
                        reason: format!(
                            "{error}; removing what was created also failed: {cleanup}"
                        ),
                    },
                })
            }
        }
    }

    async fn start_all(
        &self,
        plan: &Plan,
        options: &DockerOptions,
        created: &mut Vec<DockerContainer>,
    ) -> Result<(), DeployError> {
        for (container, body) in &plan.containers {
            let create = CreateContainerOptionsBuilder::default()
                .name(container)
                .build();
            let response = self
                .docker
                .create_container(Some(create), body.clone())
                .await
                .map_err(|e| docker_error(format!("create container {container}"), e))?;
            created.push(DockerContainer {
                name: container.clone(),
                id: response.id,
                host_port: None,
            });
            self.docker
                .start_container(container, None)
                .await
                .map_err(|e| docker_error(format!("start container {container}"), e))?;
        }
        self.wait_healthy(plan, options.ready_timeout).await?;
        let mut health_ports = BTreeMap::new();
        for container in created.iter_mut() {
            let inspect = self.inspect(&container.name).await?;
            container.host_port = plan
                .ports
                .service
                .and_then(|port| published_port(&inspect, port));
            if let Some(port) = plan.ports.health {
                health_ports.insert(container.name.clone(), published_port(&inspect, port));
            }
        }
        if let Some(registry) = &self.registry {
            for container in created.iter() {
                let Some(port) = container.host_port else {
                    continue;
                };
                let mut instance = Instance::new(&container.name, &options.host_ip, port)
                    .version(&plan.version)
                    .metadata("platform", "docker")
                    .metadata("container_id", &container.id);
                if let Some(weight) = options.weight {
                    instance = instance.metadata(WEIGHT_METADATA, weight.to_string());
                }
                if let (Some(path), Some(Some(health_port))) =
                    (&plan.health_path, health_ports.get(&container.name))
                {
                    instance = instance.health_check(
                        format!("http://{}:{health_port}{path}", options.host_ip),
                        options.health_interval,
                    );
                }
                registry.register(&plan.name, instance).await.map_err(|e| {
                    DeployError::Registry {
                        instance: container.name.clone(),
                        reason: e.to_string(),
                    }
                })?;
            }
        }
        Ok(())
    }

    async fn inspect(&self, container: &str) -> Result<ContainerInspectResponse, DeployError> {
        self.docker
            .inspect_container(container, None)
            .await
            .map_err(|e| docker_error(format!("inspect container {container}"), e))
    }

    /// Polls every container of `plan` until healthy (see the module docs), failing early
    /// when one exits for good or turns unhealthy, and at the deadline.
    async fn wait_healthy(&self, plan: &Plan, timeout: Duration) -> Result<(), DeployError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: Vec<&str> = plan.containers.iter().map(|(n, _)| n.as_str()).collect();
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        let mut interval = tokio::time::interval(Duration::from_millis(500));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let not_ready = |detail: String| DeployError::NotReady {
            name: plan.name.clone(),
            version: plan.version.clone(),
            detail,
        };
        while !pending.is_empty() {
            interval.tick().await;
            let mut still = Vec::new();
            for container in pending {
                let inspect = self.inspect(container).await?;
                let state = inspect.state.unwrap_or_default();
                let health = state
                    .health
                    .as_ref()
                    .and_then(|h| h.status)
                    .unwrap_or(HealthStatusEnum::NONE);
                match state.status {
                    Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
                        if state.restarting != Some(true) =>
                    {
                        return Err(not_ready(format!(
                            "{container} exited with code {}{}",
                            state.exit_code.unwrap_or_default(),
                            state
                                .error
                                .filter(|e| !e.is_empty())
                                .map(|e| format!(": {e}"))
                                .unwrap_or_default()
                        )));
                    }
                    Some(ContainerStateStatusEnum::RUNNING) => {}
                    other => {
                        last.insert(container.to_owned(), format!("state {other:?}"));
                        still.push(container);
                        continue;
                    }
                }
                match (health, &plan.health) {
                    (HealthStatusEnum::HEALTHY, _) | (_, None) => {}
                    (HealthStatusEnum::UNHEALTHY, _) => {
                        let output = state
                            .health
                            .and_then(|h| h.log)
                            .and_then(|log| log.last().and_then(|l| l.output.clone()))
                            .unwrap_or_default();
                        return Err(not_ready(format!(
                            "{container} is unhealthy: {}",
                            output.trim()
                        )));
                    }
                    (_, Some(command)) => match self.exec_check(container, command).await {
                        Ok(()) => {}
                        Err(reason) => {
                            last.insert(container.to_owned(), reason);
                            still.push(container);
                        }
                    },
                }
            }
            pending = still;
            if !pending.is_empty() && tokio::time::Instant::now() >= deadline {
                let detail = pending
                    .iter()
                    .map(|c| {
                        format!(
                            "{c}: {}",
                            last.get(*c).map(String::as_str).unwrap_or("not checked")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(not_ready(format!(
                    "not healthy within {timeout:?}: {detail}"
                )));
            }
        }
        Ok(())
    }

    /// Runs the health-check command in `container` (exec API), bounded to 10 s; `Ok` when
    /// it exits 0, else why not.
    async fn exec_check(&self, container: &str, command: &[String]) -> Result<(), String> {
        let run = async {
            let exec = self
                .docker
                .create_exec(
                    container,
                    CreateExecOptions {
                        cmd: Some(command.to_vec()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| format!("health check could not be started: {e}"))?;
            let mut output = String::new();
            match self
                .docker
                .start_exec(&exec.id, Some(StartExecOptions::default()))
                .await
                .map_err(|e| format!("health check could not be started: {e}"))?
            {
                StartExecResults::Attached {
                    output: mut stream, ..
                } => {
                    while let Some(chunk) = stream.next().await {
                        if let Ok(chunk) = chunk
                            && output.len() < 4096
                        {
                            output.push_str(&chunk.to_string());
                        }
                    }
                }
                StartExecResults::Detached => {}
            }
            let inspect = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| format!("health check result unreadable: {e}"))?;
            match inspect.exit_code {
                Some(0) => Ok(()),
                code => Err(format!(
                    "health check {:?} exited with {}{}",
                    command.join(" "),
                    code.map_or("no code".to_owned(), |c| c.to_string()),
                    if output.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", output.trim())
                    }
                )),
            }
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap_or_else(|_| Err("health check did not finish within 10s".to_owned()))
    }

    /// The containers of `service` (every version, or only `version`), found by label,
    /// running or not: `(name, id)` pairs sorted by name.
    pub async fn containers(
        &self,
        service: &str,
        version: Option<&str>,
    ) -> Result<Vec<(String, String)>, DeployError> {
        let mut labels = vec![format!("{SERVICE_LABEL}={service}")];
        if let Some(version) = version {
            labels.push(format!("{VERSION_LABEL}={version}"));
        }
        let filters = HashMap::from([("label".to_owned(), labels)]);
        let list = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self
            .docker
            .list_containers(Some(list))
            .await
            .map_err(|e| docker_error(format!("list containers of {service}"), e))?;
        let mut found: Vec<(String, String)> = summaries
            .into_iter()
            .filter_map(|s| {
                let name = s.names?.first()?.trim_start_matches('/').to_owned();
                Some((name, s.id.unwrap_or_default()))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    /// Deregisters, stops (with each container's [stop
    /// timeout](DockerOptions::stop_timeout)) and removes every container of `service` (of
    /// `version` only, when given). Containers already gone are skipped. Returns how many
    /// were removed.
    pub async fn remove(&self, service: &str, version: Option<&str>) -> Result<usize, DeployError> {
        let found = self.containers(service, version).await?;
        self.remove_listed(service, found).await
    }

    /// [`remove_containers`](Self::remove_containers) of containers listed as `(name, id)`
    /// pairs by [`containers`](Self::containers).
    pub(crate) async fn remove_listed(
        &self,
        service: &str,
        found: Vec<(String, String)>,
    ) -> Result<usize, DeployError> {
        let containers: Vec<DockerContainer> = found
            .into_iter()
            .map(|(name, id)| DockerContainer {
                name,
                id,
                host_port: None,
            })
            .collect();
        self.remove_containers(service, &containers).await
    }

    pub(crate) async fn remove_containers(
        &self,
        service: &str,
        containers: &[DockerContainer],
    ) -> Result<usize, DeployError> {
        let mut removed = 0;
        let mut failures = Vec::new();
        for container in containers {
            // Deregistered first, so that no gateway picks it while it stops.
            if let Some(registry) = &self.registry
                && let Err(e) = registry.deregister(service, &container.name).await
            {
                failures.push(format!("deregister {}: {e}", container.name));
            }
            if let Err(e) = self.docker.stop_container(&container.name, None).await
                && !is_gone(&e)
                && !is_not_modified(&e)
            {
                failures.push(format!("stop {}: {e}", container.name));
            }
            let remove = RemoveContainerOptionsBuilder::default().force(true).build();
            match self
                .docker
                .remove_container(&container.name, Some(remove))
                .await
            {
                Ok(()) => removed += 1,
                Err(e) if is_gone(&e) => {}
                Err(e) => failures.push(format!("remove {}: {e}", container.name)),
            }
        }
        if failures.is_empty() {
            Ok(removed)
        } else {
            Err(DeployError::Docker {
                operation: format!("remove containers of {service}"),
                reason: failures.join("; "),
            })
        }
    }
}

/// The docker platform behind [`ServiceDeployer`](crate::ServiceDeployer) (features
/// `docker` and `local`): deploy is [`DockerDeployer::deploy`] with the version deployed
/// (healthy, then registered in the registry given), undeploy is
/// [`DockerDeployer::remove`] of every version, status inspects the service's containers.
///
/// Docker has no namespaces: the deployer's namespace is not used, containers are found by
/// their `trellis.service` label. Each replica is reported with its container name as
/// `instance_id`, the published host port as `port` and no `pid`; it is
/// [`Running`](ReplicaPhase::Running) while the container runs,
/// [`Starting`](ReplicaPhase::Starting) while created or restarting, else
/// [`Stopped`](ReplicaPhase::Stopped), with the engine's restart count and exit code.
///
/// Blue-green ([`ServiceDeployer::blue_green_deploy`](crate::ServiceDeployer::blue_green_deploy))
/// runs the steps of the [local platform's](crate::bluegreen): green's containers are
/// started beside blue's and registered with green's `weight` metadata after blue's
/// instances were re-registered with blue's, so a gateway route with the `weighted`
/// balancer splits the traffic; green is judged from the deployer's metrics source (the
/// gateway's per-version metrics) and from its containers (running, not restarted) and
/// registry health; then promoted (blue's weight 0, green's weight removed, blue
/// deregistered, drained for [`DockerOptions::drain`], its containers removed) or rolled
/// back (green's weight 0, green deregistered, drained and removed, blue's weights removed;
/// blue's containers never touched). It needs the backend to register (a registry) and
/// `options.spec` (green's spec: the backend keeps no spec of blue).
#[cfg(feature = "local")]
#[derive(Debug, Clone)]
pub struct DockerBackend {
    pub(crate) deployer: DockerDeployer,
    pub(crate) options: DockerOptions,
    registered: bool,
}

#[cfg(feature = "local")]
impl DockerBackend {
    /// A backend deploying through `deployer` (registering where it registers).
    pub fn new(deployer: DockerDeployer) -> Self {
        let registered = deployer.registry.is_some();
        DockerBackend {
            deployer,
            options: DockerOptions::new(),
            registered,
        }
    }

    /// A backend on the engine at the unix socket `path`, registering every healthy
    /// replica in `registry` (usually the one given to the
    /// [`ServiceDeployer`](crate::ServiceDeployer)).
    pub fn connect_unix(path: &str, registry: ServiceRegistry) -> Result<Self, DeployError> {
        Ok(Self::new(
            DockerDeployer::connect_unix(path)?.with_registry(registry),
        ))
    }

    /// Deploy options (registry, health check timing, restarts). Their version is replaced
    /// by the version deployed. Defaults to [`DockerOptions::new`].
    #[must_use]
    pub fn options(mut self, options: DockerOptions) -> Self {
        self.options = options;
        self
    }

    /// These options with the `weight` metadata set on the instances registered.
    pub(crate) fn weighted(options: &DockerOptions, version: &str, weight: u32) -> DockerOptions {
        let mut options = options.clone().version(version);
        options.weight = Some(weight);
        options
    }

    /// The deployer.
    pub fn deployer(&self) -> &DockerDeployer {
        &self.deployer
    }

    pub(crate) async fn replicas(&self, name: &str) -> Result<Vec<ReplicaStatus>, DeployError> {
        let mut replicas = Vec::new();
        for (container, _) in self.deployer.containers(name, None).await? {
            let inspect = match self.deployer.inspect(&container).await {
                Ok(inspect) => inspect,
                // Removed between the list and the inspect.
                Err(DeployError::Docker { reason, .. }) if reason.starts_with("404") => continue,
                Err(e) => return Err(e),
            };
            replicas.push(self.replica(name, &container, &inspect));
        }
        Ok(replicas)
    }

    fn replica(
        &self,
        name: &str,
        container: &str,
        inspect: &ContainerInspectResponse,
    ) -> ReplicaStatus {
        let labels = inspect
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let port = inspect
            .config
            .as_ref()
            .and_then(|c| c.exposed_ports.as_ref())
            .and_then(|ports| {
                ports
                    .iter()
                    .find_map(|p| p.split('/').next()?.parse::<u16>().ok())
            })
            .and_then(|port| published_port(inspect, port))
            .unwrap_or_default();
        let state = inspect.state.clone().unwrap_or_default();
        let phase = match state.status {
            Some(ContainerStateStatusEnum::RUNNING) => ReplicaPhase::Running,
            Some(ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::RESTARTING) => {
                ReplicaPhase::Starting
            }
            Some(ContainerStateStatusEnum::REMOVING) => ReplicaPhase::Stopping,
            _ => ReplicaPhase::Stopped,
        };
        let last_exit = match state.status {
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => {
                Some(format!("exit code {}", state.exit_code.unwrap_or_default()))
            }
            _ => None,
        };
        ReplicaStatus {
            service: name.to_owned(),
            version: labels.get(VERSION_LABEL).cloned().unwrap_or_default(),
            index: labels
                .get(REPLICA_LABEL)
                .and_then(|r| r.parse().ok())
                .unwrap_or_default(),
            instance_id: container.to_owned(),
            port,
            pid: None,
            registered: self.registered && phase == ReplicaPhase::Running && port != 0,
            phase,
            restarts: inspect
                .restart_count
                .and_then(|r| u32::try_from(r).ok())
                .unwrap_or_default(),
            last_exit,
            health: None,
            weight: None,
            started_at: None,
        }
    }
}

#[cfg(feature = "local")]
impl crate::deployer::PlatformBackend for DockerBackend {
    fn platform(&self) -> Platform {
        Platform::Docker
    }

    fn deploy<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
        _namespace: &'a str,
        spec: &'a DeploySpec,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let options = self.options.clone().version(version);
            let deployment = self.deployer.deploy(name, spec, &options).await?;
            let mut replicas = Vec::with_capacity(deployment.containers.len());
            for container in &deployment.containers {
                let inspect = self.deployer.inspect(&container.name).await?;
                replicas.push(self.replica(name, &container.name, &inspect));
            }
            Ok(replicas)
        })
    }

    fn undeploy<'a>(
        &'a self,
        name: &'a str,
        _namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let mut replicas = self.replicas(name).await?;
            if replicas.is_empty() {
                return Err(DeployError::NotDeployed {
                    name: name.to_owned(),
                    version: None,
                });
            }
            self.deployer.remove(name, None).await?;
            for replica in &mut replicas {
                replica.phase = ReplicaPhase::Stopped;
                replica.registered = false;
            }
            Ok(replicas)
        })
    }

    fn blue_green<'a>(
        &'a self,
        name: &'a str,
        _namespace: &'a str,
        options: &'a crate::bluegreen::BlueGreenOptions,
        metrics: Option<&'a dyn crate::bluegreen::metrics::MetricsSource>,
        sink: &'a (dyn Fn(&crate::bluegreen::Decision) + Send + Sync),
    ) -> BoxFuture<'a, Result<crate::bluegreen::BlueGreenReport, DeployError>> {
        Box::pin(crate::docker_bluegreen::run(
            self, name, options, metrics, sink,
        ))
    }

    fn status<'a>(
        &'a self,
        name: &'a str,
        _namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(self.replicas(name))
    }
}

fn published_port(inspect: &ContainerInspectResponse, port: u16) -> Option<u16> {
    inspect
        .network_settings
        .as_ref()?
        .ports
        .as_ref()?
        .get(&format!("{port}/tcp"))?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse().ok())
}

fn status_code(error: &bollard::errors::Error) -> Option<u16> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_gone(error: &bollard::errors::Error) -> bool {
    status_code(error) == Some(404)
}

fn is_not_modified(error: &bollard::errors::Error) -> bool {
    status_code(error) == Some(304)
}

fn docker_error(operation: String, error: bollard::errors::Error) -> DeployError {
    let reason = match &error {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => format!("{status_code}: {message}"),
        other => other.to_string(),
    };
    DeployError::Docker { operation, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeploySpec {
        DeploySpec::from_toml(
            r#"
            image = "shop:1.4.0"
            replicas = 2
            [resources]
            cpu = "500m"
            memory = "64Mi"
            [environment]
            MODE = "test"
            [health_check]
            path = "/health"
            port = 8080
            "#,
        )
        .unwrap()
    }

    #[test]
    fn calls_carry_the_spec() {
        let calls = render_docker("shop", &spec(), &DockerOptions::new()).unwrap();
        let paths: Vec<_> = calls.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/containers/create?name=shop-0",
                "/containers/shop-0/start",
                "/containers/create?name=shop-1",
                "/containers/shop-1/start"
            ]
        );
        let body = calls[0].body.as_ref().unwrap();
        assert_eq!(body["Image"], "shop:1.4.0");
        assert_eq!(body["Env"][0], "MODE=test");
        assert_eq!(body["Labels"][SERVICE_LABEL], "shop");
        assert_eq!(body["Labels"][VERSION_LABEL], "1.4.0");
        assert_eq!(body["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
        let host = &body["HostConfig"];
        assert_eq!(host["PortBindings"]["8080/tcp"][0]["HostIp"], "127.0.0.1");
        assert_eq!(host["RestartPolicy"]["Name"], "on-failure");
        assert_eq!(host["RestartPolicy"]["MaximumRetryCount"], 3);
        assert_eq!(host["Memory"], 64 * 1024 * 1024);
        assert_eq!(host["NanoCpus"], 500_000_000);
        assert_eq!(
            body["Healthcheck"]["Test"],
            serde_json::json!([
                "CMD",
                "wget",
                "-q",
                "-O",
                "/dev/null",
                "http://127.0.0.1:8080/health"
            ])
        );
        assert_eq!(body["Healthcheck"]["Interval"], 5_000_000_000_i64);
    }

    #[test]
    fn bad_options_are_named() {
        let options = DockerOptions::new()
            .version("1.0 beta")
            .host_ip("localhost")
            .max_restarts(-1);
        let err = render_docker("shop", &spec(), &options).unwrap_err();
        assert_eq!(err.fields(), ["version", "host_ip", "max_restarts"]);
        let mut no_image = spec();
        no_image.image = None;
        let err = render_docker("shop", &no_image, &DockerOptions::new()).unwrap_err();
        assert_eq!(err.fields(), ["image"]);
    }
}
