//! One call: its builder, and the attempt loop (pick, send, report, retry).

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use tokio::time::Instant;
use trellis_resilience::http::{is_idempotent, parse_retry_after};
use trellis_tracing::HttpClientSpan;
use trellis_tracing::opentelemetry::Context;
use trellis_tracing::opentelemetry::trace::TraceContextExt as _;

use crate::client::{Inner, ServiceClient};
use crate::context::{CallContext, DEADLINE_HEADER};
use crate::endpoints::Chosen;
use crate::error::ClientError;
use crate::response::{ServiceResponse, error_body};

/// Longest path (with its query) accepted, in bytes.
const MAX_PATH: usize = 8192;

/// A request being prepared; send it with [`send`](Self::send) or by awaiting it.
///
/// ```no_run
/// # async fn run(orders: trellis_client::ServiceClient) -> Result<(), trellis_client::ClientError> {
/// #[derive(serde::Serialize)]
/// struct NewOrder<'a> { user_id: &'a str, kind: &'a str }
///
/// let created = orders
///     .post("/orders")
///     .json(&NewOrder { user_id: "42", kind: "welcome" })
///     .header("idempotency-key", "welcome-42")
///     .retryable() // safe: the service de-duplicates on the idempotency key
///     .await?;
/// assert!(created.status().is_success());
/// # Ok(()) }
/// ```
#[must_use = "a request does nothing until it is sent or awaited"]
#[derive(Debug)]
pub struct RequestBuilder {
    client: ServiceClient,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Option<Bytes>,
    retryable: bool,
    timeout: Option<Duration>,
    context: Option<CallContext>,
    hash_key: Option<Bytes>,
    error: Option<ClientError>,
}

impl RequestBuilder {
    pub(crate) fn new(client: ServiceClient, method: Method, path: &str) -> Self {
        let error = check_path(path)
            .err()
            .map(|reason| ClientError::invalid(&client.inner.service, reason));
        RequestBuilder {
            client,
            method,
            path: path.to_owned(),
            headers: HeaderMap::new(),
            body: None,
            retryable: false,
            timeout: None,
            context: None,
            hash_key: None,
            error,
        }
    }

    fn fail(&mut self, reason: String) {
        if self.error.is_none() {
            self.error = Some(ClientError::invalid(&self.client.inner.service, reason));
        }
    }

    /// Adds a header (replacing one of the same name). An invalid name or value fails the
    /// call with [`ClientError::InvalidRequest`].
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        K::Error: Into<http::Error>,
        V: TryInto<HeaderValue>,
        V::Error: Into<http::Error>,
    {
        match (name.try_into(), value.try_into()) {
            (Ok(name), Ok(value)) => {
                self.headers.insert(name, value);
            }
            (Err(e), _) => self.fail(format!("header name: {}", e.into())),
            (_, Err(e)) => self.fail(format!("header value: {}", e.into())),
        }
        self
    }

    /// Adds headers (replacing those of the same names).
    pub fn headers(mut self, headers: HeaderMap) -> Self {
        self.headers.extend(headers);
        self
    }

    /// Appends `query`, serialized as `application/x-www-form-urlencoded`, to the path's
    /// query.
    pub fn query<T: Serialize + ?Sized>(mut self, query: &T) -> Self {
        match serde_urlencoded::to_string(query) {
            Ok(encoded) if encoded.is_empty() => {}
            Ok(encoded) => {
                self.path
                    .push(if self.path.contains('?') { '&' } else { '?' });
                self.path.push_str(&encoded);
                if self.path.len() > MAX_PATH {
                    self.fail(format!("path and query are longer than {MAX_PATH} bytes"));
                }
            }
            Err(e) => self.fail(format!("query: {e}")),
        }
        self
    }

