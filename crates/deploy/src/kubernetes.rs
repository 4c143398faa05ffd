//! Kubernetes manifests: a `Deployment` and a `Service` rendered from a validated spec, as
//! `trellis deploy --platform kubernetes --dry-run` prints them and as they are applied.

use std::collections::BTreeMap;

use serde::Serialize;
use trellis_mesh::ServiceMesh;

use crate::error::{DeployError, FieldError};
use crate::image::{ImageReference, Registry};
use crate::quantity::Quantity;
use crate::spec::{DeploySpec, Platform, check_dns_label, check_label_value};

/// Deployer-level settings for rendering (the seed's `ServiceDeployer` options), built
/// with the methods below.
#[derive(Debug, Clone, Default)]
pub struct KubernetesOptions {
    registry: Option<String>,
    namespace: Option<String>,
    version: Option<String>,
    mesh: Option<ServiceMesh>,
}

impl KubernetesOptions {
    /// Options with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registry put in front of images that name none: `docker.io/myorg` turns
    /// `user-service:1.2.0` into `docker.io/myorg/user-service:1.2.0`. Defaults to none (the
    /// image as written).
    #[must_use]
    pub fn registry(mut self, registry: impl Into<String>) -> Self {
        self.registry = Some(registry.into());
        self
    }

    /// Namespace for specs that set none. Defaults to `default`.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Version of this release (`1.2.0`), for blue-green: adds `version` labels, names the
    /// Deployment `{name}-{version}` (dots and underscores become `-`) so two versions run
    /// side by side, and selects only that version from the Service. Defaults to none.
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The service mesh the workload joins: its sidecar-injection labels and annotations go
    /// on the pod template, its Service annotations (Linkerd's circuit breaker) on the
    /// Service. The workload's namespace still comes from the spec or these options, not from
    /// the mesh config (whose namespace names the services its policies and client targets
    /// are for). Defaults to no mesh.
    #[must_use]
    pub fn mesh(mut self, mesh: ServiceMesh) -> Self {
        self.mesh = Some(mesh);
        self
    }

