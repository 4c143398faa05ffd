//! Blue-green on Kubernetes (features `kubernetes` and `local`): blue and green run as
//! separate Deployments (`{name}-{version}`) labelled `version=…`. Without a mesh, one
//! Service whose selector picks the version gets the traffic — a switch, not a split. With
//! an Istio mesh ([`KubernetesOptions::mesh`] with provider `istio`), the Service selects
//! both versions and a VirtualService splits the traffic between the subsets of a
//! DestinationRule by weight.
//!
//! The steps, each recorded as a [`Decision`]:
//!
//! 1. **Split** (Istio only). DestinationRule `{name}` gets subsets `v-{blue}` and
//!    `v-{green}` (dots as `-`: `v-1-2-0`) selecting on `version`; VirtualService `{name}`
//!    routes 100% to blue's subset; the Service's selector drops `version`.
//! 2. **Start.** Green's Deployment is applied by server-side apply; without Istio the
//!    Service is not touched, so its selector still picks blue.
//! 3. **Check.** Green's readiness ([`RolloutReadiness`]; by default
//!    [`DeploymentAvailable`], the Deployment's status) is polled every
//!    `analysis.interval`, with `analysis.window` as the deadline. With Istio, once green
//!    is available the VirtualService routes by `traffic_split` and green must stay
//!    available for another window.
//! 4. **Promote** (passed): the Service is applied with `version: {new_version}` in its
//!    selector (Istio: the VirtualService routes 100% to green), then blue's Deployment is
//!    deleted (background propagation: the object goes at once, the garbage collector
//!    removes its pods). **Roll back** (failed, `rollback_on_failure`): green's Deployment
//!    is deleted; the Service selector stays on blue (Istio: 100% to blue); blue's
//!    Deployment is never touched. **Hold** (failed, no rollback): both stay.
//!
//! Other meshes (Linkerd, Consul) get the selector switch. No gateway metrics are analysed
//! here: green is judged by its readiness only.

use std::fmt;
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use trellis_mesh::MeshProvider;

use crate::bluegreen::metrics::{BoxFuture, Figures};
use crate::bluegreen::{
    Action, BlueGreenOptions, BlueGreenReport, Decision, Outcome, Recorder, green_spec,
};
use crate::error::DeployError;
use crate::kube_apply::{
    FIELD_MANAGER, KubernetesApplier, KubernetesManifests, kube_error, kubernetes_manifests,
    replicas_of,
};
use crate::kubernetes::KubernetesOptions;
use crate::spec::{DeploySpec, Platform};

/// Tells whether a Deployment is ready to take the traffic.
pub trait RolloutReadiness: Send + Sync + fmt::Debug {
    /// Whether Deployment `namespace/deployment` is ready now.
    fn is_ready<'a>(
        &'a self,
        applier: &'a KubernetesApplier,
        namespace: &'a str,
        deployment: &'a str,
    ) -> BoxFuture<'a, Result<bool, DeployError>>;
}

/// Readiness read from the Deployment's status: its rollout
/// [is complete](crate::RolloutStatus::is_complete) (what a controller-manager reports).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeploymentAvailable;

impl RolloutReadiness for DeploymentAvailable {
    fn is_ready<'a>(
        &'a self,
        applier: &'a KubernetesApplier,
        namespace: &'a str,
        deployment: &'a str,
    ) -> BoxFuture<'a, Result<bool, DeployError>> {
        Box::pin(async move {
            Ok(applier
                .rollout_status(namespace, deployment)
                .await?
                .is_complete())
        })
    }
}

/// Blue-green by Service selector switch on one cluster.
///
/// ```no_run
/// # async fn run(applier: trellis_deploy::KubernetesApplier, spec: trellis_deploy::DeploySpec)
/// # -> Result<(), trellis_deploy::DeployError> {
/// use trellis_deploy::{BlueGreenOptions, KubernetesBlueGreen, KubernetesOptions};
///
/// let report = KubernetesBlueGreen::new(applier, KubernetesOptions::new().namespace("shop"))
///     .run("user-service", &spec, &BlueGreenOptions::new("1.1.0", "1.2.0"))
///     .await?;
/// println!("{:?}", report.outcome);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct KubernetesBlueGreen<R = DeploymentAvailable> {
    applier: KubernetesApplier,
    options: KubernetesOptions,
    readiness: R,
}

impl KubernetesBlueGreen<DeploymentAvailable> {
    /// Blue-green through `applier`, rendering with `options` (namespace, registry, mesh;
    /// the version is set per side), judging green by its Deployment's status.
    pub fn new(applier: KubernetesApplier, options: KubernetesOptions) -> Self {
        KubernetesBlueGreen {
            applier,
            options,
            readiness: DeploymentAvailable,
        }
    }
}

