//! [`ServiceClient`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use trellis_core::{NameKind, validate_name};
use trellis_registry::ServiceRegistry;
use trellis_resilience::balance::{EndpointStatus, LoadBalancer, OutlierDetection, Strategy};
use trellis_resilience::breaker::{BreakerConfig, BreakerSnapshot, CircuitBreakers};
use trellis_resilience::retry::{Backoff, BudgetSnapshot, RetryBudget};
use trellis_tracing::DistributedTracer;

use crate::endpoints::{Endpoints, Source};
use crate::error::{BuildError, ClientError};
use crate::fixed::{RequestHeaders, StaticEndpoint};
use crate::request::RequestBuilder;
use crate::timer::Timers;

/// The seed's `timeout: 10000`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The seed's `retries: 3`.
pub const DEFAULT_RETRIES: u32 = 3;
/// Time allowed to open a TCP connection to an instance, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response body read by [`ServiceResponse::bytes`](crate::ServiceResponse::bytes)
/// and the JSON helpers, by default: 16 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Most retries a client may be configured with.
const MAX_RETRIES: u32 = 10;

/// Settings shared by every call of a client.
pub(crate) struct Inner {
    pub(crate) service: Arc<str>,
    pub(crate) endpoints: Endpoints,
    pub(crate) http: reqwest::Client,
    /// The default headers, when the HTTP client was supplied (otherwise it holds them).
    pub(crate) extra_headers: Option<HeaderMap>,
    pub(crate) timeout: Duration,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) retries: u32,
    pub(crate) backoff: Backoff,
    pub(crate) retry_on: Box<[StatusCode]>,
    pub(crate) budget: Arc<RetryBudget>,
    pub(crate) max_response_bytes: usize,
    pub(crate) timers: Timers,
    /// Client spans per attempt; `None` (the default) costs nothing.
    pub(crate) tracer: Option<DistributedTracer>,
    /// Adds headers to every request (a mesh's request id and B3 headers).
    pub(crate) request_headers: Option<RequestHeaders>,
}

/// A client for one service found in the registry — the seed's
/// `new ServiceClient('order-service', { serviceRegistry, timeout, retries, circuitBreaker })`.
///
/// Each call:
///
/// 1. reads the registry snapshot and brings the load balancer up to date (unhealthy
///    instances skipped, `unknown` ones allowed);
/// 2. picks an instance with the balancer, passing over instances whose circuit breaker is
///    open (all open: [`ClientError::CircuitOpen`], nothing sent);
/// 3. sends the request with the trace context and the remaining deadline
///    ([`CallContext`](crate::CallContext)), within `min(timeout, caller's deadline)`;
///    with a [`tracer`](ServiceClientBuilder::tracer), each attempt is a client span
///    and its context is what the instance receives;
/// 4. reports the outcome to the instance's breaker and to outlier detection (5xx,
///    connection errors and timeouts are failures);
/// 5. retries — GET, HEAD, OPTIONS, PUT, DELETE, or a request marked
///    [`retryable`](RequestBuilder::retryable) — on connection errors, timeouts of one
///    attempt and 502/503/504, with exponential backoff and full jitter, while the retry
///    budget, the retry count and the deadline allow. Never once the response was handed
///    to the caller.
///
/// Statuses of 400 and above are errors ([`ClientError::Status`], with the start of the
/// body). Redirects are not followed. Cheap to clone; clones share the balancer, breakers,
/// budget and connection pool.
#[derive(Clone)]
pub struct ServiceClient {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClient")
            .field("service", &self.inner.service)
            .field("timeout", &self.inner.timeout)
            .field("retries", &self.inner.retries)
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

impl ServiceClient {
    /// A client for `service` with the seed's defaults: timeout 10 s, 3 retries, circuit
    /// breakers on, round robin.
    pub fn new(service: &str, registry: &ServiceRegistry) -> Result<Self, BuildError> {
        Self::builder(service, registry).build()
    }

