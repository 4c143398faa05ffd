#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![cfg(feature = "kubernetes")]
//! Server-side apply against a real kube-apiserver (`scripts/services up kube`: etcd and
//! kube-apiserver only, so nothing reconciles Deployments). Skipped with a notice when the
//! API server is not running, unless `TRELLIS_REQUIRE_ENGINES=1`.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use trellis_deploy::{DeployError, DeploySpec, KubernetesOptions, kubernetes_manifests};

#[path = "support/kube.rs"]
mod kube_support;
use kube_support::{applier, kubeconfig, unique};

fn spec() -> DeploySpec {
    DeploySpec::from_toml(
        r#"
        image = "user-service:1.2.0"
        replicas = 3
        [resources]
        cpu = "500m"
        memory = "1024Mi"
        [environment]
        NODE_ENV = "production"
        CASSANDRA_HOSTS = "cassandra-cluster"
        [health_check]
        path = "/health"
        port = 3000
        "#,
    )
    .unwrap()
}

/// Every field Trellis renders, compared with what the API server stored (which adds
/// defaults: probe scheme, termination paths, strategy, clusterIP, …).
fn assert_deployment_matches(stored: &Deployment, rendered: &Deployment) {
    let (s, r) = (&stored.metadata, &rendered.metadata);
    assert_eq!(s.name, r.name);
    assert_eq!(s.namespace, r.namespace);
    assert_eq!(s.labels, r.labels);
    let (s, r) = (
        stored.spec.as_ref().unwrap(),
        rendered.spec.as_ref().unwrap(),
    );
    assert_eq!(s.replicas, r.replicas);
    assert_eq!(s.selector, r.selector);
    assert_eq!(s.template.metadata, r.template.metadata);
    let (s, r) = (
        s.template.spec.as_ref().unwrap(),
        r.template.spec.as_ref().unwrap(),
    );
    assert_eq!(s.containers.len(), 1);
    let (s, r) = (&s.containers[0], &r.containers[0]);
    assert_eq!(s.name, r.name);
    assert_eq!(s.image, r.image);
    assert_eq!(s.image_pull_policy, r.image_pull_policy);
    assert_eq!(s.command, r.command);
    assert_eq!(s.env, r.env);
    assert_eq!(s.resources, r.resources);
    let ports = |c: &k8s_openapi::api::core::v1::Container| {
        c.ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.container_port, p.protocol.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ports(s), ports(r));
    for (s, r) in [
        (&s.liveness_probe, &r.liveness_probe),
        (&s.readiness_probe, &r.readiness_probe),
    ] {
        let (s, r) = (s.as_ref().unwrap(), r.as_ref().unwrap());
        let (sg, rg) = (s.http_get.as_ref().unwrap(), r.http_get.as_ref().unwrap());
        assert_eq!(sg.path, rg.path);
        assert_eq!(sg.port, rg.port);
        assert_eq!(s.period_seconds, r.period_seconds);
        assert_eq!(s.timeout_seconds, r.timeout_seconds);
        assert_eq!(s.failure_threshold, r.failure_threshold);
    }
}

