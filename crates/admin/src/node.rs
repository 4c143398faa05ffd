//! A Trellis node — what `trellis up` runs: the store (with its metrics middleware), the
//! registry, the configuration manager, the health monitor and the admin HTTP server, which
//! also lists the event bus's topics with their consumer groups' lag (`/v1/events/topics`).
//!
//! Tracing is configured once, by the `[tracing]` table (off without one; the `OTEL_*`
//! variables override its keys): the node builds one [`DistributedTracer`] with an
//! in-memory [`TraceBuffer`], traces store operations made inside a trace
//! ([`StoreTraceLayer`]), serves the buffer at `/v1/traces`, takes spans other processes
//! export over OTLP/HTTP at `POST /v1/traces` (point their `OTEL_EXPORTER_OTLP_ENDPOINT`
//! at the admin address) into the same buffer, counts exported and dropped
//! spans in `/metrics`, and hands the tracer to the gateway it runs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use trellis_config::{ConfigOptions, ConfigurationManager};
use trellis_events::EventBus;
use trellis_gateway::{ApiGateway, RunningGateway};
use trellis_health::{ServiceHealthMonitor, StoreCheck};
use trellis_registry::ServiceRegistry;
use trellis_store::Store;
use trellis_tracing::{DistributedTracer, StoreTraceLayer, TraceBuffer};

use crate::api::{AdminState, router};
use crate::metrics::Metrics;
use crate::settings::{Settings, SettingsError};

