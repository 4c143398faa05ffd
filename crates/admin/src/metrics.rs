//! Prometheus metrics, registered against a registry this node owns (no globals): admin
//! requests, store operations (through a store middleware layer — the seed's
//! `client.use(...)`), and registry instances by status.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use trellis_registry::ServiceRegistry;
use trellis_store::{StoreError, StoreRequest, StoreResponse};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    backend: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    service: String,
    status: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The node's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<RouteLabels>,
    store_operations: Family<StoreLabels, Counter>,
    store_seconds: HistogramFamily<OperationLabels>,
    instances: Family<InstanceLabels, Gauge>,
    stale: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "trellis_admin_requests",
            "Admin API requests by route, method and status",
            requests.clone(),
        );
        let request_seconds: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "trellis_admin_request_duration_seconds",
            "Admin API request latency",
            request_seconds.clone(),
        );
        let store_operations = Family::<StoreLabels, Counter>::default();
        registry.register(
            "trellis_store_operations",
            "Store operations by backend, operation and outcome (ok, error)",
            store_operations.clone(),
        );
        let store_seconds: HistogramFamily<OperationLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "trellis_store_operation_duration_seconds",
            "Store operation latency",
            store_seconds.clone(),
        );
        let instances = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "trellis_registry_instances",
            "Live instances in the registry snapshot by service and status",
            instances.clone(),
        );
        let stale = Gauge::default();
        registry.register(
            "trellis_registry_stale",
            "1 when the registry snapshot is stale (store unreachable)",
            stale.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            requests,
            request_seconds,
            store_operations,
            store_seconds,
            instances,
            stale,
        }
    }

    /// Registers more metrics (the gateway's) in this node's registry.
    pub fn register_with<T>(&self, register: impl FnOnce(&mut Registry) -> T) -> T {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        register(&mut registry)
    }

    /// Records one admin request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    fn observe_store(&self, backend: &str, operation: &str, ok: bool, seconds: f64) {
        self.store_operations
            .get_or_create(&StoreLabels {
                backend: backend.to_owned(),
                operation: operation.to_owned(),
                outcome: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.store_seconds
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
            })
            .observe(seconds);
    }

    /// Renders the Prometheus text format, with registry gauges taken from `registry` now.
    pub fn render(&self, registry: &ServiceRegistry) -> String {
        self.instances.clear();
        for (service, _) in registry.services() {
            for record in registry.discover(&service).iter() {
                self.instances
                    .get_or_create(&InstanceLabels {
                        service: service.clone(),
                        status: record.status.as_str().to_owned(),
                    })
                    .inc();
            }
        }
        self.stale.set(i64::from(registry.is_stale()));
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }

    /// A store middleware layer counting and timing every operation.
    pub fn store_layer(self: &Arc<Self>, backend: &'static str) -> StoreMetricsLayer {
        StoreMetricsLayer {
            metrics: self.clone(),
            backend,
        }
    }
}

/// Store middleware (a tower layer) that feeds [`Metrics`].
#[derive(Clone, Debug)]
pub struct StoreMetricsLayer {
    metrics: Arc<Metrics>,
    backend: &'static str,
}

impl<S> tower::Layer<S> for StoreMetricsLayer {
    type Service = StoreMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StoreMetricsService {
            inner,
            metrics: self.metrics.clone(),
            backend: self.backend,
        }
    }
}

/// The service made by [`StoreMetricsLayer`].
#[derive(Clone, Debug)]
pub struct StoreMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
    backend: &'static str,
}

impl<S> tower::Service<StoreRequest> for StoreMetricsService<S>
where
    S: tower::Service<StoreRequest, Response = StoreResponse, Error = StoreError>,
    S::Future: Send + 'static,
{
    type Response = StoreResponse;
    type Error = StoreError;
    type Future = Pin<Box<dyn Future<Output = Result<StoreResponse, StoreError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StoreError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        let operation = request.operation();
        let metrics = self.metrics.clone();
        let backend = self.backend;
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            metrics.observe_store(
                backend,
                operation,
                result.is_ok(),
                started.elapsed().as_secs_f64(),
            );
            result
        })
    }
}