fn assert_service_matches(stored: &Service, rendered: &Service) {
    assert_eq!(stored.metadata.name, rendered.metadata.name);
    assert_eq!(stored.metadata.labels, rendered.metadata.labels);
    let (s, r) = (
        stored.spec.as_ref().unwrap(),
        rendered.spec.as_ref().unwrap(),
    );
    assert_eq!(s.type_, r.type_);
    assert_eq!(s.selector, r.selector);
    let ports = |spec: &k8s_openapi::api::core::v1::ServiceSpec| {
        spec.ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone(),
                    p.port,
                    p.target_port.clone(),
                    p.protocol.clone(),
                    p.app_protocol.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(ports(s), ports(r));
    // The API server allocated a cluster IP from --service-cluster-ip-range.
    assert!(
        s.cluster_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.96."))
    );
}

#[tokio::test]
async fn apply_stores_what_was_rendered_and_reapply_is_idempotent() {
    let Some(applier) = applier().await else {
        return;
    };
    let name = unique("kapply");
    let options = KubernetesOptions::new()
        .registry("docker.io/myorg")
        .version("1.2.0");
    let rendered = kubernetes_manifests(&name, &spec(), &options).unwrap();
    let applied = applier.apply(&name, &spec(), &options).await.unwrap();

    // Read back with a plain GET, not what apply returned.
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");
    let deployment = deployments.get(&format!("{name}-1-2-0")).await.unwrap();
    let service = services.get(&name).await.unwrap();
    assert_deployment_matches(&deployment, &rendered.deployment);
    assert_service_matches(&service, rendered.service.as_ref().unwrap());
    assert_eq!(
        deployment.metadata.resource_version,
        applied.deployment.metadata.resource_version
    );
    // Owned by the trellis field manager, through server-side apply.
    let managers: Vec<_> = deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.clone(), m.operation.clone()))
        .collect();
    assert!(
        managers.contains(&(Some("trellis".to_owned()), Some("Apply".to_owned()))),
        "{managers:?}"
    );

    // Re-applying the same spec changes nothing: same generation, same resourceVersion.
    let again = applier.apply(&name, &spec(), &options).await.unwrap();
    assert_eq!(
        again.deployment.metadata.generation,
        deployment.metadata.generation
    );
    assert_eq!(
        again.deployment.metadata.resource_version,
        deployment.metadata.resource_version
    );
    assert_eq!(
        again.service.unwrap().metadata.resource_version,
        service.metadata.resource_version
    );

    // A changed spec is a new generation with the new value.
    let mut scaled = spec();
    scaled.replicas = 5;
    let changed = applier.apply(&name, &scaled, &options).await.unwrap();
    assert_eq!(
        changed.deployment.metadata.generation,
        deployment.metadata.generation.map(|g| g + 1)
    );
    assert_eq!(changed.deployment.spec.unwrap().replicas, Some(5));

    assert_eq!(applier.delete(&rendered).await.unwrap(), 2);
    assert!(services.get_opt(&name).await.unwrap().is_none());
}

#[tokio::test]
async fn rollout_wait_times_out_clearly_without_a_controller() {
    let Some(applier) = applier().await else {
        return;
    };
    let name = unique("krollout");
    let options = KubernetesOptions::new();
    let applied = applier.apply(&name, &spec(), &options).await.unwrap();
    let status = applier.rollout_status("default", &name).await.unwrap();
    assert_eq!(status.desired, 3);
    assert!(!status.is_complete());

    let started = std::time::Instant::now();
    let err = applier
        .wait_for_rollout("default", &name, Duration::from_secs(2))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    match &err {
        DeployError::RolloutTimeout {
            namespace,
            deployment,
            ..
        } => {
            assert_eq!(namespace, "default");
            assert_eq!(deployment, &name);
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&format!("Deployment default/{name}")),
        "{text}"
    );
    assert!(text.contains("did not roll out within 2s"), "{text}");
    assert!(text.contains("0 of 3 replicas updated"), "{text}");
    assert!(text.contains("kube-controller-manager"), "{text}");
    let rendered = kubernetes_manifests(&name, &spec(), &options).unwrap();
    assert_eq!(
        rendered.deployment_name(),
        applied.deployment.metadata.name.unwrap()
    );
    applier.delete(&rendered).await.unwrap();
}

#[tokio::test]
async fn bad_spec_applies_nothing() {
    let Some(applier) = applier().await else {
        return;
    };
    let name = unique("kbad");
    let mut bad = spec();
    bad.replicas = -2;
    bad.resources.memory = Some("1Gx".to_owned());
    let err = applier
        .apply(&name, &bad, &KubernetesOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.fields(), ["replicas", "resources.memory"]);
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");
    assert!(deployments.get_opt(&name).await.unwrap().is_none());
    assert!(services.get_opt(&name).await.unwrap().is_none());
}

