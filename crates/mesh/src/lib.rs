//! # trellis-mesh
//!
//! The seed's `ServiceMesh`: one traffic policy — retries with a per-try timeout, a circuit
//! breaker, connection limits — rendered as the resources of the mesh you run, plus what the
//! deployer and the client need to take part in that mesh.
//!
//! - [`render`] / [`ServiceMesh::render`]: the policy for one service as a multi-document
//!   YAML stream (Istio `VirtualService` + `DestinationRule` + `Telemetry`; Linkerd
//!   `HTTPRoute`; Consul `ServiceDefaults` + `ServiceResolver` + `ServiceRouter`).
//!   [`ServiceMesh::consul_config_entries`] gives Consul's entries as the JSON that
//!   `consul config write` takes, for Consul outside Kubernetes.
//! - [`ServiceMesh::pod_metadata`] and [`ServiceMesh::service_annotations`]: the sidecar
//!   injection labels and annotations the deployer puts on its Deployments, and what goes on
//!   the Service (Linkerd's circuit breaker lives there).
//! - [`ServiceMesh::client_target`], [`PROPAGATED_HEADERS`], [`propagate_headers`],
//!   [`detect_mesh`]: the mesh DNS name of a service, the trace headers to pass on, and which
//!   mesh this process runs in.
//! - With the `client` feature, [`ServiceMesh::create_client`]: a `ServiceClient` aimed at
//!   the mesh's name for a service, its own retries and breaker off, passing on the B3
//!   headers and `x-request-id` of the request being served (`MeshContext`).
//!
//! It is not a mesh and does not talk to one: it applies nothing to a cluster (the deployer
//! or `kubectl apply` does), and it does not install Istio, Linkerd or Consul.
//!
//! ```
//! use trellis_mesh::{MeshConfig, ServiceMesh};
//!
//! let mesh = ServiceMesh::new(MeshConfig::from_toml(r#"
//!     provider = "istio"
//!     namespace = "shop"
//!     [sidecar_config]
//!     inject_logging = false
//!     [policies.retry_policy]
//!     attempts = 3
//!     per_try_timeout = "10s"
//!     [policies.circuit_breaker]
//!     consecutive_errors = 5
//!     interval = "30s"
//! "#)?)?;
//! let yaml = mesh.render("user-service")?;
//! assert!(yaml.contains("kind: VirtualService"));
//! assert!(yaml.contains("perTryTimeout: 10s"));
//! assert!(yaml.contains("consecutive5xxErrors: 5"));
//! assert_eq!(
//!     mesh.client_target("user-service")?.host,
//!     "user-service.shop.svc.cluster.local"
//! );
//! assert_eq!(mesh.pod_metadata().annotations["sidecar.istio.io/inject"], "true");
//! # Ok::<(), trellis_mesh::MeshError>(())
//! ```
//!
//! # How the policy maps
//!
//! | policy | Istio | Linkerd (2.16+) | Consul |
//! |---|---|---|---|
//! | `retry_policy.attempts` | `retries.attempts`, `retryOn: 5xx,reset,connect-failure,refused-stream` | `retry.linkerd.io/limit`, `retry.linkerd.io/http: 5xx` | router `NumRetries`, `RetryOn`, `RetryOnConnectFailure` |
//! | `retry_policy.per_try_timeout` | `retries.perTryTimeout` | `retry.linkerd.io/timeout` | resolver `ConnectTimeout` (Consul has no per-try timeout) |
//! | whole request: per-try × (attempts + 1) | route `timeout` | `timeout.linkerd.io/request` | router `RequestTimeout` |
//! | `circuit_breaker.consecutive_errors` | `outlierDetection.consecutive5xxErrors` | Service `failure-accrual-consecutive-max-failures` | `PassiveHealthCheck.MaxFailures` |
//! | `circuit_breaker.interval` | `interval` and `baseEjectionTime` | min penalty (max penalty: 10×) | `Interval` and `BaseEjectionTime` |
//! | `connection_pool` | `connectionPool.tcp.maxConnections`, `http.http1MaxPendingRequests` | — (no equivalent) | `Limits` |
//!
//! Attempts of 0 render as "no retries" for every provider. Consul's breaker sits on the
//! calling side (see the `consul` notes on [`ServiceMesh::consul_config_entries`]).
//!
//! # Sidecar flags
//!
//! | flag | Istio | Linkerd | Consul |
//! |---|---|---|---|
//! | (always) | label and annotation `sidecar.istio.io/inject: "true"` | `linkerd.io/inject: enabled` | `consul.hashicorp.com/connect-inject: "true"` |
//! | `inject_tracing` | `Telemetry` `tracing[].disableSpanReporting` | mesh-wide (linkerd-jaeger) | mesh-wide (`proxy-defaults`) |
//! | `inject_metrics` | `prometheus.istio.io/merge-metrics`, `Telemetry` `metrics` | always on | `consul.hashicorp.com/enable-metrics`, `…/enable-metrics-merging` |
//! | `inject_logging` | `Telemetry` `accessLogging[].disabled` | `config.linkerd.io/access-log: json` | mesh-wide (`proxy-defaults`) |
//!
//! # Output
//!
//! YAML is written by serde-saphyr from typed structs whose maps are `BTreeMap`s: the same
//! input gives the same bytes, and strings YAML 1.1 would misread (`"true"`, `"3"`, `"on"`)
//! are quoted. Durations are written as whole seconds (`"30s"`) or milliseconds
//! (`"1500ms"`), which Go, protobuf and Linkerd parsers all accept.

