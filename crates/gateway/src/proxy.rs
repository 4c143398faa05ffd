//! The request path: route, pick an upstream instance, forward, stream the answer back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_auth::{AuthError, JwtVerifier};
use trellis_registry::{InstanceStatus, ServiceRegistry};
use trellis_resilience::balance::{Endpoint, Outcome, PickContext, Picked};
use trellis_resilience::breaker::BreakerOpen;
use trellis_resilience::http::{is_idempotent, outcome_of, rate_limited_headers};
use trellis_resilience::ratelimit::{RateLimitInfo, RateLimited};
use trellis_resilience::retry::{Backoff, RetryBudget};
use trellis_tracing::opentelemetry::KeyValue;
use trellis_tracing::{DistributedTracer, HttpServerSpan};

use crate::config::{GatewayConfig, Limits, UpstreamProtocol};
use crate::h1::{HeadInfo, Reply, is_hop_by_hop};
use crate::metrics::AttemptStatus;
use crate::pool::{Forwarding, RawHeaders};
use crate::route::{Route, RouteTable, Upstream, check_path};

/// Error type of bodies travelling through the gateway.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of requests and responses travelling through the gateway.
pub type Body = BoxBody<Bytes, BoxError>;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// A client's mark that a non-idempotent request may be sent twice.
const RETRYABLE: HeaderName = HeaderName::from_static("x-trellis-retryable");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1);
/// `Connection` first.
static HOP_BY_HOP: [HeaderName; 8] = [
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
    /// Plain HTTP/1.1 requests: connections driven by the request's own task.
    pool: Arc<crate::pool::Pool>,
    inline: bool,
    /// HTTP/2 with prior knowledge, for `upstream_protocol = "h2c"` routes.
    h2c: Client<HttpConnector, Body>,
    retry_buffer_bytes: usize,
    next_id: AtomicU64,
    id_prefix: String,
    verifier: Option<JwtVerifier>,
    /// Headers the verifier forwards claims in: never taken from clients.
    claim_headers: Vec<HeaderName>,
    budget: RetryBudget,
    backoff: Backoff,
    pub(crate) metrics: Option<crate::metrics::GatewayMetrics>,
    /// Server and client spans; `None` when tracing is off (nothing is read or written).
    tracer: Option<DistributedTracer>,
}

impl State {
    /// `workers`: the gateway's worker threads (one upstream pool slot each; 1 when it
    /// serves on the caller's runtime).
    pub(crate) fn new(
        config: &GatewayConfig,
        workers: usize,
        registry: ServiceRegistry,
        verifier: Option<JwtVerifier>,
        metrics: Option<crate::metrics::GatewayMetrics>,
        tracer: Option<DistributedTracer>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(true)
            .build(connector);
        let claim_headers = verifier
            .as_ref()
            .map(|v| v.forward_claims().header_names().to_vec())
            .unwrap_or_default();
        State {
            table: ArcSwap::from_pointee(RouteTable::from_config(config, metrics.as_ref())),
            registry,
            limits: config.limits.clone(),
            client,
            pool: crate::pool::Pool::new(
                workers,
                256,
                Duration::from_secs(90),
                Duration::from_secs(5),
            ),
            inline: config.inline_upstream_connections,
            h2c,
            retry_buffer_bytes: config.retry_buffer_bytes,
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
            tracer: tracer.filter(DistributedTracer::is_enabled),
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
        numbered_id(&self.id_prefix, n)
    }
}

/// `{prefix}-{n:x}`, written on the stack: one allocation (the header value's).
fn numbered_id(prefix: &str, n: u64) -> HeaderValue {
    let prefix = prefix.as_bytes();
    let mut buf = [0u8; 64];
    // Room for the prefix, '-' and 16 hex digits.
    let Some(head) = buf
        .get_mut(..prefix.len())
        .filter(|_| prefix.len() <= 64 - 17)
    else {
        return HeaderValue::from_static("unknown");
    };
    head.copy_from_slice(prefix);
    let mut len = prefix.len();
    buf[len] = b'-';
    len += 1;
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
        buf[len + i] = b"0123456789abcdef"[nibble as usize];
    }
    len += digits;
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
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

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The client end of a connection, with its address as a header value made once per
/// connection (for `X-Forwarded-For`).
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) ip: HeaderValue,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }
}

/// The route a request matched (index into the table it was routed with).
#[derive(Debug, Clone, Copy)]
struct Matched {
    route: usize,
    /// A preflight answered with its CORS headers already set.
    preflight: bool,
}