#[tokio::test]
async fn server_rejection_names_the_object_and_stores_nothing() {
    let Some(applier) = applier().await else {
        return;
    };
    // A namespace that does not exist: the dry run of the Deployment is refused, so
    // neither object is stored.
    let name = unique("knons");
    let namespace = unique("missing-ns");
    let options = KubernetesOptions::new().namespace(namespace.clone());
    let err = applier.apply(&name, &spec(), &options).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DeployError::Kubernetes { .. }), "{err:?}");
    assert!(
        text.contains(&format!("apply (dry run) Deployment {namespace}/{name}")),
        "{text}"
    );
    assert!(text.contains("404") || text.contains("NotFound"), "{text}");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), &namespace);
    assert!(services.get_opt(&name).await.unwrap().is_none());
}

/// The facade: `ServiceDeployer` on the kubernetes platform with a `KubernetesBackend`
/// applies, reports from the stored Deployment, times out the rollout clearly, and
/// undeploys every version.
#[cfg(feature = "local")]
#[tokio::test]
async fn service_deployer_applies_reports_and_undeploys_through_the_backend() {
    use std::sync::Arc;
    use trellis_deploy::{KubernetesBackend, Platform, ReplicaPhase, ServiceDeployer};
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
    let deployer = ServiceDeployer::builder(Platform::Kubernetes, registry.clone())
        .backend(Arc::new(backend))
        .build()
        .unwrap();
    let name = unique("kfacade");
    let deployments: Api<Deployment> = Api::namespaced(applier.client().clone(), "default");
    let services: Api<Service> = Api::namespaced(applier.client().clone(), "default");

    let deployment = deployer
        .deploy_version(&name, "1.2.0", &spec())
        .await
        .unwrap();
    assert_eq!(deployment.platform, Platform::Kubernetes);
    assert_eq!(deployment.version, "1.2.0");
    assert_eq!(deployment.replicas.len(), 3);
    for (i, replica) in deployment.replicas.iter().enumerate() {
        assert_eq!(replica.instance_id, format!("{name}-1-2-0-{i}"));
        assert_eq!(replica.version, "1.2.0");
        assert_eq!(replica.port, 3000);
        // A bare API server: nothing runs the pods.
        assert_eq!(replica.phase, ReplicaPhase::Starting);
    }
    let stored = deployments.get(&format!("{name}-1-2-0")).await.unwrap();
    let container = &stored.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("user-service:1.2.0"));
    assert!(services.get_opt(&name).await.unwrap().is_some());

    // A second version beside the first; status sees both Deployments.
    deployer
        .deploy_version(&name, "1.3.0", &spec())
        .await
        .unwrap();
    let status = deployer.status(&name).await.unwrap();
    assert_eq!(status.len(), 6, "{status:?}");
    assert_eq!(
        status.iter().filter(|r| r.version == "1.3.0").count(),
        3,
        "{status:?}"
    );

    // With a rollout timeout the deploy fails clearly (and stays applied).
    let waiting = KubernetesBackend::from_kubeconfig(&kubeconfig())
        .await
        .unwrap()
        .rollout_timeout(Duration::from_millis(600));
    let waiting = ServiceDeployer::builder(Platform::Kubernetes, registry)
        .backend(Arc::new(waiting))
        .build()
        .unwrap();
    let err = waiting
        .deploy_version(&name, "1.4.0", &spec())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeployError::RolloutTimeout { ref deployment, .. } if *deployment == format!("{name}-1-4-0")),
        "{err}"
    );

    // Undeploy removes every version and the Service.
    let stopped = deployer.undeploy(&name).await.unwrap();
    assert_eq!(stopped.len(), 9, "{stopped:?}");
    assert!(stopped.iter().all(|r| r.phase == ReplicaPhase::Stopped));
    for version in ["1-2-0", "1-3-0", "1-4-0"] {
        assert!(
            deployments
                .get_opt(&format!("{name}-{version}"))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert!(services.get_opt(&name).await.unwrap().is_none());
    assert!(deployer.status(&name).await.unwrap().is_empty());
    let err = deployer.undeploy(&name).await.unwrap_err();
    assert!(matches!(err, DeployError::NotDeployed { .. }), "{err}");
}
