//! What a service process needs around its handlers: its environment read the way
//! `trellis deploy` on the local platform (and `trellis demo`) passes it — `PORT`,
//! `TRELLIS_SERVICE`, `TRELLIS_VERSION`, `TRELLIS_INSTANCE_ID`, `TRELLIS_STORE` and the
//! standard `OTEL_*` variables — a server span per request, and graceful shutdown on
//! Ctrl-C or SIGTERM.
//!
//! This is not a framework: a service stays an axum router; it adds [`serve_request`] as a
//! layer and reads [`ServiceEnv`].
//!
//! ```
//! use trellis::service::ServiceEnv;
//!
//! let vars = [("PORT", "3001"), ("TRELLIS_VERSION", "1.2.0")];
//! let env = ServiceEnv::from_lookup("user-service", |k| {
//!     vars.iter().find(|(name, _)| *name == k).map(|(_, v)| (*v).to_owned())
//! })?;
//! assert_eq!((env.port, env.service.as_str(), env.version.as_str()), (3001, "user-service", "1.2.0"));
//! # Ok::<(), trellis::service::EnvError>(())
//! ```

use std::convert::Infallible;
use std::time::Duration;

use crate::tracing::{DistributedTracer, TracingConfig};
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// Default store: the SQLite file `trellis up` uses.
pub const DEFAULT_STORE_URL: &str = "sqlite://./trellis-data/trellis.db";

/// Why the environment was refused; names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {variable}: {reason}")]
pub struct EnvError {
    /// The variable.
    pub variable: &'static str,
    /// Why.
    pub reason: String,
}

/// Everything a service reads from its environment.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEnv {
    /// `PORT`: the port to serve on, 127.0.0.1. Required.
    pub port: u16,
    /// `TRELLIS_SERVICE`: the service name. Defaults to the crate's name.
    pub service: String,
    /// `TRELLIS_VERSION`: the version, shown in responses. Defaults to `0.0.0`.
    pub version: String,
    /// `TRELLIS_INSTANCE_ID`: the registry instance id. Defaults to `SERVICE-PID`.
    pub instance_id: String,
    /// `TRELLIS_STORE`: the shared store URL. Defaults to [`DEFAULT_STORE_URL`].
    pub store_url: String,
    /// Tracing: every request sampled, service name `TRELLIS_SERVICE`, with the standard
    /// `OTEL_SERVICE_NAME` and `OTEL_EXPORTER_OTLP_ENDPOINT` applied (OTLP/HTTP export when
    /// an endpoint is set; in memory only otherwise).
    pub tracing: TracingConfig,
}

impl ServiceEnv {
    /// Reads this process's environment; `service` is the default name.
    pub fn from_env(service: &str) -> Result<ServiceEnv, EnvError> {
        ServiceEnv::from_lookup(service, |key| std::env::var(key).ok())
    }

    /// Same as [`from_env`](Self::from_env) with the variables read through `lookup`.
    pub fn from_lookup(
        service: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ServiceEnv, EnvError> {
        let get = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let port = get("PORT").ok_or_else(|| EnvError {
            variable: "PORT",
            reason: "is not set; the port to serve on is required".into(),
        })?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| EnvError {
                variable: "PORT",
                reason: format!("{port:?} is not a port number from 1 to 65535"),
            })?;
        let service = get("TRELLIS_SERVICE").unwrap_or_else(|| service.to_owned());
        let version = get("TRELLIS_VERSION").unwrap_or_else(|| "0.0.0".to_owned());
        let instance_id = get("TRELLIS_INSTANCE_ID")
            .unwrap_or_else(|| format!("{service}-{}", std::process::id()));
        let store_url = get("TRELLIS_STORE").unwrap_or_else(|| DEFAULT_STORE_URL.to_owned());
        let tracing = TracingConfig {
            service_name: service.clone(),
            sampling_rate: 1.0,
            batch_interval: Duration::from_millis(200).into(),
            ..TracingConfig::default()
        }
        .with_env_from(&lookup)
        .map_err(|e| EnvError {
            variable: "OTEL_*",
            reason: e.to_string(),
        })?;
        Ok(ServiceEnv {
            port,
            service,
            version,
            instance_id,
            store_url,
            tracing,
        })
    }

    /// The service's tracer, built from [`tracing`](Self::tracing).
    pub fn tracer(&self) -> Result<DistributedTracer, crate::tracing::TracingError> {
        DistributedTracer::from_config(&self.tracing, None)
    }
}

/// What the request middleware needs.
#[derive(Debug, Clone)]
pub struct Served {
    /// The service's tracer.
    pub tracer: DistributedTracer,
    /// `x-service-version` on every response.
    pub version: HeaderValue,
    /// `x-instance-id` on every response.
    pub instance: HeaderValue,
}

impl Served {
    /// The middleware state of `env` with `tracer`.
    pub fn new(env: &ServiceEnv, tracer: DistributedTracer) -> Served {
        let header = |text: &str| {
            HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        };
        Served {
            tracer,
            version: header(&env.version),
            instance: header(&env.instance_id),
        }
    }
}

/// Middleware (use with `route_layer`): a server span per request, parented by the
/// incoming trace headers and current while the handler runs (so `ServiceClient` calls and
/// outbox writes join the trace), and the version and instance headers on the response.
/// Health checks get no span: they would bury the traces worth looking at.
pub async fn serve_request(
    State(served): State<Served>,
    request: Request,
    next: Next,
) -> Result<Response, Infallible> {
    let path = request.uri().path().to_owned();
    let mut response = if path.starts_with("/health") {
        next.run(request).await
    } else {
        let span = served
            .tracer
            .http_server_span(request.method(), &path, request.headers());
        if let Some(route) = request.extensions().get::<MatchedPath>() {
            span.set_route(route.as_str());
        }
        let response = span.in_scope(next.run(request)).await;
        span.finish(response.status().as_u16());
        response
    };
    let headers = response.headers_mut();
    headers.insert("x-service-version", served.version.clone());
    headers.insert("x-instance-id", served.instance.clone());
    Ok(response)
}

/// Resolves on Ctrl-C or SIGTERM (what the local platform sends on stop).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn reads_what_the_local_platform_passes() {
        let env = ServiceEnv::from_lookup(
            "svc",
            lookup(&[
                ("PORT", "3001"),
                ("TRELLIS_SERVICE", "named"),
                ("TRELLIS_VERSION", "1.2.0"),
                ("TRELLIS_INSTANCE_ID", "named-1.2.0-0"),
                ("TRELLIS_STORE", "sqlite:///tmp/x.db"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ]),
        )
        .unwrap();
        assert_eq!(env.port, 3001);
        assert_eq!(env.service, "named");
        assert_eq!(env.version, "1.2.0");
        assert_eq!(env.instance_id, "named-1.2.0-0");
        assert_eq!(env.store_url, "sqlite:///tmp/x.db");
        assert_eq!(env.tracing.service_name, "named");
        assert_eq!(
            env.tracing.endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
    }

    #[test]
    fn a_missing_or_bad_port_is_named() {
        let err = ServiceEnv::from_lookup("svc", lookup(&[])).unwrap_err();
        assert_eq!(err.variable, "PORT");
        let err = ServiceEnv::from_lookup("svc", lookup(&[("PORT", "70000")])).unwrap_err();
        assert!(err.to_string().contains("\"70000\""), "{err}");
        let env = ServiceEnv::from_lookup("svc", lookup(&[("PORT", "9")])).unwrap();
        assert_eq!(env.service, "svc");
        assert_eq!(env.tracing.endpoint, None);
    }
}
