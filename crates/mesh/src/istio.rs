//! Istio: `VirtualService` (retries, per-try and request timeouts), `DestinationRule`
//! (connection pool, outlier detection) and `Telemetry` (the sidecar flags), all at the
//! `v1` API that Istio 1.22 and later serve.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::k8s::{Object, duration_text, to_yaml};
use crate::options::{MeshPolicy, SidecarConfig};
use crate::{MeshError, Target};

/// Envoy retry conditions: 5xx answers, resets, refused connections and refused streams.
pub(crate) const RETRY_ON: &str = "5xx,reset,connect-failure,refused-stream";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VirtualServiceSpec {
    hosts: Vec<String>,
    http: Vec<HttpRoute>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpRoute {
    name: &'static str,
    route: Vec<RouteDestination>,
    timeout: String,
    retries: HttpRetry,
}

#[derive(Serialize)]
struct RouteDestination {
    destination: Destination,
}

#[derive(Serialize)]
struct Destination {
    host: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpRetry {
    attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_try_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_on: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DestinationRuleSpec {
    host: String,
    traffic_policy: TrafficPolicy,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TrafficPolicy {
    connection_pool: ConnectionPoolSettings,
    outlier_detection: OutlierDetection,
}

#[derive(Serialize)]
struct ConnectionPoolSettings {
    tcp: TcpSettings,
    http: HttpSettings,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TcpSettings {
    max_connections: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpSettings {
    http1_max_pending_requests: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutlierDetection {
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: i32,
    interval: String,
    base_ejection_time: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TelemetrySpec {
    selector: WorkloadSelector,
    tracing: Vec<TracingEntry>,
    access_logging: Vec<AccessLoggingEntry>,
    metrics: Vec<MetricsEntry>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadSelector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TracingEntry {
    disable_span_reporting: bool,
}

#[derive(Serialize)]
struct AccessLoggingEntry {
    disabled: bool,
}

#[derive(Serialize)]
struct MetricsEntry {
    overrides: Vec<MetricsOverride>,
}

#[derive(Serialize)]
struct MetricsOverride {
    disabled: bool,
}

/// The Istio documents for `target`: VirtualService, DestinationRule, Telemetry.
pub(crate) fn render(
    target: &Target<'_>,
    policy: &MeshPolicy,
    sidecar: &SidecarConfig,
) -> Result<Vec<String>, MeshError> {
    let meta = || target.meta(BTreeMap::new());
    let host = target.host();
    let retry = &policy.retry_policy;
    let retries = if retry.attempts == 0 {
        HttpRetry {
            attempts: 0,
            per_try_timeout: None,
            retry_on: None,
        }
    } else {
        HttpRetry {
            attempts: retry.attempts,
            per_try_timeout: Some(duration_text(retry.per_try_timeout.get())),
            retry_on: Some(RETRY_ON),
        }
    };
    let virtual_service = Object {
        api_version: "networking.istio.io/v1",
        kind: "VirtualService",
        metadata: meta(),
        spec: VirtualServiceSpec {
            hosts: vec![host.clone()],
            http: vec![HttpRoute {
                name: "default",
                route: vec![RouteDestination {
                    destination: Destination { host: host.clone() },
                }],
                timeout: duration_text(policy.request_timeout()),
                retries,
            }],
        },
    };
    let breaker = &policy.circuit_breaker;
    let interval = duration_text(breaker.interval.get());
    let destination_rule = Object {
        api_version: "networking.istio.io/v1",
        kind: "DestinationRule",
        metadata: meta(),
        spec: DestinationRuleSpec {
            host,
            traffic_policy: TrafficPolicy {
                connection_pool: ConnectionPoolSettings {
                    tcp: TcpSettings {
                        max_connections: policy.connection_pool.max_connections,
                    },
                    http: HttpSettings {
                        http1_max_pending_requests: policy.connection_pool.max_pending_requests,
                    },
                },
                outlier_detection: OutlierDetection {
                    consecutive_5xx_errors: breaker.consecutive_errors,
                    interval: interval.clone(),
                    base_ejection_time: interval,
                },
            },
        },
    };
    let telemetry = Object {
        api_version: "telemetry.istio.io/v1",
        kind: "Telemetry",
        metadata: meta(),
        spec: TelemetrySpec {
            selector: WorkloadSelector {
                match_labels: BTreeMap::from([("app".to_owned(), target.service.to_owned())]),
            },
            tracing: vec![TracingEntry {
                disable_span_reporting: !sidecar.inject_tracing,
            }],
            access_logging: vec![AccessLoggingEntry {
                disabled: !sidecar.inject_logging,
            }],
            metrics: vec![MetricsEntry {
                overrides: vec![MetricsOverride {
                    disabled: !sidecar.inject_metrics,
                }],
            }],
        },
    };
    Ok(vec![
        to_yaml(&virtual_service)?,
        to_yaml(&destination_rule)?,
        to_yaml(&telemetry)?,
    ])
}

/// Pod labels and annotations that turn on Istio's sidecar and set the sidecar flags that
/// Istio reads per pod (metrics merging; tracing and access logs are in the Telemetry).
pub(crate) fn pod_metadata(
    sidecar: &SidecarConfig,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let labels = BTreeMap::from([("sidecar.istio.io/inject".to_owned(), "true".to_owned())]);
    let annotations = BTreeMap::from([
        ("sidecar.istio.io/inject".to_owned(), "true".to_owned()),
        (
            "prometheus.istio.io/merge-metrics".to_owned(),
            sidecar.inject_metrics.to_string(),
        ),
    ]);
    (labels, annotations)
}
