//! [`ServiceDeployer`] — the seed's `ServiceDeployer`: one entry point that deploys, reports
//! on, undeploys and blue-green-switches services on a [`Platform`].
//!
//! The local platform is built in. Kubernetes, Docker and ECS plug in as a
//! [`PlatformBackend`] (each in its own module, behind its cargo feature) given to
//! [`ServiceDeployerBuilder::backend`]; a deployer for such a platform without a backend
//! answers [`DeployError::PlatformUnavailable`] and changes nothing.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use trellis_registry::ServiceRegistry;
use trellis_store::Store;

use crate::bluegreen::metrics::{BoxFuture, MetricsSource};
use crate::bluegreen::{BlueGreenOptions, BlueGreenReport, Decision};
use crate::error::{DeployError, FieldError};
use crate::image::ImageReference;
use crate::local::{LocalOptions, LocalPlatform, ReplicaStatus};
use crate::records::{DeploymentRecord, DeploymentRecords, DeploymentState};
use crate::spec::{DeploySpec, Platform, check_dns_label};

/// What a deploy started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deployment {
    /// The service.
    pub service: String,
    /// The version deployed.
    pub version: String,
    /// Where.
    pub platform: Platform,
    /// The namespace.
    pub namespace: String,
    /// Its replicas, all ready and registered when returned by the local platform.
    pub replicas: Vec<ReplicaStatus>,
    /// From the call until every replica was ready.
    pub took: Duration,
}

/// A platform other than local: what the deployer calls to deploy, undeploy and report on
/// it. Implemented by the Kubernetes, Docker and ECS modules (each behind its feature) and
/// given to [`ServiceDeployerBuilder::backend`]. Backends fill in the [`ReplicaStatus`]
/// fields that apply to them (a pod or container has no local pid; `port` is the one it
/// serves on) and register instances in the registry they were built with, if any.
pub trait PlatformBackend: Send + Sync + fmt::Debug {
    /// The platform served.
    fn platform(&self) -> Platform;

    /// Deploys `version` of `name` in `namespace` from a spec already validated for this
    /// platform.
    fn deploy<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
        namespace: &'a str,
        spec: &'a DeploySpec,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>>;

    /// Removes every version of `name` from `namespace`.
    fn undeploy<'a>(
        &'a self,
        name: &'a str,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>>;

    /// The replicas of `name` in `namespace`.
    fn status<'a>(
        &'a self,
        name: &'a str,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>>;

    /// Runs a blue-green deployment of `name` in `namespace`, judging green from `metrics`
    /// (the deployer's [metrics source](ServiceDeployerBuilder::metrics), if any) and
    /// calling `sink` with each decision as it is made. The default fails with
    /// [`DeployError::PlatformUnavailable`]: only backends that override it support
    /// blue-green (the Kubernetes and Docker ones do).
    fn blue_green<'a>(
        &'a self,
        name: &'a str,
        namespace: &'a str,
        options: &'a BlueGreenOptions,
        metrics: Option<&'a dyn MetricsSource>,
        sink: &'a (dyn Fn(&Decision) + Send + Sync),
    ) -> BoxFuture<'a, Result<BlueGreenReport, DeployError>> {
        let _ = (name, namespace, options, metrics, sink);
        Box::pin(async move {
            Err(DeployError::PlatformUnavailable {
                platform: self.platform().to_string(),
                reason: "this backend does not run blue-green deployments".into(),
            })
        })
    }
}

enum Target {
    Local(LocalPlatform),
    Backend(Arc<dyn PlatformBackend>),
    Missing,
}

struct Inner {
    platform: Platform,
    namespace: String,
    registry: ServiceRegistry,
    target: Target,
    metrics: Option<Arc<dyn MetricsSource>>,
    records: Option<DeploymentRecords>,
    decisions: Mutex<HashMap<String, Vec<Decision>>>,
}

