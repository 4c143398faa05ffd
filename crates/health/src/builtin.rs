//! Ready-made checks: a [`Store`] answers ([`StoreCheck`]), an HTTP endpoint returns 2xx
//! ([`HttpCheck`]), a TCP port accepts connections ([`TcpCheck`]).
//!
//! None of them has a timeout of its own: the monitor bounds every run with the check's
//! [`CheckOptions::timeout`](crate::CheckOptions::timeout).

use std::error::Error as StdError;
use std::fmt;

use futures_util::future::BoxFuture;
use trellis_store::{Store, StoreError};

use crate::check::HealthCheck;

/// Why a built-in check failed; its `Display` is the report's `error` text.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("store ping failed: {}", chain(.0))]
    Store(#[source] StoreError),
    #[error("HTTP client could not be built: {0}")]
    HttpClient(String),
    #[error("GET {url} failed: {}", chain(.source))]
    HttpRequest {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url} returned {status}")]
    HttpStatus {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("TCP connect to {addr} failed: {source}")]
    TcpConnect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// An error's message followed by those of its sources that it does not already contain:
/// `error sending request: client error (Connect): tcp connect error: Connection refused`.
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// Healthy when the [`Store`] answers a ping (the seed's "database" check).
///
/// Fails with the store's error, e.g. `store unavailable (sqlite): database file … is not
/// reachable` when the file was removed.
#[derive(Debug, Clone)]
pub struct StoreCheck {
    store: Store,
}

impl StoreCheck {
    /// A check pinging `store`.
    pub fn new(store: Store) -> Self {
        StoreCheck { store }
    }
}

impl HealthCheck for StoreCheck {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.store
                .ping()
                .await
                .map_err(|e| ProbeError::Store(e).to_string())
        })
    }
}

/// Healthy when `GET url` answers with a 2xx status — typically a peer's `/health`.
///
/// Plain HTTP only (no TLS), and no proxy: a health check talks to the endpoint itself.
/// The response body is not read. Fails with the status
/// (`GET http://…/health returned 503 Service Unavailable`) or with the connection error
/// (`GET http://…/health failed: error sending request: client error (Connect): tcp connect
/// error: Connection refused (os error 111)`).
#[derive(Clone)]
pub struct HttpCheck {
    url: String,
    client: Result<reqwest::Client, String>,
}

impl fmt::Debug for HttpCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCheck")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl HttpCheck {
    /// A check of `url` (`http://host:port/path`) with a client of its own.
    pub fn new(url: impl Into<String>) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| chain(&e));
        HttpCheck {
            url: url.into(),
            client,
        }
    }

    /// The URL this check requests.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn probe(&self) -> Result<(), ProbeError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| ProbeError::HttpClient(e.clone()))?;
        let response =
            client
                .get(&self.url)
                .send()
                .await
                .map_err(|source| ProbeError::HttpRequest {
                    url: self.url.clone(),
                    // The URL is already in our message.
                    source: source.without_url(),
                })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(ProbeError::HttpStatus {
                url: self.url.clone(),
                status,
            })
        }
    }
}

impl HealthCheck for HttpCheck {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.probe().await.map_err(|e| e.to_string()) })
    }
}

/// Healthy when a TCP connection to `addr` (`host:port`) can be opened; the connection is
/// closed right away.
///
/// Fails with the connect error: `TCP connect to 127.0.0.1:5432 failed: Connection refused`.
#[derive(Debug, Clone)]
pub struct TcpCheck {
    addr: String,
}

impl TcpCheck {
    /// A check connecting to `addr`, written `host:port` (the host is resolved on each run).
    pub fn new(addr: impl Into<String>) -> Self {
        TcpCheck { addr: addr.into() }
    }

    /// The address this check connects to.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl HealthCheck for TcpCheck {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match tokio::net::TcpStream::connect(self.addr.as_str()).await {
                Ok(_stream) => Ok(()),
                Err(source) => Err(ProbeError::TcpConnect {
                    addr: self.addr.clone(),
                    source,
                }
                .to_string()),
            }
        })
    }
}
