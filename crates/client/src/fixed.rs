//! A client with one fixed address instead of the registry — how a client talks through a
//! service mesh, whose sidecar picks the instance — and a hook adding headers to every
//! request (the mesh's request id and B3 headers).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;

use crate::error::BuildError;

/// The one address a [`ServiceClient`](crate::ServiceClient) built with
/// [`static_endpoint`](crate::ServiceClientBuilder::static_endpoint) sends every request
/// to: `http://host[:port]/`. The request's `Host` header is that host, whatever
/// [`resolve_to`](Self::resolve_to) says.
///
/// ```
/// use trellis_client::StaticEndpoint;
///
/// let endpoint = StaticEndpoint::parse("http://user-service.default.svc.cluster.local/")?
///     .resolve_to("127.0.0.1:8080".parse()?);
/// assert_eq!(endpoint.host(), "user-service.default.svc.cluster.local");
/// assert!(StaticEndpoint::parse("https://x/").is_err()); // plain HTTP only
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticEndpoint {
    url: reqwest::Url,
    host: String,
    resolve: Option<SocketAddr>,
}

impl StaticEndpoint {
    /// Parses `http://host[:port][/]`. Other schemes, a missing host, a path other than
    /// `/`, a query, a fragment or credentials are rejected, naming what was wrong.
    pub fn parse(url: &str) -> Result<Self, BuildError> {
        let invalid = |reason: String| BuildError::Invalid {
            setting: "static_endpoint",
            reason: format!("{url:?}: {reason}"),
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() != "http" {
            return Err(invalid(format!(
                "scheme {:?}; only http (the client speaks plain HTTP/1.1)",
                parsed.scheme()
            )));
        }
        let Some(host) = parsed.host_str().map(str::to_owned) else {
            return Err(invalid("has no host".into()));
        };
        if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(invalid(
                "has a path, query or fragment; give only http://host[:port]/".into(),
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid("has credentials".into()));
        }
        Ok(StaticEndpoint {
            url: parsed,
            host,
            resolve: None,
        })
    }

    /// Connects to `addr` instead of resolving the host with DNS — like curl's
    /// `--resolve`. The port of `addr` is used when the URL names none. Defaults to DNS.
    #[must_use]
    pub fn resolve_to(mut self, addr: SocketAddr) -> Self {
        self.resolve = Some(addr);
        self
    }

    /// The base URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The host, as sent in the `Host` header.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The address given to [`resolve_to`](Self::resolve_to).
    pub fn resolved(&self) -> Option<SocketAddr> {
        self.resolve
    }

    /// `host:port` of the URL (the port may be the scheme's default).
    pub(crate) fn address(&self) -> String {
        format!(
            "{}:{}",
            self.host,
            self.url.port_or_known_default().unwrap_or(80)
        )
    }
}

/// Called with the headers of every request just before it is sent (after the trace
/// context and the client's default headers were added), to add headers of its own — a
/// service mesh's `x-request-id` and B3 headers. Built with [`RequestHeaders::new`] and
/// given to [`ServiceClientBuilder::request_headers`](crate::ServiceClientBuilder::request_headers).
#[derive(Clone)]
pub struct RequestHeaders(Arc<dyn Fn(&mut HeaderMap) + Send + Sync>);

impl RequestHeaders {
    /// Wraps `hook`.
    pub fn new(hook: impl Fn(&mut HeaderMap) + Send + Sync + 'static) -> Self {
        RequestHeaders(Arc::new(hook))
    }

    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        (self.0)(headers);
    }
}

impl fmt::Debug for RequestHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RequestHeaders(..)")
    }
}
