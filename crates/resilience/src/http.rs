//! The HTTP-specific parts: which requests may be retried, which responses count as
//! failures, `Retry-After` and `RateLimit-*` headers, rate-limit keys and hash keys read
//! from requests, and buffering a body so a request can be sent twice.
//!
//! Everything else in the crate is generic over the request type.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};

use crate::BoxError;
use crate::balance::Outcome;
use crate::breaker::Classify;
use crate::ratelimit::{KeyExtractor, RateKey, RateLimitInfo, RateLimited, ceil_secs};
use crate::retry::{Decision, Policy, RetryableError};

/// Marks a request retryable although its method is not idempotent (a POST with an
/// idempotency key, say). Insert it in the request's extensions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retryable;

/// The header a caller sets to `true` (or `1`) to mark its request retryable.
pub const RETRYABLE_HEADER: HeaderName = HeaderName::from_static("x-trellis-retryable");

/// `RateLimit-Limit`.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// True for the methods RFC 9110 defines as idempotent: GET, HEAD, OPTIONS, TRACE, PUT,
/// DELETE.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// True when `request` may be sent more than once: its method is idempotent, or it carries
/// the [`Retryable`] extension, or the [`RETRYABLE_HEADER`] set to `true` or `1`.
pub fn is_retryable_request<B>(request: &Request<B>) -> bool {
    is_idempotent(request.method())
        || request.extensions().get::<Retryable>().is_some()
        || request
            .headers()
            .get(&RETRYABLE_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true") || v.as_bytes() == b"1")
}

/// The retry policy for HTTP.
///
/// - Requests: only those [`is_retryable_request`] accepts, with a body that is `Clone`
///   (buffer streaming bodies with [`buffer_request`] first).
/// - Responses: 502, 503 and 504 are retried by default; when the response has a
///   `Retry-After` within the backoff cap, the retry waits at least that long.
/// - Errors: retried when [`RetryableError::is_retryable`] says so (timeouts, open
///   breakers, transport errors; not rate limits).
///
/// ```
/// use http::{Method, Request, Response, StatusCode};
/// use trellis_resilience::BoxError;
/// use trellis_resilience::http::HttpRetryPolicy;
/// use trellis_resilience::retry::{Decision, Policy};
///
/// let policy = HttpRetryPolicy::default();
/// let get = Request::get("/orders").body(()).unwrap();
/// let post = Request::post("/orders").body(()).unwrap();
/// assert!(Policy::<_, Response<()>, BoxError>::clone_request(&policy, &get).is_some());
/// assert!(Policy::<_, Response<()>, BoxError>::clone_request(&policy, &post).is_none());
/// let unavailable: Result<Response<()>, BoxError> =
///     Ok(Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(()).unwrap());
/// assert_eq!(Policy::<Request<()>, _, _>::decide(&policy, &unavailable), Decision::Retry);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct HttpRetryPolicy {
    statuses: Arc<[StatusCode]>,
    honor_retry_after: bool,
}

impl Default for HttpRetryPolicy {
    fn default() -> Self {
        HttpRetryPolicy {
            statuses: Arc::new([
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ]),
            honor_retry_after: true,
        }
    }
}

impl HttpRetryPolicy {
    /// The response statuses that are retried. Defaults to 502, 503, 504.
    pub fn retry_on(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// Whether a `Retry-After` on a retried response sets the least wait. Defaults to true.
    pub fn honor_retry_after(mut self, honor: bool) -> Self {
        self.honor_retry_after = honor;
        self
    }
}

impl<B, R, E> Policy<Request<B>, Response<R>, E> for HttpRetryPolicy
where
    B: Clone,
    E: RetryableError,
{
    fn clone_request(&self, request: &Request<B>) -> Option<Request<B>> {
        is_retryable_request(request).then(|| request.clone())
    }

    fn decide(&self, result: &Result<Response<R>, E>) -> Decision {
        match result {
            Ok(response) if self.statuses.contains(&response.status()) => {
                let after = self
                    .honor_retry_after
                    .then(|| response.headers().get(RETRY_AFTER))
                    .flatten()
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                after.map_or(Decision::Retry, Decision::RetryAfter)
            }
            Ok(_) => Decision::Accept,
            Err(e) if e.is_retryable() => Decision::Retry,
            Err(_) => Decision::Accept,
        }
    }
}

/// For circuit breakers: errors and 5xx responses are failures.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerErrors;

impl<R, E> Classify<Response<R>, E> for ServerErrors {
    fn is_failure(&self, result: &Result<Response<R>, E>) -> bool {
        match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        }
    }
}