    /// Sends `body` as JSON (`content-type: application/json`).
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(bytes) => {
                self.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                self.body = Some(Bytes::from(bytes));
            }
            Err(e) => self.fail(format!("JSON body: {e}")),
        }
        self
    }

    /// Sends `body` as it is (set `content-type` with [`header`](Self::header)). Bodies are
    /// held in memory so that a retry can send them again.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Marks the request safe to send more than once although its method is not
    /// idempotent (a POST with an idempotency key). GET, HEAD, OPTIONS, PUT and DELETE are
    /// retryable already.
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    /// This call's time limit instead of the client's `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The trace context and deadline to pass on, instead of [`CallContext::current`].
    pub fn context(mut self, context: CallContext) -> Self {
        self.context = Some(context);
        self
    }

    /// The key a [`Strategy::ConsistentHash`](trellis_resilience::balance::Strategy)
    /// balancer hashes (a user or session id); requests without one are spread at random.
    pub fn hash_key(mut self, key: impl Into<Bytes>) -> Self {
        self.hash_key = Some(key.into());
        self
    }

    /// Sends the request; see [`ServiceClient`] for what happens.
    pub async fn send(self) -> Result<ServiceResponse, ClientError> {
        let RequestBuilder {
            client,
            method,
            path,
            mut headers,
            body,
            retryable,
            timeout,
            context,
            hash_key,
            error,
        } = self;
        if let Some(error) = error {
            return Err(error);
        }
        let inner = &*client.inner;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(ClientError::invalid(
                &inner.service,
                "calls must be made inside a tokio runtime",
            ));
        };
        let start = Instant::now();
        let explicit_context = context.is_some();
        let caller_deadline = match &context {
            Some(ctx) => {
                ctx.inject(&mut headers);
                ctx.deadline()
            }
            None => CallContext::inject_current(&mut headers),
        };
        if let Some(extra) = &inner.extra_headers {
            for (name, value) in extra {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        if let Some(hook) = &inner.request_headers {
            hook.apply(&mut headers);
        }
        // With a tracer, the attempts' spans are children of the caller's context: the one
        // given to this request, else the current OpenTelemetry span, else the
        // `CallContext` scope (already in `headers`).
        let parent = inner.tracer.as_ref().map(|tracer| {
            let current = Context::current();
            if !explicit_context && current.span().span_context().is_valid() {
                current
            } else {
                tracer.propagator().extract_headers(&headers)
            }
        });
        let own = start + timeout.unwrap_or(inner.timeout);
        let (deadline, by_caller) = match caller_deadline {
            Some(d) if d < own => (d, true),
            _ => (own, false),
        };
        let call = Call {
            inner,
            runtime: runtime.id(),
            method,
            path,
            headers,
            body,
            parent,
            deadline,
            by_caller,
            limit: deadline.saturating_duration_since(start),
        };
        let may_retry = inner.retries > 0 && (retryable || is_idempotent(&call.method));
        call.run(may_retry, hash_key.as_deref()).await
    }
}

impl IntoFuture for RequestBuilder {
    type Output = Result<ServiceResponse, ClientError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// A path must start with `/`, hold only characters allowed in a URI path and query, and
/// carry no fragment.
fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path {:?} must start with '/'", cut(path)));
    }
    if path.len() > MAX_PATH {
        return Err(format!("path is longer than {MAX_PATH} bytes"));
    }
    if path.contains('#') {
        return Err(format!(
            "path {:?} must not contain a fragment ('#')",
            cut(path)
        ));
    }
    http::uri::PathAndQuery::try_from(path)
        .map(|_| ())
        .map_err(|e| format!("path {:?}: {e}", cut(path)))
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

/// One call in progress.
struct Call<'a> {
    inner: &'a Inner,
    /// The runtime the call runs on (attempt timers belong to it).
    runtime: tokio::runtime::Id,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Option<Bytes>,
    /// The parent of the attempts' client spans; `None` without a tracer.
    parent: Option<Context>,
    /// When the call gives up: `min(start + timeout, caller's deadline)`.
    deadline: Instant,
    /// The deadline is the caller's, not the client's own timeout.
    by_caller: bool,
    /// `deadline - start`, reported in [`ClientError::Timeout`].
    limit: Duration,
}

