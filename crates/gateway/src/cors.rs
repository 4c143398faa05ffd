//! CORS, compiled from a validated [`CorsConfig`]: preflights answered by the gateway,
//! `Access-Control-*` headers added for allowed origins and removed for every other one.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::config::CorsConfig;
use crate::proxy::{Body, json_response};

/// Every response header CORS decides; the upstream's are replaced by the gateway's.
const RESPONSE_HEADERS: [HeaderName; 6] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
];

/// One route's CORS policy, with its header values built once.
#[derive(Debug)]
pub(crate) struct Cors {
    any_origin: bool,
    /// Allowed origins, lower case.
    origins: Vec<String>,
    methods: Vec<Method>,
    allow_methods: HeaderValue,
    any_header: bool,
    headers: Vec<HeaderName>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

fn join(values: impl Iterator<Item = String>) -> Option<HeaderValue> {
    let joined = values.collect::<Vec<_>>().join(", ");
    (!joined.is_empty())
        .then(|| HeaderValue::from_str(&joined).ok())
        .flatten()
}

impl Cors {
    /// Compiles a validated configuration.
    pub(crate) fn new(config: &CorsConfig) -> Self {
        let methods: Vec<Method> = config
            .allowed_methods
            .iter()
            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
            .collect();
        Cors {
            any_origin: config.allowed_origins.iter().any(|o| o == "*"),
            origins: config
                .allowed_origins
                .iter()
                .map(|o| o.to_ascii_lowercase())
                .collect(),
            allow_methods: join(methods.iter().map(ToString::to_string))
                .unwrap_or_else(|| HeaderValue::from_static("GET, HEAD, POST")),
            methods,
            any_header: config.allowed_headers.iter().any(|h| h == "*"),
            headers: config
                .allowed_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            expose: join(config.expose_headers.iter().cloned()),
            credentials: config.allow_credentials,
            max_age: config
                .max_age
                .and_then(|d| HeaderValue::from_str(&d.get().as_secs().to_string()).ok()),
        }
    }

    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        self.any_origin
            || origin.to_str().is_ok_and(|origin| {
                self.origins
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(origin))
            })
    }

    /// The `Access-Control-Allow-Origin` value for `origin`.
    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any_origin && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// Whether `request` is a preflight: `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`. Returns the method asked for.
    pub(crate) fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
        if method != Method::OPTIONS || !headers.contains_key(header::ORIGIN) {
            return None;
        }
        headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    }

    /// The gateway's answer to a preflight: 204 with the allowances, or 403 without any
    /// CORS header when the origin, method or a header is not allowed.
    pub(crate) fn preflight(&self, requested: &Method, headers: &HeaderMap) -> Response<Body> {
        let refuse =
            |detail: String| json_response(StatusCode::FORBIDDEN, "cors_forbidden", &detail);
        let Some(origin) = headers.get(header::ORIGIN) else {
            return refuse("preflight without Origin".into());
        };
        if !self.origin_allowed(origin) {
            return refuse(format!(
                "origin {} is not allowed",
                String::from_utf8_lossy(origin.as_bytes())
            ));
        }
        if !self.methods.contains(requested) {
            return refuse(format!("method {requested} is not allowed"));
        }
        let asked = headers
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty());
        let mut allowed_headers = Vec::new();
        for name in asked {
            let ok = self.any_header
                || self
                    .headers
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(name));
            if !ok {
                return refuse(format!("request header {name:?} is not allowed"));
            }
            allowed_headers.push(name.to_ascii_lowercase());
        }
        let mut response = Response::new(crate::proxy::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let out = response.headers_mut();
        out.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin(origin),
        );
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        if let Some(value) = join(allowed_headers.into_iter()) {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, value);
        }
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(max_age) = &self.max_age {
            out.insert(header::ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        out.insert(
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        response
    }

    /// Sets the CORS headers of a response to a request from `origin`: the gateway's for
    /// an allowed origin, none for any other (the upstream's are removed either way).
    pub(crate) fn apply(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        for name in &RESPONSE_HEADERS {
            headers.remove(name);
        }
        if !self.any_origin || self.credentials {
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        }
        let Some(origin) = origin.filter(|o| self.origin_allowed(o)) else {
            return;
        };
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin(origin),
        );
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}
