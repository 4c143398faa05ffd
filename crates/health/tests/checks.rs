//! The built-in checks against real peers: an axum server and listeners on 127.0.0.1:0,
//! a SQLite store in a temporary folder.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use trellis_health::{
    HealthCheck, HealthStatus, HttpCheck, ServiceHealthMonitor, StoreCheck, TcpCheck,
};
use trellis_store::Store;

/// Serves `app` on a fresh port of 127.0.0.1; the listener is bound before this returns.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An address on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn http_check_follows_the_peer_status() {
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&healthy);
    let app = Router::new().route(
        "/health",
        get(move || {
            let flag = Arc::clone(&flag);
            async move {
                if flag.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }
        }),
    );
    let addr = serve(app).await;
    let url = format!("http://{addr}/health");
    let check = HttpCheck::new(&url);
    assert_eq!(check.url(), url);

    assert_eq!(check.check().await, Ok(()));

    healthy.store(false, Ordering::SeqCst);
    let error = check.check().await.unwrap_err();
    assert_eq!(
        error,
        format!("GET {url} returned 500 Internal Server Error")
    );

    // A missing route is not 2xx either.
    let missing = HttpCheck::new(format!("http://{addr}/nope"))
        .check()
        .await
        .unwrap_err();
    assert!(missing.contains("404"), "{missing}");

    healthy.store(true, Ordering::SeqCst);
    assert_eq!(check.check().await, Ok(()));
}

#[tokio::test]
async fn http_check_to_a_closed_port_names_the_connect_error() {
    let url = format!("http://{}/health", closed_port());
    let error = HttpCheck::new(&url).check().await.unwrap_err();
    assert!(
        error.starts_with(&format!("GET {url} failed: error sending request: ")),
        "{error}"
    );
    assert!(error.contains("tcp connect error"), "{error}");
    assert!(error.to_lowercase().contains("refused"), "{error}");
    assert_eq!(error.matches(&url).count(), 1, "URL named once: {error}");
}

#[tokio::test]
async fn http_check_with_an_invalid_url_fails_with_the_reason() {
    let error = HttpCheck::new("not a url").check().await.unwrap_err();
    assert!(error.starts_with("GET not a url failed: "), "{error}");
}

#[tokio::test]
async fn tcp_check_against_a_listener_and_a_closed_port() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = TcpCheck::new(listener.local_addr().unwrap().to_string());
    assert_eq!(open.check().await, Ok(()));

    let addr = closed_port().to_string();
    let closed = TcpCheck::new(&addr);
    assert_eq!(closed.addr(), addr);
    let error = closed.check().await.unwrap_err();
    assert!(
        error.starts_with(&format!("TCP connect to {addr} failed: ")),
        "{error}"
    );
    assert!(error.to_lowercase().contains("refused"), "{error}");

    let unparsable = TcpCheck::new("no-port-here").check().await.unwrap_err();
    assert!(
        unparsable.starts_with("TCP connect to no-port-here failed: "),
        "{unparsable}"
    );
    drop(listener);
}

#[tokio::test]
async fn store_check_passes_then_fails_once_the_file_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/h.db", dir.path().display()))
        .await
        .unwrap();
    let monitor = ServiceHealthMonitor::builder("svc")
        .check("store", StoreCheck::new(store.clone()))
        .cache_ttl(std::time::Duration::ZERO)
        .build();
    assert_eq!(monitor.check().await.status, HealthStatus::Healthy);

    std::fs::remove_file(dir.path().join("h.db")).unwrap();
    assert!(store.ping().await.unwrap_err().is_unavailable());

    let report = monitor.check().await;
    assert_eq!(report.status, HealthStatus::Unhealthy);
    let error = report.checks[0].error.as_deref().unwrap();
    assert!(
        error.starts_with("store ping failed: store unavailable (sqlite)"),
        "{error}"
    );
    assert!(error.contains("h.db"), "names the file: {error}");
}
