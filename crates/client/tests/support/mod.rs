//! Real HTTP servers on 127.0.0.1 and a real registry on a temporary SQLite file.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use trellis_registry::{Instance, RegistryOptions, ServiceRegistry};
use trellis_store::Store;

/// A registry on its own SQLite file (kept alive with it).
pub(crate) struct Env {
    pub(crate) registry: ServiceRegistry,
    _dir: tempfile::TempDir,
}

pub(crate) async fn env() -> Env {
    env_with(RegistryOptions {
        refresh_interval: Duration::from_millis(20),
        ..Default::default()
    })
    .await
}

pub(crate) async fn env_with(options: RegistryOptions) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/registry.db", dir.path().display()))
        .await
        .unwrap();
    let registry = ServiceRegistry::start(&store, options).await.unwrap();
    Env {
        registry,
        _dir: dir,
    }
}

impl Env {
    /// Registers `server` as instance `id` of `service`.
    pub(crate) async fn register(&self, service: &str, id: &str, server: &Server) {
        self.register_instance(service, Instance::new(id, "127.0.0.1", server.addr.port()))
            .await;
    }

    pub(crate) async fn register_instance(&self, service: &str, instance: Instance) {
        self.registry.register(service, instance).await.unwrap();
    }
}

/// An HTTP server whose connections all live inside one task: [`Server::kill`] aborts it,
/// which closes the listener and every open connection at once, as a crash would.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    pub(crate) fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn serve(app: Router) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(app.clone());
                    connections.spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Server { addr, task }
}

/// A shared request counter.
#[derive(Clone, Default)]
pub(crate) struct Hits(Arc<AtomicUsize>);

impl Hits {
    pub(crate) fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Polls `check` every 5 ms until it holds or `limit` passes.
pub(crate) async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    check()
}
