//! The local platform — the embedded default: Trellis starts each replica as a child process
//! on this machine, registers it in the service registry once it is ready, restarts it when
//! it dies, and stops it on undeploy.
//!
//! Each replica:
//!
//! - gets one port, passed in `PORT` (with `TRELLIS_SERVICE`, `TRELLIS_VERSION`,
//!   `TRELLIS_INSTANCE_ID` and `TRELLIS_NAMESPACE`, after the spec's `environment`): the
//!   spec's port (`port`, else `health_check.port`) plus the replica's index when that port is
//!   free on 127.0.0.1, otherwise a free port the system picks. Its health check is served on
//!   that port;
//! - runs in a process group of its own, so a stop reaches what it started;
//! - is registered (host 127.0.0.1, its port, the version, the health check path, metadata
//!   `platform`, `namespace`, `replica`, `pid`, `cpu`, `memory` and, during blue-green,
//!   `weight`) only once its health endpoint answers 2xx — or, without a health check, once
//!   its port accepts connections — so no request reaches a replica that is still starting;
//! - when it exits, is deregistered at once and started again after a backoff that doubles
//!   from `backoff_initial` to `backoff_max`, and goes back to `backoff_initial` once a
//!   replica has stayed up for `backoff_reset_after`;
//! - on stop, is deregistered first, then sent SIGTERM, then SIGKILL after `stop_grace`.
//!
//! Why the readiness gate and not the registry's first check: the registry decides a new
//! instance's status on its first check, and a replica checked before it listens would be
//! unhealthy for `healthy_threshold` more checks — traffic would wait for nothing.
//!
//! Resources (`cpu`, `memory`) are recorded as metadata, not enforced: limiting a process
//! needs cgroups, which the local platform does not manage.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_registry::{Instance, InstanceStatus, ServiceRegistry};

use crate::bluegreen::Started;
use crate::error::DeployError;
use crate::spec::{DeploySpec, Platform};

/// Knobs of the local platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOptions {
    /// How often the registry checks each replica's health endpoint. Defaults to 2 s.
    pub health_check_interval: Duration,
    /// How long a replica may take to become ready before it counts as failed. Defaults to
    /// 30 s.
    pub startup_timeout: Duration,
    /// Time between SIGTERM and SIGKILL on stop. Defaults to 10 s.
    pub stop_grace: Duration,
    /// Time between deregistering replicas and stopping them, for gateways and clients to
    /// notice (their registry refresh) and for requests in flight to finish. Defaults to
    /// 2 s.
    pub drain: Duration,
    /// First delay before restarting a replica that exited. Defaults to 200 ms.
    pub backoff_initial: Duration,
    /// Longest delay between restarts. Defaults to 30 s.
    pub backoff_max: Duration,
    /// A replica that stayed up this long restarts after `backoff_initial` again. Defaults
    /// to 30 s.
    pub backoff_reset_after: Duration,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            health_check_interval: Duration::from_secs(2),
            startup_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            drain: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            backoff_reset_after: Duration::from_secs(30),
        }
    }
}

