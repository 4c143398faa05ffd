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
use trellis_auth::{AuthError, JwtVerifier};
use trellis_registry::{InstanceStatus, ServiceRegistry};
use trellis_resilience::balance::{Endpoint, Outcome, PickContext, Picked};
use trellis_resilience::breaker::BreakerOpen;
use trellis_resilience::http::{
    insert_rate_limit_headers, is_idempotent, outcome_of, rate_limited_headers,
};
use trellis_resilience::ratelimit::RateLimited;
use trellis_resilience::retry::{Backoff, RetryBudget};

use crate::config::{GatewayConfig, Limits};
use crate::route::{Route, RouteTable, Upstream, check_path};

/// Error type of bodies travelling through the gateway.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of requests and responses travelling through the gateway.
pub type Body = BoxBody<Bytes, BoxError>;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// A client's mark that a non-idempotent request may be sent twice.
const RETRYABLE: HeaderName = HeaderName::from_static("x-trellis-retryable");

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
    verifier: Option<JwtVerifier>,
    /// Headers the verifier forwards claims in: never taken from clients.
    claim_headers: Vec<HeaderName>,
    budget: RetryBudget,
    backoff: Backoff,
    pub(crate) metrics: Option<crate::metrics::GatewayMetrics>,
}

impl State {
    pub(crate) fn new(
        config: &GatewayConfig,
        registry: ServiceRegistry,
        verifier: Option<JwtVerifier>,
        metrics: Option<crate::metrics::GatewayMetrics>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        let claim_headers = verifier
            .as_ref()
            .map(|v| v.forward_claims().header_names().to_vec())
            .unwrap_or_default();
        State {
            table: ArcSwap::from_pointee(RouteTable::from_config(config)),
            registry,
            limits: config.limits.clone(),
            client,
            next_id: AtomicU64::new(1),
            id_prefix: id_prefix(),
            verifier,
            claim_headers,
            // Retries at most 20% of requests over 10 s, plus 10 a second for quiet times.
            budget: RetryBudget::new(Duration::from_secs(10), 0.2, 10)
                .unwrap_or_else(|_| unreachable_budget()),
            backoff: Backoff::new(Duration::from_millis(25), Duration::from_secs(1))
                .unwrap_or_else(|_| unreachable_backoff()),
            metrics,
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
    Unreachable {
        service: String,
        detail: String,
    },
    Timeout {
        service: String,
        after: Duration,
    },
    Unauthorized(AuthError),
    Forbidden(String),
    RateLimited(RateLimited),
    CircuitOpen {
        service: String,
        retry_in: Option<Duration>,
    },
}

impl Refusal {
    fn response(&self) -> Response<Body> {
        match self {
            Refusal::Unauthorized(e) => {
                let mut response = json_response(e.status(), e.reason(), &e.to_string());
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, e.www_authenticate());
                return response;
            }
            Refusal::RateLimited(limited) => {
                let mut response = json_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &format!(
                        "rate limit exceeded; retry in {}",
                        trellis_core::format_duration(limited.retry_after())
                    ),
                );
                response.headers_mut().extend(rate_limited_headers(limited));
                return response;
            }
            Refusal::CircuitOpen { service, retry_in } => {
                let mut response = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "circuit_open",
                    &format!("the circuit breaker of {service} is open"),
                );
                if let Some(value) = retry_in
                    .and_then(|d| HeaderValue::from_str(&d.as_secs().max(1).to_string()).ok())
                {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return response;
            }
            _ => {}
        }
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
            Refusal::Forbidden(reason) => (StatusCode::FORBIDDEN, "forbidden", reason.clone()),
            Refusal::Unauthorized(_) | Refusal::RateLimited(_) | Refusal::CircuitOpen { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", String::new())
            }
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
    let started = std::time::Instant::now();
    let request_id = state.request_id(request.headers().get(REQUEST_ID));
    let mut matched = None;
    let mut response = match forward(&state, request, remote, &request_id, &mut matched).await {
        Ok(response) => response,
        Err(refusal) => {
            tracing::debug!(?refusal, "request refused");
            refusal.response()
        }
    };
    response.headers_mut().insert(REQUEST_ID, request_id);
    if let Some(metrics) = &state.metrics {
        let (route, service) = matched.unwrap_or_else(|| ("none".to_owned(), "none".to_owned()));
        metrics.observe(
            &route,
            &service,
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
    }
    Ok(response)
}

async fn forward(
    state: &State,
    request: Request<Incoming>,
    remote: SocketAddr,
    request_id: &HeaderValue,
    matched: &mut Option<(String, String)>,
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
    *matched = Some((route.config.path.clone(), route.config.service.clone()));
    let max_body = state.limits.max_body_bytes;
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if content_length.is_some_and(|length| length > max_body) {
        return Err(Refusal::TooLarge(max_body));
    }

    // Who is calling: claims headers are never taken from the client.
    for name in &state.claim_headers {
        parts.headers.remove(name);
    }
    let mut subject = None;
    if route.authenticate {
        let Some(verifier) = &state.verifier else {
            return Err(Refusal::Forbidden(
                "authentication is not configured".into(),
            ));
        };
        let claims = verifier
            .verify_request(&parts.headers)
            .await
            .map_err(Refusal::Unauthorized)?;
        if route.authorize
            && let Some(rule) = &route.config.authorization
        {
            rule.authorize(&claims)
                .map_err(|e| Refusal::Forbidden(e.to_string()))?;
        }
        for (name, value) in verifier
            .forward_headers(&claims)
            .map_err(Refusal::Unauthorized)?
        {
            parts.headers.insert(name, value);
        }
        subject = claims.subject().map(str::to_owned);
    }

    let mut rate_info = None;
    if let (Some(class), Some(limiter)) = (&route.rate_class, &table.limiter) {
        let key = subject
            .clone()
            .or_else(|| {
                parts
                    .headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(|k| format!("key:{k}"))
            })
            .unwrap_or_else(|| remote.ip().to_string());
        let class = (class != "default").then_some(class.as_str());
        rate_info = Some(limiter.check(class, &key).map_err(Refusal::RateLimited)?);
    }

    let service = route.config.service.clone();
    let permit = match &route.breaker {
        Some(breaker) => {
            Some(
                breaker
                    .try_acquire()
                    .map_err(|open: BreakerOpen| Refusal::CircuitOpen {
                        service: service.clone(),
                        retry_in: Some(open.retry_in()),
                    })?,
            )
        }
        None => None,
    };

    let upstream_path = route.upstream_path(path);
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{upstream_path}?{query}"),
        None => upstream_path.into_owned(),
    };
    parts.version = http::Version::HTTP_11;
    forward_headers(&mut parts.headers, remote, host.as_deref(), request_id);
    let bodiless =
        content_length.unwrap_or(0) == 0 && !parts.headers.contains_key(header::TRANSFER_ENCODING);
    // Only idempotent (or marked) requests without a body may be sent twice.
    let retryable = is_idempotent(&parts.method)
        || parts
            .headers
            .get(RETRYABLE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true") || v.as_bytes() == b"1");
    let attempts = if bodiless && retryable && route.config.retries > 0 {
        1 + route.config.retries
    } else {
        1
    };
    state.budget.deposit();
    let mut body = Some(
        Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX))
            .map_err(|e| -> BoxError { Box::new(ClientBodyError(e)) })
            .boxed(),
    );
    let timeout = route.config.upstream_timeout();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        let Some(picked) = pick(state, route, &parts.headers) else {
            break Err(Refusal::NoInstance(service.clone()));
        };
        // The last attempt takes the request head; earlier ones copy it.
        let mut upstream_parts = if attempt < attempts {
            parts.clone()
        } else {
            std::mem::replace(&mut parts, Request::new(()).into_parts().0)
        };
        upstream_parts.uri = match Uri::builder()
            .scheme("http")
            .authority(picked.value().as_str())
            .path_and_query(path_and_query.as_str())
            .build()
        {
            Ok(uri) => uri,
            Err(e) => {
                break Err(Refusal::BadRequest(format!(
                    "cannot build the upstream URI: {e}"
                )));
            }
        };
        let attempt_body = body.take().unwrap_or_else(|| full(Bytes::new()));
        let sent = tokio::time::timeout(
            timeout,
            state
                .client
                .request(Request::from_parts(upstream_parts, attempt_body)),
        )
        .await;
        // Asked only when a retry is wanted, so answered requests spend no budget.
        let may_retry = || attempt < attempts && state.budget.withdraw();
        match sent {
            Ok(Ok(response)) => {
                let status = response.status();
                let outcome = outcome_of(status);
                picked.report(outcome);
                if matches!(status.as_u16(), 502..=504) && may_retry() {
                    tokio::time::sleep(state.backoff.delay(attempt - 1)).await;
                    continue;
                }
                break Ok(response);
            }
            Ok(Err(e)) => {
                if let Some(client_error) = client_body_error(&e) {
                    drop(picked);
                    if client_error.0.is::<http_body_util::LengthLimitError>() {
                        break Err(Refusal::TooLarge(max_body));
                    }
                    break Err(Refusal::BadRequest(format!(
                        "request body: {}",
                        error_chain(&*client_error.0)
                    )));
                }
                let address = picked.value().clone();
                picked.report(Outcome::Failure);
                if may_retry() {
                    tokio::time::sleep(state.backoff.delay(attempt - 1)).await;
                    continue;
                }
                break Err(Refusal::Unreachable {
                    service: service.clone(),
                    detail: format!("{address} ({})", error_chain(&e)),
                });
            }
            Err(_) => {
                picked.report(Outcome::Failure);
                if may_retry() {
                    continue;
                }
                break Err(Refusal::Timeout {
                    service: service.clone(),
                    after: timeout,
                });
            }
        }
    };
    if let Some(permit) = permit {
        let failed = match &result {
            Ok(response) => response.status().is_server_error(),
            Err(Refusal::Timeout { .. } | Refusal::Unreachable { .. } | Refusal::NoInstance(_)) => {
                true
            }
            Err(_) => false,
        };
        permit.record(failed);
    }
    let response = result?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(info) = &rate_info {
        insert_rate_limit_headers(&mut parts.headers, info);
    }
    Ok(Response::from_parts(
        parts,
        body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
    ))
}

