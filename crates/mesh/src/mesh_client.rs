//! `mesh.create_client("user-service")` (feature `client`): a
//! [`ServiceClient`](trellis_client::ServiceClient) that sends to the mesh's name for the
//! service and leaves retries and circuit breaking to the mesh.
//!
//! Why each setting:
//!
//! - **One fixed endpoint**, `http://{service}.{namespace}.svc.{cluster_domain}/` (port 80,
//!   the Service's): the sidecar picks the pod, so the client does not read the registry.
//! - **No retries, no circuit breaker, no outlier ejection**: the mesh retries
//!   `retry_policy.attempts` times and ejects by `circuit_breaker`; a client doing the same
//!   would multiply the attempts (3 client retries × 3 mesh retries = 16 tries) and open
//!   its one breaker for the whole service.
//! - **Timeout** = the mesh's whole-request timeout (per-try timeout × (attempts + 1)) plus
//!   one second, so the client never gives up while the mesh is still retrying.
//! - **Headers**: every request carries the B3 headers and `x-request-id` of the request
//!   being served ([`MeshContext`], set with [`MeshContext::scope`]), so the mesh joins the
//!   spans into one trace; without one, a fresh `x-request-id` (a UUID v4, as Envoy makes).
//!   Headers set on the request itself win. W3C `traceparent` goes through the client's
//!   own [`CallContext`](trellis_client::CallContext) as usual, and from the
//!   [`MeshContext`] when that has none.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use trellis_client::{RequestHeaders, ServiceClient, ServiceClientBuilder, StaticEndpoint};

use crate::ServiceMesh;
use crate::client::{PROPAGATED_HEADERS, propagate_headers};
use crate::error::{MeshError, invalid};

/// The request id header the mesh's proxies log and propagate.
pub const REQUEST_ID: &str = "x-request-id";

tokio::task_local! {
    static CURRENT: MeshContext;
}

/// The mesh headers of the request being served: [`PROPAGATED_HEADERS`] copied from it.
/// Give it to every call made while serving that request with [`scope`](Self::scope).
///
/// ```
/// use http::{HeaderMap, HeaderValue};
/// use trellis_mesh::MeshContext;
///
/// let mut incoming = HeaderMap::new();
/// incoming.insert("x-request-id", HeaderValue::from_static("r-1"));
/// incoming.insert("authorization", HeaderValue::from_static("secret"));
/// let context = MeshContext::from_headers(&incoming);
/// assert_eq!(context.headers()["x-request-id"], "r-1");
/// assert!(context.headers().get("authorization").is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshContext {
    headers: HeaderMap,
}

impl MeshContext {
    /// The [`PROPAGATED_HEADERS`] of `incoming`, and nothing else.
    pub fn from_headers(incoming: &HeaderMap) -> Self {
        let mut headers = HeaderMap::new();
        propagate_headers(incoming, &mut headers);
        MeshContext { headers }
    }

    /// The headers kept.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Runs `future` with this context as the current one: every request a mesh client
    /// makes inside it carries these headers.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// The context of the enclosing [`scope`](Self::scope), if any.
    pub fn current() -> Option<MeshContext> {
        CURRENT.try_with(Clone::clone).ok()
    }
}

/// Adds the current [`MeshContext`]'s headers that the request does not have, then a fresh
/// `x-request-id` when it still has none.
fn add_mesh_headers(headers: &mut HeaderMap) {
    if let Some(context) = MeshContext::current() {
        for name in PROPAGATED_HEADERS {
            if headers.contains_key(name) {
                continue;
            }
            for value in context.headers.get_all(name) {
                headers.append(name, value.clone());
            }
        }
    }
    if !headers.contains_key(REQUEST_ID)
        && let Ok(value) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
    {
        headers.insert(REQUEST_ID, value);
    }
}

/// Settings of a mesh client beyond the mesh's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeshClientOptions {
    /// The Service port. Defaults to 80.
    pub port: Option<u16>,
    /// Connect here instead of resolving the mesh name with DNS (curl's `--resolve`): for
    /// tests and for running outside the cluster through a port-forward. Defaults to DNS.
    pub resolve: Option<SocketAddr>,
}

impl MeshClientOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the Service port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Connects to `addr` instead of resolving the mesh name.
    #[must_use]
    pub fn resolve(mut self, addr: SocketAddr) -> Self {
        self.resolve = Some(addr);
        self
    }
}

impl ServiceMesh {
    /// The seed's `mesh.createClient('user-service')`: a client for `service` through the
    /// mesh — see the [module docs](crate::mesh_client) for each setting.
    ///
    /// ```
    /// use trellis_mesh::{MeshConfig, MeshProvider, ServiceMesh};
    ///
    /// let mesh = ServiceMesh::new(MeshConfig::new(MeshProvider::Istio))?;
    /// let users = mesh.create_client("user-service")?;
    /// assert_eq!(users.service(), "user-service");
    /// assert!(users.breakers().is_empty()); // the mesh breaks circuits
    /// assert!(mesh.create_client("User_Service").is_err());
    /// # Ok::<(), trellis_mesh::MeshError>(())
    /// ```
    pub fn create_client(&self, service: &str) -> Result<ServiceClient, MeshError> {
        self.create_client_with(service, &MeshClientOptions::default())
    }

    /// [`create_client`](Self::create_client) with `options`.
    pub fn create_client_with(
        &self,
        service: &str,
        options: &MeshClientOptions,
    ) -> Result<ServiceClient, MeshError> {
        self.client_builder(service, options)?
            .build()
            .map_err(|e| invalid("client", e.to_string()))
    }

    /// The builder [`create_client_with`](Self::create_client_with) builds, to change
    /// what the mesh does not decide (default headers, response size limit, a tracer).
    /// Turning retries or breakers back on multiplies the mesh's policy.
    pub fn client_builder(
        &self,
        service: &str,
        options: &MeshClientOptions,
    ) -> Result<ServiceClientBuilder, MeshError> {
        let target = self.client_target(service)?;
        let url = match options.port {
            Some(0) => return Err(invalid("port", "0 is not a port")),
            Some(port) => target.base_url(port),
            None => format!("http://{}/", target.host),
        };
        let mut endpoint =
            StaticEndpoint::parse(&url).map_err(|e| invalid("client", e.to_string()))?;
        if let Some(addr) = options.resolve {
            endpoint = endpoint.resolve_to(addr);
        }
        let timeout = self.config().policies.request_timeout() + Duration::from_secs(1);
        Ok(ServiceClient::static_builder(service, endpoint)
            .retries(0)
            .circuit_breaker(false)
            .without_outlier_detection()
            .timeout(timeout)
            .request_headers(RequestHeaders::new(add_mesh_headers)))
    }
}