impl<R: RolloutReadiness> KubernetesBlueGreen<R> {
    /// Judges green's readiness with `readiness` instead.
    pub fn readiness<S: RolloutReadiness>(self, readiness: S) -> KubernetesBlueGreen<S> {
        KubernetesBlueGreen {
            applier: self.applier,
            options: self.options,
            readiness,
        }
    }

    fn manifests(
        &self,
        name: &str,
        spec: &DeploySpec,
        version: &str,
    ) -> Result<KubernetesManifests, DeployError> {
        kubernetes_manifests(name, spec, &self.options.clone().version(version))
    }

    /// Runs the blue-green deployment of `name`, whose blue (`options.current_version`) was
    /// deployed from `blue_spec` with a version; green runs `options.spec` or blue's spec
    /// with the image tag set to the new version. Fails with
    /// [`DeployError::NotDeployed`] when blue's Deployment does not exist and
    /// [`DeployError::AlreadyDeployed`] when green's already does; the outcome of the
    /// rollout itself is in the report.
    pub async fn run(
        &self,
        name: &str,
        blue_spec: &DeploySpec,
        options: &BlueGreenOptions,
    ) -> Result<BlueGreenReport, DeployError> {
        self.run_with(name, blue_spec, options, &|_| {}).await
    }

    /// [`run`](Self::run), calling `sink` with each decision as it is made.
    pub async fn run_with(
        &self,
        name: &str,
        blue_spec: &DeploySpec,
        options: &BlueGreenOptions,
        sink: &(dyn Fn(&Decision) + Send + Sync),
    ) -> Result<BlueGreenReport, DeployError> {
        options.validate_for(name, Platform::Kubernetes)?;
        let blue = self.manifests(name, blue_spec, &options.current_version)?;
        let green_spec = options
            .spec
            .clone()
            .unwrap_or_else(|| green_spec(blue_spec, &options.new_version));
        let green = self.manifests(name, &green_spec, &options.new_version)?;
        let namespace = blue.namespace().to_owned();
        let client = self.applier.client().clone();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
        for (manifests, version, want) in [
            (&blue, &options.current_version, true),
            (&green, &options.new_version, false),
        ] {
            let deployment = manifests.deployment_name();
            let found = deployments
                .get_opt(deployment)
                .await
                .map_err(|e| kube_error(format!("get Deployment {namespace}/{deployment}"), e))?;
            match (found.is_some(), want) {
                (false, true) => {
                    return Err(DeployError::NotDeployed {
                        name: name.to_owned(),
                        version: Some(version.clone()),
                    });
                }
                (true, false) => {
                    return Err(DeployError::AlreadyDeployed {
                        name: name.to_owned(),
                        version: version.clone(),
                    });
                }
                _ => {}
            }
        }
        let istio = match self.options.mesh_ref() {
            Some(mesh) if mesh.provider() == MeshProvider::Istio => Some(IstioRoutes {
                virtual_services: Api::namespaced_with(
                    client.clone(),
                    &namespace,
                    &resource("VirtualService"),
                ),
                destination_rules: Api::namespaced_with(
                    client.clone(),
                    &namespace,
                    &resource("DestinationRule"),
                ),
                name: name.to_owned(),
                namespace: namespace.clone(),
                host: format!("{name}.{namespace}.svc.{}", mesh.config().cluster_domain),
                blue: subset(&options.current_version),
                green: subset(&options.new_version),
            }),
            _ => None,
        };
        let new = options.new_version.as_str();
        let current = options.current_version.as_str();
        let green_name = green.deployment_name().to_owned();
        let mut recorder = Recorder::new(name, sink);
        let started = Instant::now();

        // 1. With Istio: subsets for both versions, all of the traffic to blue's, and the
        //    Service selecting both versions (the VirtualService picks the subset).
        if let Some(istio) = &istio {
            istio
                .apply_subsets(&options.current_version, &options.new_version)
                .await?;
            istio.route(100, 0).await?;
            if let Some(service) = &green.service {
                let mut service = service.clone();
                if let Some(selector) = service.spec.as_mut().and_then(|s| s.selector.as_mut()) {
                    selector.remove("version");
                }
                let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
                services
                    .patch(name, &apply_params(), &Patch::Apply(&service))
                    .await
                    .map_err(|e| kube_error(format!("apply Service {namespace}/{name}"), e))?;
            }
            recorder.record(
                Action::Split,
                new,
                Figures::default(),
                format!(
                    "DestinationRule {namespace}/{name} has subsets {} and {}; VirtualService {namespace}/{name} routes 100% to {} until green is available; Service {name} selects both versions",
                    istio.blue, istio.green, istio.blue
                ),
            );
        }

        // 2. Green's Deployment alone: without Istio the Service keeps selecting blue.
        let green_only = KubernetesManifests {
            deployment: green.deployment.clone(),
            service: None,
        };
        self.applier.apply_manifests(&green_only).await?;
        recorder.record(
            Action::Start,
            new,
            Figures::default(),
            match &istio {
                Some(_) => format!("Deployment {namespace}/{green_name} applied"),
                None => format!(
                    "Deployment {namespace}/{green_name} applied; Service {name} still selects version {current}"
                ),
            },
        );

        // 3. Readiness, with the analysis window as the deadline; with Istio, then the
        //    split held for another window while green stays available.
        let analysis_started = Instant::now();
        let mut ready_after = None;
        let mut failure = match self
            .wait(&namespace, &green_name, options, true, new, &mut recorder)
            .await
        {
            Ok(()) => {
                ready_after = Some(started.elapsed());
                None
            }
            Err(why) => Some(why),
        };
        if let (Some(istio), None) = (&istio, &failure) {
            let split = options.traffic_split;
            istio.route(split.blue, split.green).await?;
            recorder.record(
                Action::Split,
                new,
                Figures::default(),
                format!(
                    "green available; VirtualService {namespace}/{name} routes {}% to {} and {}% to {}",
                    split.blue, istio.blue, split.green, istio.green
                ),
            );
            if let Err(why) = self
                .wait(&namespace, &green_name, options, false, new, &mut recorder)
                .await
            {
                failure = Some(why);
            }
        }
        let analysis_took = analysis_started.elapsed();

        // 4. Verdict.
        let switch_started = Instant::now();
        let outcome = match failure {
            None => {
                let how = if let Some(istio) = &istio {
                    istio.route(0, 100).await?;
                    format!(
                        "VirtualService {namespace}/{name} routes 100% to {}",
                        istio.green
                    )
                } else {
                    if let Some(service) = &green.service {
                        let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
                        services
                            .patch(name, &apply_params(), &Patch::Apply(service))
                            .await
                            .map_err(|e| {
                                kube_error(format!("apply Service {namespace}/{name}"), e)
                            })?;
                    }
                    format!("Service {name} selects version {new}")
                };
                delete_deployment(&deployments, &namespace, blue.deployment_name()).await?;
                recorder.record(
                    Action::Promote,
                    new,
                    Figures::default(),
                    format!(
                        "green available after {:?}; {how}; blue Deployment {} deleted",
                        ready_after.unwrap_or_default(),
                        blue.deployment_name()
                    ),
                );
                Outcome::Promoted
            }
            Some(why) if options.rollback_on_failure => {
                let how = if let Some(istio) = &istio {
                    istio.route(100, 0).await?;
                    format!(
                        "VirtualService {namespace}/{name} routes 100% to {}",
                        istio.blue
                    )
                } else {
                    format!("Service {name} still selects version {current}")
                };
                delete_deployment(&deployments, &namespace, &green_name).await?;
                recorder.record(
                    Action::Rollback,
                    new,
                    Figures::default(),
                    format!("{why}; green deleted, {how}"),
                );
                Outcome::RolledBack
            }
            Some(why) => {
                recorder.record(
                    Action::Hold,
                    new,
                    Figures::default(),
                    format!("{why}; rollback_on_failure is off: both Deployments stay"),
                );
                Outcome::Held
            }
        };
        let switch_took = (outcome != Outcome::Held).then(|| switch_started.elapsed());
        // The replicas of whichever Deployments remain, from their status.
        let mut replicas = Vec::new();
        for deployment in [blue.deployment_name(), green_name.as_str()] {
            if let Some(object) = deployments
                .get_opt(deployment)
                .await
                .map_err(|e| kube_error(format!("get Deployment {namespace}/{deployment}"), e))?
            {
                replicas.extend(replicas_of(name, &object, None));
            }
        }
        Ok(BlueGreenReport {
            service: name.to_owned(),
            current_version: current.to_owned(),
            new_version: new.to_owned(),
            outcome,
            decisions: recorder.decisions,
            green_ready_after: ready_after,
            analysis_took,
            switch_took,
            replicas,
        })
    }