/// Deploys services on one platform and keeps the registry in step — the seed's
/// `ServiceDeployer`.
///
/// ```no_run
/// # async fn run(registry: trellis_registry::ServiceRegistry) -> Result<(), trellis_deploy::DeployError> {
/// use trellis_deploy::{BlueGreenOptions, DeploySpec, Platform, PrometheusScrape, ServiceDeployer};
///
/// let deployer = ServiceDeployer::builder(Platform::Local, registry)
///     .namespace("production")
///     .metrics(PrometheusScrape::new("http://127.0.0.1:9900/metrics")?)
///     .build()?;
/// let spec = DeploySpec::from_toml(r#"
///     command = ["./bin/user-service"]
///     replicas = 2
///     [health_check]
///     path = "/health"
///     port = 3000
/// "#)?;
/// deployer.deploy_version("user-service", "1.1.0", &spec).await?;
/// let report = deployer
///     .blue_green_deploy("user-service", BlueGreenOptions::new("1.1.0", "1.2.0").traffic_split(90, 10))
///     .await?;
/// println!("{:?}: {:#?}", report.outcome, report.decisions);
/// # Ok(()) }
/// ```
///
/// Cheap to clone; clones share the running deployments.
#[derive(Clone)]
pub struct ServiceDeployer {
    inner: Arc<Inner>,
}

impl fmt::Debug for ServiceDeployer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceDeployer")
            .field("platform", &self.inner.platform)
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

/// Builds a [`ServiceDeployer`].
#[must_use]
pub struct ServiceDeployerBuilder {
    platform: Platform,
    registry: ServiceRegistry,
    namespace: String,
    local: LocalOptions,
    backend: Option<Arc<dyn PlatformBackend>>,
    metrics: Option<Arc<dyn MetricsSource>>,
    store: Option<Store>,
}