/// Serves one request; never fails (errors become responses).
pub(crate) async fn handle<B>(
    state: Arc<State>,
    request: Request<B>,
    peer: Arc<Peer>,
    info: HeadInfo,
) -> Reply
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    // Read once: the retry budget's count and, unless the gateway waits before it (see
    // `forward`), the first attempt's timeout and latency count from it too.
    let started = tokio::time::Instant::now();
    let request_id = state.request_id(request.headers().get(REQUEST_ID));
    let table = state.table.load_full();
    let origin = request.headers().get(header::ORIGIN).cloned();
    // The server span: parent from the incoming W3C or B3 headers; a new root when they
    // are missing or malformed (never a refusal).
    let span = state.tracer.as_ref().map(|tracer| {
        tracer.http_server_span(request.method(), request.uri().path(), request.headers())
    });
    let mut matched = None;
    let mut rate_limit = None;
    let mut answered_at = None;
    let forwarded = if info.ambiguous {
        // See `h1`: the request's body length is ambiguous; never forwarded.
        Err(Refusal::BadRequest(
            "request has both Content-Length and Transfer-Encoding".into(),
        ))
    } else {
        forward(
            &state,
            &table,
            request,
            Incoming {
                peer: &peer,
                request_id: &request_id,
                span: span.as_ref(),
                hop_by_hop: info.hop_by_hop,
                started,
            },
            &mut matched,
            &mut rate_limit,
            &mut answered_at,
        )
        .await
    };
    let (mut response, mut raw) = match forwarded {
        Ok(answer) => answer,
        Err(refusal) => {
            tracing::debug!(?refusal, "request refused");
            if let Some(span) = &span
                && span.is_recording()
            {
                span.log(format!("refused: {refusal:?}"));
            }
            (refusal.response(), None)
        }
    };
    if let Some(span) = span {
        span.finish(response.status().as_u16());
    }
    let route = matched.and_then(|m| Some((table.routes.get(m.route)?, m.preflight)));
    if let Some((route, false)) = route
        && let Some(cors) = &route.cors
    {
        // CORS edits what the upstream sent (its Access-Control-* go, Vary grows).
        let (mut parts, body) = response.into_parts();
        crate::pool::materialize(&mut parts.headers, raw.take());
        cors.apply(origin.as_ref(), &mut parts.headers);
        response = Response::from_parts(parts, body);
    }
    if let Some(metrics) = &state.metrics {
        let status = response.status().as_u16();
        // From the request's start to the upstream's answer (its head); now, when none came.
        let ended = answered_at.unwrap_or_else(tokio::time::Instant::now);
        let seconds = ended.saturating_duration_since(started).as_secs_f64();
        match route.and_then(|(r, _)| r.metrics.as_ref()) {
            Some(route_metrics) => route_metrics.observe(status, seconds),
            None => metrics.observe("none", "none", status, seconds),
        }
    }
    Reply {
        response,
        raw,
        request_id: Some(request_id),
        rate_limit,
    }
}

/// A request body as the attempts see it.
enum RequestBody {
    /// No body.
    Empty,
    /// Held in memory: every attempt sends a copy.
    Buffered(Bytes),
    /// Streamed through once: the request is not retried.
    Streaming(Body),
}

/// Reads a retryable request's body into memory when it fits in `limit` bytes; a larger
/// one (or one with trailers) streams on with what was read put back in front.
async fn buffer_body(mut body: Body, limit: usize) -> Result<RequestBody, BoxError> {
    let mut frames: std::collections::VecDeque<Frame<Bytes>> = std::collections::VecDeque::new();
    let mut size = 0usize;
    loop {
        let Some(frame) = body.frame().await.transpose()? else {
            let mut buffered = bytes::BytesMut::with_capacity(size);
            for frame in frames {
                if let Ok(data) = frame.into_data() {
                    buffered.extend_from_slice(&data);
                }
            }
            return Ok(RequestBody::Buffered(buffered.freeze()));
        };
        let trailers = frame.is_trailers();
        size += frame.data_ref().map_or(0, Bytes::len);
        frames.push_back(frame);
        if trailers || size > limit {
            let rest = (!trailers).then_some(body);
            return Ok(RequestBody::Streaming(Replay { frames, rest }.boxed()));
        }
    }
}