/// The outlier-detection outcome of a response status: 5xx is a failure.
pub fn outcome_of(status: StatusCode) -> Outcome {
    if status.is_server_error() {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

/// Reads a `Retry-After` value: delay-seconds (`"120"`) or an HTTP-date, which is
/// measured from `now` (a date in the past is zero).
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().ok().map(Duration::from_secs);
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Sets `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds, rounded
/// up) from `info` — for every response of a rate-limited route.
pub fn insert_rate_limit_headers(headers: &mut HeaderMap, info: &RateLimitInfo) {
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(info.limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(info.remaining));
    headers.insert(RATELIMIT_RESET, HeaderValue::from(info.reset_secs()));
}

/// The headers of a 429 answer: `Retry-After` (seconds, at least 1), the `RateLimit-*`
/// triple and `RateLimit-Policy` (`"1000;w=60"`).
///
/// ```
/// use std::time::Duration;
/// use trellis_resilience::ratelimit::{Quota, RateLimiter};
/// use trellis_resilience::http::rate_limited_headers;
///
/// let limiter = RateLimiter::new(Quota::parse("1000", "1m").unwrap());
/// for _ in 0..1000 { limiter.check(None, "k").unwrap(); }
/// let limited = limiter.check(None, "k").unwrap_err();
/// let headers = rate_limited_headers(&limited);
/// assert_eq!(headers["retry-after"], "1");
/// assert_eq!(headers["ratelimit-limit"], "1000");
/// assert_eq!(headers["ratelimit-remaining"], "0");
/// assert_eq!(headers["ratelimit-reset"], "60");
/// assert_eq!(headers["ratelimit-policy"], "1000;w=60");
/// ```
pub fn rate_limited_headers(limited: &RateLimited) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(5);
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from(ceil_secs(limited.retry_after()).max(1)),
    );
    insert_rate_limit_headers(&mut headers, &limited.info());
    let quota = limited.quota();
    let policy = format!(
        "{};w={}",
        quota.requests(),
        ceil_secs(quota.window()).max(1)
    );
    if let Ok(value) = HeaderValue::from_str(&policy) {
        headers.insert(RATELIMIT_POLICY, value);
    }
    headers
}

/// A 429 Too Many Requests response with [`rate_limited_headers`] and `body`.
pub fn rate_limited_response<B>(limited: &RateLimited, body: B) -> Response<B> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    *response.headers_mut() = rate_limited_headers(limited);
    response
}

/// Rate-limit key from a request header (an API key: `x-api-key`). Admitted requests get
/// their [`RateLimitInfo`] as an extension, for the response headers.
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
    class: Option<Arc<str>>,
}

impl HeaderKey {
    /// Keys requests by the value of header `name`; requests without it are not limited.
    pub fn new(name: HeaderName) -> Self {
        HeaderKey { name, class: None }
    }

    /// Uses the quota of `class` instead of the default one.
    #[must_use]
    pub fn with_class(mut self, class: impl Into<Arc<str>>) -> Self {
        self.class = Some(class.into());
        self
    }
}

fn with_class<'r>(key: RateKey<'r>, class: &'r Option<Arc<str>>) -> RateKey<'r> {
    match class {
        Some(c) => key.with_class(&**c),
        None => key,
    }
}

impl<B> KeyExtractor<Request<B>> for HeaderKey {
    fn extract<'r>(&'r self, request: &'r Request<B>) -> Option<RateKey<'r>> {
        let value = request.headers().get(&self.name)?.to_str().ok()?;
        Some(with_class(RateKey::new(value), &self.class))
    }

    fn admitted(&self, request: &mut Request<B>, info: RateLimitInfo) {
        request.extensions_mut().insert(info);
    }
}

