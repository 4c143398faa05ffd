//! The admin HTTP API: registry, configuration, health and metrics as JSON over HTTP, so a
//! service in any language can take part.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use trellis_config::ConfigurationManager;
use trellis_core::{HumanDuration, NameKind, validate_name};
use trellis_health::ServiceHealthMonitor;
use trellis_registry::{HealthCheckSpec, Instance, ServiceRegistry};
use trellis_store::Store;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Longest a config watch request may wait.
const MAX_WATCH: Duration = Duration::from_secs(60);

/// Everything the admin API serves.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<StateInner>,
}

struct StateInner {
    store: Store,
    registry: ServiceRegistry,
    config: ConfigurationManager,
    monitor: ServiceHealthMonitor,
    metrics: Arc<Metrics>,
    token: Option<String>,
    gateway: Option<trellis_gateway::GatewayInspector>,
    extra: Option<Router>,
}

impl AdminState {
    /// Serves the gateway's routes, upstreams and rate limits under `/v1/gateway/`.
    #[must_use]
    pub fn with_gateway(mut self, gateway: trellis_gateway::GatewayInspector) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.gateway = Some(gateway);
        }
        self
    }

    /// Serves `routes` (full paths, e.g. `/v1/sagas…` or `/v1/traces…`) beside the built-in
    /// ones, behind the same token check, request metrics and body limit. Call it before
    /// the state is cloned; later calls add to the earlier routes.
    #[must_use]
    pub fn with_routes(mut self, routes: Router) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.extra = Some(match inner.extra.take() {
                Some(extra) => extra.merge(routes),
                None => routes,
            });
        }
        self
    }

    /// Bundles the parts. With a `token`, every request except `/health/live` and
    /// `/health/ready` must carry `Authorization: Bearer TOKEN`.
    pub fn new(
        store: Store,
        registry: ServiceRegistry,
        config: ConfigurationManager,
        monitor: ServiceHealthMonitor,
        metrics: Arc<Metrics>,
        token: Option<String>,
    ) -> Self {
        AdminState {
            inner: Arc::new(StateInner {
                store,
                registry,
                config,
                monitor,
                metrics,
                token,
                gateway: None,
                extra: None,
            }),
        }
    }

    /// The registry served.
    pub fn registry(&self) -> &ServiceRegistry {
        &self.inner.registry
    }

    /// The store served.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}

