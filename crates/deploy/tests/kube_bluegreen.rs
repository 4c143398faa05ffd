#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![cfg(feature = "kubernetes")]
//! Blue-green by Service selector switch against a real kube-apiserver
//! (`scripts/services up kube`: etcd and kube-apiserver only, so no controller ever makes a
//! Deployment available — the promote test writes the status a controller would, through
//! the status subresource). Skipped with a notice when the API server is not running,
//! unless `TRELLIS_REQUIRE_ENGINES=1`.

use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use trellis_deploy::{
    Action, AnalysisOptions, BlueGreenOptions, DeployError, DeploySpec, KubernetesApplier,
    KubernetesBlueGreen, KubernetesOptions, Outcome,
};
use trellis_mesh::{MeshConfig, MeshProvider, ServiceMesh};

#[path = "support/kube.rs"]
mod kube_support;
use kube_support::{applier, kubeconfig, unique};

fn blue_spec() -> DeploySpec {
    DeploySpec::from_toml(
        r#"
        image = "user-service:1.1.0"
        replicas = 2
        [health_check]
        path = "/health"
        port = 3000
        "#,
    )
    .unwrap()
}

fn options(window: Duration) -> BlueGreenOptions {
    BlueGreenOptions::new("1.1.0", "1.2.0").analysis(AnalysisOptions {
        window,
        interval: Duration::from_millis(250),
        ..AnalysisOptions::default()
    })
}

/// Deploys blue (Deployment `{name}-1-1-0` and Service `{name}` selecting version 1.1.0).
async fn deploy_blue(applier: &KubernetesApplier, name: &str) -> Deployment {
    applier
        .apply(
            name,
            &blue_spec(),
            &KubernetesOptions::new().version("1.1.0"),
        )
        .await
        .unwrap()
        .deployment
}

fn selected_version(service: &Service) -> Option<String> {
    service
        .spec
        .as_ref()?
        .selector
        .as_ref()?
        .get("version")
        .cloned()
}

async fn cleanup(applier: &KubernetesApplier, name: &str) {
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");
    for deployment in [format!("{name}-1-1-0"), format!("{name}-1-2-0")] {
        let _ = deployments.delete(&deployment, &Default::default()).await;
    }
    let _ = services.delete(name, &Default::default()).await;
}