mod client;
mod consul;
mod error;
mod istio;
mod k8s;
mod linkerd;
#[cfg(feature = "client")]
pub mod mesh_client;
mod names;
mod options;

use std::collections::BTreeMap;

pub use client::{
    MESH_ENV, MeshDetection, MeshTarget, PROPAGATED_HEADERS, detect_mesh, detect_mesh_from_process,
    propagate_headers,
};
pub use error::MeshError;
#[cfg(feature = "client")]
pub use mesh_client::{MeshClientOptions, MeshContext, REQUEST_ID};
pub use options::{
    CircuitBreaker, ConnectionPool, MeshConfig, MeshPolicy, MeshProvider, RetryPolicy,
    SidecarConfig,
};

use crate::error::invalid;
use crate::k8s::{ObjectMeta, join_documents, managed_by};
use crate::names::check_dns_label;

/// A validated mesh configuration: renders resources, annotations and client targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMesh {
    config: MeshConfig,
}

/// Labels and annotations for a workload's pod template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMetadata {
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
}

impl ServiceMesh {
    /// Validates `config`; the error names the offending key.
    pub fn new(config: MeshConfig) -> Result<Self, MeshError> {
        config.validate()?;
        Ok(ServiceMesh { config })
    }

    /// The configuration.
    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// The provider.
    pub fn provider(&self) -> MeshProvider {
        self.config.provider
    }

    fn target<'a>(&'a self, service: &'a str) -> Result<Target<'a>, MeshError> {
        Target::new(service, &self.config.namespace, &self.config.cluster_domain)
    }

    /// The policy for `service` as this provider's resources, a multi-document YAML stream.
    /// For Linkerd, a leading comment lists the circuit-breaker annotations that belong on
    /// the Service ([`service_annotations`](Self::service_annotations)).
    pub fn render(&self, service: &str) -> Result<String, MeshError> {
        let target = self.target(service)?;
        let policy = &self.config.policies;
        let (header, documents) = match self.config.provider {
            MeshProvider::Istio => (
                String::new(),
                istio::render(&target, policy, &self.config.sidecar_config)?,
            ),
            MeshProvider::Linkerd => (
                linkerd::header(&target, policy),
                linkerd::render(&target, policy)?,
            ),
            MeshProvider::Consul => (String::new(), consul::render(&target, policy)?),
        };
        Ok(join_documents(&header, &documents))
    }

    /// Consul's `service-defaults`, `service-resolver` and `service-router` for `service` as
    /// JSON config entries (`Kind`, `Name`, PascalCase keys), one per element, for
    /// `consul config write` outside Kubernetes — whatever this mesh's provider is.
    ///
    /// Consul configures passive health checks on the calling side: the breaker in
    /// `service`'s `service-defaults` covers `service`'s calls to its upstreams, so render
    /// the policy for every service to cover every call.
    pub fn consul_config_entries(
        &self,
        service: &str,
    ) -> Result<Vec<serde_json::Value>, MeshError> {
        consul::config_entries(&self.target(service)?, &self.config.policies)
    }