impl LocalOptions {
    /// Checks the options; the error names the option.
    pub fn validate(self) -> Result<Self, DeployError> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, reason: &str| {
            errors.push(crate::error::FieldError {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if self.health_check_interval < Duration::from_millis(10) {
            fail("health_check_interval", "must be at least 10ms");
        }
        if self.startup_timeout.is_zero() {
            fail("startup_timeout", "must be greater than zero");
        }
        if self.backoff_initial.is_zero() {
            fail("backoff_initial", "must be greater than zero");
        }
        if self.backoff_max < self.backoff_initial {
            fail("backoff_max", "must be at least backoff_initial");
        }
        if errors.is_empty() {
            Ok(self)
        } else {
            Err(DeployError::Invalid {
                name: "local options".into(),
                errors,
            })
        }
    }
}

/// The next restart delay: doubled, at most `max`.
pub(crate) fn next_backoff(delay: Duration, max: Duration) -> Duration {
    delay.saturating_mul(2).min(max)
}

/// The delay before restarting a replica that ran for `uptime`, when the delay due was
/// `due`: back to `backoff_initial` once it stayed up for `backoff_reset_after`.
pub(crate) fn restart_delay(due: Duration, uptime: Duration, options: &LocalOptions) -> Duration {
    if uptime >= options.backoff_reset_after {
        options.backoff_initial
    } else {
        due
    }
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaPhase {
    /// Started, not ready yet.
    Starting,
    /// Ready and registered (unless withdrawn for a switch).
    Running,
    /// Exited; waiting to be started again.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped for good.
    Stopped,
}

/// One replica as the supervisor sees it — `trellis deploy status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    /// Service name.
    pub service: String,
    /// Version of the deployment it belongs to.
    pub version: String,
    /// Index within the deployment, from 0.
    pub index: u32,
    /// Registry instance id: `SERVICE-VERSION-INDEX`.
    pub instance_id: String,
    /// Port it listens on (127.0.0.1).
    pub port: u16,
    /// Process id while it runs.
    pub pid: Option<u32>,
    /// Where it is in its life.
    pub phase: ReplicaPhase,
    /// Times it was started again after exiting.
    pub restarts: u32,
    /// How the last run ended (`exit status: 1`, `signal: 9 (SIGKILL)`, `not ready within 30s`).
    pub last_exit: Option<String>,
    /// Whether it is in the registry now.
    pub registered: bool,
    /// Its health as the registry knows it, when registered.
    pub health: Option<InstanceStatus>,
    /// Its `weight` metadata, when a traffic split set one.
    pub weight: Option<u32>,
    /// When its current process started.
    #[serde(skip)]
    pub started_at: Option<SystemTime>,
}

#[derive(Debug, Clone)]
struct ReplicaState {
    phase: ReplicaPhase,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<String>,
    registered: bool,
    started_at: Option<SystemTime>,
    /// Set when the process failed before ever being ready: deploy gives up on it.
    failed_before_ready: bool,
    ever_ready: bool,
}

/// What the registry should say about a replica; changed under its lock so that the
/// supervisor's (re)registrations and traffic changes never interleave.
#[derive(Debug)]
struct Listing {
    /// `None`: no weight metadata (the gateway's default, 1).
    weight: Option<u32>,
    /// False once withdrawn: it is not registered again, even after a restart.
    listed: bool,
    /// Registered now.
    registered: bool,
    pid: Option<u32>,
}

/// Everything supervision needs besides the replica.
#[derive(Debug, Clone)]
struct Context {
    registry: ServiceRegistry,
    options: LocalOptions,
    http: reqwest::Client,
}

#[derive(Debug)]
struct Replica {
    service: String,
    version: String,
    index: u32,
    id: String,
    port: u16,
    program: String,
    args: Vec<String>,
    environment: Vec<(String, String)>,
    health_path: Option<String>,
    metadata: BTreeMap<String, String>,
    state: watch::Sender<ReplicaState>,
    listing: tokio::sync::Mutex<Listing>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// One version of one service: its replicas.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) service: String,
    pub(crate) version: String,
    pub(crate) spec: DeploySpec,
    replicas: Vec<Arc<Replica>>,
}

/// The local platform: every service and version it runs.
#[derive(Debug)]
pub(crate) struct LocalPlatform {
    context: Context,
    namespace: String,
    groups: Mutex<Vec<Arc<Group>>>,
    ports: Mutex<BTreeSet<u16>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalPlatform {
    pub(crate) fn new(
        registry: ServiceRegistry,
        namespace: String,
        options: LocalOptions,
    ) -> Result<Self, DeployError> {
        let options = options.validate()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| DeployError::PlatformUnavailable {
                platform: "local".into(),
                reason: format!("HTTP client for readiness checks: {e}"),
            })?;
        Ok(LocalPlatform {
            context: Context {
                registry,
                options,
                http,
            },
            namespace,
            groups: Mutex::new(Vec::new()),
            ports: Mutex::new(BTreeSet::new()),
        })
    }

    /// Starts `replicas` processes of `version` of `name` and returns once every one is
    /// ready and registered, each with `weight` metadata when given. On any failure, what
    /// was started is stopped again and nothing stays registered.
    pub(crate) async fn deploy(
        &self,
        name: &str,
        version: &str,
        spec: &DeploySpec,
        weight: Option<u32>,
    ) -> Result<Vec<ReplicaStatus>, DeployError> {
        spec.validate(name, Platform::Local)?;
        check_version(name, version)?;
        let command = spec.command.clone().unwrap_or_default();
        let Some((program, args)) = command.split_first() else {
            // validate() rejects this; kept panic-free.
            return Err(DeployError::Invalid {
                name: name.to_owned(),
                errors: vec![crate::error::FieldError {
                    field: "command".into(),
                    reason: "missing".into(),
                }],
            });
        };
        let group = {
            let mut groups = lock(&self.groups);
            if groups
                .iter()
                .any(|g| g.service == name && g.version == version)
            {
                return Err(DeployError::AlreadyDeployed {
                    name: name.to_owned(),
                    version: version.to_owned(),
                });
            }
            let base = spec.service_port().and_then(|p| u16::try_from(p).ok());
            let count = u32::try_from(spec.replicas).unwrap_or(0);
            let mut ports = lock(&self.ports);
            let mut replicas = Vec::new();
            for index in 0..count {
                let port = match allocate_port(base, index, &ports) {
                    Ok(port) => port,
                    Err(reason) => {
                        for r in &replicas {
                            let r: &Arc<Replica> = r;
                            ports.remove(&r.port);
                        }
                        return Err(DeployError::Spawn {
                            instance: instance_id(name, version, index),
                            program: program.clone(),
                            reason,
                        });
                    }
                };
                ports.insert(port);
                replicas.push(Arc::new(
                    self.replica(name, version, index, port, program, args, spec, weight),
                ));
            }
            let group = Arc::new(Group {
                service: name.to_owned(),
                version: version.to_owned(),
                spec: spec.clone(),
                replicas,
            });
            groups.push(group.clone());
            group
        };
        tracing::info!(service = %name, %version, replicas = group.replicas.len(), platform = "local", "deploying");
        for replica in &group.replicas {
            let task = tokio::spawn(supervise(replica.clone(), self.context.clone()));
            *lock(&replica.task) = Some(task);
        }
        match self.wait_ready(&group).await {
            Ok(()) => Ok(self.group_status(&group)),
            Err(detail) => {
                self.remove_group(&group);
                self.stop_group(&group, false).await;
                Err(match detail {
                    NotReady::Spawn { instance, reason } => DeployError::Spawn {
                        instance,
                        program: program.clone(),
                        reason,
                    },
                    NotReady::Other(detail) => DeployError::NotReady {
                        name: name.to_owned(),
                        version: version.to_owned(),
                        detail,
                    },
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn replica(
        &self,
        name: &str,
        version: &str,
        index: u32,
        port: u16,
        program: &str,
        args: &[String],
        spec: &DeploySpec,
        weight: Option<u32>,
    ) -> Replica {
        let id = instance_id(name, version, index);
        let mut environment: Vec<(String, String)> = spec
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, value) in [
            ("PORT", port.to_string()),
            ("TRELLIS_SERVICE", name.to_owned()),
            ("TRELLIS_VERSION", version.to_owned()),
            ("TRELLIS_INSTANCE_ID", id.clone()),
            ("TRELLIS_NAMESPACE", self.namespace.clone()),
        ] {
            environment.push((key.to_owned(), value));
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("platform".to_owned(), "local".to_owned());
        metadata.insert("namespace".to_owned(), self.namespace.clone());
        metadata.insert("replica".to_owned(), index.to_string());
        if let Some(cpu) = &spec.resources.cpu {
            metadata.insert("cpu".to_owned(), cpu.clone());
        }
        if let Some(memory) = &spec.resources.memory {
            metadata.insert("memory".to_owned(), memory.clone());
        }
        let (state, _) = watch::channel(ReplicaState {
            phase: ReplicaPhase::Starting,
            pid: None,
            restarts: 0,
            last_exit: None,
            registered: false,
            started_at: None,
            failed_before_ready: false,
            ever_ready: false,
        });
        let (stop, _) = watch::channel(false);
        Replica {
            service: name.to_owned(),
            version: version.to_owned(),
            index,
            id,
            port,
            program: program.to_owned(),
            args: args.to_vec(),
            environment,
            health_path: spec.health_check.as_ref().map(|h| h.readiness().to_owned()),
            metadata,
            state,
            listing: tokio::sync::Mutex::new(Listing {
                weight,
                listed: true,
                registered: false,
                pid: None,
            }),
            stop,
            task: Mutex::new(None),
        }
    }

    async fn wait_ready(&self, group: &Group) -> Result<(), NotReady> {
        // Every replica reaches a verdict by itself within the startup timeout (the
        // supervisor kills one that is not ready by then); the margin covers registration.
        let deadline = tokio::time::Instant::now()
            + self.context.options.startup_timeout
            + Duration::from_secs(5);
        for replica in &group.replicas {
            let mut rx = replica.state.subscribe();
            let verdict = tokio::time::timeout_at(
                deadline,
                rx.wait_for(|s| (s.ever_ready && s.registered) || s.failed_before_ready),
            )
            .await;
            match verdict {
                Ok(Ok(state)) if !state.failed_before_ready => {}
                Ok(Ok(state)) => {
                    let reason = state
                        .last_exit
                        .clone()
                        .unwrap_or_else(|| "exited before it was ready".into());
                    return Err(if reason.starts_with("spawn failed: ") {
                        NotReady::Spawn {
                            instance: replica.id.clone(),
                            reason: reason.trim_start_matches("spawn failed: ").to_owned(),
                        }
                    } else {
                        NotReady::Other(format!("{}: {reason}", replica.id))
                    });
                }
                Ok(Err(_)) => {
                    return Err(NotReady::Other(format!(
                        "{}: its supervisor ended",
                        replica.id
                    )));
                }
                Err(_) => {
                    return Err(NotReady::Other(format!(
                        "{}: not ready and registered within {:?}",
                        replica.id, self.context.options.startup_timeout
                    )));
                }
            }
        }
        Ok(())
    }

    fn remove_group(&self, group: &Arc<Group>) {
        lock(&self.groups).retain(|g| !Arc::ptr_eq(g, group));
        let mut ports = lock(&self.ports);
        for replica in &group.replicas {
            ports.remove(&replica.port);
        }
    }

    /// Stops a version: deregisters every replica first, waits `drain` when any was
    /// registered and `drain` is asked for, then stops the processes (SIGTERM, SIGKILL after
    /// the grace period) and waits for them to exit.
    pub(crate) async fn stop_group(&self, group: &Group, drain: bool) {
        let withdrawn = self.withdraw(group).await;
        if drain && withdrawn > 0 {
            tokio::time::sleep(self.context.options.drain).await;
        }
        for replica in &group.replicas {
            replica.stop.send_replace(true);
        }
        for replica in &group.replicas {
            let task = lock(&replica.task).take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        tracing::info!(service = %group.service, version = %group.version, "stopped");
    }

    /// Deregisters every replica of the group and keeps them out of the registry, even if
    /// they restart. Returns how many were registered.
    pub(crate) async fn withdraw(&self, group: &Group) -> usize {
        let mut count = 0;
        for replica in &group.replicas {
            let mut listing = replica.listing.lock().await;
            listing.listed = false;
            if listing.registered {
                count += 1;
            }
            deregister(&self.context, replica, &mut listing).await;
        }
        count
    }

    /// Sets (or, with `None`, removes) the `weight` metadata of every replica of the group
    /// and re-registers those that are registered, so gateways see it at their next refresh.
    pub(crate) async fn set_weight(
        &self,
        group: &Group,
        weight: Option<u32>,
    ) -> Result<(), DeployError> {
        for replica in &group.replicas {
            let mut listing = replica.listing.lock().await;
            listing.weight = weight;
            if listing.registered {
                register(&self.context, replica, &mut listing).await?;
            }
        }
        Ok(())
    }

    /// Stops and forgets every version of `name`.
    pub(crate) async fn undeploy(&self, name: &str) -> Result<Vec<ReplicaStatus>, DeployError> {
        let groups = self.groups(name);
        if groups.is_empty() {
            return Err(DeployError::NotDeployed {
                name: name.to_owned(),
                version: None,
            });
        }
        tracing::info!(service = %name, versions = groups.len(), "undeploying");
        let mut statuses = Vec::new();
        for group in &groups {
            self.stop_group(group, true).await;
            self.remove_group(group);
            statuses.extend(self.group_status(group));
        }
        Ok(statuses)
    }

    /// Stops and forgets one version of `name`; drains first.
    pub(crate) async fn undeploy_version(
        &self,
        group: &Arc<Group>,
        drain: bool,
    ) -> Vec<ReplicaStatus> {
        self.stop_group(group, drain).await;
        self.remove_group(group);
        self.group_status(group)
    }

    /// The versions of `name`, oldest first.
    pub(crate) fn groups(&self, name: &str) -> Vec<Arc<Group>> {
        lock(&self.groups)
            .iter()
            .filter(|g| g.service == name)
            .cloned()
            .collect()
    }

    pub(crate) fn group(&self, name: &str, version: &str) -> Option<Arc<Group>> {
        lock(&self.groups)
            .iter()
            .find(|g| g.service == name && g.version == version)
            .cloned()
    }

    /// Every replica of every version of `name`.
    pub(crate) fn status(&self, name: &str) -> Result<Vec<ReplicaStatus>, DeployError> {
        let groups = self.groups(name);
        if groups.is_empty() {
            return Err(DeployError::NotDeployed {
                name: name.to_owned(),
                version: None,
            });
        }
        Ok(groups.iter().flat_map(|g| self.group_status(g)).collect())
    }

    pub(crate) fn group_status(&self, group: &Group) -> Vec<ReplicaStatus> {
        let found = self.context.registry.discover(&group.service);
        group
            .replicas
            .iter()
            .map(|r| {
                let state = r.state.borrow().clone();
                let record = found.iter().find(|rec| rec.instance.id == r.id);
                ReplicaStatus {
                    service: r.service.clone(),
                    version: r.version.clone(),
                    index: r.index,
                    instance_id: r.id.clone(),
                    port: r.port,
                    pid: state.pid,
                    phase: state.phase,
                    restarts: state.restarts,
                    last_exit: state.last_exit,
                    registered: state.registered,
                    health: record.map(|rec| rec.status),
                    weight: record.and_then(|rec| {
                        rec.instance
                            .metadata
                            .get("weight")
                            .and_then(|w| w.parse().ok())
                    }),
                    started_at: state.started_at,
                }
            })
            .collect()
    }

    /// Stops everything this platform runs (used when the deployer is shut down).
    pub(crate) async fn shutdown(&self) {
        let groups: Vec<Arc<Group>> = lock(&self.groups).clone();
        for group in groups {
            self.stop_group(&group, false).await;
            self.remove_group(&group);
        }
    }
}

impl Group {
    pub(crate) fn replica_count(&self) -> usize {
        self.replicas.len()
    }
}

/// One service on the local platform, for blue-green: versions are process groups, their
/// status always current.
pub(crate) struct LocalService<'a> {
    local: &'a LocalPlatform,
    name: &'a str,
}

impl<'a> LocalService<'a> {
    pub(crate) fn new(local: &'a LocalPlatform, name: &'a str) -> Self {
        LocalService { local, name }
    }
}

impl crate::bluegreen::GreenPlatform for LocalService<'_> {
    type Version = Arc<Group>;

    fn service(&self) -> &str {
        self.name
    }

    fn platform(&self) -> Platform {
        Platform::Local
    }

    async fn version(&self, version: &str) -> Result<Option<Self::Version>, DeployError> {
        Ok(self.local.group(self.name, version))
    }

    async fn running_versions(&self) -> Result<Vec<String>, DeployError> {
        let groups = self.local.groups(self.name);
        Ok(groups.iter().map(|g| g.version.clone()).collect())
    }

    fn spec_of<'v>(&self, version: &'v Self::Version) -> Option<&'v DeploySpec> {
        Some(&version.spec)
    }

    fn replica_count(&self, version: &Self::Version) -> usize {
        version.replica_count()
    }

    async fn start(&self, version: &str, spec: &DeploySpec, weight: u32) -> Started<Arc<Group>> {
        let (local, name) = (self.local, self.name);
        if let Err(e) = local.deploy(name, version, spec, Some(weight)).await {
            return Ok(Err(e));
        }
        match local.group(name, version) {
            Some(green) => Ok(Ok(green)),
            None => Err(DeployError::NotDeployed {
                name: name.to_owned(),
                version: Some(version.to_owned()),
            }),
        }
    }

    fn started(&self, green: &Self::Version, after: Duration) -> String {
        let count = green.replica_count();
        format!("{count} green replica(s) ready and registered after {after:?}")
    }

    async fn set_weight(&self, group: &Arc<Group>, weight: Option<u32>) -> Result<(), DeployError> {
        self.local.set_weight(group, weight).await
    }

    async fn refresh(&self, _version: &Self::Version) -> Result<(), DeployError> {
        Ok(())
    }

    fn replicas_of(&self, version: &Self::Version) -> Vec<ReplicaStatus> {
        self.local.group_status(version)
    }

    async fn retire(&self, version: &Self::Version) -> Result<(), DeployError> {
        self.local.undeploy_version(version, true).await;
        Ok(())
    }

    fn retired(&self) -> &'static str {
        "stopped"
    }

    fn retired_count(&self, _version: &Self::Version) -> String {
        String::new()
    }

    async fn report(&self, only: Option<&Self::Version>) -> Vec<ReplicaStatus> {
        match only {
            Some(version) => self.local.group_status(version),
            None => self.local.status(self.name).unwrap_or_default(),
        }
    }
}

enum NotReady {
    Spawn { instance: String, reason: String },
    Other(String),
}

/// One process the local platform would start — what `trellis deploy --platform local
/// --dry-run` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalProcess {
    /// Registry instance id: `SERVICE-VERSION-INDEX`.
    pub instance_id: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The port asked for: the spec's port plus the replica index. When it is taken at
    /// start, the system picks a free one. None when the spec has no port (a free one is
    /// picked).
    pub port: Option<u16>,
    /// The environment it gets: the spec's, then `PORT` (when known here),
    /// `TRELLIS_SERVICE`, `TRELLIS_VERSION`, `TRELLIS_INSTANCE_ID`, `TRELLIS_NAMESPACE`.
    pub environment: BTreeMap<String, String>,
}

/// The processes [`ServiceDeployer`](crate::ServiceDeployer) would start on the local
/// platform for `version` of `name` in `namespace`, validating the spec and version first.
///
/// ```
/// use trellis_deploy::{DeploySpec, render_local};
///
/// let spec = DeploySpec::from_toml("command = [\"./shop\", \"--quiet\"]\nreplicas = 2\nport = 8080")?;
/// let processes = render_local("shop", "1.0.0", "default", &spec)?;
/// assert_eq!(processes[1].instance_id, "shop-1.0.0-1");
/// assert_eq!(processes[1].port, Some(8081));
/// assert_eq!(processes[1].environment["PORT"], "8081");
/// # Ok::<(), trellis_deploy::DeployError>(())
/// ```
pub fn render_local(
    name: &str,
    version: &str,
    namespace: &str,
    spec: &DeploySpec,
) -> Result<Vec<LocalProcess>, DeployError> {
    spec.validate(name, Platform::Local)?;
    check_version(name, version)?;
    let base = spec.service_port().and_then(|p| u16::try_from(p).ok());
    let count = u32::try_from(spec.replicas).unwrap_or(0);
    Ok((0..count)
        .map(|index| {
            let id = instance_id(name, version, index);
            let port = base.and_then(|b| b.checked_add(u16::try_from(index).ok()?));
            let mut environment = spec.environment.clone();
            if let Some(port) = port {
                environment.insert("PORT".to_owned(), port.to_string());
            }
            environment.insert("TRELLIS_SERVICE".to_owned(), name.to_owned());
            environment.insert("TRELLIS_VERSION".to_owned(), version.to_owned());
            environment.insert("TRELLIS_INSTANCE_ID".to_owned(), id.clone());
            environment.insert("TRELLIS_NAMESPACE".to_owned(), namespace.to_owned());
            LocalProcess {
                instance_id: id,
                command: spec.command.clone().unwrap_or_default(),
                port,
                environment,
            }
        })
        .collect())
}

/// `SERVICE-VERSION-INDEX`, a valid registry instance id.
fn instance_id(name: &str, version: &str, index: u32) -> String {
    format!("{name}-{version}-{index}")
}

/// Versions become part of instance ids and metadata: Trellis' name rule.
pub(crate) fn check_version(name: &str, version: &str) -> Result<(), DeployError> {
    trellis_core::validate_name(trellis_core::NameKind::Instance, version).map_err(|e| {
        DeployError::Invalid {
            name: name.to_owned(),
            errors: vec![crate::error::FieldError {
                field: "version".into(),
                reason: e.to_string(),
            }],
        }
    })
}

/// The spec's port plus the index when free, else a port the system picks; never one this
/// platform already gave out.
fn allocate_port(base: Option<u16>, index: u32, taken: &BTreeSet<u16>) -> Result<u16, String> {
    if let Some(port) = base
        .and_then(|b| u32::from(b).checked_add(index))
        .and_then(|p| u16::try_from(p).ok())
        && !taken.contains(&port)
        && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    {
        return Ok(port);
    }
    for _ in 0..32 {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?
            .port();
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
    Err("no free port on 127.0.0.1 after 32 tries".into())
}

impl Replica {
    fn update(&self, change: impl FnOnce(&mut ReplicaState)) {
        self.state.send_modify(change);
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        command.spawn()
    }

    fn instance(&self, listing: &Listing, interval: Duration) -> Instance {
        let mut instance = Instance::new(&self.id, "127.0.0.1", self.port).version(&self.version);
        if let Some(path) = &self.health_path {
            instance = instance.health_check(path.clone(), interval);
        }
        for (key, value) in &self.metadata {
            instance = instance.metadata(key, value);
        }
        if let Some(pid) = listing.pid {
            instance = instance.metadata("pid", pid.to_string());
        }
        if let Some(weight) = listing.weight {
            instance = instance.metadata("weight", weight.to_string());
        }
        instance
    }
}

async fn register(
    context: &Context,
    replica: &Replica,
    listing: &mut Listing,
) -> Result<(), DeployError> {
    if !listing.listed {
        return Ok(());
    }
    let instance = replica.instance(listing, context.options.health_check_interval);
    context
        .registry
        .register(&replica.service, instance)
        .await
        .map_err(|e| DeployError::Registry {
            instance: replica.id.clone(),
            reason: e.to_string(),
        })?;
    listing.registered = true;
    replica.update(|s| s.registered = true);
    Ok(())
}

async fn deregister(context: &Context, replica: &Replica, listing: &mut Listing) {
    if !listing.registered {
        return;
    }
    match context
        .registry
        .deregister(&replica.service, &replica.id)
        .await
    {
        Ok(_) => {
            listing.registered = false;
            replica.update(|s| s.registered = false);
        }
        Err(e) => {
            // The lease loop is gone either way: the row expires within the ttl.
            tracing::warn!(instance = %replica.id, error = %e, "deregistration failed; the lease will run out");
            listing.registered = false;
            replica.update(|s| s.registered = false);
        }
    }
}

async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("could not wait for the process: {e}"),
    }
}

fn signal(pid: Option<u32>, signal: rustix::process::Signal) {
    let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    // The replica leads its own process group: signal the group, then the process in case
    // it left the group.
    let _ = rustix::process::kill_process_group(pid, signal);
    let _ = rustix::process::kill_process(pid, signal);
}

/// SIGTERM, then SIGKILL after `grace`; waits for the exit.
async fn terminate(child: &mut Child, pid: Option<u32>, grace: Duration) -> String {
    signal(pid, rustix::process::Signal::TERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => describe_exit(status),
        Err(_) => {
            signal(pid, rustix::process::Signal::KILL);
            let _ = child.start_kill();
            format!(
                "{} (killed after a {grace:?} grace period)",
                describe_exit(child.wait().await)
            )
        }
    }
}

/// Polls the replica until it is ready: its health path answers 2xx, or (without one) its
/// port accepts connections.
async fn wait_ready(
    http: &reqwest::Client,
    port: u16,
    path: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: String;
    loop {
        match path {
            Some(path) => match http
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => last = format!("{path} answered {}", response.status()),
                Err(e) => last = format!("{path}: {e}"),
            },
            None => match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("port {port}: {e}"),
            },
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("not ready within {timeout:?} ({last})"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs one replica until asked to stop: start, wait until ready, register, wait for the
/// exit, deregister, back off, start again.
async fn supervise(replica: Arc<Replica>, context: Context) {
    let options = &context.options;
    let mut stop = replica.stop.subscribe();
    let mut delay = options.backoff_initial;
    loop {
        if *stop.borrow() {
            break;
        }
        replica.update(|s| {
            s.phase = ReplicaPhase::Starting;
            s.pid = None;
        });
        let started = Instant::now();
        let outcome = match replica.spawn() {
            Err(e) => format!("spawn failed: {e}"),
            Ok(mut child) => {
                let pid = child.id();
                replica.listing.lock().await.pid = pid;
                replica.update(|s| {
                    s.pid = pid;
                    s.started_at = Some(SystemTime::now());
                });
                tracing::info!(instance = %replica.id, pid, port = replica.port, "replica started");
                let ready = tokio::select! {
                    () = stop_requested(&mut stop) => {
                        replica.update(|s| s.phase = ReplicaPhase::Stopping);
                        let how = terminate(&mut child, pid, options.stop_grace).await;
                        replica.update(|s| s.last_exit = Some(how));
                        break;
                    }
                    status = child.wait() => Err(describe_exit(status)),
                    ready = wait_ready(&context.http, replica.port, replica.health_path.as_deref(), options.startup_timeout) => ready,
                };
                match ready {
                    Err(reason) => {
                        // Not ready in time, or exited: make sure it is gone.
                        let _ = child.start_kill();
                        signal(pid, rustix::process::Signal::KILL);
                        let _ = child.wait().await;
                        reason
                    }
                    Ok(()) => {
                        let registered = {
                            let mut listing = replica.listing.lock().await;
                            register(&context, &replica, &mut listing).await
                        };
                        if let Err(e) = registered {
                            tracing::warn!(instance = %replica.id, error = %e, "replica ready but not registered");
                        }
                        replica.update(|s| {
                            s.phase = ReplicaPhase::Running;
                            s.ever_ready = true;
                        });
                        tracing::info!(instance = %replica.id, pid, "replica ready");
                        tokio::select! {
                            () = stop_requested(&mut stop) => {
                                replica.update(|s| s.phase = ReplicaPhase::Stopping);
                                {
                                    let mut listing = replica.listing.lock().await;
                                    deregister(&context, &replica, &mut listing).await;
                                }
                                let how = terminate(&mut child, pid, options.stop_grace).await;
                                replica.update(|s| s.last_exit = Some(how));
                                break;
                            }
                            status = child.wait() => describe_exit(status),
                        }
                    }
                }
            }
        };
        // The process is gone: out of the registry at once, then back off.
        {
            let mut listing = replica.listing.lock().await;
            deregister(&context, &replica, &mut listing).await;
            listing.pid = None;
        }
        delay = restart_delay(delay, started.elapsed(), options);
        let ever_ready = replica.state.borrow().ever_ready;
        replica.update(|s| {
            s.phase = ReplicaPhase::Backoff;
            s.pid = None;
            s.last_exit = Some(outcome.clone());
            if !ever_ready {
                s.failed_before_ready = true;
            }
        });
        tracing::warn!(instance = %replica.id, exit = %outcome, retry_in = ?delay, "replica exited; restarting after backoff");
        tokio::select! {
            () = stop_requested(&mut stop) => break,
            () = tokio::time::sleep(delay) => {}
        }
        replica.update(|s| s.restarts += 1);
        delay = next_backoff(delay, options.backoff_max);
    }
    replica.update(|s| {
        s.phase = ReplicaPhase::Stopped;
        s.pid = None;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let max = Duration::from_secs(1);
        let mut delay = Duration::from_millis(200);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(delay.as_millis());
            delay = next_backoff(delay, max);
        }
        assert_eq!(seen, [200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn backoff_resets_after_a_long_enough_run() {
        let options = LocalOptions::default();
        let due = Duration::from_secs(8);
        assert_eq!(restart_delay(due, Duration::from_secs(1), &options), due);
        assert_eq!(
            restart_delay(due, options.backoff_reset_after, &options),
            options.backoff_initial
        );
    }

    #[test]
    fn ports_prefer_base_plus_index_and_skip_taken_ones() {
        let free = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let base = free.local_addr().unwrap().port();
        drop(free);
        let taken = BTreeSet::new();
        assert_eq!(allocate_port(Some(base), 0, &taken).unwrap(), base);
        let taken: BTreeSet<u16> = [base].into();
        let other = allocate_port(Some(base), 0, &taken).unwrap();
        assert_ne!(other, base);
        // A port in use falls back to a free one.
        let busy = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        assert_ne!(
            allocate_port(Some(busy_port), 0, &BTreeSet::new()).unwrap(),
            busy_port
        );
        // Past 65535 falls back too.
        assert!(allocate_port(Some(65535), 3, &BTreeSet::new()).is_ok());
    }

    #[test]
    fn options_are_validated_naming_the_option() {
        assert!(LocalOptions::default().validate().is_ok());
        let err = LocalOptions {
            backoff_max: Duration::from_millis(1),
            ..LocalOptions::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.fields(), ["backoff_max"]);
    }

    #[test]
    fn versions_follow_the_name_rule() {
        assert!(check_version("users", "1.2.0").is_ok());
        let err = check_version("users", "1.2/0").unwrap_err();
        assert_eq!(err.fields(), ["version"]);
    }
}
