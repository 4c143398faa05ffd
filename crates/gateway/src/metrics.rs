//! Gateway metrics, registered in a Prometheus registry the caller owns, and the state the
//! admin API shows (routes, upstream instances with ejections, breakers, rate limits).

use std::sync::Arc;

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

/// Request counters and latency histograms per route, service and status.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

fn latency() -> Histogram {
    // 100 µs … ~3.3 s
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

impl GatewayMetrics {
    /// Registers the gateway's metrics in `registry`:
    /// `trellis_gateway_requests_total{route,service,status}` and
    /// `trellis_gateway_request_duration_seconds{route}`.
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
        GatewayMetrics { requests, seconds }
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
