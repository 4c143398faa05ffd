//! Claims forwarded upstream as request headers (`sub` → `x-user-id`, `roles` →
//! `x-user-roles`).
//!
//! Header names are checked once, when the configuration is read: a valid lowercase token,
//! not one the proxy itself owns (`host`, `content-length`, `authorization`, the
//! `x-forwarded-*` family, …), each used once. Values are checked per request: a claim
//! carrying a control character (CR, LF, NUL, …) or a list item carrying a comma makes the
//! request fail with [`AuthError::BadClaim`] instead of reaching the upstream — a signed token
//! must not be able to inject headers or smuggle an extra role into a comma-joined list.
//!
//! The gateway should also remove these headers from every incoming request
//! ([`ForwardClaims::header_names`]), so a client cannot send `x-user-id` itself.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use serde_json::Value;

use crate::claims::{Claims, lookup};
use crate::error::{AuthError, ConfigError, Shown, invalid};

/// Longest forwarded header value, in bytes.
pub const MAX_FORWARDED_VALUE: usize = 4096;

/// Headers a claim may never be forwarded as.
const RESERVED: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "set-cookie",
    "te",
    "trailer",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
];

/// The validated `forward_claims` mapping: which claim goes upstream in which header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardClaims {
    entries: Vec<(Vec<String>, String, HeaderName)>,
    names: Vec<HeaderName>,
}

impl ForwardClaims {
    /// Validates a claim → header-name mapping; the error names the bad entry
    /// (`forward_claims.sub`).
    pub fn new(map: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut out = ForwardClaims::default();
        for (claim, header) in map {
            let key = format!("forward_claims.{claim}");
            if claim.is_empty() || claim.split('.').any(str::is_empty) {
                return Err(invalid(
                    key,
                    "the claim must be a name or a dotted path such as realm_access.roles",
                ));
            }
            let lower = header.to_ascii_lowercase();
            let name = HeaderName::from_bytes(lower.as_bytes()).map_err(|_| {
                invalid(
                    &key,
                    format!("{header:?} is not a valid header name (letters, digits, '-')"),
                )
            })?;
            if RESERVED.contains(&name.as_str()) || name.as_str().starts_with("proxy-") {
                return Err(invalid(
                    &key,
                    format!(
                        "{header:?} is a header the gateway sets itself; choose another name such as x-user-id"
                    ),
                ));
            }
            if out.names.contains(&name) {
                return Err(invalid(
                    &key,
                    format!("header {header:?} is already used by another claim"),
                ));
            }
            let path = claim.split('.').map(str::to_owned).collect();
            out.entries.push((path, claim.clone(), name.clone()));
            out.names.push(name);
        }
        Ok(out)
    }

    /// `true` when no claim is forwarded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every header this mapping may set: remove them from incoming requests before adding
    /// [`ForwardClaims::headers`].
    pub fn header_names(&self) -> &[HeaderName] {
        &self.names
    }

    /// The headers for a verified token. A claim the token does not carry (or carries as
    /// `null`) adds no header. Strings go as they are, numbers and booleans as JSON text,
    /// lists comma-joined, objects as compact JSON.
    pub fn headers(&self, claims: &Claims) -> Result<Vec<(HeaderName, HeaderValue)>, AuthError> {
        let mut out = Vec::with_capacity(self.entries.len());
        for (path, claim, name) in &self.entries {
            let Some(value) = lookup(claims.raw(), path) else {
                continue;
            };
            let Some(text) = render(claim, value)? else {
                continue;
            };
            out.push((name.clone(), header_value(claim, &text)?));
        }
        Ok(out)
    }
}

fn bad(claim: &str, problem: impl Into<String>) -> AuthError {
    AuthError::BadClaim {
        claim: Shown::new(claim),
        problem: problem.into(),
    }
}

fn scalar(claim: &str, value: &Value) -> Result<Option<String>, AuthError> {
    Ok(match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(_) | Value::Number(_) | Value::Object(_) | Value::Array(_) => {
            Some(serde_json::to_string(value).map_err(|e| bad(claim, e.to_string()))?)
        }
    })
}

fn render(claim: &str, value: &Value) -> Result<Option<String>, AuthError> {
    let Value::Array(items) = value else {
        return scalar(claim, value);
    };
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        if let Some(text) = scalar(claim, item)? {
            if text.contains(',') {
                return Err(bad(
                    claim,
                    "has a list item with a comma, which cannot be forwarded comma-joined",
                ));
            }
            parts.push(text);
        }
    }
    Ok(Some(parts.join(",")))
}

fn header_value(claim: &str, text: &str) -> Result<HeaderValue, AuthError> {
    if text.len() > MAX_FORWARDED_VALUE {
        return Err(bad(
            claim,
            format!("is longer than {MAX_FORWARDED_VALUE} bytes and cannot be forwarded"),
        ));
    }
    if text.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(bad(
            claim,
            "contains a control character (CR, LF, NUL, TAB, …) and cannot be forwarded as a header",
        ));
    }
    // Non-ASCII UTF-8 bytes are obs-text, which HeaderValue accepts; controls are gone.
    HeaderValue::from_bytes(text.as_bytes()).map_err(|e| bad(claim, e.to_string()))
}