/// How long shutdown waits for in-flight admin requests.
const DRAIN: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Bad settings.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The store could not be opened.
    #[error("store {url}: {source}")]
    Store {
        /// The URL.
        url: String,
        /// What failed.
        #[source]
        source: trellis_store::StoreError,
    },
    /// The registry could not start.
    #[error(transparent)]
    Registry(#[from] trellis_registry::RegistryError),
    /// The configuration manager could not start.
    #[error(transparent)]
    Config(#[from] trellis_config::ConfigError),
    /// The admin address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The gateway could not start.
    #[error(transparent)]
    Gateway(#[from] trellis_gateway::GatewayError),
    /// The tracer could not start (its exporter, or a feature this build lacks).
    #[error(transparent)]
    Tracing(#[from] trellis_tracing::TracingError),
    /// The saga log could not be opened.
    #[error("saga log: {0}")]
    Saga(#[from] trellis_saga::SagaError),
    /// The event bus of `[events] bus` could not be opened.
    #[error("event bus {bus}: {source}")]
    Events {
        /// The `bus` setting.
        bus: String,
        /// What failed.
        #[source]
        source: trellis_events::EventError,
    },
    /// An admin server beyond loopback without a token.
    #[error(
        "the admin server would listen on {0}, beyond loopback, without a token: set admin.token (or TRELLIS_ADMIN_TOKEN), or listen on 127.0.0.1"
    )]
    Insecure(SocketAddr),
}

/// What `trellis gateway` runs: the gateway alone, over a registry on the configured store
/// (no admin server).
#[derive(Debug)]
pub struct GatewayNode {
    gateway: RunningGateway,
    registry: ServiceRegistry,
    tracer: DistributedTracer,
}

impl GatewayNode {
    /// Starts the gateway of `settings` (its `[gateway]` table must be present), traced as
    /// `settings.tracing` and the `OTEL_*` variables say.
    pub async fn start(settings: Settings) -> Result<GatewayNode, NodeError> {
        let (tracer, _buffer) = Node::tracer_for(&settings)?;
        GatewayNode::start_with_tracer(settings, tracer).await
    }

    /// Starts like [`GatewayNode::start`] with a tracer built by the caller (the one a
    /// binary installed globally with [`trellis_tracing::install`]).
    pub async fn start_with_tracer(
        settings: Settings,
        tracer: DistributedTracer,
    ) -> Result<GatewayNode, NodeError> {
        let settings = settings.validate()?;
        let Some(config) = settings.gateway.clone() else {
            return Err(NodeError::Settings(SettingsError::Invalid {
                key: "gateway",
                reason: "the settings have no [gateway] table".into(),
            }));
        };
        let store = Store::open(&settings.store.url)
            .await
            .map_err(|source| NodeError::Store {
                url: settings.store.url.clone(),
                source,
            })?;
        let registry = ServiceRegistry::start(&store, settings.registry.options()).await?;
        let gateway = ApiGateway::new(config, registry.clone())?
            .with_tracer(tracer.clone())
            .start()
            .await?;
        Ok(GatewayNode {
            gateway,
            registry,
            tracer,
        })
    }

    /// Where the gateway listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.gateway.local_addr()
    }

    /// The gateway's tracer.
    pub fn tracer(&self) -> &DistributedTracer {
        &self.tracer
    }

    /// Drains the gateway, stops the registry and exports the spans still queued.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.gateway.shutdown().await;
        self.registry.shutdown().await?;
        self.tracer.flush();
        Ok(())
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    admin_addr: SocketAddr,
    registry: ServiceRegistry,
    store: Store,
    tracer: DistributedTracer,
    trace_buffer: Option<TraceBuffer>,
    gateway: Option<RunningGateway>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

impl Node {
    /// Starts every part and the admin server; returns once it accepts connections.
    /// Tracing follows `settings.tracing` with the process's `OTEL_*` variables applied.
    pub async fn start(settings: Settings) -> Result<Node, NodeError> {
        let (tracer, buffer) = Node::tracer_for(&settings)?;
        Node::start_with_tracer(settings, tracer, buffer).await
    }

    /// The tracer and trace buffer [`Node::start`] would build for `settings` (no buffer
    /// when tracing is disabled).
    pub fn tracer_for(
        settings: &Settings,
    ) -> Result<(DistributedTracer, Option<TraceBuffer>), NodeError> {
        let config = settings.tracing_config()?;
        let buffer = config
            .enabled
            .then(|| TraceBuffer::new(config.buffer_spans));
        let tracer = DistributedTracer::from_config(&config, buffer.clone())?;
        Ok((tracer, buffer))
    }

    /// Starts like [`Node::start`] with a tracer built by the caller (the one a binary
    /// installed globally with [`trellis_tracing::install`]) and the buffer it keeps spans
    /// in, served at `/v1/traces` when given. `settings.tracing` is not read again.
    pub async fn start_with_tracer(
        settings: Settings,
        tracer: DistributedTracer,
        trace_buffer: Option<TraceBuffer>,
    ) -> Result<Node, NodeError> {
        let settings = settings.validate()?;
        let addr = settings.admin_addr()?;
        if !addr.ip().is_loopback() && settings.admin.token.is_none() {
            return Err(NodeError::Insecure(addr));
        }
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(&settings.store.url)
            .await
            .map_err(|source| NodeError::Store {
                url: settings.store.url.clone(),
                source,
            })?;
        let mut store = store.clone().layer(metrics.store_layer(store.backend()));
        if tracer.is_enabled() {
            // Operations inside a trace (a gateway request, an admin call) become spans.
            store = store
                .clone()
                .layer(StoreTraceLayer::new(tracer.clone()).backend(store.backend()));
        }
        metrics.register_with(|registry| tracer.stats().register_metrics(registry));
        let registry = ServiceRegistry::start(&store, settings.registry.options()).await?;
        let mut config_options = ConfigOptions {
            config_table: settings.config.config_table.clone(),
            refresh_interval: settings.config.refresh_interval.get(),
            ..ConfigOptions::default()
        };
        if let Some(env) = &settings.config.environment {
            config_options.environment = env.clone();
        }
        let config = ConfigurationManager::new(&store, config_options)?;
        let monitor = ServiceHealthMonitor::builder("trellis-admin")
            .check("store", StoreCheck::new(store.clone()))
            .build();
        let mut state = AdminState::new(
            store.clone(),
            registry.clone(),
            config,
            monitor,
            metrics.clone(),
            settings.admin.token.clone(),
        )
        // GET /v1/sagas, /v1/sagas/{id}; POST …/retry, …/abort (the saga log in the store).
        .with_routes(trellis_saga::admin::router(store.clone())?)
        // GET /v1/deployments, /v1/deployments/{service} (deployment records in the store).
        .with_routes(trellis_deploy::admin_router(store.clone()));
        if let Some(buffer) = &trace_buffer {
            // GET /v1/traces, /v1/traces/{trace_id}; POST /v1/traces (OTLP/HTTP from other
            // processes, protobuf or JSON, into the same buffer).
            state = state
                .with_routes(trellis_tracing::admin::router(buffer.clone()))
                .with_routes(trellis_tracing::receiver::router(buffer.clone()));
        }
        // GET /v1/events/topics, /v1/events/topics/{topic}: topics of the bus in
        // `[events] bus` (by default the embedded log in this store, so services sharing
        // the SQLite file show up) with their consumer groups' lag.
        let events = EventBus::from_url(&settings.events.bus, &store)
            .await
            .map_err(|source| NodeError::Events {
                bus: settings.events.bus.clone(),
                source,
            })?;
        state = state.with_routes(trellis_events::admin_router(events.transport().clone()));
        let gateway = match settings.gateway.clone() {
            Some(config) => {
                let gateway_metrics = metrics.register_with(trellis_gateway::GatewayMetrics::new);
                Some(
                    ApiGateway::new(config, registry.clone())?
                        .with_metrics(gateway_metrics)
                        .with_tracer(tracer.clone())
                        .start()
                        .await?,
                )
            }
            None => None,
        };
        if let Some(gateway) = &gateway {
            state = state.with_gateway(gateway.inspector());
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NodeError::Bind { addr, source })?;
        let admin_addr = listener
            .local_addr()
            .map_err(|source| NodeError::Bind { addr, source })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(state);
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%admin_addr, store = %store.location(), backend = store.backend(), "trellis node up");
        Ok(Node {
            admin_addr,
            registry,
            store,
            tracer,
            trace_buffer,
            gateway,
            stop: Some(stop),
            server,
        })
    }

    /// Where the admin server listens (the real port when 0 was asked for).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where the gateway listens, when one runs.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(RunningGateway::local_addr)
    }

    /// The node's registry.
    pub fn registry(&self) -> &ServiceRegistry {
        &self.registry
    }

    /// The node's store (with its middleware).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The node's tracer (disabled when `[tracing] enabled = false`), for services embedded
    /// in the node: give it to their `ServiceClient`s and `EventBus`.
    pub fn tracer(&self) -> &DistributedTracer {
        &self.tracer
    }

    /// The in-memory buffer of recent traces served at `/v1/traces`; `None` when tracing
    /// is disabled.
    pub fn trace_buffer(&self) -> Option<&TraceBuffer> {
        self.trace_buffer.as_ref()
    }

    /// Stops accepting requests, lets in-flight ones finish (up to 10 s), and deregisters
    /// every instance registered through this node.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
        match tokio::time::timeout(DRAIN, &mut self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "admin server task failed"),
            Err(_) => {
                tracing::warn!("in-flight admin requests still running after {DRAIN:?}; closing");
                self.server.abort();
            }
        }
        self.registry.shutdown().await?;
        // Export what is queued (within the export timeout) before the process exits.
        self.tracer.flush();
        tracing::info!("trellis node stopped; its instances are deregistered");
        Ok(())
    }

    /// Runs until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(
        settings: Settings,
        signal: impl Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let node = Node::start(settings).await?;
        signal.await;
        node.shutdown().await
    }
}
