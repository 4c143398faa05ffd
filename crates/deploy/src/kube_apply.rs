//! Server-side apply of the rendered manifests to a Kubernetes API server (feature
//! `kubernetes`), and the separate wait for the rollout.
//!
//! Applying and waiting are two steps on purpose: the API server stores and validates the
//! objects, but only a controller-manager (creating the ReplicaSet and pods) and kubelets
//! (running them) make a Deployment available. On a bare API server, as in this
//! repository's tests, [`KubernetesApplier::apply`] succeeds and
//! [`KubernetesApplier::wait_for_rollout`] fails with [`DeployError::RolloutTimeout`].
//!
//! Apply uses field manager `trellis` and forces conflicts: Trellis owns the fields it
//! renders (image, replicas, probes, …) and takes them over from whoever changed them by
//! hand, as `kubectl apply --server-side --force-conflicts` does; fields it does not render
//! are left to their owners. Both objects are first sent as a dry run, so the server's
//! validation (and admission) of both passes before either is stored.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
#[cfg(feature = "local")]
use kube::api::ListParams;
use kube::api::{Api, DeleteParams, Patch, PatchParams, ValidationDirective};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::de::DeserializeOwned;

#[cfg(feature = "local")]
use crate::bluegreen::metrics::BoxFuture;
use crate::error::DeployError;
use crate::kubernetes::{KubernetesOptions, render_kubernetes};
#[cfg(feature = "local")]
use crate::local::{ReplicaPhase, ReplicaStatus};
use crate::spec::DeploySpec;

/// The field manager Trellis applies as.
pub const FIELD_MANAGER: &str = "trellis";

/// The typed objects [`render_kubernetes`] renders: what [`KubernetesApplier::apply`] sends.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesManifests {
    /// The Deployment.
    pub deployment: Deployment,
    /// The Service, when the spec has a port.
    pub service: Option<Service>,
}

impl KubernetesManifests {
    /// The namespace both objects live in.
    pub fn namespace(&self) -> &str {
        self.deployment
            .metadata
            .namespace
            .as_deref()
            .unwrap_or("default")
    }

    /// The Deployment's name (`{name}` or, with a version, `{name}-{version}`).
    pub fn deployment_name(&self) -> &str {
        self.deployment.metadata.name.as_deref().unwrap_or_default()
    }
}

/// Renders `name` like [`render_kubernetes`] (validating the spec first) and reads the YAML
/// back into typed objects.
pub fn kubernetes_manifests(
    name: &str,
    spec: &DeploySpec,
    options: &KubernetesOptions,
) -> Result<KubernetesManifests, DeployError> {
    let yaml = render_kubernetes(name, spec, options)?;
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&yaml).map_err(|e| DeployError::Emit(e.to_string()))?;
    let mut deployment = None;
    let mut service = None;
    for document in documents {
        match document.get("kind").and_then(serde_json::Value::as_str) {
            Some("Deployment") => deployment = Some(typed::<Deployment>(document)?),
            Some("Service") => service = Some(typed::<Service>(document)?),
            other => {
                return Err(DeployError::Emit(format!(
                    "unexpected manifest kind {other:?}"
                )));
            }
        }
    }
    let deployment =
        deployment.ok_or_else(|| DeployError::Emit("no Deployment was rendered".to_owned()))?;
    Ok(KubernetesManifests {
        deployment,
        service,
    })
}

fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, DeployError> {
    serde_json::from_value(value).map_err(|e| DeployError::Emit(e.to_string()))
}

/// What the API server stored after an apply: the objects as it returned them (with
/// defaults, uid, resourceVersion and managedFields filled in).
#[derive(Debug, Clone)]
pub struct AppliedManifests {
    /// The stored Deployment.
    pub deployment: Deployment,
    /// The stored Service, when one was rendered.
    pub service: Option<Service>,
}

/// A Deployment's rollout progress, from its `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutStatus {
    /// `metadata.generation`: the spec version the API server holds.
    pub generation: i64,
    /// `status.observedGeneration`: the spec version the controller has acted on, if any.
    pub observed_generation: Option<i64>,
    /// `spec.replicas`.
    pub desired: i32,
    /// `status.updatedReplicas`: replicas running the current template.
    pub updated: i32,
    /// `status.availableReplicas`.
    pub available: i32,
    /// `status.replicas`: every replica, old and new.
    pub total: i32,
}

