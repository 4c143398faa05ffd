//! The listening side: accept, HTTP/1.x (the gateway's own, see `h1`) and, through hyper,
//! HTTP/2 (h2c) and upgrades, with limits and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use trellis_registry::ServiceRegistry;

use crate::config::{ConfigError, GatewayConfig};
use crate::h1::{self, ConnLimits, HeadInfo, Served};
use crate::proxy::{Peer, State, handle};
use crate::route::RouteTable;

/// How long shutdown waits for in-flight requests.
const DRAIN: Duration = Duration::from_secs(10);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start a gateway worker thread: {source}")]
    Worker {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The API gateway — the seed's `APIGateway`: routes requests to the instances the registry
/// knows, picked by a load balancer, with forwarding headers, request ids and limits.
///
/// Upstreams come from the registry's snapshot (a memory read per request, never a store
/// read). Routes can be replaced while serving with [`RunningGateway::reload`]; requests in
/// flight finish on the routes they started with.
#[derive(Debug)]
pub struct ApiGateway {
    config: GatewayConfig,
    registry: ServiceRegistry,
    metrics: Option<crate::metrics::GatewayMetrics>,
    tracer: Option<trellis_tracing::DistributedTracer>,
}

impl ApiGateway {
    /// A gateway for `config` over `registry`.
    pub fn new(config: GatewayConfig, registry: ServiceRegistry) -> Result<Self, GatewayError> {
        Ok(ApiGateway {
            config: config.validate()?,
            registry,
            metrics: None,
            tracer: None,
        })
    }

    /// Records request metrics in `metrics` (see [`GatewayMetrics::new`](crate::GatewayMetrics::new)).
    #[must_use]
    pub fn with_metrics(mut self, metrics: crate::metrics::GatewayMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records a server span per request (route, service, status and the instance that
    /// answered; parent from incoming W3C `traceparent` or B3 headers, a new root when
    /// they are missing or malformed) and a client span per upstream attempt, whose
    /// context replaces the client's trace headers upstream. Defaults to none: trace
    /// headers pass through untouched and nothing is recorded.
    #[must_use]
    pub fn with_tracer(mut self, tracer: trellis_tracing::DistributedTracer) -> Self {
        self.tracer = Some(tracer);
        self
    }

    /// Binds the configured address and serves in the background: on worker threads of
    /// its own, or as tasks of the current runtime with `workers = "runtime"` (see
    /// [`Workers`](crate::Workers)).
    pub async fn start(self) -> Result<RunningGateway, GatewayError> {
        let addr = self.config.listen_addr()?;
        // Resolved once: the pool's slots and the threads must agree.
        let threads = self.config.workers.threads();
        let verifier = match self.config.authentication.as_ref().filter(|a| a.enabled) {
            Some(auth) => Some(trellis_auth::JwtVerifier::from_config(auth).map_err(|e| {
                GatewayError::Config(ConfigError::Invalid {
                    key: "authentication".into(),
                    reason: e.to_string(),
                })
            })?),
            None => None,
        };
        let routes = self.config.routes.len();
        let (stop, stopped) = watch::channel(false);
        let (local, state, done) = match threads {
            None => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| GatewayError::Bind { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| GatewayError::Bind { addr, source })?;
                let state = self.into_state(1, verifier);
                let (finished, done) = oneshot::channel();
                tokio::spawn(accept_loop(listener, state.clone(), stopped, finished));
                (local, state, vec![done])
            }
            Some(threads) => {
                // Every listener is bound before any thread starts: a bind error is
                // reported here and leaves nothing running.
                let mut workers = Vec::with_capacity(threads);
                let mut local = addr;
                if threads > 1 {
                    // `SO_REUSEPORT` would let these sockets share the port with any other
                    // process that sets it too (a second node started on the same
                    // config): a plain socket first, so that a port in use is refused as
                    // it is with one socket; the workers' sockets then take its port.
                    let probe = std::net::TcpListener::bind(addr)
                        .map_err(|source| GatewayError::Bind { addr, source })?;
                    local = probe
                        .local_addr()
                        .map_err(|source| GatewayError::Bind { addr, source })?;
                }
                for _ in 0..threads {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|source| GatewayError::Worker { source })?;
                    // Registered with the worker's own reactor.
                    let bound = {
                        let _entered = runtime.enter();
                        bind_shared(local, threads > 1)
                    };
                    // In a `Worker` before anything can fail: on an error below, its
                    // runtime is shut down without blocking.
                    let mut worker = Worker {
                        runtime: Some(runtime),
                        listener: None,
                    };
                    let listener = bound.map_err(|source| GatewayError::Bind { addr, source })?;
                    // The port the first socket got (when 0 was asked for with one worker)
                    // is the one reported.
                    local = listener
                        .local_addr()
                        .map_err(|source| GatewayError::Bind { addr, source })?;
                    worker.listener = Some(listener);
                    workers.push(worker);
                }
                let state = self.into_state(threads, verifier);
                let mut done = Vec::with_capacity(threads);
                for (slot, mut worker) in workers.into_iter().enumerate() {
                    let (state, stopped) = (state.clone(), stopped.clone());
                    let (finished, finished_rx) = oneshot::channel();
                    std::thread::Builder::new()
                        .name(format!("trellis-gateway-{slot}"))
                        .spawn(move || {
                            crate::pool::set_worker_slot(slot);
                            crate::deadline::keep_timers();
                            if let (Some(runtime), Some(listener)) =
                                (&worker.runtime, worker.listener.take())
                            {
                                runtime.block_on(accept_loop(listener, state, stopped, finished));
                            }
                            // Before the runtime they belong to.
                            crate::deadline::drop_timers();
                        })
                        .map_err(|source| GatewayError::Worker { source })?;
                    done.push(finished_rx);
                }
                (local, state, done)
            }
        };
        tracing::info!(
            addr = %local,
            routes,
            workers = threads.unwrap_or(0),
            "gateway listening"
        );
        Ok(RunningGateway {
            addr: local,
            state,
            stop,
            done,
        })
    }

    fn into_state(self, workers: usize, verifier: Option<trellis_auth::JwtVerifier>) -> Arc<State> {
        Arc::new(State::new(
            &self.config,
            workers,
            self.registry,
            verifier,
            self.metrics,
            self.tracer,
        ))
    }
}

/// A worker thread's runtime and listener. Its runtime is shut down without blocking
/// when dropped: when starting fails half-way (dropping a runtime inside an async context
/// would panic), and when the worker ends (connections past the drain deadline are cut,
/// not waited for).
struct Worker {
    runtime: Option<tokio::runtime::Runtime>,
    listener: Option<TcpListener>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.listener.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A listening socket on `addr`, with `SO_REUSEPORT` when `shared` (several workers, one
/// socket each, the kernel spreading connections over them).
fn bind_shared(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A gateway serving in the background.
#[derive(Debug)]
pub struct RunningGateway {
    addr: SocketAddr,
    state: Arc<State>,
    /// Set (or dropped) to stop every worker.
    stop: watch::Sender<bool>,
    /// One per worker, completed when it has drained.
    done: Vec<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl RunningGateway {
    /// A read-only view for admin endpoints.
    pub fn inspector(&self) -> crate::metrics::GatewayInspector {
        crate::metrics::GatewayInspector {
            state: self.state.clone(),
        }
    }

    /// Where it listens (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the routes (with their balancers, breakers and rate limits, which start
    /// afresh); requests already in flight are not disturbed. The listen address, limits
    /// and authentication keys stay as they were at start.
    pub fn reload(&self, config: GatewayConfig) -> Result<(), GatewayError> {
        let config = config.validate()?;
        self.state.table.store(Arc::new(RouteTable::from_config(
            &config,
            self.state.metrics.as_ref(),
        )));
        tracing::info!(routes = config.routes.len(), "gateway routes reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish (up to 10 s), then returns.
    /// Dropping a running gateway does the same in the background.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for done in self.done {
            // An error: the worker ended without saying so (it panicked).
            let _ = done.await;
        }
    }
}

/// Serves `listener`'s connections until `stopped` changes (or its sender is dropped), then
/// drains them and completes `finished`.
async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
    finished: oneshot::Sender<()>,
) {
    // Connections handed to hyper (h2c, upgrades) drain through `graceful`; the
    // gateway's own HTTP/1 connections each hold a receiver of `drain`, which tells them
    // to finish the request in flight and close, and is dropped when they end.
    let graceful = GracefulShutdown::new();
    let (drain, drain_rx) = watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.limits.header_read_timeout.get())
        .writev(false)
        .max_buf_size(state.limits.max_header_bytes);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let limits = ConnLimits {
        max_head: state.limits.max_header_bytes,
        header_read_timeout: state.limits.header_read_timeout.get(),
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let peer = Arc::new(Peer::new(remote));
                let drain = drain_rx.clone();
                let watcher = graceful.watcher();
                let builder = builder.clone();
                tokio::spawn(async move {
                    let served = {
                        let (state, peer) = (&state, &peer);
                        h1::serve(
                            stream,
                            limits,
                            |request, info| handle(state.clone(), request, peer.clone(), info),
                            drain,
                        )
                        .await
                    };
                    let Served::Handover(io) = served else {
                        return;
                    };
                    // hyper writes the map only: received headers go into it.
                    let service = service_fn(move |request| {
                        let answer = handle(state.clone(), request, peer.clone(), HeadInfo::UNKNOWN);
                        async move {
                            Ok::<_, std::convert::Infallible>(answer.await.into_response())
                        }
                    });
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    drop(drain_rx);
    let _ = drain.send(true);
    let drained = async {
        drain.closed().await;
        graceful.shutdown().await;
    };
    if tokio::time::timeout(DRAIN, drained).await.is_err() {
        tracing::warn!("gateway connections still open after {DRAIN:?}; closing");
    }
    let _ = finished.send(());
}