/// A body that first yields frames already read, then the rest of the original.
struct Replay {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.frames.pop_front() {
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        match &mut self.rest {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// The refusal for an error of the client's body.
fn body_refusal(error: &(dyn std::error::Error + 'static), max_body: u64) -> Refusal {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return Refusal::TooLarge(max_body);
        }
        source = e.source();
    }
    Refusal::BadRequest(format!("request body: {}", error_chain(error)))
}

/// Whether the request asks for an HTTP/1.1 protocol upgrade (WebSocket).
fn wants_upgrade(parts: &http::request::Parts) -> bool {
    parts.version == http::Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Joins the client's and the upstream's upgraded connections and copies bytes both
/// ways until either side closes.
fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
        }
    });
}

/// Who sent a request and what is known of it besides its parts.
struct Incoming<'a> {
    peer: &'a Peer,
    request_id: &'a HeaderValue,
    /// The server span, when tracing.
    span: Option<&'a HttpServerSpan>,
    /// Whether the head may hold hop-by-hop headers (see [`HeadInfo`]).
    hop_by_hop: bool,
    /// When the gateway began to serve the request (tokio's clock).
    started: tokio::time::Instant,
}

async fn forward<B>(
    state: &State,
    table: &RouteTable,
    request: Request<B>,
    incoming: Incoming<'_>,
    matched: &mut Option<Matched>,
    rate_limit: &mut Option<RateLimitInfo>,
    answered_at: &mut Option<tokio::time::Instant>,
) -> Result<(Response<Body>, Option<RawHeaders>), Refusal>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let Incoming {
        peer,
        request_id,
        span,
        hop_by_hop,
        started,
    } = incoming;
    let remote = peer.addr;
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path();
    check_path(path).map_err(|e| Refusal::BadRequest(e.0))?;
    let host = match parts.headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let host_name = host.as_ref().and_then(|h| h.to_str().ok());
    if let Some(wanted) = crate::cors::Cors::preflight_method(&parts.method, &parts.headers)
        && let Some((index, route)) = table.find_index(&wanted, host_name, path, &parts.headers)
        && let Some(cors) = &route.cors
    {
        *matched = Some(Matched {
            route: index,
            preflight: true,
        });
        return Ok((cors.preflight(&wanted, &parts.headers), None));
    }
    let (index, route) = table
        .find_index(&parts.method, host_name, path, &parts.headers)
        .ok_or_else(|| Refusal::NoRoute(path.to_owned()))?;
    *matched = Some(Matched {
        route: index,
        preflight: false,
    });
    if let Some(span) = span {
        span.set_route(&route.path_tag);
        span.set_service(&route.service_tag);
    }
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
    let mut claims = None;
    if route.authenticate {
        let Some(verifier) = &state.verifier else {
            return Err(Refusal::Forbidden(
                "authentication is not configured".into(),
            ));
        };
        let verified = verifier
            .verify_request(&parts.headers)
            .await
            .map_err(Refusal::Unauthorized)?;
        if route.authorize
            && let Some(rule) = &route.config.authorization
        {
            rule.authorize(&verified)
                .map_err(|e| Refusal::Forbidden(e.to_string()))?;
        }
        for (name, value) in verifier
            .forward_headers(&verified)
            .map_err(Refusal::Unauthorized)?
        {
            parts.headers.insert(name, value);
        }
        claims = Some(verified);
    }

    let mut rate_info = None;
    if let (Some(class), Some(limiter)) = (&route.rate_class, &table.limiter) {
        // Keyed by the JWT subject, else the API key, else the client's address.
        let key: std::borrow::Cow<'_, str> = match claims.as_ref().and_then(|c| c.subject()) {
            Some(subject) => subject.into(),
            None => match parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
                Some(api_key) => format!("key:{api_key}").into(),
                None => remote.ip().to_string().into(),
            },
        };
        let class = (class != "default").then_some(class.as_str());
        rate_info = Some(limiter.check(class, &key).map_err(Refusal::RateLimited)?);
    }

    let service = route.config.service.as_str();
    let permit = match &route.breaker {
        Some(breaker) => {
            Some(
                breaker
                    .try_acquire()
                    .map_err(|open: BreakerOpen| Refusal::CircuitOpen {
                        service: service.to_owned(),
                        retry_in: Some(open.retry_in()),
                    })?,
            )
        }
        None => None,
    };

    let upstream_path = route.upstream_path(path);
    let path_and_query = if upstream_path == path
        && let Some(original) = parts.uri.path_and_query()
    {
        original.clone()
    } else {
        let text = match parts.uri.query() {
            Some(query) => format!("{upstream_path}?{query}"),
            None => upstream_path.into_owned(),
        };
        PathAndQuery::from_maybe_shared(Bytes::from(text))
            .map_err(|e| Refusal::BadRequest(format!("cannot build the upstream path: {e}")))?
    };
    let upgrade = wants_upgrade(&parts);
    let client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let upgrade_protocol = if upgrade {
        parts.headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let h2c = !upgrade && route.config.upstream_protocol == UpstreamProtocol::H2c;
    let client = if h2c { &state.h2c } else { &state.client };
    let use_pool = state.inline && !h2c && !upgrade;
    parts.version = if h2c {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    if hop_by_hop {
        strip_hop_by_hop(&mut parts.headers);
    }
    if let Some(protocol) = upgrade_protocol {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Only idempotent (or marked) requests may be sent twice; their bodies are held in
    // memory up to `retry_buffer_bytes` so that each attempt can send them.
    let retryable = !upgrade
        && route.config.retries > 0
        && (is_idempotent(&parts.method)
            || route.config.retry_non_idempotent
            || parts.headers.get(RETRYABLE).is_some_and(|v| {
                v.as_bytes().eq_ignore_ascii_case(b"true") || v.as_bytes() == b"1"
            }));
    let request_body = if hyper::body::Body::is_end_stream(&body) {
        RequestBody::Empty
    } else {
        let limited = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX))
            .map_err(|e| -> BoxError { Box::new(ClientBodyError(e)) })
            .boxed();
        if retryable {
            buffer_body(limited, state.retry_buffer_bytes)
                .await
                .map_err(|e| body_refusal(&*e, max_body))?
        } else {
            RequestBody::Streaming(limited)
        }
    };
    if let RequestBody::Buffered(bytes) = &request_body {
        // The body now has a known length (it may have come chunked).
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }
    let (buffered, mut streaming) = match request_body {
        RequestBody::Empty => (None, None),
        RequestBody::Buffered(bytes) => (Some(bytes), None),
        RequestBody::Streaming(body) => (None, Some(body)),
    };
    // The first attempt counts its timeout and latency from the request's start, unless
    // the gateway waited meanwhile (for a JWKS refresh or the body to be buffered).
    let mut first_start = (!route.authenticate && buffered.is_none()).then_some(started);
    let attempts = if retryable && streaming.is_none() {
        1 + route.config.retries
    } else {
        1
    };
    state.budget.deposit_at(started);
    // A consistent hash on a forwarding header hashes it as it goes upstream (the
    // caller's X-Forwarded-For with its address added, say), not as the caller sent it.
    let hashed = route
        .hash_header
        .as_ref()
        .is_some_and(Forwarding::replaces)
        .then(|| {
            let mut headers = parts.headers.clone();
            Forwarding {
                host: None,
                peer_ip: &peer.ip,
                forwarded_host: host.as_ref(),
                request_id,
                trace: &[],
            }
            .insert_into(&mut headers);
            headers
        });
    let timeout = route.config.upstream_timeout();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        let Some(picked) = pick(state, route, hashed.as_ref().unwrap_or(&parts.headers)) else {
            break Err(Refusal::NoInstance(service.to_owned()));
        };
        // The last attempt takes the request head; earlier ones copy it.
        let mut upstream_parts = if attempt < attempts {
            parts.clone()
        } else {
            std::mem::replace(&mut parts, Request::new(()).into_parts().0)
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(picked.value().authority.clone());
        uri.path_and_query = Some(path_and_query.clone());
        upstream_parts.uri = match Uri::from_parts(uri) {
            Ok(uri) => uri,
            Err(e) => {
                break Err(Refusal::BadRequest(format!(
                    "cannot build the upstream URI: {e}"
                )));
            }
        };
        let attempt_body = match (streaming.take(), &buffered) {
            (Some(body), _) => body,
            (None, Some(bytes)) => full(bytes.clone()),
            (None, None) => empty(),
        };
        // The client span of this attempt: child of the server span, its context (not
        // the caller's) is what the instance receives. The pool writes it into the head
        // as lines; hyper's client gets it in the map.
        let mut trace_lines = Vec::new();
        let client_span = match (&state.tracer, span) {
            (Some(tracer), Some(server)) => {
                server.set_upstream(picked.endpoint().shared_id());
                if server.carried_context() {
                    remove_trace_headers(&mut upstream_parts.headers);
                }
                // The URL is a tag: formatted only for a recorded trace.
                let url = if server.is_recording() {
                    let authority = picked.value().authority.as_str();
                    let target = path_and_query.as_str();
                    let mut url = String::with_capacity(7 + authority.len() + target.len());
                    url.push_str("http://");
                    url.push_str(authority);
                    url.push_str(target);
                    url
                } else {
                    String::new()
                };
                let tags = |tags: &mut Vec<KeyValue>| {
                    tags.push(KeyValue::new("trellis.service", route.service_tag.clone()));
                    tags.push(KeyValue::new(
                        "trellis.upstream.instance",
                        picked.endpoint().shared_id().clone(),
                    ));
                    tags.push(KeyValue::new("trellis.attempt", i64::from(attempt)));
                };
                // For an unsampled request: no OpenTelemetry span or context, only ids.
                let method = &upstream_parts.method;
                Some(if use_pool {
                    let lines = &mut trellis_tracing::HeadLines(&mut trace_lines);
                    tracer.http_client_span_child_of_with_tags(server, method, &url, lines, tags)
                } else {
                    let headers = &mut upstream_parts.headers;
                    tracer.http_client_span_child_of_with_tags(server, method, &url, headers, tags)
                })
            }
            _ => None,
        };
        let sent_at = first_start.take().unwrap_or_else(tokio::time::Instant::now);
        let forwarding = Forwarding {
            host: Some(&picked.value().host),
            peer_ip: &peer.ip,
            forwarded_host: host.as_ref(),
            request_id,
            trace: &trace_lines,
        };
        let sent = if use_pool {
            // Origin-form request line; the pool writes the forwarding headers.
            upstream_parts.uri = Uri::from(path_and_query.clone());
            let request = Request::from_parts(upstream_parts, attempt_body);
            crate::deadline::timeout_from(
                sent_at,
                timeout,
                state.pool.send(
                    &picked.value().authority,
                    request,
                    Some(&forwarding),
                    sent_at,
                ),
            )
            .await
            .map(|r| {
                r.map(|(response, raw)| (response, Some(raw)))
                    .map_err(|e| -> BoxError { Box::new(e) })
            })
        } else {
            forwarding.insert_into(&mut upstream_parts.headers);
            crate::deadline::timeout_from(
                sent_at,
                timeout,
                client.request(Request::from_parts(upstream_parts, attempt_body)),
            )
            .await
            .map(|r| {
                r.map(|response| {
                    let response =
                        response.map(|body| body.map_err(|e| -> BoxError { Box::new(e) }).boxed());
                    (response, None)
                })
                .map_err(|e| -> BoxError { Box::new(e) })
            })
        };
        if let Some(metrics) = &picked.value().metrics {
            let status = match &sent {
                Ok(Ok((response, _))) => AttemptStatus::Answered(response.status().as_u16()),
                Ok(Err(_)) => AttemptStatus::Error,
                Err(_) => AttemptStatus::Timeout,
            };
            // Read once for this attempt's latency and the request's (see `handle`).
            let at = tokio::time::Instant::now();
            *answered_at = Some(at);
            metrics.observe(status, at.saturating_duration_since(sent_at).as_secs_f64());
        }
        if let Some(client_span) = client_span {
            match &sent {
                Ok(Ok((response, _))) => client_span.finish(response.status().as_u16()),
                Ok(Err(e)) => client_span.fail(error_chain(&**e)),
                Err(_) => client_span.fail(format_args!(
                    "no answer within {}",
                    trellis_core::format_duration(timeout)
                )),
            }
        }
        // Asked only when a retry is wanted, so answered requests spend no budget.
        let may_retry = || attempt < attempts && state.budget.withdraw();
        match sent {
            Ok(Ok(answer)) => {
                let status = answer.0.status();
                let outcome = outcome_of(status);
                picked.report(outcome);
                if matches!(status.as_u16(), 502..=504) && may_retry() {
                    tokio::time::sleep(state.backoff.delay(attempt - 1)).await;
                    continue;
                }
                break Ok(answer);
            }
            Ok(Err(e)) => {
                if let Some(client_error) = client_body_error(&*e) {
                    drop(picked);
                    break Err(body_refusal(&*client_error.0, max_body));
                }
                let address = picked.value().authority.clone();
                picked.report(Outcome::Failure);
                if may_retry() {
                    tokio::time::sleep(state.backoff.delay(attempt - 1)).await;
                    continue;
                }
                break Err(Refusal::Unreachable {
                    service: service.to_owned(),
                    detail: format!("{address} ({})", error_chain(&*e)),
                });
            }
            Err(_) => {
                picked.report(Outcome::Failure);
                if may_retry() {
                    continue;
                }
                break Err(Refusal::Timeout {
                    service: service.to_owned(),
                    after: timeout,
                });
            }
        }
    };
    if let Some(permit) = permit {
        let failed = match &result {
            Ok((response, _)) => response.status().is_server_error(),
            Err(Refusal::Timeout { .. } | Refusal::Unreachable { .. } | Refusal::NoInstance(_)) => {
                true
            }
            Err(_) => false,
        };
        permit.record(failed);
    }
    let (mut response, raw) = result?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let protocol = response.headers().get(header::UPGRADE).cloned();
        splice(client_upgrade, upstream_upgrade);
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = protocol {
            parts.headers.insert(header::UPGRADE, protocol);
        }
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok((Response::from_parts(parts, empty()), None));
    }
    let (mut parts, body) = response.into_parts();
    if !use_pool {
        // (The pool's codec leaves them out of the answers it reads.)
        strip_hop_by_hop(&mut parts.headers);
    }
    // Its `RateLimit-*` headers are written with the answer (see `Reply`).
    *rate_limit = rate_info;
    Ok((Response::from_parts(parts, body), raw))
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