impl RolloutStatus {
    fn of(deployment: &Deployment) -> RolloutStatus {
        let status = deployment.status.clone().unwrap_or_default();
        RolloutStatus {
            generation: deployment.metadata.generation.unwrap_or_default(),
            observed_generation: status.observed_generation,
            desired: deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1),
            updated: status.updated_replicas.unwrap_or_default(),
            available: status.available_replicas.unwrap_or_default(),
            total: status.replicas.unwrap_or_default(),
        }
    }

    /// Whether the controller has seen the current spec and every replica is updated and
    /// available, with no old replica left (what `kubectl rollout status` waits for).
    pub fn is_complete(&self) -> bool {
        self.observed_generation
            .is_some_and(|observed| observed >= self.generation)
            && self.updated == self.desired
            && self.available == self.desired
            && self.total == self.desired
    }

    fn describe(&self) -> String {
        let observed = match self.observed_generation {
            Some(observed) if observed >= self.generation => String::new(),
            Some(observed) => format!(
                "; generation {} not yet observed (controller is at {observed})",
                self.generation
            ),
            None => format!(
                "; generation {} never observed by a controller (is kube-controller-manager running?)",
                self.generation
            ),
        };
        format!(
            "{} of {} replicas updated, {} available, {} in total{observed}",
            self.updated, self.desired, self.available, self.total
        )
    }
}

/// Applies rendered manifests to one cluster and follows their rollout.
#[derive(Clone)]
pub struct KubernetesApplier {
    client: Client,
}

impl std::fmt::Debug for KubernetesApplier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesApplier").finish_non_exhaustive()
    }
}

impl KubernetesApplier {
    /// An applier using an existing client.
    pub fn new(client: Client) -> Self {
        KubernetesApplier { client }
    }