    /// Labels and annotations that put a workload into the mesh, with the sidecar flags
    /// that the provider reads per pod (see the crate docs' table).
    pub fn pod_metadata(&self) -> PodMetadata {
        let sidecar = &self.config.sidecar_config;
        match self.config.provider {
            MeshProvider::Istio => {
                let (labels, annotations) = istio::pod_metadata(sidecar);
                PodMetadata {
                    labels,
                    annotations,
                }
            }
            MeshProvider::Linkerd => PodMetadata {
                labels: BTreeMap::new(),
                annotations: linkerd::pod_annotations(sidecar),
            },
            MeshProvider::Consul => PodMetadata {
                labels: BTreeMap::new(),
                annotations: consul::pod_annotations(sidecar),
            },
        }
    }

    /// Annotations for the service's Kubernetes `Service`: Linkerd's failure accrual (its
    /// circuit breaker); empty for Istio and Consul, whose breakers are resources.
    pub fn service_annotations(&self) -> BTreeMap<String, String> {
        match self.config.provider {
            MeshProvider::Linkerd => linkerd::service_annotations(&self.config.policies),
            MeshProvider::Istio | MeshProvider::Consul => BTreeMap::new(),
        }
    }

    /// Where a mesh-aware client sends requests for `service`: its Service's cluster DNS
    /// name. The client should not retry or break circuits itself — the mesh does.
    pub fn client_target(&self, service: &str) -> Result<MeshTarget, MeshError> {
        let target = self.target(service)?;
        Ok(MeshTarget {
            service: service.to_owned(),
            namespace: self.config.namespace.clone(),
            host: target.host(),
        })
    }
}

/// Renders `policy` for `service` in namespace `default` as `provider`'s resources, with the
/// sidecar flags at their defaults (all on). The `trellis mesh render` command.
pub fn render(
    provider: MeshProvider,
    service: &str,
    policy: &MeshPolicy,
) -> Result<String, MeshError> {
    let mut config = MeshConfig::new(provider);
    config.policies = *policy;
    ServiceMesh::new(config)?.render(service)
}

/// The mesh DNS name of `service`: `{service}.{namespace}.svc.cluster.local`.
pub fn mesh_host(service: &str, namespace: &str) -> Result<String, MeshError> {
    Ok(Target::new(service, namespace, "cluster.local")?.host())
}

/// One service, where it lives: the names every renderer needs.
pub(crate) struct Target<'a> {
    pub(crate) service: &'a str,
    pub(crate) namespace: &'a str,
    pub(crate) cluster_domain: &'a str,
}

impl<'a> Target<'a> {
    fn new(
        service: &'a str,
        namespace: &'a str,
        cluster_domain: &'a str,
    ) -> Result<Self, MeshError> {
        trellis_core::validate_name(trellis_core::NameKind::Service, service)
            .map_err(|e| invalid("service", e.to_string()))?;
        check_dns_label(service).map_err(|r| invalid("service", r))?;
        check_dns_label(namespace).map_err(|r| invalid("namespace", r))?;
        Ok(Target {
            service,
            namespace,
            cluster_domain,
        })
    }

    pub(crate) fn host(&self) -> String {
        format!(
            "{}.{}.svc.{}",
            self.service, self.namespace, self.cluster_domain
        )
    }

    pub(crate) fn meta(&self, annotations: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: self.service.to_owned(),
            namespace: self.namespace.to_owned(),
            labels: managed_by(),
            annotations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_service_names_are_rejected_naming_the_field() {
        for bad in ["", "User", "a_b", "a.b", "-a"] {
            let err = render(MeshProvider::Istio, bad, &MeshPolicy::default()).unwrap_err();
            assert_eq!(err.field(), Some("service"), "{bad}: {err}");
        }
        assert_eq!(
            mesh_host("user-service", "prod").unwrap(),
            "user-service.prod.svc.cluster.local"
        );
        assert_eq!(
            mesh_host("user-service", "Prod").unwrap_err().field(),
            Some("namespace")
        );
    }

    #[test]
    fn invalid_policy_is_rejected_before_rendering() {
        let mut policy = MeshPolicy::default();
        policy.retry_policy.attempts = 11;
        let err = render(MeshProvider::Linkerd, "a", &policy).unwrap_err();
        assert_eq!(err.field(), Some("policies.retry_policy.attempts"));
    }
}