/// The admin API router.
pub fn router(state: AdminState) -> Router {
    let monitor = state.inner.monitor.clone();
    let extra = state.inner.extra.clone().unwrap_or_default();
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}/instances", get(list_instances))
        .route(
            "/v1/services/{service}/instances/{id}",
            put(put_instance).delete(delete_instance).get(get_instance),
        )
        .route(
            "/v1/services/{service}/instances/{id}/heartbeat",
            put(heartbeat),
        )
        .route("/v1/config/{service}", get(get_config).put(put_config))
        .route("/v1/config/{service}/history", get(config_history))
        .route("/v1/config/{service}/rollback", post(config_rollback))
        .route("/v1/config/{service}/watch", get(config_watch))
        .route("/v1/gateway/{view}", get(gateway_view))
        .route("/metrics", get(metrics))
        .with_state(state.clone())
        // GET /health, /health/live, /health/ready
        .merge(monitor.router())
        // Sagas, traces: routers of other crates, under the same checks.
        .merge(extra)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(state, track))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // After the layers: the dashboard's files hold no data and need no token; its API
        // calls do.
        .merge(crate::dashboard::dashboard_router())
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.inner.token {
        let path = request.uri().path();
        let open = path == "/health/live" || path == "/health/ready";
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !open && given != Some(token.as_str()) {
            return ApiError::unauthorized(
                "this admin server requires Authorization: Bearer <admin token>",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn track(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    state.inner.metrics.observe_request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let body = state.inner.metrics.render(&state.inner.registry);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// `GET /v1/gateway/routes|upstreams|ratelimits`.
async fn gateway_view(
    State(state): State<AdminState>,
    view: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let view = path(view)?;
    let Some(gateway) = &state.inner.gateway else {
        return Err(ApiError::not_found("no gateway runs in this node"));
    };
    match view.as_str() {
        "routes" => Ok(Json(json!({"routes": gateway.routes()}))),
        "upstreams" => Ok(Json(json!({"routes": gateway.upstreams()}))),
        "ratelimits" => Ok(Json(json!({"classes": gateway.rate_limits()}))),
        other => Err(ApiError::not_found(format!(
            "no gateway view {other:?}; try routes, upstreams or ratelimits"
        ))),
    }
}

// ---- extraction helpers: every rejection is a JSON 400 naming the problem ----

fn path<T>(extracted: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    extracted
        .map(|Path(p)| p)
        .map_err(|e| ApiError::bad_request(format!("path: {}", e.body_text())))
}

fn query<T>(extracted: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    extracted
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))
}

fn body<T: DeserializeOwned>(bytes: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = bytes.map_err(|e| ApiError::new(e.status(), "invalid_request", e.body_text()))?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "body: empty; a JSON document is required",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let at = e.path().to_string();
        if at == "." {
            ApiError::bad_request(format!("body: {}", e.inner()))
        } else {
            ApiError::bad_request(format!("body: {at}: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    Ok(value)
}

fn service_name(name: &str) -> Result<(), ApiError> {
    validate_name(NameKind::Service, name).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn instance_id(id: &str) -> Result<(), ApiError> {
    validate_name(NameKind::Instance, id).map_err(|e| ApiError::bad_request(e.to_string()))
}

// ---- registry ----

/// Body of `PUT /v1/services/{service}/instances/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceBody {
    #[serde(default)]
    id: Option<String>,
    host: String,
    port: u16,
    #[serde(default)]
    version: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    health_check: Option<HealthCheckSpec>,
    #[serde(default)]
    ttl: Option<HumanDuration>,
}

async fn list_services(State(state): State<AdminState>) -> Json<Value> {
    let services: Vec<Value> = state
        .inner
        .registry
        .services()
        .into_iter()
        .map(|(name, instances)| json!({"name": name, "instances": instances}))
        .collect();
    Json(json!({"services": services, "stale": state.inner.registry.is_stale()}))
}

async fn list_instances(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let service = path(service)?;
    service_name(&service)?;
    let found = state.inner.registry.discover(&service);
    Ok(Json(json!({
        "service": service,
        "stale": found.is_stale(),
        "instances": found.to_vec(),
    })))
}

async fn get_instance(
    State(state): State<AdminState>,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (service, id) = path(ids)?;
    service_name(&service)?;
    instance_id(&id)?;
    let found = state.inner.registry.discover(&service);
    let record = found.iter().find(|r| r.instance.id == id).ok_or_else(|| {
        ApiError::not_found(format!("instance {id} of {service} is not registered"))
    })?;
    Ok(Json(json!(record)))
}

async fn put_instance(
    State(state): State<AdminState>,
    ids: Result<Path<(String, String)>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (service, id) = path(ids)?;
    service_name(&service)?;
    instance_id(&id)?;
    let body: InstanceBody = body(bytes)?;
    if let Some(body_id) = &body.id
        && body_id != &id
    {
        return Err(ApiError::bad_request(format!(
            "body: id: {body_id:?} differs from the id in the path {id:?}"
        )));
    }
    let instance = Instance {
        id: id.clone(),
        host: body.host,
        port: body.port,
        version: body.version,
        metadata: body.metadata,
        health_check: body.health_check,
        ttl: body.ttl,
    };
    state.inner.registry.register(&service, instance).await?;
    let found = state.inner.registry.discover(&service);
    let record = found.iter().find(|r| r.instance.id == id).cloned();
    Ok((StatusCode::CREATED, Json(json!(record))))
}

async fn heartbeat(
    State(state): State<AdminState>,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (service, id) = path(ids)?;
    service_name(&service)?;
    instance_id(&id)?;
    state.inner.registry.heartbeat(&service, &id)?;
    Ok(Json(
        json!({"service": service, "id": id, "heartbeat": "recorded"}),
    ))
}

async fn delete_instance(
    State(state): State<AdminState>,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (service, id) = path(ids)?;
    service_name(&service)?;
    instance_id(&id)?;
    if state.inner.registry.deregister(&service, &id).await? {
        Ok(Json(
            json!({"service": service, "id": id, "deregistered": true}),
        ))
    } else {
        Err(ApiError::not_found(format!(
            "instance {id} of {service} is not registered"
        )))
    }
}

// ---- configuration ----

#[derive(Debug, Deserialize)]
struct EnvQuery {
    env: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PutConfigQuery {
    env: Option<String>,
    expected_version: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RollbackQuery {
    env: Option<String>,
    version: u64,
}

#[derive(Debug, Deserialize)]
struct WatchQuery {
    env: Option<String>,
    after: Option<u64>,
    timeout: Option<HumanDuration>,
}

fn environment(state: &AdminState, env: Option<String>) -> Result<String, ApiError> {
    let env = env.unwrap_or_else(|| state.inner.config.environment().to_owned());
    validate_name(NameKind::Environment, &env).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(env)
}

async fn get_config(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
    q: Result<Query<EnvQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let service = path(service)?;
    service_name(&service)?;
    let env = environment(&state, query(q)?.env)?;
    match state.inner.config.current(&service, &env).await? {
        Some(version) => Ok(Json(json!(version))),
        None => Err(ApiError::not_found(format!(
            "no configuration stored for {service} in {env}"
        ))),
    }
}

async fn put_config(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
    q: Result<Query<PutConfigQuery>, QueryRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let service = path(service)?;
    service_name(&service)?;
    let q = query(q)?;
    let env = environment(&state, q.env)?;
    let document: Value = body(bytes)?;
    let config = &state.inner.config;
    let version = match q.expected_version {
        Some(expected) => {
            config
                .set_config_if(&service, &env, document, expected)
                .await?
        }
        None => config.set_config(&service, &env, document).await?,
    };
    Ok(Json(json!(version)))
}

async fn config_history(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
    q: Result<Query<EnvQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let service = path(service)?;
    service_name(&service)?;
    let env = environment(&state, query(q)?.env)?;
    let versions = state.inner.config.history(&service, &env).await?;
    Ok(Json(
        json!({"service": service, "environment": env, "versions": versions}),
    ))
}

async fn config_rollback(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
    q: Result<Query<RollbackQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let service = path(service)?;
    service_name(&service)?;
    let q = query(q)?;
    let env = environment(&state, q.env)?;
    let version = state
        .inner
        .config
        .rollback(&service, &env, q.version)
        .await?;
    Ok(Json(json!(version)))
}

/// Long poll: answers with the next version after `after` as soon as it exists (from this
/// or any other process), or with no versions when `timeout` (default 30 s) passes.
async fn config_watch(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
    q: Result<Query<WatchQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let service = path(service)?;
    service_name(&service)?;
    let q = query(q)?;
    let env = environment(&state, q.env)?;
    let wait = q.timeout.map_or(Duration::from_secs(30), |t| t.get());
    if wait > MAX_WATCH {
        return Err(ApiError::bad_request(format!(
            "query: timeout {} is longer than the limit of 60s",
            trellis_core::format_duration(wait)
        )));
    }
    let mut watch = state.inner.config.watch_in(&service, &env, q.after);
    let versions = match tokio::time::timeout(wait, watch.next()).await {
        Ok(version) => vec![version?],
        Err(_elapsed) => Vec::new(),
    };
    Ok(Json(
        json!({"service": service, "environment": env, "versions": versions}),
    ))
}