    /// An applier for the current context of the kubeconfig file at `path`.
    pub async fn from_kubeconfig(path: &Path) -> Result<Self, DeployError> {
        let failed = |reason: String| DeployError::Kubernetes {
            operation: format!("read kubeconfig {}", path.display()),
            reason,
        };
        let kubeconfig = Kubeconfig::read_from(path).map_err(|e| failed(e.to_string()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let client = Client::try_from(config).map_err(|e| failed(e.to_string()))?;
        Ok(KubernetesApplier { client })
    }

    /// The client, for reading objects back.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Renders `name` (validating the spec: a bad spec sends nothing), then server-side
    /// applies the Deployment and the Service as field manager [`FIELD_MANAGER`]: first
    /// both as a dry run, then both for real. Applying the same spec again changes nothing
    /// (the stored `metadata.generation` stays the same). Returns as soon as the API server
    /// has stored them; [`wait_for_rollout`](Self::wait_for_rollout) is the separate step
    /// that waits for replicas.
    pub async fn apply(
        &self,
        name: &str,
        spec: &DeploySpec,
        options: &KubernetesOptions,
    ) -> Result<AppliedManifests, DeployError> {
        let manifests = kubernetes_manifests(name, spec, options)?;
        self.apply_manifests(&manifests).await
    }

    /// Server-side applies already rendered manifests (dry run of both first, then both).
    pub async fn apply_manifests(
        &self,
        manifests: &KubernetesManifests,
    ) -> Result<AppliedManifests, DeployError> {
        let namespace = manifests.namespace();
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let services: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let deployment_name = manifests.deployment_name();
        let mut applied = None;
        for dry_run in [true, false] {
            let params = PatchParams {
                dry_run,
                force: true,
                field_manager: Some(FIELD_MANAGER.to_owned()),
                field_validation: Some(ValidationDirective::Strict),
            };
            let what = |kind: &str, object: &str| {
                format!(
                    "apply{} {kind} {namespace}/{object}",
                    if dry_run { " (dry run)" } else { "" }
                )
            };
            let deployment = deployments
                .patch(
                    deployment_name,
                    &params,
                    &Patch::Apply(&manifests.deployment),
                )
                .await
                .map_err(|e| kube_error(what("Deployment", deployment_name), e))?;
            let service = match &manifests.service {
                Some(service) => {
                    let service_name = service.metadata.name.as_deref().unwrap_or_default();
                    Some(
                        services
                            .patch(service_name, &params, &Patch::Apply(service))
                            .await
                            .map_err(|e| kube_error(what("Service", service_name), e))?,
                    )
                }
                None => None,
            };
            applied = Some(AppliedManifests {
                deployment,
                service,
            });
        }
        applied.ok_or_else(|| DeployError::Emit("nothing was applied".to_owned()))
    }

    /// The rollout progress of Deployment `namespace/deployment` now.
    pub async fn rollout_status(
        &self,
        namespace: &str,
        deployment: &str,
    ) -> Result<RolloutStatus, DeployError> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let object = deployments
            .get(deployment)
            .await
            .map_err(|e| kube_error(format!("get Deployment {namespace}/{deployment}"), e))?;
        Ok(RolloutStatus::of(&object))
    }

    /// Polls Deployment `namespace/deployment` every 250 ms until its
    /// rollout [is complete](RolloutStatus::is_complete), or fails with
    /// [`DeployError::RolloutTimeout`] after `timeout`, naming the last status seen. Needs
    /// a controller-manager and nodes: on a bare API server it always times out. The last
    /// status read may finish up to a second past `timeout`.
    pub async fn wait_for_rollout(
        &self,
        namespace: &str,
        deployment: &str,
        timeout: Duration,
    ) -> Result<RolloutStatus, DeployError> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            // Each read gets what is left of the deadline, but at least a second, so the
            // last status seen is always reported.
            let remaining = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_secs(1));
            let status =
                match tokio::time::timeout(remaining, self.rollout_status(namespace, deployment))
                    .await
                {
                    Ok(status) => status?,
                    Err(_) => {
                        return Err(DeployError::RolloutTimeout {
                            namespace: namespace.to_owned(),
                            deployment: deployment.to_owned(),
                            waited: timeout,
                            status: "the API server did not answer in time".to_owned(),
                        });
                    }
                };
            if status.is_complete() {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DeployError::RolloutTimeout {
                    namespace: namespace.to_owned(),
                    deployment: deployment.to_owned(),
                    waited: timeout,
                    status: status.describe(),
                });
            }
        }
    }

    /// Deletes the Deployment and the Service of `manifests`; objects already gone are not
    /// an error. Returns how many objects were deleted.
    pub async fn delete(&self, manifests: &KubernetesManifests) -> Result<usize, DeployError> {
        let namespace = manifests.namespace();
        let mut deleted = 0;
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let name = manifests.deployment_name();
        if deployments
            .delete(name, &DeleteParams::foreground())
            .await
            .map(|_| true)
            .or_else(not_found_is_false)
            .map_err(|e| kube_error(format!("delete Deployment {namespace}/{name}"), e))?
        {
            deleted += 1;
        }
        if let Some(service) = &manifests.service {
            let services: Api<Service> = Api::namespaced(self.client.clone(), namespace);
            let name = service.metadata.name.as_deref().unwrap_or_default();
            if services
                .delete(name, &DeleteParams::default())
                .await
                .map(|_| true)
                .or_else(not_found_is_false)
                .map_err(|e| kube_error(format!("delete Service {namespace}/{name}"), e))?
            {
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// The Kubernetes platform behind [`ServiceDeployer`](crate::ServiceDeployer) (features
/// `kubernetes` and `local`): deploy is [`KubernetesApplier::apply`] with the version and
/// the deployer's namespace (then, when [`rollout_timeout`](Self::rollout_timeout) is set,
/// [`KubernetesApplier::wait_for_rollout`]); undeploy deletes every Deployment of the
/// service that Trellis manages (any version) and its Service; status reads the
/// Deployments.
///
/// Replicas are reported from each Deployment's `status`, not pod by pod: replica `i` of a
/// Deployment is [`Running`](ReplicaPhase::Running) when `i` is below its available count,
/// else [`Starting`](ReplicaPhase::Starting); `instance_id` is `{deployment}-{i}`, `port`
/// the service port and `pid` none. Instances are not put in a Trellis registry: inside
/// a cluster the Service is the discovery.
#[cfg(feature = "local")]
#[derive(Debug, Clone)]
pub struct KubernetesBackend {
    applier: KubernetesApplier,
    options: KubernetesOptions,
    rollout_timeout: Option<Duration>,
}

#[cfg(feature = "local")]
impl KubernetesBackend {
    /// A backend applying through `applier`.
    pub fn new(applier: KubernetesApplier) -> Self {
        KubernetesBackend {
            applier,
            options: KubernetesOptions::new(),
            rollout_timeout: None,
        }
    }

    /// A backend for the current context of the kubeconfig file at `path`.
    pub async fn from_kubeconfig(path: &Path) -> Result<Self, DeployError> {
        Ok(Self::new(KubernetesApplier::from_kubeconfig(path).await?))
    }

    /// Rendering options (registry, mesh). Their namespace and version are replaced by the
    /// deployer's namespace and the version deployed. Defaults to
    /// [`KubernetesOptions::new`].
    #[must_use]
    pub fn options(mut self, options: KubernetesOptions) -> Self {
        self.options = options;
        self
    }

    /// Waits for the rollout after applying, failing with
    /// [`DeployError::RolloutTimeout`] after `timeout` (the objects stay applied). Defaults
    /// to none: deploy returns once the API server has stored the objects.
    #[must_use]
    pub fn rollout_timeout(mut self, timeout: Duration) -> Self {
        self.rollout_timeout = Some(timeout);
        self
    }

    /// The applier.
    pub fn applier(&self) -> &KubernetesApplier {
        &self.applier
    }

    async fn deployments(
        &self,
        name: &str,
        namespace: &str,
    ) -> Result<Vec<Deployment>, DeployError> {
        let api: Api<Deployment> = Api::namespaced(self.applier.client.clone(), namespace);
        let params = ListParams::default().labels(&format!(
            "app.kubernetes.io/name={name},app.kubernetes.io/managed-by=trellis"
        ));
        let list = api
            .list(&params)
            .await
            .map_err(|e| kube_error(format!("list Deployments of {namespace}/{name}"), e))?;
        let mut items = list.items;
        items.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(items)
    }
}

#[cfg(feature = "local")]
pub(crate) fn replicas_of(
    name: &str,
    deployment: &Deployment,
    phase: Option<ReplicaPhase>,
) -> Vec<ReplicaStatus> {
    let status = RolloutStatus::of(deployment);
    let object = deployment.metadata.name.clone().unwrap_or_default();
    let version = deployment
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("version").cloned())
        .unwrap_or_else(|| "unversioned".to_owned());
    let port = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.ports.as_ref()?.first().map(|p| p.container_port))
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_default();
    (0..u32::try_from(status.desired.max(0)).unwrap_or_default())
        .map(|index| {
            let available = i64::from(index) < i64::from(status.available);
            ReplicaStatus {
                service: name.to_owned(),
                version: version.clone(),
                index,
                instance_id: format!("{object}-{index}"),
                port,
                pid: None,
                phase: phase.unwrap_or(if available {
                    ReplicaPhase::Running
                } else {
                    ReplicaPhase::Starting
                }),
                restarts: 0,
                last_exit: None,
                registered: false,
                health: None,
                weight: None,
                started_at: None,
            }
        })
        .collect()
}

#[cfg(feature = "local")]
impl crate::deployer::PlatformBackend for KubernetesBackend {
    fn platform(&self) -> crate::spec::Platform {
        crate::spec::Platform::Kubernetes
    }

    fn deploy<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
        namespace: &'a str,
        spec: &'a DeploySpec,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let options = self.options.clone().namespace(namespace).version(version);
            let applied = self.applier.apply(name, spec, &options).await?;
            let mut deployment = applied.deployment;
            if let Some(timeout) = self.rollout_timeout {
                let object = deployment.metadata.name.clone().unwrap_or_default();
                self.applier
                    .wait_for_rollout(namespace, &object, timeout)
                    .await?;
                let api: Api<Deployment> = Api::namespaced(self.applier.client.clone(), namespace);
                deployment = api
                    .get(&object)
                    .await
                    .map_err(|e| kube_error(format!("get Deployment {namespace}/{object}"), e))?;
            }
            Ok(replicas_of(name, &deployment, None))
        })
    }

    fn undeploy<'a>(
        &'a self,
        name: &'a str,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let deployments = self.deployments(name, namespace).await?;
            let api: Api<Deployment> = Api::namespaced(self.applier.client.clone(), namespace);
            let mut stopped = Vec::new();
            for deployment in &deployments {
                let object = deployment.metadata.name.clone().unwrap_or_default();
                api.delete(&object, &DeleteParams::background())
                    .await
                    .map(|_| true)
                    .or_else(not_found_is_false)
                    .map_err(|e| {
                        kube_error(format!("delete Deployment {namespace}/{object}"), e)
                    })?;
                stopped.extend(replicas_of(name, deployment, Some(ReplicaPhase::Stopped)));
            }
            let services: Api<Service> = Api::namespaced(self.applier.client.clone(), namespace);
            let managed = services
                .get_opt(name)
                .await
                .map_err(|e| kube_error(format!("get Service {namespace}/{name}"), e))?
                .is_some_and(|s| {
                    s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("app.kubernetes.io/managed-by"))
                        .is_some_and(|m| m == "trellis")
                });
            if managed {
                services
                    .delete(name, &DeleteParams::default())
                    .await
                    .map(|_| true)
                    .or_else(not_found_is_false)
                    .map_err(|e| kube_error(format!("delete Service {namespace}/{name}"), e))?;
            }
            if deployments.is_empty() && !managed {
                return Err(DeployError::NotDeployed {
                    name: name.to_owned(),
                    version: None,
                });
            }
            Ok(stopped)
        })
    }

    /// Blue-green by [`KubernetesBlueGreen`](crate::KubernetesBlueGreen) with this backend's
    /// rendering options (a mesh with provider `istio` splits by VirtualService weights) in
    /// `namespace`. Needs `options.spec` — green's spec, also used to name blue's
    /// Deployment — since the backend keeps no spec of blue.
    fn blue_green<'a>(
        &'a self,
        name: &'a str,
        namespace: &'a str,
        options: &'a crate::bluegreen::BlueGreenOptions,
        metrics: Option<&'a dyn crate::bluegreen::metrics::MetricsSource>,
        sink: &'a (dyn Fn(&crate::bluegreen::Decision) + Send + Sync),
    ) -> BoxFuture<'a, Result<crate::bluegreen::BlueGreenReport, DeployError>> {
        // Judged from the Deployments' rollout and readiness, not the gateway's metrics:
        // on a cluster the traffic does not go through a Trellis gateway.
        let _ = metrics;
        Box::pin(async move {
            let Some(spec) = &options.spec else {
                return Err(DeployError::Invalid {
                    name: name.to_owned(),
                    errors: vec![crate::error::FieldError {
                        field: "spec".to_owned(),
                        reason: "missing; blue-green on kubernetes needs green's spec".to_owned(),
                    }],
                });
            };
            crate::kube_bluegreen::KubernetesBlueGreen::new(
                self.applier.clone(),
                self.options.clone().namespace(namespace),
            )
            .run_with(name, spec, options, sink)
            .await
        })
    }

    fn status<'a>(
        &'a self,
        name: &'a str,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let deployments = self.deployments(name, namespace).await?;
            Ok(deployments
                .iter()
                .flat_map(|d| replicas_of(name, d, None))
                .collect())
        })
    }
}