    /// The mesh set with [`mesh`](Self::mesh).
    #[cfg(all(feature = "kubernetes", feature = "local"))]
    pub(crate) fn mesh_ref(&self) -> Option<&ServiceMesh> {
        self.mesh.as_ref()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Object<S> {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    spec: S,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeploymentSpec {
    replicas: i32,
    selector: LabelSelector,
    template: PodTemplateSpec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct PodTemplateSpec {
    metadata: PodMeta,
    spec: PodSpec,
}

#[derive(Serialize)]
struct PodMeta {
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct PodSpec {
    containers: Vec<Container>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: String,
    image: String,
    image_pull_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<ContainerPort>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<EnvVar>,
    #[serde(skip_serializing_if = "ResourceRequirements::is_empty")]
    resources: ResourceRequirements,
    #[serde(skip_serializing_if = "Option::is_none")]
    liveness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness_probe: Option<Probe>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: &'static str,
    container_port: i32,
    protocol: &'static str,
}

#[derive(Serialize)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Serialize)]
struct ResourceRequirements {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    limits: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    requests: BTreeMap<&'static str, String>,
}

impl ResourceRequirements {
    fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.requests.is_empty()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    http_get: HttpGetAction,
    period_seconds: i32,
    timeout_seconds: i32,
    failure_threshold: i32,
}

#[derive(Serialize)]
struct HttpGetAction {
    path: String,
    port: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(rename = "type")]
    kind: &'static str,
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServicePort {
    name: &'static str,
    port: i32,
    target_port: &'static str,
    protocol: &'static str,
    app_protocol: &'static str,
}

/// Renders `name` as a `Deployment` and, when the spec has a port (`port` or
/// `health_check.port`), a `Service` — a multi-document YAML stream, deterministic for the
/// same input. The spec is [validated](DeploySpec::validate) for the kubernetes platform
/// first, with the options (registry, namespace, version); nothing is rendered from an
/// invalid spec.
///
/// The Deployment carries labels `app`, `app.kubernetes.io/name`,
/// `app.kubernetes.io/managed-by: trellis` (plus `version` ones with
/// [`KubernetesOptions::version`]), the replicas, one container with the image, command,
/// sorted environment, resources as both requests and limits in canonical quantity form,
/// and HTTP liveness and readiness probes from `health_check`; the mesh's labels and
/// annotations go on the pod template.
pub fn render_kubernetes(
    name: &str,
    spec: &DeploySpec,
    options: &KubernetesOptions,
) -> Result<String, DeployError> {
    spec.validate(name, Platform::Kubernetes)?;
    let mut errors = Vec::new();
    let registry = match options.registry.as_deref().map(Registry::parse) {
        Some(Err(reason)) => {
            errors.push(field_error("registry", reason));
            None
        }
        Some(Ok(registry)) => Some(registry),
        None => None,
    };
    let namespace = spec
        .namespace
        .clone()
        .or_else(|| options.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    if let Err(reason) = check_dns_label(&namespace) {
        errors.push(field_error("namespace", reason));
    }
    let mut deployment_name = name.to_owned();
    if let Some(version) = &options.version {
        match check_label_value(version) {
            Err(reason) => errors.push(field_error("version", reason)),
            Ok(()) => {
                deployment_name = format!(
                    "{name}-{}",
                    version.to_ascii_lowercase().replace(['.', '_'], "-")
                );
                if let Err(reason) = check_dns_label(&deployment_name) {
                    errors.push(field_error(
                        "version",
                        format!("makes the Deployment name {reason}"),
                    ));
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(DeployError::Invalid {
            name: name.to_owned(),
            errors,
        });
    }

    // Validation above guarantees these parse.
    let image = parsed_image(name, spec)?;
    let image = match &registry {
        Some(registry) => image.with_registry(registry),
        None => image,
    };
    let mut selector = BTreeMap::from([("app.kubernetes.io/name".to_owned(), name.to_owned())]);
    let mut labels = BTreeMap::from([
        ("app".to_owned(), name.to_owned()),
        ("app.kubernetes.io/name".to_owned(), name.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "trellis".to_owned(),
        ),
    ]);
    if let Some(version) = &options.version {
        labels.insert("version".to_owned(), version.clone());
        labels.insert("app.kubernetes.io/version".to_owned(), version.clone());
        selector.insert("version".to_owned(), version.clone());
    }
    let (mut pod_labels, pod_annotations, service_annotations) = match &options.mesh {
        Some(mesh) => {
            let pod = mesh.pod_metadata();
            (pod.labels, pod.annotations, mesh.service_annotations())
        }
        None => (BTreeMap::new(), BTreeMap::new(), BTreeMap::new()),
    };
    pod_labels.extend(labels.clone());

    let port = spec.service_port();
    let probe = |path: &str, port: i32| Probe {
        http_get: HttpGetAction {
            path: path.to_owned(),
            port,
        },
        period_seconds: 10,
        timeout_seconds: 2,
        failure_threshold: 3,
    };
    let mut resources = ResourceRequirements {
        limits: BTreeMap::new(),
        requests: BTreeMap::new(),
    };
    for (key, value) in [
        ("cpu", &spec.resources.cpu),
        ("memory", &spec.resources.memory),
    ] {
        if let Some(value) = value {
            let canonical = Quantity::parse(value)
                .map_err(|reason| invalid(name, &format!("resources.{key}"), reason))?
                .to_string();
            resources.limits.insert(key, canonical.clone());
            resources.requests.insert(key, canonical);
        }
    }
    let container = Container {
        name: name.to_owned(),
        image: image.to_string(),
        image_pull_policy: "IfNotPresent",
        command: spec.command.clone(),
        ports: port
            .map(|p| ContainerPort {
                name: "http",
                container_port: p,
                protocol: "TCP",
            })
            .into_iter()
            .collect(),
        env: spec
            .environment
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        resources,
        liveness_probe: spec
            .health_check
            .as_ref()
            .map(|h| probe(h.liveness(), h.port)),
        readiness_probe: spec
            .health_check
            .as_ref()
            .map(|h| probe(h.readiness(), h.port)),
    };
    let deployment = Object {
        api_version: "apps/v1",
        kind: "Deployment",
        metadata: ObjectMeta {
            name: deployment_name,
            namespace: namespace.clone(),
            labels: labels.clone(),
            annotations: BTreeMap::new(),
        },
        spec: DeploymentSpec {
            replicas: spec.replicas,
            selector: LabelSelector {
                match_labels: selector.clone(),
            },
            template: PodTemplateSpec {
                metadata: PodMeta {
                    labels: pod_labels,
                    annotations: pod_annotations,
                },
                spec: PodSpec {
                    containers: vec![container],
                },
            },
        },
    };
    let mut documents = vec![to_yaml(&deployment)?];
    if let Some(port) = port {
        let mut service_labels = labels;
        service_labels.remove("version");
        service_labels.remove("app.kubernetes.io/version");
        let service = Object {
            api_version: "v1",
            kind: "Service",
            metadata: ObjectMeta {
                name: name.to_owned(),
                namespace,
                labels: service_labels,
                annotations: service_annotations,
            },
            spec: ServiceSpec {
                kind: "ClusterIP",
                selector,
                ports: vec![ServicePort {
                    name: "http",
                    port,
                    target_port: "http",
                    protocol: "TCP",
                    app_protocol: "http",
                }],
            },
        };
        documents.push(to_yaml(&service)?);
    }
    Ok(documents.join("---\n"))
}

fn parsed_image(name: &str, spec: &DeploySpec) -> Result<ImageReference, DeployError> {
    let text = spec
        .image
        .as_deref()
        .ok_or_else(|| invalid(name, "image", "missing".to_owned()))?;
    ImageReference::parse(text).map_err(|reason| invalid(name, "image", reason))
}

fn field_error(field: &str, reason: String) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason,
    }
}

fn invalid(name: &str, field: &str, reason: String) -> DeployError {
    DeployError::Invalid {
        name: name.to_owned(),
        errors: vec![field_error(field, reason)],
    }
}

fn to_yaml<T: Serialize>(object: &T) -> Result<String, DeployError> {
    serde_saphyr::to_string(object).map_err(|e| DeployError::Emit(e.to_string()))
}