    /// Polls green's readiness every `analysis.interval` for up to `analysis.window`. With
    /// `until_ready`, succeeds at the first ready answer and fails at the deadline; without,
    /// fails at the first not-ready answer and succeeds at the deadline. The error is the
    /// reason.
    async fn wait(
        &self,
        namespace: &str,
        deployment: &str,
        options: &BlueGreenOptions,
        until_ready: bool,
        version: &str,
        recorder: &mut Recorder<'_>,
    ) -> Result<(), String> {
        let window = options.analysis.window;
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let answer = self
                .readiness
                .is_ready(&self.applier, namespace, deployment)
                .await;
            let at_deadline = tokio::time::Instant::now() >= deadline;
            let reason = match (&answer, until_ready) {
                (Ok(true), true) => return Ok(()),
                (Ok(true), false) if at_deadline => return Ok(()),
                (Ok(true), false) => {
                    format!("Deployment {namespace}/{deployment} available, split held")
                }
                (Ok(false), false) => {
                    return Err(format!(
                        "Deployment {namespace}/{deployment} stopped being available during the {window:?} window"
                    ));
                }
                (Ok(false), true) if at_deadline => {
                    return Err(format!(
                        "Deployment {namespace}/{deployment} not available within the {window:?} window"
                    ));
                }
                (Ok(false), true) => {
                    format!("Deployment {namespace}/{deployment} is not available yet")
                }
                (Err(e), _) if at_deadline || !until_ready => {
                    return Err(format!(
                        "cannot read the readiness of {namespace}/{deployment}: {e}"
                    ));
                }
                (Err(e), _) => {
                    format!("cannot read the readiness of {namespace}/{deployment}: {e}")
                }
            };
            recorder.record(Action::Check, version, Figures::default(), reason);
            let next = (tokio::time::Instant::now() + options.analysis.interval).min(deadline);
            tokio::time::sleep_until(next).await;
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The Istio resource `kind` of `networking.istio.io/v1`.
fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("networking.istio.io", "v1", kind))
}