fn unreachable_budget() -> RetryBudget {
    // The constants above are valid; this only keeps construction panic-free.
    RetryBudget::new(Duration::from_secs(10), 0.0, 0).unwrap_or_else(|_| unreachable_budget())
}

fn unreachable_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(1), Duration::from_millis(1))
        .unwrap_or_else(|_| unreachable_backoff())
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

/// Picks an instance of the route's service: its balancer is rebuilt from the registry
/// snapshot whenever the service's instances changed (a memory read per request).
/// Unhealthy instances are never picked; instances not checked yet are.
fn pick(state: &State, route: &Route, headers: &HeaderMap) -> Option<Picked<Upstream>> {
    let found = state.registry.discover(&route.config.service);
    let generation = found.generation();
    if route.synced.swap(generation, Ordering::AcqRel) != generation {
        route.balancer.update(found.iter().map(|record| {
            let host = &record.instance.host;
            let authority = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{}", record.instance.port)
            } else {
                format!("{host}:{}", record.instance.port)
            };
            let weight = record
                .instance
                .metadata
                .get("weight")
                .and_then(|w| w.parse().ok())
                .unwrap_or(1);
            Endpoint::new(record.instance.id.as_str(), authority)
                .with_weight(weight)
                .with_health(record.status != InstanceStatus::Unhealthy)
        }));
    }
    let hash = route
        .hash_header
        .as_ref()
        .and_then(|name| headers.get(name))
        .map(HeaderValue::as_bytes);
    let context = match hash {
        Some(key) => PickContext::new().with_hash_key(key),
        None => PickContext::new(),
    };
    route.balancer.pick(&context)
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