fn client_body_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ClientBodyError> {
    let mut source = error.source();
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
        let weight = |record: &trellis_registry::InstanceRecord| -> u32 {
            record
                .instance
                .metadata
                .get("weight")
                .and_then(|w| w.trim().parse().ok())
                .unwrap_or(1)
        };
        // Weight 0 takes an instance out of rotation (blue-green: the idle colour); when
        // every instance says 0, none is preferred, so all count as 1.
        let all_zero = found.iter().all(|record| weight(record) == 0);
        route.balancer.update(found.iter().filter_map(|record| {
            let host = &record.instance.host;
            let text = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{}", record.instance.port)
            } else {
                format!("{host}:{}", record.instance.port)
            };
            let authority = match http::uri::Authority::try_from(text.as_str()) {
                Ok(authority) => authority,
                Err(e) => {
                    tracing::warn!(instance = %record.instance.id, address = %text, error = %e,
                        "instance address is not a valid authority; skipped");
                    return None;
                }
            };
            let Ok(host) = HeaderValue::from_str(authority.as_str()) else {
                return None;
            };
            let upstream = Upstream {
                authority,
                host,
                metrics: state
                    .metrics
                    .as_ref()
                    .map(|m| m.instance(&route.config.service, &record.instance.version)),
            };
            Some(
                Endpoint::new(record.instance.id.as_str(), upstream)
                    .with_weight(if all_zero { 1 } else { weight(record) })
                    .with_health(record.status != InstanceStatus::Unhealthy),
            )
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

/// Trace context headers (W3C and B3) the client sent; the client span's own replace them
/// upstream (a malformed `b3` must not travel beside a fresh `traceparent`).
static TRACE_HEADERS: [HeaderName; 9] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("baggage"),
    HeaderName::from_static("b3"),
    HeaderName::from_static("x-b3-traceid"),
    HeaderName::from_static("x-b3-spanid"),
    HeaderName::from_static("x-b3-parentspanid"),
    HeaderName::from_static("x-b3-sampled"),
    HeaderName::from_static("x-b3-flags"),
];

fn remove_trace_headers(headers: &mut HeaderMap) {
    for name in &TRACE_HEADERS {
        headers.remove(name);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (no hashing) finds which are present; most requests carry
    // none, most responses only `Connection: keep-alive`.
    let mut present = 0u16;
    for name in headers.keys() {
        if is_hop_by_hop(name)
            && let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name)
        {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Headers named by Connection are hop-by-hop too (the listed ones go anyway, and
    // `close` names no header).
    let mut named: Vec<HeaderName> = Vec::new();
    if present & 1 != 0 {
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close")
                    || HOP_BY_HOP
                        .iter()
                        .any(|hop| token.eq_ignore_ascii_case(hop.as_str()))
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
    }
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_ids_are_prefix_dash_lowercase_hex() {
        for n in [0u64, 1, 0xf, 0x10, 0xabc, u64::MAX] {
            assert_eq!(
                numbered_id("0123456789abcdef", n),
                format!("0123456789abcdef-{n:x}").as_str()
            );
        }
        assert_eq!(numbered_id(&"p".repeat(60), 1), "unknown");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("a"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let untouched = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, untouched, "nothing hop-by-hop: nothing removed");

        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, untouched);
    }
}