impl Call<'_> {
    async fn run(
        &self,
        may_retry: bool,
        hash_key: Option<&[u8]>,
    ) -> Result<ServiceResponse, ClientError> {
        let inner = self.inner;
        inner.budget.deposit();
        let mut retry = 0u32;
        let mut last: Option<ClientError> = None;
        loop {
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last.unwrap_or_else(|| self.timeout_error(self.limit)));
            }
            let chosen = match inner.endpoints.choose(hash_key) {
                Ok(chosen) => chosen,
                // On a retry, what went wrong with the previous attempt says more than
                // "its breaker is open now".
                Err(refused) => return Err(last.unwrap_or(refused)),
            };
            let attempt_limit = inner
                .attempt_timeout
                .map_or(remaining, |a| a.min(remaining));
            let (error, wait_at_least) =
                match self.attempt(chosen, attempt_limit, remaining, retry).await {
                    Ok(response) => return Ok(response),
                    Err(failed) => failed,
                };
            let retryable = match &error {
                ClientError::Status { status, .. } => inner.retry_on.contains(status),
                other => other.is_retryable(),
            };
            let delay = if may_retry && retryable && retry < inner.retries {
                self.may_wait(retry, wait_at_least)
            } else {
                None
            };
            let Some(delay) = delay else {
                return Err(error);
            };
            tracing::debug!(
                service = %inner.service,
                retry = retry + 1,
                ?delay,
                %error,
                "retrying"
            );
            last = Some(error);
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }

    /// The wait before retry `retry`, if the deadline and the budget allow one.
    fn may_wait(&self, retry: u32, wait_at_least: Option<Duration>) -> Option<Duration> {
        let backoff = self.inner.backoff;
        let delay = match wait_at_least {
            Some(after) if after > backoff.cap() => return None,
            Some(after) => after.max(backoff.delay(retry)),
            None => backoff.delay(retry),
        };
        if Instant::now() + delay >= self.deadline {
            return None;
        }
        self.inner.budget.withdraw().then_some(delay)
    }

    /// Sends one attempt to `chosen` and reports its outcome. A failure comes with the
    /// least wait before a retry (an error response's `Retry-After`).
    async fn attempt(
        &self,
        chosen: Chosen,
        attempt_limit: Duration,
        remaining: Duration,
        retry: u32,
    ) -> Result<ServiceResponse, (ClientError, Option<Duration>)> {
        let inner = self.inner;
        let target = chosen.target();
        let instance = target.id.clone();
        let url = match &target.base {
            Ok(base) => {
                let mut url = base.clone();
                match self.path.split_once('?') {
                    Some((path, query)) => {
                        url.set_path(path);
                        url.set_query(Some(query));
                    }
                    None => url.set_path(&self.path),
                }
                url
            }
            Err(reason) => {
                let reason = reason.clone();
                chosen.abandon();
                return Err((ClientError::invalid(&inner.service, reason), None));
            }
        };
        let mut request = reqwest::Request::new(self.method.clone(), url);
        let headers = request.headers_mut();
        headers.clone_from(&self.headers);
        headers.insert(
            DEADLINE_HEADER,
            HeaderValue::from(u64::try_from(attempt_limit.as_millis()).unwrap_or(u64::MAX)),
        );
        if let Some(body) = &self.body {
            *request.body_mut() = Some(body.clone().into());
        }
        let span = self.client_span(&mut request, &instance, retry);
        let attempt_end = Instant::now() + attempt_limit;
        // The attempt ends at the call's deadline (not at an attempt timeout).
        let last_chance = attempt_limit >= remaining;
        let outcome = {
            let timer = inner.timers.start(self.runtime, attempt_end);
            tokio::select! {
                biased;
                result = inner.http.execute(request) => Some(result),
                () = timer => None,
            }
        };
        match outcome {
            Some(Ok(mut response)) => {
                let status = response.status();
                if let Some(span) = span {
                    span.finish(status.as_u16());
                }
                chosen.report(status.is_server_error());
                if status.as_u16() < 400 {
                    return Ok(ServiceResponse::new(
                        response,
                        inner.service.clone(),
                        instance,
                        self.deadline,
                        self.limit,
                        inner.max_response_bytes,
                    ));
                }
                let wait_at_least = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                // Reading the (short) error body also frees the connection for reuse.
                let body = error_body(&mut response, attempt_end).await;
                let error = ClientError::Status {
                    service: inner.service.to_string(),
                    instance: instance.to_string(),
                    status,
                    body,
                };
                Err((error, wait_at_least))
            }
            Some(Err(source)) => {
                let address = chosen.target().address.to_string();
                chosen.report(true);
                let error = ClientError::Connect {
                    service: inner.service.to_string(),
                    instance: instance.to_string(),
                    address,
                    source,
                };
                if let Some(span) = span {
                    span.fail(&error);
                }
                Err((error, None))
            }
            None => {
                if last_chance && self.by_caller {
                    // The caller's deadline, not the instance, ended this attempt.
                    chosen.abandon();
                } else {
                    chosen.report(true);
                }
                let after = if last_chance {
                    self.limit
                } else {
                    attempt_limit
                };
                let error = self.timeout_error(after);
                if let Some(span) = span {
                    span.fail(&error);
                }
                Err((error, None))
            }
        }
    }

    /// Starts the client span of attempt `retry` (0 for the first) and writes its context
    /// into the request headers, when the client has a tracer.
    fn client_span(
        &self,
        request: &mut reqwest::Request,
        instance: &str,
        retry: u32,
    ) -> Option<HttpClientSpan> {
        let (Some(tracer), Some(parent)) = (&self.inner.tracer, &self.parent) else {
            return None;
        };
        let url = request.url().to_string();
        let span =
            tracer.http_client_span_with_parent(parent, &self.method, &url, request.headers_mut());
        if span.is_recording() {
            span.set_tag("trellis.service", self.inner.service.to_string());
            span.set_tag("trellis.upstream.instance", instance.to_owned());
            span.set_tag("trellis.attempt", i64::from(retry) + 1);
        }
        Some(span)
    }

    fn timeout_error(&self, after: Duration) -> ClientError {
        ClientError::Timeout {
            service: self.inner.service.to_string(),
            after,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn paths_are_checked() {
        assert!(check_path("/users/42/orders?limit=10&x=%20").is_ok());
        for (bad, needle) in [
            ("users", "must start with '/'"),
            ("http://evil.example/x", "must start with '/'"),
            ("/a#frag", "fragment"),
            ("/a b", "path \"/a b\""),
            ("/a\nb", "path"),
        ] {
            let err = check_path(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }
}