#[tokio::test]
async fn green_never_available_rolls_back_and_keeps_the_selector_on_blue() {
    let Some(applier) = applier().await else {
        return;
    };
    let name = unique("kbg-rollback");
    let blue = deploy_blue(&applier, &name).await;
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");

    let started = std::time::Instant::now();
    let report = KubernetesBlueGreen::new(applier.clone(), KubernetesOptions::new())
        .run(&name, &blue_spec(), &options(Duration::from_secs(2)))
        .await
        .unwrap();
    let took = started.elapsed();
    let _ = writeln!(std::io::stderr(), "rollback took {took:?}");

    assert_eq!(
        report.outcome,
        Outcome::RolledBack,
        "{:?}",
        report.decisions
    );
    assert!(report.green_ready_after.is_none());
    // Only blue's two replicas remain, none available (no controller).
    let versions: Vec<&str> = report.replicas.iter().map(|r| r.version.as_str()).collect();
    assert_eq!(versions, ["1.1.0", "1.1.0"]);
    assert!(report.analysis_took >= Duration::from_secs(2), "{report:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let actions: Vec<Action> = report.decisions.iter().map(|d| d.action).collect();
    assert_eq!(actions.first(), Some(&Action::Start), "{actions:?}");
    assert_eq!(actions.last(), Some(&Action::Rollback), "{actions:?}");
    assert!(actions.contains(&Action::Check), "{actions:?}");
    let last = report.decisions.last().unwrap();
    assert!(
        last.reason.contains("not available within the 2s window"),
        "{}",
        last.reason
    );

    // The Service still selects blue; green's Deployment is gone; blue is untouched.
    let service = services.get(&name).await.unwrap();
    assert_eq!(selected_version(&service).as_deref(), Some("1.1.0"));
    assert!(
        deployments
            .get_opt(&format!("{name}-1-2-0"))
            .await
            .unwrap()
            .is_none()
    );
    let blue_now = deployments.get(&format!("{name}-1-1-0")).await.unwrap();
    assert_eq!(
        blue_now.metadata.resource_version,
        blue.metadata.resource_version
    );
    cleanup(&applier, &name).await;
}

#[tokio::test]
async fn green_made_available_is_promoted_by_switching_the_selector() {
    let Some(applier) = applier().await else {
        return;
    };
    let name = unique("kbg-promote");
    deploy_blue(&applier, &name).await;
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");

    // Plays the controller-manager: once green's Deployment exists, reports all of its
    // replicas available through the status subresource.
    let green_name = format!("{name}-1-2-0");
    let controller = {
        let deployments = deployments.clone();
        let green_name = green_name.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "green's Deployment never appeared"
                );
                if let Some(green) = deployments.get_opt(&green_name).await.unwrap() {
                    let status = serde_json::json!({
                        "status": {
                            "observedGeneration": green.metadata.generation,
                            "replicas": 2,
                            "updatedReplicas": 2,
                            "readyReplicas": 2,
                            "availableReplicas": 2,
                        }
                    });
                    deployments
                        .patch_status(&green_name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .unwrap();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let report = KubernetesBlueGreen::new(applier.clone(), KubernetesOptions::new())
        .run(&name, &blue_spec(), &options(Duration::from_secs(20)))
        .await
        .unwrap();
    controller.await.unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "promote: green ready after {:?}, switch took {:?}",
        report.green_ready_after,
        report.switch_took
    );

    assert_eq!(report.outcome, Outcome::Promoted, "{:?}", report.decisions);
    // Only green's two replicas remain, both available as the status says.
    let remaining: Vec<(&str, trellis_deploy::ReplicaPhase)> = report
        .replicas
        .iter()
        .map(|r| (r.version.as_str(), r.phase))
        .collect();
    assert_eq!(
        remaining,
        [
            ("1.2.0", trellis_deploy::ReplicaPhase::Running),
            ("1.2.0", trellis_deploy::ReplicaPhase::Running)
        ]
    );
    // Promoted as soon as green was available, not at the end of the window.
    assert!(
        report.analysis_took < Duration::from_secs(10),
        "{:?}",
        report.analysis_took
    );
    let actions: Vec<Action> = report.decisions.iter().map(|d| d.action).collect();
    assert_eq!(actions.first(), Some(&Action::Start), "{actions:?}");
    assert_eq!(actions.last(), Some(&Action::Promote), "{actions:?}");

    let service = services.get(&name).await.unwrap();
    assert_eq!(selected_version(&service).as_deref(), Some("1.2.0"));
    assert!(
        deployments
            .get_opt(&format!("{name}-1-1-0"))
            .await
            .unwrap()
            .is_none(),
        "blue's Deployment is deleted"
    );
    let green = deployments.get(&green_name).await.unwrap();
    let labels = green.metadata.labels.unwrap();
    assert_eq!(labels.get("version").map(String::as_str), Some("1.2.0"));
    let image = green.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("user-service:1.2.0"));
    cleanup(&applier, &name).await;
}

#[tokio::test]
async fn missing_blue_or_existing_green_is_refused_before_anything_changes() {
    let Some(applier) = applier().await else {
        return;
    };
    let name = unique("kbg-refused");
    let blue_green = KubernetesBlueGreen::new(applier.clone(), KubernetesOptions::new());
    let err = blue_green
        .run(&name, &blue_spec(), &options(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeployError::NotDeployed { version: Some(v), .. } if v == "1.1.0"),
        "{err:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    assert!(
        deployments
            .get_opt(&format!("{name}-1-2-0"))
            .await
            .unwrap()
            .is_none()
    );

    // Green already there (same name, same version): refused, both left as they are.
    deploy_blue(&applier, &name).await;
    let mut green_spec = blue_spec();
    green_spec.image = Some("user-service:1.2.0".to_owned());
    let green = applier
        .apply(
            &name,
            &green_spec,
            &KubernetesOptions::new().version("1.2.0"),
        )
        .await
        .unwrap();
    let err = blue_green
        .run(&name, &blue_spec(), &options(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeployError::AlreadyDeployed { version, .. } if version == "1.2.0"),
        "{err:?}"
    );
    let still = deployments.get(&format!("{name}-1-2-0")).await.unwrap();
    assert_eq!(
        still.metadata.resource_version,
        green.deployment.metadata.resource_version
    );
    cleanup(&applier, &name).await;
}

// ---- Istio: VirtualService weights between DestinationRule subsets ----

fn istio_api(applier: &KubernetesApplier, kind: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("networking.istio.io", "v1", kind));
    Api::namespaced_with(applier.client().clone(), "default", &resource)
}

