//! Two "services" over real HTTP on 127.0.0.1: a front service whose handler calls a
//! back service with a traced client, and a back service that opens a server span from the
//! incoming headers.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::get;
use trellis_tracing::DistributedTracer;

/// Serves `router` on 127.0.0.1:0 in the background; returns its address.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    addr
}

/// The back service: `GET /profiles/{id}` answers 200 inside a server span with a child
/// `db_query` span; `GET /fail` answers 503 (span marked failed).
pub fn back_service(tracer: DistributedTracer) -> Router {
    Router::new()
        .route("/profiles/{id}", get(profile))
        .route("/fail", get(fail))
        .with_state(tracer)
}

async fn profile(
    State(tracer): State<DistributedTracer>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    let server = tracer.http_server_span(&Method::GET, "/profiles/u1", &headers);
    server.set_route("/profiles/{id}");
    server.set_service("profile-service");
    let trace_id = server.trace_id();
    let db = tracer.start_child("db_query", &server);
    db.set_tag("db.table", "profiles");
    db.finish();
    server.finish(200);
    (StatusCode::OK, trace_id)
}

async fn fail(State(tracer): State<DistributedTracer>, headers: HeaderMap) -> StatusCode {
    let server = tracer.http_server_span(&Method::GET, "/fail", &headers);
    server.set_route("/fail");
    server.finish(503);
    StatusCode::SERVICE_UNAVAILABLE
}

/// What the front service saw: its root span's trace id and the back service's answer.
pub struct Call {
    pub trace_id: String,
    pub root_span_id: String,
    pub back_trace_id: String,
    pub status: u16,
}

/// The front service's work: a root span `get_user_profile` tagged `user.id`, with a
/// client span calling `http://{back}{path}` over real HTTP.
pub async fn front_call(tracer: &DistributedTracer, back: SocketAddr, path: &str) -> Call {
    let root = tracer.start_span("get_user_profile");
    root.set_tag("user.id", "u1");
    let url = format!("http://{back}{path}");
    let (status, body) = root
        .in_scope(async {
            let mut headers = HeaderMap::new();
            let client_span = tracer.http_client_span(&Method::GET, &url, &mut headers);
            let response = reqwest::Client::new()
                .get(&url)
                .headers(headers)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            client_span.finish(status);
            (status, body)
        })
        .await;
    let call = Call {
        trace_id: root.trace_id(),
        root_span_id: root.span_id(),
        back_trace_id: body,
        status,
    };
    root.finish();
    call
}