/// Rate-limit key from a request extension put there by earlier middleware (the JWT
/// subject after authentication). Requests without it are not limited.
#[derive(Debug)]
pub struct ExtensionKey<T> {
    class: Option<Arc<str>>,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Clone for ExtensionKey<T> {
    fn clone(&self) -> Self {
        ExtensionKey {
            class: self.class.clone(),
            _marker: PhantomData,
        }
    }
}

impl<T> Default for ExtensionKey<T> {
    fn default() -> Self {
        ExtensionKey {
            class: None,
            _marker: PhantomData,
        }
    }
}

impl<T> ExtensionKey<T> {
    /// Keys requests by their `T` extension.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses the quota of `class` instead of the default one.
    #[must_use]
    pub fn with_class(mut self, class: impl Into<Arc<str>>) -> Self {
        self.class = Some(class.into());
        self
    }
}

impl<B, T> KeyExtractor<Request<B>> for ExtensionKey<T>
where
    T: AsRef<str> + Clone + Send + Sync + 'static,
{
    fn extract<'r>(&'r self, request: &'r Request<B>) -> Option<RateKey<'r>> {
        let value = request.extensions().get::<T>()?.as_ref();
        Some(with_class(RateKey::new(value), &self.class))
    }

    fn admitted(&self, request: &mut Request<B>, info: RateLimitInfo) {
        request.extensions_mut().insert(info);
    }
}

/// Rate-limit key from the client's address: the [`SocketAddr`] extension the server puts
/// on each request (its IP, without the port). Requests without it are not limited.
#[derive(Debug, Clone, Default)]
pub struct ClientIpKey {
    class: Option<Arc<str>>,
}

impl ClientIpKey {
    /// Keys requests by client IP.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses the quota of `class` instead of the default one.
    #[must_use]
    pub fn with_class(mut self, class: impl Into<Arc<str>>) -> Self {
        self.class = Some(class.into());
        self
    }
}

impl<B> KeyExtractor<Request<B>> for ClientIpKey {
    fn extract<'r>(&'r self, request: &'r Request<B>) -> Option<RateKey<'r>> {
        let addr = request.extensions().get::<SocketAddr>()?;
        Some(with_class(
            RateKey::new(Cow::Owned(addr.ip().to_string())),
            &self.class,
        ))
    }

    fn admitted(&self, request: &mut Request<B>, info: RateLimitInfo) {
        request.extensions_mut().insert(info);
    }
}

/// Where [`Strategy::ConsistentHash`](crate::balance::Strategy::ConsistentHash) finds its
/// key: a header or a cookie.
///
/// ```
/// use trellis_resilience::http::HashOn;
/// let req = http::Request::get("/").header("cookie", "theme=dark; session=abc123").body(()).unwrap();
/// assert_eq!(HashOn::Cookie("session".into()).key(&req), Some(&b"abc123"[..]));
/// assert_eq!(HashOn::Header(http::header::HOST).key(&req), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// The value of this header.
    Header(HeaderName),
    /// The value of the cookie of this name.
    Cookie(String),
}

impl HashOn {
    /// The key bytes of `request`, if it has them.
    pub fn key<'r, B>(&self, request: &'r Request<B>) -> Option<&'r [u8]> {
        match self {
            HashOn::Header(name) => request.headers().get(name).map(HeaderValue::as_bytes),
            HashOn::Cookie(name) => request
                .headers()
                .get_all(http::header::COOKIE)
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
                .find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let eq = pair.iter().position(|&b| b == b'=')?;
                    let (k, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
                    (k == name.as_bytes()).then_some(v)
                }),
        }
    }
}

/// Why [`buffer_request`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The body is larger than the buffer allows; the request cannot be retried.
    #[error("request body is larger than {limit} bytes, the most buffered to allow a retry")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Reading the body failed.
    #[error("reading the request body: {0}")]
    Body(#[source] BoxError),
}

