//! Consul service mesh: the `service-defaults`, `service-resolver` and `service-router`
//! config entries, rendered two ways from one model:
//!
//! - as Consul-on-Kubernetes custom resources (`consul.hashicorp.com/v1alpha1`
//!   `ServiceDefaults`, `ServiceResolver`, `ServiceRouter`; camelCase keys) in the YAML stream,
//!   so the output applies like the other providers';
//! - as the JSON config entries that `consul config write` and `PUT /v1/config` take
//!   (`Kind`/`Name` plus PascalCase keys), for Consul outside Kubernetes.
//!
//! Consul configures passive health checks on the *calling* side: `UpstreamConfig.Defaults`
//! in a service's `service-defaults` applies the breaker to that service's calls to every
//! upstream. Rendering the mesh-wide policy for every service therefore covers every call.
//! Consul has no per-try timeout: the router's `RequestTimeout` bounds the whole request with
//! retries, and the resolver's `ConnectTimeout` bounds each connection attempt.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::k8s::{Object, duration_text, to_yaml};
use crate::options::MeshPolicy;
use crate::{MeshError, Target};

/// The retry conditions besides connection failures (which `retryOnConnectFailure` covers).
const RETRY_ON: [&str; 3] = ["5xx", "reset", "refused-stream"];

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceDefaultsSpec {
    protocol: &'static str,
    upstream_config: UpstreamConfig,
}

#[derive(Serialize)]
struct UpstreamConfig {
    defaults: UpstreamDefaults,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UpstreamDefaults {
    limits: Limits,
    passive_health_check: PassiveHealthCheck,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Limits {
    max_connections: i32,
    max_pending_requests: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PassiveHealthCheck {
    interval: String,
    max_failures: i32,
    #[serde(rename = "enforcingConsecutive5xx")]
    enforcing_consecutive_5xx: u32,
    base_ejection_time: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceResolverSpec {
    connect_timeout: String,
}

#[derive(Serialize)]
struct ServiceRouterSpec {
    routes: Vec<Route>,
}

#[derive(Serialize)]
struct Route {
    #[serde(rename = "match")]
    match_: RouteMatch,
    destination: RouteDestination,
}

#[derive(Serialize)]
struct RouteMatch {
    http: HttpMatch,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpMatch {
    path_prefix: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RouteDestination {
    service: String,
    request_timeout: String,
    num_retries: i32,
    retry_on_connect_failure: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    retry_on: Vec<&'static str>,
}

struct Entries {
    defaults: ServiceDefaultsSpec,
    resolver: ServiceResolverSpec,
    router: ServiceRouterSpec,
}

fn entries(target: &Target<'_>, policy: &MeshPolicy) -> Entries {
    let breaker = &policy.circuit_breaker;
    let retry = &policy.retry_policy;
    let interval = duration_text(breaker.interval.get());
    Entries {
        defaults: ServiceDefaultsSpec {
            protocol: "http",
            upstream_config: UpstreamConfig {
                defaults: UpstreamDefaults {
                    limits: Limits {
                        max_connections: policy.connection_pool.max_connections,
                        max_pending_requests: policy.connection_pool.max_pending_requests,
                    },
                    passive_health_check: PassiveHealthCheck {
                        interval: interval.clone(),
                        max_failures: breaker.consecutive_errors,
                        enforcing_consecutive_5xx: 100,
                        base_ejection_time: interval,
                    },
                },
            },
        },
        resolver: ServiceResolverSpec {
            connect_timeout: duration_text(retry.per_try_timeout.get()),
        },
        router: ServiceRouterSpec {
            routes: vec![Route {
                match_: RouteMatch {
                    http: HttpMatch { path_prefix: "/" },
                },
                destination: RouteDestination {
                    service: target.service.to_owned(),
                    request_timeout: duration_text(policy.request_timeout()),
                    num_retries: retry.attempts,
                    retry_on_connect_failure: retry.attempts > 0,
                    retry_on: if retry.attempts > 0 {
                        RETRY_ON.to_vec()
                    } else {
                        Vec::new()
                    },
                },
            }],
        },
    }
}

/// The three entries as Consul-on-Kubernetes custom resources.
pub(crate) fn render(target: &Target<'_>, policy: &MeshPolicy) -> Result<Vec<String>, MeshError> {
    let e = entries(target, policy);
    let meta = || target.meta(BTreeMap::new());
    const API: &str = "consul.hashicorp.com/v1alpha1";
    Ok(vec![
        to_yaml(&Object {
            api_version: API,
            kind: "ServiceDefaults",
            metadata: meta(),
            spec: e.defaults,
        })?,
        to_yaml(&Object {
            api_version: API,
            kind: "ServiceResolver",
            metadata: meta(),
            spec: e.resolver,
        })?,
        to_yaml(&Object {
            api_version: API,
            kind: "ServiceRouter",
            metadata: meta(),
            spec: e.router,
        })?,
    ])
}

/// The three entries in Consul's own JSON form, one object each.
pub(crate) fn config_entries(
    target: &Target<'_>,
    policy: &MeshPolicy,
) -> Result<Vec<Value>, MeshError> {
    let e = entries(target, policy);
    let emit = |e: serde_json::Error| MeshError::Emit(e.to_string());
    let entry = |kind: &str, spec: Value| -> Value {
        let mut object = Map::new();
        object.insert("Kind".to_owned(), Value::String(kind.to_owned()));
        object.insert("Name".to_owned(), Value::String(target.service.to_owned()));
        if let Value::Object(fields) = pascal_case(spec) {
            object.extend(fields);
        }
        Value::Object(object)
    };
    Ok(vec![
        entry(
            "service-defaults",
            serde_json::to_value(&e.defaults).map_err(emit)?,
        ),
        entry(
            "service-resolver",
            serde_json::to_value(&e.resolver).map_err(emit)?,
        ),
        entry(
            "service-router",
            serde_json::to_value(&e.router).map_err(emit)?,
        ),
    ])
}

/// Custom-resource keys to config-entry keys: `maxFailures` → `MaxFailures`, with Consul's
/// one acronym, `http` → `HTTP`. Values (such as `"5xx"`) are left alone.
fn pascal_case(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, v)| {
                    let key = if key == "http" {
                        "HTTP".to_owned()
                    } else {
                        let mut chars = key.chars();
                        chars
                            .next()
                            .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                            .unwrap_or_default()
                    };
                    (key, pascal_case(v))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(pascal_case).collect()),
        other => other,
    }
}

/// Pod annotations: injection, and Envoy metrics (merged with the application's) when
/// metrics are on. Consul turns on tracing and access logs mesh-wide in `proxy-defaults`,
/// so those two flags have no per-pod annotation.
pub(crate) fn pod_annotations(sidecar: &crate::options::SidecarConfig) -> BTreeMap<String, String> {
    let metrics = sidecar.inject_metrics.to_string();
    BTreeMap::from([
        (
            "consul.hashicorp.com/connect-inject".to_owned(),
            "true".to_owned(),
        ),
        (
            "consul.hashicorp.com/enable-metrics".to_owned(),
            metrics.clone(),
        ),
        (
            "consul.hashicorp.com/enable-metrics-merging".to_owned(),
            metrics,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pascal_case_keeps_values_and_knows_http() {
        let v = pascal_case(json!({"match": {"http": {"pathPrefix": "/"}}, "retryOn": ["5xx"]}));
        assert_eq!(
            v,
            json!({"Match": {"HTTP": {"PathPrefix": "/"}}, "RetryOn": ["5xx"]})
        );
    }
}