/// The DestinationRule subset of `version`: `v-` and the version with dots and underscores
/// as `-` (`v-1-2-0`).
fn subset(version: &str) -> String {
    format!(
        "v-{}",
        version.to_ascii_lowercase().replace(['.', '_'], "-")
    )
}

/// The Istio objects of one blue-green: a DestinationRule with one subset per version and a
/// VirtualService with one route to each subset, both named after the service.
struct IstioRoutes {
    virtual_services: Api<DynamicObject>,
    destination_rules: Api<DynamicObject>,
    name: String,
    namespace: String,
    host: String,
    blue: String,
    green: String,
}

impl IstioRoutes {
    fn metadata(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "namespace": self.namespace,
            "labels": {
                "app.kubernetes.io/name": self.name,
                "app.kubernetes.io/managed-by": "trellis",
            },
        })
    }

    async fn apply(
        &self,
        api: &Api<DynamicObject>,
        kind: &str,
        spec: serde_json::Value,
    ) -> Result<(), DeployError> {
        let object = serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": kind,
            "metadata": self.metadata(),
            "spec": spec,
        });
        api.patch(&self.name, &apply_params(), &Patch::Apply(&object))
            .await
            .map(|_| ())
            .map_err(|e| kube_error(format!("apply {kind} {}/{}", self.namespace, self.name), e))
    }

    async fn apply_subsets(&self, blue: &str, green: &str) -> Result<(), DeployError> {
        let spec = serde_json::json!({
            "host": self.host,
            "subsets": [
                { "name": self.blue, "labels": { "version": blue } },
                { "name": self.green, "labels": { "version": green } },
            ],
        });
        self.apply(&self.destination_rules, "DestinationRule", spec)
            .await
    }

    async fn route(&self, blue: u32, green: u32) -> Result<(), DeployError> {
        let spec = serde_json::json!({
            "hosts": [self.host],
            "http": [{
                "name": "blue-green",
                "route": [
                    { "destination": { "host": self.host, "subset": self.blue }, "weight": blue },
                    { "destination": { "host": self.host, "subset": self.green }, "weight": green },
                ],
            }],
        });
        self.apply(&self.virtual_services, "VirtualService", spec)
            .await
    }
}

/// Deletes Deployment `namespace/name` with background propagation (as `kubectl delete`
/// does): the object is gone at once and the garbage collector removes its ReplicaSets and
/// pods afterwards. Already gone is not an error.
async fn delete_deployment(
    deployments: &Api<Deployment>,
    namespace: &str,
    name: &str,
) -> Result<(), DeployError> {
    match deployments.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(kube_error(
            format!("delete Deployment {namespace}/{name}"),
            e,
        )),
    }
}