/// Reads a request's body into memory (at most `limit` bytes) so the request can be
/// cloned and retried. Check the `Content-Length` first: on
/// [`BufferError::TooLarge`] the body is lost.
pub async fn buffer_request<B>(
    request: Request<B>,
    limit: usize,
) -> Result<Request<Full<Bytes>>, BufferError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let collected = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.is::<LengthLimitError>() {
            BufferError::TooLarge { limit }
        } else {
            BufferError::Body(e)
        }
    })?;
    Ok(Request::from_parts(parts, Full::new(collected.to_bytes())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn idempotent_methods_and_marks() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
        let plain = Request::post("/").body(()).unwrap();
        assert!(!is_retryable_request(&plain));
        let mut marked = Request::post("/").body(()).unwrap();
        marked.extensions_mut().insert(Retryable);
        assert!(is_retryable_request(&marked));
        let header = Request::post("/")
            .header("x-trellis-retryable", "TRUE")
            .body(())
            .unwrap();
        assert!(is_retryable_request(&header));
        let no = Request::post("/")
            .header("x-trellis-retryable", "no")
            .body(())
            .unwrap();
        assert!(!is_retryable_request(&no));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let secs = HeaderValue::from_static("120");
        assert_eq!(
            parse_retry_after(&secs, now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let date = HeaderValue::from_str(&later).unwrap();
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past =
            HeaderValue::from_str(&httpdate::fmt_http_date(now - Duration::from_secs(5))).unwrap();
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("soon"), now),
            None
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("-1"), now),
            None
        );
    }

    #[test]
    fn policy_decisions() {
        let policy = HttpRetryPolicy::default();
        let decide = |status: u16, retry_after: Option<&str>| {
            let mut b = Response::builder().status(status);
            if let Some(v) = retry_after {
                b = b.header(RETRY_AFTER, v);
            }
            let result: Result<Response<()>, BoxError> = Ok(b.body(()).unwrap());
            Policy::<Request<()>, _, _>::decide(&policy, &result)
        };
        assert_eq!(decide(200, None), Decision::Accept);
        assert_eq!(decide(500, None), Decision::Accept);
        assert_eq!(decide(404, None), Decision::Accept);
        assert_eq!(decide(502, None), Decision::Retry);
        assert_eq!(decide(504, None), Decision::Retry);
        assert_eq!(
            decide(503, Some("2")),
            Decision::RetryAfter(Duration::from_secs(2))
        );
        let io: Result<Response<()>, BoxError> = Err(std::io::Error::other("reset").into());
        assert_eq!(
            Policy::<Request<()>, _, _>::decide(&policy, &io),
            Decision::Retry
        );
        let limited = crate::ratelimit::RateLimiter::new(
            crate::ratelimit::Quota::new(1, Duration::from_secs(1)).unwrap(),
        );
        limited.check(None, "k").unwrap();
        let err: Result<Response<()>, BoxError> = Err(limited.check(None, "k").unwrap_err().into());
        assert_eq!(
            Policy::<Request<()>, _, _>::decide(&policy, &err),
            Decision::Accept
        );
    }

    #[test]
    fn server_errors_classify() {
        let c = ServerErrors;
        let r = |s: u16| -> Result<Response<()>, BoxError> {
            Ok(Response::builder().status(s).body(()).unwrap())
        };
        assert!(!c.is_failure(&r(200)));
        assert!(!c.is_failure(&r(429)));
        assert!(c.is_failure(&r(500)));
        assert!(c.is_failure(&r(503)));
        assert!(c.is_failure(&Err::<Response<()>, BoxError>("boom".into())));
        assert_eq!(outcome_of(StatusCode::BAD_GATEWAY), Outcome::Failure);
        assert_eq!(outcome_of(StatusCode::NOT_FOUND), Outcome::Success);
    }

    #[test]
    fn extractors_read_header_extension_and_ip() {
        let mut req = Request::get("/")
            .header("x-api-key", "key-1")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(SocketAddr::from(([10, 0, 0, 7], 5555)));
        req.extensions_mut().insert(Subject("user-42".into()));
        let h = HeaderKey::new(HeaderName::from_static("x-api-key")).with_class("api");
        let k = h.extract(&req).unwrap();
        assert_eq!((k.key.as_ref(), k.class.as_deref()), ("key-1", Some("api")));
        assert_eq!(ClientIpKey::new().extract(&req).unwrap().key, "10.0.0.7");
        assert_eq!(
            ExtensionKey::<Subject>::new().extract(&req).unwrap().key,
            "user-42"
        );
        let bare = Request::get("/").body(()).unwrap();
        assert!(h.extract(&bare).is_none());
        assert!(ClientIpKey::new().extract(&bare).is_none());
    }

    #[derive(Clone)]
    struct Subject(String);
    impl AsRef<str> for Subject {
        fn as_ref(&self) -> &str {
            &self.0
        }
    }

    #[test]
    fn cookie_and_header_hash_keys() {
        let req = Request::get("/")
            .header("cookie", "a=1")
            .header("cookie", " session = s-9 ; b=2")
            .header("x-user", "u1")
            .body(())
            .unwrap();
        assert_eq!(
            HashOn::Cookie("session".into()).key(&req),
            Some(&b"s-9"[..])
        );
        assert_eq!(HashOn::Cookie("a".into()).key(&req), Some(&b"1"[..]));
        assert_eq!(HashOn::Cookie("sess".into()).key(&req), None);
        assert_eq!(
            HashOn::Header(HeaderName::from_static("x-user")).key(&req),
            Some(&b"u1"[..])
        );
    }

    #[tokio::test]
    async fn buffering_respects_the_limit() {
        let req = Request::post("/")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        let buffered = buffer_request(req, 5).await.unwrap();
        let copy = buffered.clone();
        let body = copy.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
        let big = Request::post("/")
            .body(Full::new(Bytes::from_static(b"hello!")))
            .unwrap();
        let err = buffer_request(big, 5).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "request body is larger than 5 bytes, the most buffered to allow a retry"
        );
    }
}