    /// A builder for a client of `service`.
    pub fn builder(service: &str, registry: &ServiceRegistry) -> ServiceClientBuilder {
        ServiceClientBuilder::new(service, Source::Registry(registry.clone()))
    }

    /// A builder for a client of `service` that sends every request to `endpoint` instead
    /// of instances from a registry — the same as
    /// [`builder`](Self::builder)`(…).`[`static_endpoint`](ServiceClientBuilder::static_endpoint)`(endpoint)`
    /// without a registry.
    pub fn static_builder(service: &str, endpoint: StaticEndpoint) -> ServiceClientBuilder {
        ServiceClientBuilder::new(service, Source::Static(endpoint))
    }

    /// The service this client calls.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// A request with `method` to `path` (starting with `/`, may carry a `?query`).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        RequestBuilder::new(self.clone(), method, path)
    }

    /// A GET request: `client.get("/users/42/orders").await?`.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// A POST request: `client.post("/orders").json(&order).await?`. Not retried unless
    /// marked [`retryable`](RequestBuilder::retryable).
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    /// A PUT request.
    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    /// A PATCH request. Not retried unless marked retryable.
    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.request(Method::PATCH, path)
    }

    /// A DELETE request.
    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }

    /// GETs `path` and decodes the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.get(path).send().await?.json().await
    }

    /// POSTs `body` as JSON to `path` and decodes the JSON answer. Not retried.
    pub async fn post_json<B, T>(&self, path: &str, body: &B) -> Result<T, ClientError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.post(path).json(body).send().await?.json().await
    }

    /// PUTs `body` as JSON to `path` and decodes the JSON answer.
    pub async fn put_json<B, T>(&self, path: &str, body: &B) -> Result<T, ClientError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.put(path).json(body).send().await?.json().await
    }

    /// Each instance as the load balancer sees it (eligibility, requests in flight,
    /// failures, ejections), after bringing it up to date with the registry.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.inner.endpoints.sync();
        self.inner.endpoints.balancer().status()
    }

    /// Each instance's circuit breaker, keyed `service/instance`; empty when breakers are
    /// off.
    pub fn breakers(&self) -> Vec<(String, BreakerSnapshot)> {
        let mut all = self
            .inner
            .endpoints
            .breakers()
            .map(CircuitBreakers::snapshot)
            .unwrap_or_default();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Requests, retries and retries left in the retry budget.
    pub fn retry_budget(&self) -> BudgetSnapshot {
        self.inner.budget.snapshot()
    }
}

/// Builds a [`ServiceClient`]; every knob has the seed's default.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let store = trellis_store::Store::open(&format!("sqlite://{}/doc.db", dir.path().display())).await?;
/// # let registry = trellis_registry::ServiceRegistry::start(&store, Default::default()).await?;
/// use std::time::Duration;
/// use trellis_client::ServiceClient;
/// use trellis_resilience::balance::Strategy;
/// use trellis_resilience::breaker::BreakerConfig;
///
/// let orders = ServiceClient::builder("order-service", &registry)
///     .timeout(Duration::from_secs(10))
///     .retries(3)
///     .circuit_breaker(true)
///     .breaker_config(BreakerConfig::default().threshold(5).open_timeout(Duration::from_secs(60)))
///     .load_balancer(Strategy::LeastRequest)
///     .build()?;
/// assert_eq!(orders.service(), "order-service");
/// # registry.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ServiceClientBuilder {
    service: String,
    source: Source,
    request_headers: Option<RequestHeaders>,
    timeout: Duration,
    attempt_timeout: Option<Duration>,
    connect_timeout: Duration,
    retries: u32,
    backoff: Backoff,
    retry_on: Vec<StatusCode>,
    budget: Option<Arc<RetryBudget>>,
    breaker: Option<BreakerConfig>,
    strategy: Strategy,
    outlier: Option<OutlierDetection>,
    default_headers: HeaderMap,
    max_response_bytes: usize,
    pool_max_idle_per_host: usize,
    http: Option<reqwest::Client>,
    tracer: Option<DistributedTracer>,
}

