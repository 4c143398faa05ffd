#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Rendered resources parse back as each provider's kinds, carry the policy's values under
//! the providers' own field names, and nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use trellis_core::HumanDuration;
use trellis_mesh::{
    MeshConfig, MeshError, MeshPolicy, MeshProvider, ServiceMesh, SidecarConfig, render,
};

fn parse(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn policy(attempts: i32, per_try_ms: u64, errors: i32, interval_ms: u64) -> MeshPolicy {
    let mut p = MeshPolicy::default();
    p.retry_policy.attempts = attempts;
    p.retry_policy.per_try_timeout = HumanDuration(Duration::from_millis(per_try_ms));
    p.circuit_breaker.consecutive_errors = errors;
    p.circuit_breaker.interval = HumanDuration(Duration::from_millis(interval_ms));
    p
}

/// Every key path in `value`, arrays written as `[]`: `spec.http[].retries.attempts`.
fn paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                // Annotation and label keys are data, not schema.
                if prefix.ends_with("annotations")
                    || prefix.ends_with("labels")
                    || prefix.ends_with("matchLabels")
                {
                    continue;
                }
                out.insert(path.clone());
                paths(v, &path, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

const META: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "metadata.name",
    "metadata.namespace",
    "metadata.labels",
    "metadata.annotations",
    "spec",
];

/// Field names each kind's schema has, written out from the providers' API references
/// (Istio networking/v1 and telemetry/v1, Gateway API v1, consul-k8s v1alpha1): a rendered
/// key outside these lists would be rejected or ignored by the provider.
fn known_fields(kind: &str) -> BTreeSet<String> {
    let spec: &[&str] = match kind {
        "VirtualService" => &[
            "spec.hosts",
            "spec.http",
            "spec.http[].name",
            "spec.http[].route",
            "spec.http[].route[].destination",
            "spec.http[].route[].destination.host",
            "spec.http[].timeout",
            "spec.http[].retries",
            "spec.http[].retries.attempts",
            "spec.http[].retries.perTryTimeout",
            "spec.http[].retries.retryOn",
        ],
        "DestinationRule" => &[
            "spec.host",
            "spec.trafficPolicy",
            "spec.trafficPolicy.connectionPool",
            "spec.trafficPolicy.connectionPool.tcp",
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "spec.trafficPolicy.connectionPool.http",
            "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
            "spec.trafficPolicy.outlierDetection",
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
            "spec.trafficPolicy.outlierDetection.interval",
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
        ],
        "Telemetry" => &[
            "spec.selector",
            "spec.selector.matchLabels",
            "spec.tracing",
            "spec.tracing[].disableSpanReporting",
            "spec.accessLogging",
            "spec.accessLogging[].disabled",
            "spec.metrics",
            "spec.metrics[].overrides",
            "spec.metrics[].overrides[].disabled",
        ],
        "HTTPRoute" => &[
            "spec.parentRefs",
            "spec.parentRefs[].group",
            "spec.parentRefs[].kind",
            "spec.parentRefs[].name",
            "spec.rules",
            "spec.rules[].matches",
            "spec.rules[].matches[].path",
            "spec.rules[].matches[].path.type",
            "spec.rules[].matches[].path.value",
        ],
        "ServiceDefaults" => &[
            "spec.protocol",
            "spec.upstreamConfig",
            "spec.upstreamConfig.defaults",
            "spec.upstreamConfig.defaults.limits",
            "spec.upstreamConfig.defaults.limits.maxConnections",
            "spec.upstreamConfig.defaults.limits.maxPendingRequests",
            "spec.upstreamConfig.defaults.passiveHealthCheck",
            "spec.upstreamConfig.defaults.passiveHealthCheck.interval",
            "spec.upstreamConfig.defaults.passiveHealthCheck.maxFailures",
            "spec.upstreamConfig.defaults.passiveHealthCheck.enforcingConsecutive5xx",
            "spec.upstreamConfig.defaults.passiveHealthCheck.baseEjectionTime",
        ],
        "ServiceResolver" => &["spec.connectTimeout"],
        "ServiceRouter" => &[
            "spec.routes",
            "spec.routes[].match",
            "spec.routes[].match.http",
            "spec.routes[].match.http.pathPrefix",
            "spec.routes[].destination",
            "spec.routes[].destination.service",
            "spec.routes[].destination.requestTimeout",
            "spec.routes[].destination.numRetries",
            "spec.routes[].destination.retryOnConnectFailure",
            "spec.routes[].destination.retryOn",
        ],
        other => panic!("unexpected kind {other}"),
    };
    META.iter().chain(spec).map(|s| (*s).to_owned()).collect()
}

/// apiVersion/kind/metadata/spec present, names right, every key a known field.
fn check_structure(doc: &Value, service: &str, namespace: &str) -> (String, String) {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion").to_owned();
    let kind = doc["kind"].as_str().expect("kind").to_owned();
    assert_eq!(doc["metadata"]["name"], service, "{kind}");
    assert_eq!(doc["metadata"]["namespace"], namespace, "{kind}");
    assert!(doc["spec"].is_object(), "{kind} has no spec");
    let mut found = BTreeSet::new();
    paths(doc, "", &mut found);
    let known = known_fields(&kind);
    let unknown: Vec<_> = found.difference(&known).collect();
    assert!(unknown.is_empty(), "{kind}: unknown fields {unknown:?}");
    for annotations in ["annotations", "labels"] {
        if let Some(map) = doc["metadata"][annotations].as_object() {
            for (k, v) in map {
                assert!(
                    v.is_string(),
                    "{kind} {annotations} {k} is not a string: {v}"
                );
            }
        }
    }
    (api_version, kind)
}

fn kinds(docs: &[Value]) -> Vec<(String, String)> {
    docs.iter()
        .map(|d| {
            (
                d["apiVersion"].as_str().unwrap().to_owned(),
                d["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_provider_renders_its_resource_kinds() {
    let expected: BTreeMap<MeshProvider, Vec<(&str, &str)>> = BTreeMap::from([
        (
            MeshProvider::Istio,
            vec![
                ("networking.istio.io/v1", "VirtualService"),
                ("networking.istio.io/v1", "DestinationRule"),
                ("telemetry.istio.io/v1", "Telemetry"),
            ],
        ),
        (
            MeshProvider::Linkerd,
            vec![("gateway.networking.k8s.io/v1", "HTTPRoute")],
        ),
        (
            MeshProvider::Consul,
            vec![
                ("consul.hashicorp.com/v1alpha1", "ServiceDefaults"),
                ("consul.hashicorp.com/v1alpha1", "ServiceResolver"),
                ("consul.hashicorp.com/v1alpha1", "ServiceRouter"),
            ],
        ),
    ]);
    for provider in MeshProvider::ALL {
        let yaml = render(provider, "user-service", &MeshPolicy::default()).unwrap();
        let docs = parse(&yaml);
        for doc in &docs {
            check_structure(doc, "user-service", "default");
        }
        let want: Vec<(String, String)> = expected[&provider]
            .iter()
            .map(|(a, k)| ((*a).to_owned(), (*k).to_owned()))
            .collect();
        assert_eq!(kinds(&docs), want, "{provider}");
    }
}

#[test]
fn istio_carries_the_policy() {
    let yaml = render(MeshProvider::Istio, "orders", &policy(2, 1500, 7, 45_000)).unwrap();
    let docs = parse(&yaml);
    let route = &docs[0]["spec"]["http"][0];
    assert_eq!(
        docs[0]["spec"]["hosts"][0],
        "orders.default.svc.cluster.local"
    );
    assert_eq!(
        route["route"][0]["destination"]["host"],
        "orders.default.svc.cluster.local"
    );
    assert_eq!(route["retries"]["attempts"], 2);
    assert_eq!(route["retries"]["perTryTimeout"], "1500ms");
    assert_eq!(
        route["retries"]["retryOn"],
        "5xx,reset,connect-failure,refused-stream"
    );
    // (2 retries + 1) × 1.5 s.
    assert_eq!(route["timeout"], "4500ms");
    let traffic = &docs[1]["spec"]["trafficPolicy"];
    assert_eq!(docs[1]["spec"]["host"], "orders.default.svc.cluster.local");
    let outlier = &traffic["outlierDetection"];
    assert_eq!(outlier["consecutive5xxErrors"], 7);
    assert_eq!(outlier["interval"], "45s");
    assert_eq!(outlier["baseEjectionTime"], "45s");
    assert_eq!(traffic["connectionPool"]["tcp"]["maxConnections"], 1024);
    assert_eq!(
        traffic["connectionPool"]["http"]["http1MaxPendingRequests"],
        1024
    );
    assert_eq!(docs[2]["spec"]["selector"]["matchLabels"]["app"], "orders");
}

#[test]
fn istio_telemetry_follows_the_sidecar_flags() {
    let mut config = MeshConfig::new(MeshProvider::Istio);
    config.sidecar_config = SidecarConfig {
        inject_tracing: false,
        inject_metrics: true,
        inject_logging: false,
    };
    let mesh = ServiceMesh::new(config).unwrap();
    let docs = parse(&mesh.render("orders").unwrap());
    let telemetry = &docs[2]["spec"];
    assert_eq!(telemetry["tracing"][0]["disableSpanReporting"], true);
    assert_eq!(telemetry["accessLogging"][0]["disabled"], true);
    assert_eq!(telemetry["metrics"][0]["overrides"][0]["disabled"], false);
    let pod = mesh.pod_metadata();
    assert_eq!(pod.labels["sidecar.istio.io/inject"], "true");
    assert_eq!(pod.annotations["sidecar.istio.io/inject"], "true");
    assert_eq!(pod.annotations["prometheus.istio.io/merge-metrics"], "true");
    assert!(mesh.service_annotations().is_empty());
}

#[test]
fn linkerd_route_annotations_and_service_breaker() {
    let mut config = MeshConfig::new(MeshProvider::Linkerd);
    config.namespace = "shop".into();
    config.policies = policy(4, 250, 9, 2_000);
    let mesh = ServiceMesh::new(config).unwrap();
    let yaml = mesh.render("cart").unwrap();
    let docs = parse(&yaml);
    assert_eq!(docs.len(), 1);
    check_structure(&docs[0], "cart", "shop");
    let annotations = &docs[0]["metadata"]["annotations"];
    assert_eq!(annotations["retry.linkerd.io/http"], "5xx");
    assert_eq!(annotations["retry.linkerd.io/limit"], "4");
    assert_eq!(annotations["retry.linkerd.io/timeout"], "250ms");
    assert_eq!(annotations["timeout.linkerd.io/request"], "1250ms");
    let parent = &docs[0]["spec"]["parentRefs"][0];
    assert_eq!(
        (&parent["group"], &parent["kind"], &parent["name"]),
        (
            &Value::from("core"),
            &Value::from("Service"),
            &Value::from("cart")
        )
    );
    let service = mesh.service_annotations();
    assert_eq!(
        service["balancer.linkerd.io/failure-accrual"],
        "consecutive"
    );
    assert_eq!(
        service["balancer.linkerd.io/failure-accrual-consecutive-max-failures"],
        "9"
    );
    assert_eq!(
        service["balancer.linkerd.io/failure-accrual-consecutive-min-penalty"],
        "2s"
    );
    assert_eq!(
        service["balancer.linkerd.io/failure-accrual-consecutive-max-penalty"],
        "20s"
    );
    // The header comment tells where the breaker goes, with the same values.
    assert!(yaml.starts_with("# Linkerd reads circuit breaking from the Service"));
    assert!(
        yaml.contains("#   balancer.linkerd.io/failure-accrual-consecutive-max-failures: \"9\"")
    );
    let pod = mesh.pod_metadata();
    assert_eq!(pod.annotations["linkerd.io/inject"], "enabled");
    assert_eq!(pod.annotations["config.linkerd.io/access-log"], "json");
    assert!(pod.labels.is_empty());
}

#[test]
fn consul_entries_in_both_forms() {
    let p = policy(3, 10_000, 5, 30_000);
    let docs = parse(&render(MeshProvider::Consul, "user-service", &p).unwrap());
    let pass = &docs[0]["spec"]["upstreamConfig"]["defaults"]["passiveHealthCheck"];
    assert_eq!(docs[0]["spec"]["protocol"], "http");
    assert_eq!(pass["maxFailures"], 5);
    assert_eq!(pass["interval"], "30s");
    assert_eq!(docs[1]["spec"]["connectTimeout"], "10s");
    let dest = &docs[2]["spec"]["routes"][0]["destination"];
    assert_eq!(dest["numRetries"], 3);
    assert_eq!(dest["requestTimeout"], "40s");
    assert_eq!(dest["retryOnConnectFailure"], true);
    assert_eq!(dest["service"], "user-service");

    let mut config = MeshConfig::new(MeshProvider::Consul);
    config.policies = p;
    let mesh = ServiceMesh::new(config).unwrap();
    let entries = mesh.consul_config_entries("user-service").unwrap();
    let kinds: Vec<_> = entries
        .iter()
        .map(|e| e["Kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["service-defaults", "service-resolver", "service-router"]
    );
    assert!(entries.iter().all(|e| e["Name"] == "user-service"));
    assert_eq!(
        entries[0]["UpstreamConfig"]["Defaults"]["PassiveHealthCheck"]["MaxFailures"],
        5
    );
    assert_eq!(entries[1]["ConnectTimeout"], "10s");
    let route = &entries[2]["Routes"][0];
    assert_eq!(route["Match"]["HTTP"]["PathPrefix"], "/");
    assert_eq!(route["Destination"]["NumRetries"], 3);
    assert_eq!(route["Destination"]["RetryOn"][0], "5xx");
    let pod = mesh.pod_metadata();
    assert_eq!(
        pod.annotations["consul.hashicorp.com/connect-inject"],
        "true"
    );
    assert_eq!(
        pod.annotations["consul.hashicorp.com/enable-metrics"],
        "true"
    );
}

#[test]
fn zero_attempts_means_no_retries_everywhere() {
    let p = policy(0, 2_000, 5, 30_000);
    let istio = parse(&render(MeshProvider::Istio, "a", &p).unwrap());
    let retries = &istio[0]["spec"]["http"][0]["retries"];
    assert_eq!(retries["attempts"], 0);
    assert!(retries.get("perTryTimeout").is_none());
    assert_eq!(istio[0]["spec"]["http"][0]["timeout"], "2s");
    let linkerd = parse(&render(MeshProvider::Linkerd, "a", &p).unwrap());
    let annotations = linkerd[0]["metadata"]["annotations"].as_object().unwrap();
    assert!(!annotations.contains_key("retry.linkerd.io/http"));
    assert!(!annotations.contains_key("retry.linkerd.io/limit"));
    assert_eq!(annotations["timeout.linkerd.io/request"], "2s");
    let consul = parse(&render(MeshProvider::Consul, "a", &p).unwrap());
    let dest = &consul[2]["spec"]["routes"][0]["destination"];
    assert_eq!(dest["numRetries"], 0);
    assert_eq!(dest["retryOnConnectFailure"], false);
    assert!(dest.get("retryOn").is_none());
}

#[test]
fn output_is_deterministic_and_depends_on_the_input() {
    for provider in MeshProvider::ALL {
        let a = render(provider, "user-service", &MeshPolicy::default()).unwrap();
        let b = render(provider, "user-service", &MeshPolicy::default()).unwrap();
        assert_eq!(a, b, "{provider}");
        let c = render(provider, "user-service", &policy(1, 10_000, 5, 30_000)).unwrap();
        assert_ne!(a, c, "{provider}: attempts must show");
    }
    // A pinned copy of one stream, so formatting changes are seen in review.
    let yaml = render(MeshProvider::Linkerd, "cart", &policy(2, 500, 3, 10_000)).unwrap();
    let route = yaml.split("---\n").nth(1).unwrap();
    assert_eq!(
        route,
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: cart
  namespace: default
  labels:
    app.kubernetes.io/managed-by: trellis
  annotations:
    retry.linkerd.io/http: 5xx
    retry.linkerd.io/limit: \"2\"
    retry.linkerd.io/timeout: 500ms
    timeout.linkerd.io/request: 1500ms
spec:
  parentRefs:
  - group: core
    kind: Service
    name: cart
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /
"
    );
}

#[test]
fn policy_files_and_errors() {
    let p = MeshPolicy::from_toml(
        "[retry_policy]\nattempts = 2\nper_try_timeout = \"3s\"\n[circuit_breaker]\ninterval = 60000",
    )
    .unwrap();
    assert_eq!(p.retry_policy.attempts, 2);
    assert_eq!(p.circuit_breaker.interval.get(), Duration::from_secs(60));
    assert_eq!(p.circuit_breaker.consecutive_errors, 5);
    let err = MeshPolicy::from_toml("[retry_policy]\nattempts = 11").unwrap_err();
    assert_eq!(err.field(), Some("retry_policy.attempts"));
    assert!(matches!(
        MeshPolicy::from_toml("[retry]\nattempts = 1"),
        Err(MeshError::Parse(m)) if m.contains("retry")
    ));
}

#[test]
fn client_target_is_the_mesh_dns_name() {
    let mut config = MeshConfig::new(MeshProvider::Linkerd);
    config.namespace = "shop".into();
    let mesh = ServiceMesh::new(config).unwrap();
    let target = mesh.client_target("user-service").unwrap();
    assert_eq!(target.host, "user-service.shop.svc.cluster.local");
    assert_eq!(
        target.base_url(8080),
        "http://user-service.shop.svc.cluster.local:8080/"
    );
    assert_eq!(
        mesh.client_target("User").unwrap_err().field(),
        Some("service")
    );
}