fn not_found_is_false(error: kube::Error) -> Result<bool, kube::Error> {
    match &error {
        kube::Error::Api(status) if status.is_not_found() => Ok(false),
        _ => Err(error),
    }
}

pub(crate) fn kube_error(operation: String, error: kube::Error) -> DeployError {
    let reason = match &error {
        kube::Error::Api(status) => format!(
            "{} {}: {}",
            status.code,
            if status.reason.is_empty() {
                "error"
            } else {
                status.reason.as_str()
            },
            status.message
        ),
        other => other.to_string(),
    };
    DeployError::Kubernetes { operation, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(generation: i64, observed: Option<i64>, counts: [i32; 4]) -> RolloutStatus {
        RolloutStatus {
            generation,
            observed_generation: observed,
            desired: counts[0],
            updated: counts[1],
            available: counts[2],
            total: counts[3],
        }
    }

    #[test]
    fn rollout_completion() {
        assert!(status(2, Some(2), [3, 3, 3, 3]).is_complete());
        assert!(status(0, Some(1), [0, 0, 0, 0]).is_complete());
        // Not observed, old replicas left, not available.
        assert!(!status(2, Some(1), [3, 3, 3, 3]).is_complete());
        assert!(!status(1, None, [0, 0, 0, 0]).is_complete());
        assert!(!status(2, Some(2), [3, 3, 3, 4]).is_complete());
        assert!(!status(2, Some(2), [3, 3, 2, 3]).is_complete());
        let text = status(1, None, [3, 0, 0, 0]).describe();
        assert!(text.contains("0 of 3 replicas updated"), "{text}");
        assert!(text.contains("kube-controller-manager"), "{text}");
    }

    #[test]
    fn manifests_read_back_typed() {
        let spec = DeploySpec::from_toml(
            "image = \"shop:1.0.0\"\nreplicas = 2\n[health_check]\npath = \"/health\"\nport = 8080",
        )
        .unwrap();
        let m = kubernetes_manifests("shop", &spec, &KubernetesOptions::new().version("1.0.0"))
            .unwrap();
        assert_eq!(m.namespace(), "default");
        assert_eq!(m.deployment_name(), "shop-1-0-0");
        assert_eq!(m.deployment.spec.as_ref().unwrap().replicas, Some(2));
        let service = m.service.unwrap();
        assert_eq!(service.metadata.name.as_deref(), Some("shop"));
        assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 8080);
        // No port, no Service.
        let m = kubernetes_manifests(
            "shop",
            &DeploySpec::from_toml("image = \"shop:1\"").unwrap(),
            &KubernetesOptions::new(),
        )
        .unwrap();
        assert!(m.service.is_none());
    }
}