impl ServiceClientBuilder {
    fn new(service: &str, source: Source) -> Self {
        ServiceClientBuilder {
            service: service.to_owned(),
            source,
            request_headers: None,
            timeout: DEFAULT_TIMEOUT,
            attempt_timeout: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            backoff: Backoff::default(),
            retry_on: vec![
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ],
            budget: None,
            breaker: Some(BreakerConfig::default()),
            strategy: Strategy::RoundRobin,
            outlier: Some(OutlierDetection::default()),
            default_headers: HeaderMap::new(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            pool_max_idle_per_host: 64,
            http: None,
            tracer: None,
        }
    }

    /// The longest a call may take, retries and backoff included; a caller's deadline that
    /// comes sooner wins. Defaults to 10 s (the seed's `timeout: 10000`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest one attempt may take before it is abandoned (and retried, if the request
    /// may be). Defaults to none: an attempt may use all the time left.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Time allowed to open a connection to an instance. Defaults to 2 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Retries after the first attempt (at most 10). Defaults to 3 (the seed's
    /// `retries: 3`); 0 disables retries.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The wait between attempts: exponential with full jitter. Defaults to
    /// [`Backoff::default`] (100 ms base, 10 s cap).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Response statuses that are retried. Defaults to 502, 503, 504.
    pub fn retry_on(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.retry_on = statuses.into_iter().collect();
        self
    }

    /// The budget retries are drawn from; share one between clients to bound their
    /// retries together. Defaults to a budget of this client's own,
    /// [`RetryBudget::default`] (retries ≤ 20 % of requests over 10 s, plus 10 per second).
    pub fn retry_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Circuit breakers per instance, on or off (the seed's `circuitBreaker: true`).
    /// Defaults to on, with [`BreakerConfig::default`].
    pub fn circuit_breaker(mut self, enabled: bool) -> Self {
        self.breaker = enabled.then(|| self.breaker.take().unwrap_or_default());
        self
    }

    /// Turns breakers on with `config` (threshold, failure rate, open timeout, probes).
    /// Defaults to [`BreakerConfig::default`]: 5 failures in a row, open 60 s.
    pub fn breaker_config(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(config);
        self
    }

    /// How instances are picked. Defaults to [`Strategy::RoundRobin`]. For
    /// [`Strategy::Weighted`], an instance's weight is its `weight` metadata (default 1);
    /// for [`Strategy::ConsistentHash`], the key is
    /// [`RequestBuilder::hash_key`](crate::RequestBuilder::hash_key).
    pub fn load_balancer(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Passive outlier ejection settings. Defaults to [`OutlierDetection::default`]: 5
    /// failures in a row eject an instance for 30 s (doubling), at most half of them.
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = Some(outlier);
        self
    }

    /// Never eject instances.
    pub fn without_outlier_detection(mut self) -> Self {
        self.outlier = None;
        self
    }

    /// A header sent with every request (an API key, a `user-agent`). Defaults to none.
    pub fn default_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.default_headers.insert(name, value);
        self
    }

    /// Headers sent with every request, added to those set before.
    pub fn default_headers(mut self, headers: HeaderMap) -> Self {
        self.default_headers.extend(headers);
        self
    }

    /// Largest response body the client reads into memory. Defaults to 16 MiB.
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// Idle keep-alive connections kept per instance. Defaults to 64.
    pub fn pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// Uses `client` (and its connection pool) instead of building one; the connect
    /// timeout and pool settings of this builder then do not apply, and redirects follow
    /// that client's policy. Default headers are still added to each request.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Records a client span (kind `client`) for every attempt with `tracer`, and sends
    /// that span's context (W3C `traceparent`, `tracestate`, `baggage`, and B3) instead of
    /// passing the caller's on unchanged. The span's parent is the request's
    /// [`context`](RequestBuilder::context) if set, else the current OpenTelemetry
    /// context, else [`CallContext::current`](crate::CallContext::current). It records the
    /// instance, the attempt number and the status; connection errors, timeouts and
    /// statuses of 400 and above mark it failed. A disabled tracer changes nothing.
    /// Defaults to none: the caller's trace context is forwarded as it is.
    pub fn tracer(mut self, tracer: DistributedTracer) -> Self {
        self.tracer = tracer.is_enabled().then_some(tracer);
        self
    }

    /// Sends every request to `endpoint` — one fixed address, such as a service mesh's name
    /// for the service — instead of the instances the registry lists. The balancer then
    /// holds that one endpoint, with its breaker and outlier detection when they are on.
    /// When the endpoint has a [`resolve_to`](StaticEndpoint::resolve_to) address, the
    /// HTTP client built here connects there (not with a supplied
    /// [`http_client`](Self::http_client), whose own resolution applies). Defaults to the
    /// registry.
    pub fn static_endpoint(mut self, endpoint: StaticEndpoint) -> Self {
        self.source = Source::Static(endpoint);
        self
    }

    /// Calls `hook` with the headers of every request just before it is sent, after the
    /// trace context and default headers were added. Defaults to none.
    pub fn request_headers(mut self, hook: RequestHeaders) -> Self {
        self.request_headers = Some(hook);
        self
    }

    /// Checks the settings and builds the client.
    pub fn build(self) -> Result<ServiceClient, BuildError> {
        validate_name(NameKind::Service, &self.service)?;
        let positive = |setting: &'static str, d: Duration| {
            if d.is_zero() {
                Err(BuildError::Invalid {
                    setting,
                    reason: "must be above zero".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("timeout", self.timeout)?;
        positive("connect_timeout", self.connect_timeout)?;
        if let Some(attempt) = self.attempt_timeout {
            positive("attempt_timeout", attempt)?;
        }
        if self.retries > MAX_RETRIES {
            return Err(BuildError::Invalid {
                setting: "retries",
                reason: format!("{} is too many; at most {MAX_RETRIES}", self.retries),
            });
        }
        if self.max_response_bytes == 0 {
            return Err(BuildError::Invalid {
                setting: "max_response_bytes",
                reason: "must be at least 1".into(),
            });
        }
        let service: Arc<str> = Arc::from(self.service.as_str());
        let mut balancer = LoadBalancer::builder(self.strategy);
        balancer = match self.outlier {
            Some(outlier) => balancer.outlier_detection(outlier),
            None => balancer.without_outlier_detection(),
        };
        let breakers = self.breaker.map(CircuitBreakers::new).transpose()?;
        let (http, extra_headers) = match self.http {
            Some(http) => (
                http,
                (!self.default_headers.is_empty()).then_some(self.default_headers),
            ),
            None => {
                let mut http = reqwest::Client::builder();
                if let Source::Static(endpoint) = &self.source
                    && let Some(addr) = endpoint.resolved()
                {
                    http = http.resolve(endpoint.host(), addr);
                }
                let http = http
                    .default_headers(self.default_headers)
                    .connect_timeout(self.connect_timeout)
                    .pool_max_idle_per_host(self.pool_max_idle_per_host)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .tcp_nodelay(true)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(BuildError::Http)?;
                (http, None)
            }
        };
        Ok(ServiceClient {
            inner: Arc::new(Inner {
                endpoints: Endpoints::new(
                    service.clone(),
                    self.source,
                    balancer.build()?,
                    breakers,
                ),
                service,
                http,
                extra_headers,
                timeout: self.timeout,
                attempt_timeout: self.attempt_timeout,
                retries: self.retries,
                backoff: self.backoff,
                retry_on: self.retry_on.into(),
                budget: self
                    .budget
                    .unwrap_or_else(|| Arc::new(RetryBudget::default())),
                max_response_bytes: self.max_response_bytes,
                timers: Timers::default(),
                tracer: self.tracer,
                request_headers: self.request_headers,
            }),
        })
    }
}