impl fmt::Debug for ServiceDeployerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceDeployerBuilder")
            .field("platform", &self.platform)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl ServiceDeployerBuilder {
    /// The namespace (a DNS label): Kubernetes namespace, `namespace` metadata on local
    /// instances. Defaults to `default`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Options of the local platform. Defaults to [`LocalOptions::default`].
    pub fn local_options(mut self, options: LocalOptions) -> Self {
        self.local = options;
        self
    }

    /// The backend of a non-local platform.
    pub fn backend(mut self, backend: Arc<dyn PlatformBackend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Where blue-green analysis reads the gateway's metrics (usually a
    /// [`PrometheusScrape`](crate::PrometheusScrape)). Defaults to none: the analysis then
    /// judges health only.
    pub fn metrics(mut self, source: impl MetricsSource + 'static) -> Self {
        self.metrics = Some(Arc::new(source));
        self
    }

    /// Keeps a [deployment record](crate::records) per service in `store` (table
    /// `deployments`), rewritten at every state change, for the admin API's
    /// `GET /v1/deployments` ([`admin_router`](crate::admin_router)). Defaults to none:
    /// decisions are kept in memory only ([`ServiceDeployer::decisions`]).
    pub fn store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Checks the namespace and options and builds the deployer.
    pub fn build(self) -> Result<ServiceDeployer, DeployError> {
        if let Err(reason) = check_dns_label(&self.namespace) {
            return Err(DeployError::Invalid {
                name: "deployer".into(),
                errors: vec![FieldError {
                    field: "namespace".into(),
                    reason,
                }],
            });
        }
        let target = match (self.platform, self.backend) {
            (Platform::Local, _) => Target::Local(LocalPlatform::new(
                self.registry.clone(),
                self.namespace.clone(),
                self.local,
            )?),
            (platform, Some(backend)) if backend.platform() == platform => Target::Backend(backend),
            (platform, Some(backend)) => {
                return Err(DeployError::PlatformUnavailable {
                    platform: platform.to_string(),
                    reason: format!("the backend given serves {}", backend.platform()),
                });
            }
            (_, None) => Target::Missing,
        };
        Ok(ServiceDeployer {
            inner: Arc::new(Inner {
                platform: self.platform,
                namespace: self.namespace,
                registry: self.registry,
                target,
                metrics: self.metrics,
                records: self.store.map(DeploymentRecords::new),
                decisions: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl ServiceDeployer {
    /// A builder for `platform`, keeping `registry` in step with what runs.
    pub fn builder(platform: Platform, registry: ServiceRegistry) -> ServiceDeployerBuilder {
        ServiceDeployerBuilder {
            platform,
            registry,
            namespace: "default".into(),
            local: LocalOptions::default(),
            backend: None,
            metrics: None,
            store: None,
        }
    }

    /// The platform.
    pub fn platform(&self) -> Platform {
        self.inner.platform
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The registry kept in step.
    pub fn registry(&self) -> &ServiceRegistry {
        &self.inner.registry
    }

    /// Deploys `name` at the version named by the image's tag (or digest), else
    /// `unversioned`. Use [`deploy_version`](Self::deploy_version) to name it.
    pub async fn deploy(&self, name: &str, spec: &DeploySpec) -> Result<Deployment, DeployError> {
        let version = spec
            .image
            .as_deref()
            .and_then(|i| ImageReference::parse(i).ok())
            .and_then(|r| r.tag.or_else(|| r.digest.map(|d| d.replace(':', "-"))))
            .unwrap_or_else(|| "unversioned".into());
        self.deploy_version(name, &version, spec).await
    }

    /// Deploys `version` of `name`. The spec is validated first: when it is invalid the
    /// error names every bad key and nothing is started. On the local platform this returns
    /// once every replica is ready and registered; if one cannot be, everything started is
    /// stopped again.
    pub async fn deploy_version(
        &self,
        name: &str,
        version: &str,
        spec: &DeploySpec,
    ) -> Result<Deployment, DeployError> {
        spec.validate(name, self.inner.platform)?;
        crate::local::check_version(name, version)?;
        if matches!(self.inner.target, Target::Missing) {
            return Err(self.unavailable());
        }
        let started = Instant::now();
        let mut record =
            DeploymentRecord::deploy(name, &self.inner.namespace, self.inner.platform, version);
        self.save(&record).await;
        let deployed = match &self.inner.target {
            Target::Local(local) => local.deploy(name, version, spec, None).await,
            Target::Backend(backend) => {
                backend
                    .deploy(name, version, &self.inner.namespace, spec)
                    .await
            }
            Target::Missing => Err(self.unavailable()),
        };
        let replicas = match deployed {
            Ok(replicas) => replicas,
            Err(e) => {
                record.error = Some(e.to_string());
                record.set_state(DeploymentState::Failed);
                self.save(&record).await;
                return Err(e);
            }
        };
        record.set_state(DeploymentState::Deployed);
        self.save(&record).await;
        let took = started.elapsed();
        tracing::info!(service = %name, %version, platform = %self.inner.platform, ?took, "deployed");
        Ok(Deployment {
            service: name.to_owned(),
            version: version.to_owned(),
            platform: self.inner.platform,
            namespace: self.inner.namespace.clone(),
            replicas,
            took,
        })
    }

    /// Stops every version of `name`: each replica is deregistered first, drained, then
    /// stopped (SIGTERM, SIGKILL after the grace period). Returns the final replica states.
    pub async fn undeploy(&self, name: &str) -> Result<Vec<ReplicaStatus>, DeployError> {
        let stopped = match &self.inner.target {
            Target::Local(local) => local.undeploy(name).await?,
            Target::Backend(backend) => backend.undeploy(name, &self.inner.namespace).await?,
            Target::Missing => return Err(self.unavailable()),
        };
        if let Some(records) = &self.inner.records {
            match records.get(&self.inner.namespace, name).await {
                Ok(Some(mut record)) => {
                    record.traffic.clear();
                    record.set_state(DeploymentState::Undeployed);
                    self.save(&record).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "deployment record not updated")
                }
            }
        }
        Ok(stopped)
    }

    /// Every replica of `name`: phase, pid, port, restarts, last exit, registration and
    /// health.
    pub async fn status(&self, name: &str) -> Result<Vec<ReplicaStatus>, DeployError> {
        match &self.inner.target {
            Target::Local(local) => local.status(name),
            Target::Backend(backend) => backend.status(name, &self.inner.namespace).await,
            Target::Missing => Err(self.unavailable()),
        }
    }

    /// Moves `name` from `options.current_version` to `options.new_version` with a traffic
    /// split and an analysis — see [`bluegreen`](crate::bluegreen) for every step. Invalid
    /// options or a current version that is not running are errors and change nothing;
    /// otherwise the report says whether green was promoted, rolled back or held, with every
    /// decision. Runs on the local platform and on backends that implement
    /// [`PlatformBackend::blue_green`] — Kubernetes (feature `kubernetes`:
    /// `KubernetesBlueGreen`) and Docker (feature `docker`: `DockerBackend`, judged from
    /// this deployer's [metrics source](ServiceDeployerBuilder::metrics) like local), both
    /// needing `options.spec`; other platforms fail with
    /// [`DeployError::PlatformUnavailable`]. With a [store](ServiceDeployerBuilder::store),
    /// the service's [record](crate::records) follows every decision.
    pub async fn blue_green_deploy(
        &self,
        name: &str,
        options: BlueGreenOptions,
    ) -> Result<BlueGreenReport, DeployError> {
        if matches!(self.inner.target, Target::Missing) {
            return Err(self.unavailable());
        }
        lock(&self.inner.decisions).remove(name);
        // Decisions go to the record writer in order through a channel (the sink cannot
        // wait for the store); it holds at most the analysis' decisions, window / interval
        // plus four.
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<Decision>();
        let run = async {
            let sink = move |decision: &Decision| {
                lock(&self.inner.decisions)
                    .entry(name.to_owned())
                    .or_default()
                    .push(decision.clone());
                let _ = sender.send(decision.clone());
            };
            let metrics = self.inner.metrics.as_deref();
            match &self.inner.target {
                Target::Local(local) => {
                    let service = crate::local::LocalService::new(local, name);
                    crate::bluegreen::run_blue_green(&service, metrics, &options, &sink).await
                }
                Target::Backend(backend) => {
                    backend
                        .blue_green(name, &self.inner.namespace, &options, metrics, &sink)
                        .await
                }
                Target::Missing => Err(self.unavailable()),
            }
        };
        let split = (options.traffic_split.blue, options.traffic_split.green);
        let write = async {
            let mut record: Option<DeploymentRecord> = None;
            while let Some(decision) = received.recv().await {
                let record = record.get_or_insert_with(|| {
                    DeploymentRecord::blue_green(
                        name,
                        &self.inner.namespace,
                        self.inner.platform,
                        &options.current_version,
                        &options.new_version,
                    )
                });
                record.apply(&decision, split);
                self.save(record).await;
            }
            record
        };
        let (report, record) = tokio::join!(run, write);
        // An error after something changed (a decision was taken) is recorded; one before
        // (bad options, blue not running) changed nothing and writes nothing.
        if let (Err(e), Some(mut record)) = (&report, record) {
            record.error = Some(e.to_string());
            record.set_state(DeploymentState::Failed);
            self.save(&record).await;
        }
        report
    }

    /// The decisions of the latest blue-green deployment of `name` (also while it runs).
    pub fn decisions(&self, name: &str) -> Vec<Decision> {
        lock(&self.inner.decisions)
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Stops everything this deployer runs on the local platform (deregistering first).
    pub async fn shutdown(&self) {
        if let Target::Local(local) = &self.inner.target {
            local.shutdown().await;
        }
    }

    /// Writes `record` when the deployer has a store. A failed write is logged, not
    /// returned: the deployment itself went on.
    async fn save(&self, record: &DeploymentRecord) {
        if let Some(records) = &self.inner.records
            && let Err(e) = records.put(record).await
        {
            tracing::warn!(service = %record.service, state = %record.state, error = %e, "deployment record not written");
        }
    }

    fn unavailable(&self) -> DeployError {
        DeployError::PlatformUnavailable {
            platform: self.inner.platform.to_string(),
            reason: format!(
                "no {} backend was given to this deployer (is the `{}` feature on?)",
                self.inner.platform, self.inner.platform
            ),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
