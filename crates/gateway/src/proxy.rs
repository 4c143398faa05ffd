//! The request path: route, pick an upstream instance, forward, stream the answer back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use trellis_registry::{InstanceRecord, InstanceStatus, ServiceRegistry};

use crate::config::{GatewayConfig, Limits, LoadBalancer};
use crate::route::{Route, RouteTable, check_path};

/// Error type of bodies travelling through the gateway.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of requests and responses travelling through the gateway.
pub type Body = BoxBody<Bytes, BoxError>;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What the gateway shares between connections.
pub(crate) struct State {
    pub(crate) table: ArcSwap<RouteTable>,
    pub(crate) registry: ServiceRegistry,
    pub(crate) limits: Limits,
    client: Client<HttpConnector, Body>,
    next_id: AtomicU64,
    id_prefix: String,
}

impl State {
    pub(crate) fn new(config: &GatewayConfig, registry: ServiceRegistry) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        State {
            table: ArcSwap::from_pointee(RouteTable::new(&config.routes, config.load_balancer)),
            registry,
            limits: config.limits.clone(),
            client,
            next_id: AtomicU64::new(1),
            id_prefix: id_prefix(),
        }
    }

    fn request_id(&self, incoming: Option<&HeaderValue>) -> HeaderValue {
        if let Some(value) = incoming.filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= 128
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        }) {
            return value.clone();
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.id_prefix))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

/// A per-process random prefix for request ids.
fn id_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// Why the gateway answered instead of an upstream.
#[derive(Debug)]
pub(crate) enum Refusal {
    BadRequest(String),
    NoRoute(String),
    TooLarge(u64),
    NoInstance(String),
    Unreachable { service: String, detail: String },
    Timeout { service: String, after: Duration },
}

impl Refusal {
    fn response(&self) -> Response<Body> {
        let (status, kind, detail) = match self {
            Refusal::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", d.clone()),
            Refusal::NoRoute(path) => (
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no route matches {path}"),
            ),
            Refusal::TooLarge(max) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body is larger than {max} bytes"),
            ),
            Refusal::NoInstance(service) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_instance",
                format!("no healthy instance of {service}"),
            ),
            Refusal::Unreachable { service, detail } => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("{service}: {detail}"),
            ),
            Refusal::Timeout { service, after } => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "{service} did not answer within {}",
                    trellis_core::format_duration(*after)
                ),
            ),
        };
        json_response(status, kind, &detail)
    }
}

pub(crate) fn json_response(status: StatusCode, kind: &str, detail: &str) -> Response<Body> {
    let body = serde_json::json!({"error": kind, "detail": detail}).to_string();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Serves one request; never fails (errors become responses).
pub(crate) async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
    remote: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let request_id = state.request_id(request.headers().get(REQUEST_ID));
    let mut response = match forward(&state, request, remote, &request_id).await {
        Ok(response) => response,
        Err(refusal) => {
            tracing::debug!(?refusal, "request refused");
            refusal.response()
        }
    };
    response.headers_mut().insert(REQUEST_ID, request_id);
    Ok(response)
}

async fn forward(
    state: &State,
    request: Request<Incoming>,
    remote: SocketAddr,
    request_id: &HeaderValue,
) -> Result<Response<Body>, Refusal> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path();
    check_path(path).map_err(|e| Refusal::BadRequest(e.0))?;
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    let table = state.table.load();
    let route = table
        .find(&parts.method, host.as_deref(), path, &parts.headers)
        .ok_or_else(|| Refusal::NoRoute(path.to_owned()))?;
    let max_body = state.limits.max_body_bytes;
    if let Some(length) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > max_body
    {
        return Err(Refusal::TooLarge(max_body));
    }
    let service = route.config.service.clone();
    let instance = pick(state, route).ok_or_else(|| Refusal::NoInstance(service.clone()))?;

    let upstream_path = route.upstream_path(path);
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{upstream_path}?{query}"),
        None => upstream_path.into_owned(),
    };
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority(&instance))
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| Refusal::BadRequest(format!("cannot build the upstream URI: {e}")))?;
    parts.version = http::Version::HTTP_11;
    forward_headers(&mut parts.headers, remote, host.as_deref(), request_id);
    let body = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX))
        .map_err(|e| -> BoxError { Box::new(ClientBodyError(e)) })
        .boxed();
    let timeout = route.config.upstream_timeout();
    let upstream = Request::from_parts(parts, body);
    match tokio::time::timeout(timeout, state.client.request(upstream)).await {
        Err(_) => Err(Refusal::Timeout {
            service,
            after: timeout,
        }),
        Ok(Err(e)) => {
            if let Some(client_error) = client_body_error(&e) {
                if client_error.0.is::<http_body_util::LengthLimitError>() {
                    return Err(Refusal::TooLarge(max_body));
                }
                return Err(Refusal::BadRequest(format!(
                    "request body: {}",
                    error_chain(&*client_error.0)
                )));
            }
            Err(Refusal::Unreachable {
                service,
                detail: format!("{} ({})", instance.address(), error_chain(&e)),
            })
        }
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(
                parts,
                body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
            ))
        }
    }
}

/// An error of the body the client sent (malformed chunks, too long), as opposed to an
/// error of the upstream: the first is the client's fault (400/413), the second a 502.
#[derive(Debug)]
struct ClientBodyError(BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

fn client_body_error(error: &hyper_util::client::legacy::Error) -> Option<&ClientBodyError> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<ClientBodyError>() {
            return Some(found);
        }
        source = e.source();
    }
    None
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn authority(instance: &InstanceRecord) -> String {
    let host = &instance.instance.host;
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", instance.instance.port)
    } else {
        format!("{host}:{}", instance.instance.port)
    }
}

/// Chooses an instance of the route's service: healthy ones, or those not checked yet;
/// never unhealthy ones.
fn pick(state: &State, route: &Route) -> Option<InstanceRecord> {
    let found = state.registry.discover(&route.config.service);
    let eligible = || {
        found
            .iter()
            .filter(|r| r.status != InstanceStatus::Unhealthy)
    };
    let count = eligible().count();
    if count == 0 {
        return None;
    }
    let index = match route.load_balancer {
        LoadBalancer::RoundRobin => route.next_turn() % count,
        LoadBalancer::Random => fastrand_below(count),
    };
    eligible().nth(index).cloned()
}

/// A small xorshift generator per thread: load balancing needs spread, not secrecy.
fn fastrand_below(n: usize) -> usize {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(id_prefix_seed());
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x % n as u64) as usize
    })
}

fn id_prefix_seed() -> u64 {
    u64::from_str_radix(&id_prefix(), 16).unwrap_or(0x9E37_79B9_7F4A_7C15) | 1
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn forward_headers(
    headers: &mut HeaderMap,
    remote: SocketAddr,
    host: Option<&str>,
    request_id: &HeaderValue,
) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    let client_ip = remote.ip().to_string();
    let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(value) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(X_FORWARDED_HOST, value);
    }
    headers.insert(REQUEST_ID, request_id.clone());
}

impl Route {
    /// The next round-robin turn of this route.
    pub(crate) fn next_turn(&self) -> usize {
        self.turns.fetch_add(1, Ordering::Relaxed)
    }
}