/// Registers minimal VirtualService and DestinationRule CRDs (any spec accepted) and waits
/// until the API server serves them.
async fn register_istio_crds(applier: &KubernetesApplier) {
    let crds: Api<CustomResourceDefinition> = Api::all(applier.client().clone());
    for (kind, plural) in [
        ("VirtualService", "virtualservices"),
        ("DestinationRule", "destinationrules"),
    ] {
        let name = format!("{plural}.networking.istio.io");
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": { "name": name },
            "spec": {
                "group": "networking.istio.io",
                "scope": "Namespaced",
                "names": {
                    "kind": kind,
                    "plural": plural,
                    "singular": kind.to_ascii_lowercase(),
                    "listKind": format!("{kind}List"),
                },
                "versions": [{
                    "name": "v1",
                    "served": true,
                    "storage": true,
                    "schema": { "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": true,
                    }},
                }],
            },
        });
        crds.patch(
            &name,
            &PatchParams::apply("trellis-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for kind in ["VirtualService", "DestinationRule"] {
        let api = istio_api(applier, kind);
        loop {
            match api.list(&Default::default()).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{kind} is not served: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The VirtualService's routes as (subset, weight).
async fn weights(applier: &KubernetesApplier, name: &str) -> Option<Vec<(String, u64)>> {
    let vs = istio_api(applier, "VirtualService")
        .get_opt(name)
        .await
        .unwrap()?;
    let routes = vs.data["spec"]["http"][0]["route"].as_array()?.clone();
    Some(
        routes
            .iter()
            .map(|r| {
                (
                    r["destination"]["subset"].as_str().unwrap().to_owned(),
                    r["weight"].as_u64().unwrap(),
                )
            })
            .collect(),
    )
}

fn istio() -> KubernetesOptions {
    KubernetesOptions::new().mesh(ServiceMesh::new(MeshConfig::new(MeshProvider::Istio)).unwrap())
}

fn split(blue: u64, green: u64) -> Option<Vec<(String, u64)>> {
    Some(vec![
        ("v-1-1-0".to_owned(), blue),
        ("v-1-2-0".to_owned(), green),
    ])
}

async fn cleanup_istio(applier: &KubernetesApplier, name: &str) {
    cleanup(applier, name).await;
    for kind in ["VirtualService", "DestinationRule"] {
        let _ = istio_api(applier, kind)
            .delete(name, &Default::default())
            .await;
    }
}

#[tokio::test]
async fn istio_splits_by_weight_then_routes_everything_to_green() {
    let Some(applier) = applier().await else {
        return;
    };
    register_istio_crds(&applier).await;
    let name = unique("kbg-istio-promote");
    deploy_blue(&applier, &name).await;
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");
    let green_name = format!("{name}-1-2-0");

    // Plays the controller: when green's Deployment appears, notes the weights, then
    // reports green available; then watches for the split.
    let observer = {
        let applier = applier.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let green = loop {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no green Deployment"
                );
                if let Some(green) = deployments.get_opt(&green_name).await.unwrap() {
                    break green;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let before_ready = weights(&applier, &name).await;
            let status = serde_json::json!({ "status": {
                "observedGeneration": green.metadata.generation,
                "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
            }});
            deployments
                .patch_status(&green_name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
            let during = loop {
                assert!(tokio::time::Instant::now() < deadline, "never split");
                let now = weights(&applier, &name).await;
                if now != before_ready {
                    break now;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            (before_ready, during)
        })
    };

    let report = KubernetesBlueGreen::new(applier.clone(), istio())
        .run(
            &name,
            &blue_spec(),
            &options(Duration::from_secs(2)).traffic_split(90, 10),
        )
        .await
        .unwrap();
    let (before_ready, during) = observer.await.unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "istio promote: ready after {:?}, analysis {:?}, switch {:?}",
        report.green_ready_after,
        report.analysis_took,
        report.switch_took
    );
    assert_eq!(report.outcome, Outcome::Promoted, "{:?}", report.decisions);
    assert_eq!(before_ready, split(100, 0));
    assert_eq!(during, split(90, 10));
    assert_eq!(weights(&applier, &name).await, split(0, 100));
    // The split was held for the window once green was available.
    assert!(report.analysis_took >= Duration::from_secs(2), "{report:?}");
    let actions: Vec<Action> = report.decisions.iter().map(|d| d.action).collect();
    assert_eq!(actions.first(), Some(&Action::Split), "{actions:?}");
    assert_eq!(actions.last(), Some(&Action::Promote), "{actions:?}");
    assert_eq!(
        actions.iter().filter(|a| **a == Action::Split).count(),
        2,
        "{actions:?}"
    );

    // The DestinationRule's subsets select the version labels.
    let rule = istio_api(&applier, "DestinationRule")
        .get(&name)
        .await
        .unwrap();
    assert_eq!(
        rule.data["spec"]["host"].as_str(),
        Some(format!("{name}.default.svc.cluster.local").as_str())
    );
    let subsets: Vec<(String, String)> = rule.data["spec"]["subsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["labels"]["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        subsets,
        vec![
            ("v-1-1-0".to_owned(), "1.1.0".to_owned()),
            ("v-1-2-0".to_owned(), "1.2.0".to_owned())
        ]
    );
    // The Service selects both versions; blue's Deployment is deleted.
    let service = services.get(&name).await.unwrap();
    assert_eq!(selected_version(&service), None);
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    assert!(
        deployments
            .get_opt(&format!("{name}-1-1-0"))
            .await
            .unwrap()
            .is_none()
    );
    cleanup_istio(&applier, &name).await;
}

#[tokio::test]
async fn istio_rollback_routes_everything_back_to_blue() {
    let Some(applier) = applier().await else {
        return;
    };
    register_istio_crds(&applier).await;
    let name = unique("kbg-istio-rollback");
    let blue = deploy_blue(&applier, &name).await;
    let report = KubernetesBlueGreen::new(applier.clone(), istio())
        .run(&name, &blue_spec(), &options(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(
        report.outcome,
        Outcome::RolledBack,
        "{:?}",
        report.decisions
    );
    assert_eq!(weights(&applier, &name).await, split(100, 0));
    let last = report.decisions.last().unwrap();
    assert!(
        last.reason.contains("routes 100% to v-1-1-0"),
        "{}",
        last.reason
    );
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    assert!(
        deployments
            .get_opt(&format!("{name}-1-2-0"))
            .await
            .unwrap()
            .is_none()
    );
    let blue_now = deployments.get(&format!("{name}-1-1-0")).await.unwrap();
    assert_eq!(
        blue_now.metadata.resource_version,
        blue.metadata.resource_version
    );
    cleanup_istio(&applier, &name).await;
}

/// The facade: `ServiceDeployer::blue_green_deploy` on the kubernetes platform runs through
/// the backend, records the decisions, and needs green's spec.
#[cfg(feature = "local")]
#[tokio::test]
async fn service_deployer_runs_blue_green_through_the_kubernetes_backend() {
    use std::sync::Arc;
    use trellis_deploy::{KubernetesBackend, Platform, ServiceDeployer};
    use trellis_registry::{RegistryOptions, ServiceRegistry};

    let Some(applier) = applier().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = trellis_store::Store::open(&format!("sqlite://{}/r.db", dir.path().display()))
        .await
        .unwrap();
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    let backend = KubernetesBackend::from_kubeconfig(&kubeconfig())
        .await
        .unwrap();
    let deployer = ServiceDeployer::builder(Platform::Kubernetes, registry)
        .backend(Arc::new(backend))
        .build()
        .unwrap();
    let name = unique("kbg-facade");
    deployer
        .deploy_version(&name, "1.1.0", &blue_spec())
        .await
        .unwrap();

    // Without green's spec: refused, naming the key, nothing applied.
    let err = deployer
        .blue_green_deploy(&name, options(Duration::from_secs(1)))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("spec: missing"), "{text}");
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    assert!(
        deployments
            .get_opt(&format!("{name}-1-2-0"))
            .await
            .unwrap()
            .is_none()
    );

    let mut green = blue_spec();
    green.image = Some("user-service:1.2.0".to_owned());
    let report = deployer
        .blue_green_deploy(&name, options(Duration::from_secs(1)).spec(green))
        .await
        .unwrap();
    assert_eq!(
        report.outcome,
        Outcome::RolledBack,
        "{:?}",
        report.decisions
    );
    assert_eq!(deployer.decisions(&name), report.decisions);
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");
    let service = services.get(&name).await.unwrap();
    assert_eq!(selected_version(&service).as_deref(), Some("1.1.0"));
    assert!(
        deployments
            .get_opt(&format!("{name}-1-2-0"))
            .await
            .unwrap()
            .is_none()
    );
    cleanup(&applier, &name).await;
}
