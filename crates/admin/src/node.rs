//! A Trellis node — what `trellis up` runs: the store (with its metrics middleware), the
//! registry, the configuration manager, the health monitor and the admin HTTP server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use trellis_config::{ConfigOptions, ConfigurationManager};
use trellis_gateway::{ApiGateway, RunningGateway};
use trellis_health::{ServiceHealthMonitor, StoreCheck};
use trellis_registry::ServiceRegistry;
use trellis_store::Store;

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
}

impl GatewayNode {
    /// Starts the gateway of `settings` (its `[gateway]` table must be present).
    pub async fn start(settings: Settings) -> Result<GatewayNode, NodeError> {
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
        let gateway = ApiGateway::new(config, registry.clone())?.start().await?;
        Ok(GatewayNode { gateway, registry })
    }

    /// Where the gateway listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.gateway.local_addr()
    }

    /// Drains the gateway and stops the registry.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.gateway.shutdown().await;
        self.registry.shutdown().await?;
        Ok(())
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    admin_addr: SocketAddr,
    registry: ServiceRegistry,
    store: Store,
    gateway: Option<RunningGateway>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

impl Node {
    /// Starts every part and the admin server; returns once it accepts connections.
    pub async fn start(settings: Settings) -> Result<Node, NodeError> {
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
        let store = store.clone().layer(metrics.store_layer(store.backend()));
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
        );
        let gateway = match settings.gateway.clone() {
            Some(config) => {
                let gateway_metrics = metrics.register_with(trellis_gateway::GatewayMetrics::new);
                Some(
                    ApiGateway::new(config, registry.clone())?
                        .with_metrics(gateway_metrics)
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
