//! Linkerd 2.16 and later: retries and timeouts are annotations on a Gateway API `HTTPRoute`
//! whose parent is the Service; circuit breaking (failure accrual) is annotations on the
//! Service itself; injection is an annotation on the pod template.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::k8s::{Object, duration_text, to_yaml};
use crate::options::{MeshPolicy, SidecarConfig};
use crate::{MeshError, Target};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpRouteSpec {
    parent_refs: Vec<ParentReference>,
    rules: Vec<HttpRouteRule>,
}

#[derive(Serialize)]
struct ParentReference {
    group: &'static str,
    kind: &'static str,
    name: String,
}

#[derive(Serialize)]
struct HttpRouteRule {
    matches: Vec<HttpRouteMatch>,
}

#[derive(Serialize)]
struct HttpRouteMatch {
    path: HttpPathMatch,
}

#[derive(Serialize)]
struct HttpPathMatch {
    #[serde(rename = "type")]
    kind: &'static str,
    value: &'static str,
}

/// Retry and timeout annotations of the route.
pub(crate) fn route_annotations(policy: &MeshPolicy) -> BTreeMap<String, String> {
    let retry = &policy.retry_policy;
    let mut annotations = BTreeMap::from([(
        "timeout.linkerd.io/request".to_owned(),
        duration_text(policy.request_timeout()),
    )]);
    if retry.attempts > 0 {
        annotations.insert("retry.linkerd.io/http".to_owned(), "5xx".to_owned());
        annotations.insert(
            "retry.linkerd.io/limit".to_owned(),
            retry.attempts.to_string(),
        );
        annotations.insert(
            "retry.linkerd.io/timeout".to_owned(),
            duration_text(retry.per_try_timeout.get()),
        );
    }
    annotations
}

/// Failure-accrual annotations for the Service: eject an endpoint after
/// `consecutive_errors` failures, for `interval` at first and up to ten times that on
/// repeated failures.
pub(crate) fn service_annotations(policy: &MeshPolicy) -> BTreeMap<String, String> {
    let breaker = &policy.circuit_breaker;
    let interval = breaker.interval.get();
    BTreeMap::from([
        (
            "balancer.linkerd.io/failure-accrual".to_owned(),
            "consecutive".to_owned(),
        ),
        (
            "balancer.linkerd.io/failure-accrual-consecutive-max-failures".to_owned(),
            breaker.consecutive_errors.to_string(),
        ),
        (
            "balancer.linkerd.io/failure-accrual-consecutive-min-penalty".to_owned(),
            duration_text(interval),
        ),
        (
            "balancer.linkerd.io/failure-accrual-consecutive-max-penalty".to_owned(),
            duration_text(interval * 10),
        ),
    ])
}

/// The HTTPRoute for `target`, attached to its Service on every port, matching every path.
pub(crate) fn render(target: &Target<'_>, policy: &MeshPolicy) -> Result<Vec<String>, MeshError> {
    let route = Object {
        api_version: "gateway.networking.k8s.io/v1",
        kind: "HTTPRoute",
        metadata: target.meta(route_annotations(policy)),
        spec: HttpRouteSpec {
            parent_refs: vec![ParentReference {
                group: "core",
                kind: "Service",
                name: target.service.to_owned(),
            }],
            rules: vec![HttpRouteRule {
                matches: vec![HttpRouteMatch {
                    path: HttpPathMatch {
                        kind: "PathPrefix",
                        value: "/",
                    },
                }],
            }],
        },
    };
    Ok(vec![to_yaml(&route)?])
}

/// A YAML comment telling where the circuit breaker goes, since it is not part of the route.
pub(crate) fn header(target: &Target<'_>, policy: &MeshPolicy) -> String {
    let mut out = format!(
        "# Linkerd reads circuit breaking from the Service; `trellis deploy` sets these\n\
         # annotations on Service {}/{} (or: kubectl annotate service {} -n {} KEY=VALUE):\n",
        target.namespace, target.service, target.service, target.namespace
    );
    for (key, value) in service_annotations(policy) {
        out.push_str(&format!("#   {key}: \"{value}\"\n"));
    }
    out
}

/// Pod annotations: injection, and JSON access logs when logging is on. Linkerd proxies
/// always serve metrics, and tracing is switched on mesh-wide by the linkerd-jaeger
/// extension, so those two flags have no per-pod annotation.
pub(crate) fn pod_annotations(sidecar: &SidecarConfig) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([("linkerd.io/inject".to_owned(), "enabled".to_owned())]);
    if sidecar.inject_logging {
        annotations.insert("config.linkerd.io/access-log".to_owned(), "json".to_owned());
    }
    annotations
}
