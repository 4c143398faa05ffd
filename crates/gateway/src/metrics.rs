//! Gateway metrics, registered in a Prometheus registry the caller owns, and the state the
//! admin API shows (routes, upstream instances with ejections, breakers, rate limits).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::proxy::State;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    service: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    service: String,
    version: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    service: String,
    version: String,
}

/// Request counters and latency histograms per route, service and status, and per
/// upstream instance version (for blue-green and canary comparisons).
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_seconds: Family<VersionLabels, Histogram, fn() -> Histogram>,
}

/// How one upstream attempt ended, the `status` label of
/// `trellis_gateway_upstream_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptStatus {
    /// Answered with this HTTP status (labelled by class: `1xx` … `5xx`).
    Answered(u16),
    /// No answer: connect error, reset, protocol error (`error`).
    Error,
    /// No answer head within the route's timeout (`timeout`).
    Timeout,
}

const STATUS_LABELS: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error", "timeout"];

impl AttemptStatus {
    fn index(self) -> usize {
        match self {
            AttemptStatus::Answered(code) => usize::from((code / 100).clamp(1, 5)) - 1,
            AttemptStatus::Error => 5,
            AttemptStatus::Timeout => 6,
        }
    }
}

/// One upstream instance's metric handles, looked up once when the instance set changes
/// so that a request only bumps atomics (no label allocation or map lookup).
#[derive(Debug)]
pub(crate) struct InstanceMetrics {
    requests: [Counter; 7],
    seconds: Histogram,
}

impl InstanceMetrics {
    pub(crate) fn observe(&self, status: AttemptStatus, seconds: f64) {
        self.requests[status.index()].inc();
        self.seconds.observe(seconds);
    }
}

/// One route's metric handles; the counter of each status code is looked up the first
/// time that code is seen and kept.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    family: Family<RequestLabels, Counter>,
    route: String,
    service: String,
    /// Index: status − 100, for 100..=599.
    by_status: Box<[OnceLock<Counter>]>,
    seconds: Histogram,
}

impl RouteMetrics {
    pub(crate) fn observe(&self, status: u16, seconds: f64) {
        let labels = || RequestLabels {
            route: self.route.clone(),
            service: self.service.clone(),
            status,
        };
        match self.by_status.get(usize::from(status.wrapping_sub(100))) {
            Some(slot) => slot
                .get_or_init(|| self.family.get_or_create_owned(&labels()))
                .inc(),
            None => self.family.get_or_create(&labels()).inc(),
        };
        self.seconds.observe(seconds);
    }
}

fn latency() -> Histogram {
    // 100 µs … ~3.3 s
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

impl GatewayMetrics {
    /// Registers the gateway's metrics in `registry`:
    /// `trellis_gateway_requests_total{route,service,status}`,
    /// `trellis_gateway_request_duration_seconds{route}`,
    /// `trellis_gateway_upstream_requests_total{service,version,status}` (one count per
    /// attempt; `status` is `1xx`…`5xx`, `error` or `timeout`; `version` is the instance's
    /// registry version, `unknown` when empty) and
    /// `trellis_gateway_upstream_request_duration_seconds{service,version}`.
    pub fn new(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "trellis_gateway_requests",
            "Requests through the gateway by route, service and status (0: no route matched)",
            requests.clone(),
        );
        let seconds: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency);
        registry.register(
            "trellis_gateway_request_duration_seconds",
            "Time to the response head, by route",
            seconds.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "trellis_gateway_upstream_requests",
            "Attempts sent to upstream instances by service, instance version and status \
             (1xx..5xx, error: no answer, timeout: no answer in time)",
            upstream_requests.clone(),
        );
        let upstream_seconds: Family<VersionLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency);
        registry.register(
            "trellis_gateway_upstream_request_duration_seconds",
            "Time from sending an attempt to the upstream's response head (or its failure), \
             by service and instance version",
            upstream_seconds.clone(),
        );
        GatewayMetrics {
            requests,
            seconds,
            upstream_requests,
            upstream_seconds,
        }
    }

    /// The handles of an instance of `service` running `version` (`unknown` when empty).
    pub(crate) fn instance(&self, service: &str, version: &str) -> InstanceMetrics {
        let version = if version.is_empty() {
            "unknown"
        } else {
            version
        };
        let counter = |status: &'static str| {
            self.upstream_requests.get_or_create_owned(&UpstreamLabels {
                service: service.to_owned(),
                version: version.to_owned(),
                status,
            })
        };
        InstanceMetrics {
            requests: STATUS_LABELS.map(counter),
            seconds: self.upstream_seconds.get_or_create_owned(&VersionLabels {
                service: service.to_owned(),
                version: version.to_owned(),
            }),
        }
    }

    /// The handles of a route.
    pub(crate) fn route(&self, route: &str, service: &str) -> RouteMetrics {
        RouteMetrics {
            family: self.requests.clone(),
            route: route.to_owned(),
            service: service.to_owned(),
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
            seconds: self.seconds.get_or_create_owned(&RouteLabels {
                route: route.to_owned(),
            }),
        }
    }

    pub(crate) fn observe(&self, route: &str, service: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                service: service.to_owned(),
                status,
            })
            .inc();
        self.seconds
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(seconds);
    }
}

/// A read-only view of a running gateway for admin endpoints; cheap to clone.
#[derive(Clone, Debug)]
pub struct GatewayInspector {
    pub(crate) state: Arc<State>,
}

impl GatewayInspector {
    /// The routes as configured, most specific first.
    pub fn routes(&self) -> Value {
        let table = self.state.table.load();
        Value::Array(
            table
                .routes
                .iter()
                .map(|r| {
                    let c = &r.config;
                    json!({
                        "path": c.path,
                        "service": c.service,
                        "strip_prefix": c.strip_prefix,
                        "methods": c.methods,
                        "host": c.host,
                        "timeout": trellis_core::format_duration(c.upstream_timeout()),
                        "retries": c.retries,
                        "retry_non_idempotent": c.retry_non_idempotent,
                        "upstream_protocol": match c.upstream_protocol {
                            crate::config::UpstreamProtocol::Http1 => "http1",
                            crate::config::UpstreamProtocol::H2c => "h2c",
                        },
                        "cors": r.cors.is_some(),
                        "load_balancer": r.balancer.strategy().to_string(),
                        "authentication": r.authenticate,
                        "authorization": r.authorize,
                        "rate_limit_class": r.rate_class,
                    })
                })
                .collect(),
        )
    }

    /// Per route: its upstream instances as the balancer sees them (in flight, failures,
    /// ejections) and its circuit breaker.
    pub fn upstreams(&self) -> Value {
        let table = self.state.table.load();
        Value::Array(
            table
                .routes
                .iter()
                .map(|r| {
                    json!({
                        "path": r.config.path,
                        "service": r.config.service,
                        "instances": r.balancer.status(),
                        "circuit_breaker": r.breaker.as_ref().map(|b| b.snapshot()),
                    })
                })
                .collect(),
        )
    }

    /// Rate-limit classes with their quotas, tracked keys, admitted and limited counts.
    pub fn rate_limits(&self) -> Value {
        let table = self.state.table.load();
        match &table.limiter {
            Some(limiter) => json!(limiter.stats()),
            None => json!([]),
        }
    }
}
