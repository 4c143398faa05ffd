#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![cfg(feature = "client")]
//! `mesh.create_client(…)` against a real HTTP server on 127.0.0.1, the mesh name resolved
//! to it (cluster DNS does not resolve here): the Host header is the mesh name, a 503 is
//! not retried, many failures open no breaker, and the mesh headers are passed on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::get;
use trellis_client::ClientError;
use trellis_mesh::{MeshClientOptions, MeshConfig, MeshContext, MeshProvider, ServiceMesh};

#[derive(Default)]
struct Counts {
    echo: AtomicU64,
    unavailable: AtomicU64,
}

async fn server() -> (SocketAddr, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let (c1, c2) = (counts.clone(), counts.clone());
    let app = Router::new()
        .route(
            "/echo",
            get(move |headers: HeaderMap| {
                let counts = c1.clone();
                async move {
                    counts.echo.fetch_add(1, Ordering::SeqCst);
                    let seen: BTreeMap<String, String> = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
                        .collect();
                    Json(seen)
                }
            }),
        )
        .route(
            "/unavailable",
            get(move || {
                let counts = c2.clone();
                async move {
                    counts.unavailable.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, counts)
}

fn mesh() -> ServiceMesh {
    let mut config = MeshConfig::new(MeshProvider::Istio);
    config.namespace = "shop".into();
    ServiceMesh::new(config).unwrap()
}

const HOST: &str = "user-service.shop.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_mesh_name_once_without_a_breaker() {
    let (addr, counts) = server().await;
    let client = mesh()
        .create_client_with("user-service", &MeshClientOptions::new().resolve(addr))
        .unwrap();

    // The Host header is the mesh name: the sidecar routes on it.
    let seen: BTreeMap<String, String> = client.get_json("/echo").await.unwrap();
    assert_eq!(seen["host"], HOST, "{seen:?}");
    assert_eq!(counts.echo.load(Ordering::SeqCst), 1);

    // A 503 is the mesh's to retry: exactly one attempt reaches the server (GET is
    // idempotent, so a default client would have tried 4 times).
    let err = client.get("/unavailable").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status, .. } if status == 503),
        "{err:?}"
    );
    assert_eq!(counts.unavailable.load(Ordering::SeqCst), 1);

    // Many failures in a row open no breaker (a default client's opens after 5).
    for _ in 0..30 {
        let err = client.get("/unavailable").await.unwrap_err();
        assert!(matches!(err, ClientError::Status { .. }), "{err:?}");
    }
    assert_eq!(counts.unavailable.load(Ordering::SeqCst), 31);
    assert!(client.breakers().is_empty());
    let seen: BTreeMap<String, String> = client.get_json("/echo").await.unwrap();
    assert_eq!(seen["host"], HOST);
    assert_eq!(counts.echo.load(Ordering::SeqCst), 2);
    assert_eq!(
        client.retry_budget().retries,
        0,
        "{:?}",
        client.retry_budget()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_headers_are_propagated_from_the_incoming_request() {
    let (addr, _) = server().await;
    let client = mesh()
        .create_client_with("user-service", &MeshClientOptions::new().resolve(addr))
        .unwrap();

    // The request being served, as a handler would see it.
    let mut incoming = HeaderMap::new();
    for (name, value) in [
        ("x-request-id", "req-7f3a"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ("x-b3-sampled", "1"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ("authorization", "Bearer secret"),
    ] {
        incoming.insert(name, HeaderValue::from_static(value));
    }
    let seen: BTreeMap<String, String> = MeshContext::from_headers(&incoming)
        .scope(async { client.get_json("/echo").await })
        .await
        .unwrap();
    for name in [
        "x-request-id",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "b3",
    ] {
        assert_eq!(
            seen.get(name),
            incoming[name].to_str().ok().map(str::to_owned).as_ref(),
            "{name}: {seen:?}"
        );
    }
    assert!(!seen.contains_key("authorization"), "only the mesh headers");

    // Without an incoming request: a fresh request id each time, a UUID.
    let a: BTreeMap<String, String> = client.get_json("/echo").await.unwrap();
    let b: BTreeMap<String, String> = client.get_json("/echo").await.unwrap();
    let id = &a["x-request-id"];
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id.matches('-').count(), 4, "{id}");
    assert_ne!(a["x-request-id"], b["x-request-id"]);
    assert!(!a.contains_key("x-b3-traceid"));

    // A header set on the request wins over the context's.
    let seen: BTreeMap<String, String> = MeshContext::from_headers(&incoming)
        .scope(async {
            client
                .get("/echo")
                .header("x-request-id", "mine")
                .send()
                .await?
                .json()
                .await
        })
        .await
        .unwrap();
    assert_eq!(seen["x-request-id"], "mine");
    assert_eq!(seen["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
}

#[test]
fn bad_names_and_ports_are_named() {
    let err = mesh().create_client("User_Service").unwrap_err();
    assert!(err.to_string().contains("User_Service"), "{err}");
    let err = mesh()
        .create_client_with("users", &MeshClientOptions::new().port(0))
        .unwrap_err();
    assert_eq!(err.field(), Some("port"));
}
