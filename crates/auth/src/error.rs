//! The errors: why a token was refused ([`AuthError`], 401), why a verified caller was
//! refused ([`AuthzError`], 403), why a key set could not be fetched ([`JwksError`]) and why a
//! configuration was rejected ([`ConfigError`]).
//!
//! Every text that comes from a token (an `alg`, a `kid`, an issuer) is shown quoted, with
//! control characters escaped and cut to [`SHOWN_MAX`] characters, so a message can go into a
//! log line or a response body as it is.

use std::fmt;
use std::sync::Arc;

use http::StatusCode;

/// Longest piece of token-supplied text an error message shows.
pub const SHOWN_MAX: usize = 64;

/// Token-supplied text as an error shows it: quoted, escaped, at most [`SHOWN_MAX`] chars.
#[derive(Clone, PartialEq, Eq)]
pub struct Shown(String);

impl Shown {
    pub(crate) fn new(text: &str) -> Self {
        let mut cut: String = text.chars().take(SHOWN_MAX).collect();
        if cut.len() < text.len() {
            cut.push('…');
        }
        Shown(cut)
    }

    /// The (possibly cut) text, unescaped.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug quoting escapes CR, LF and every other control character.
        write!(f, "{:?}", self.0)
    }
}

/// Why a request's token was refused. The gateway answers [`AuthError::status`] (401, or
/// 503 when the keys could not be fetched) with [`AuthError::reason`] as the machine-readable
/// reason and the `Display` text as the human one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No `Authorization` header, or an empty bearer token.
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    MissingToken,
    /// An `Authorization` header with another scheme than `Bearer`.
    #[error("authorization scheme {scheme} is not supported; use `Bearer`")]
    BadScheme {
        /// The scheme the client sent.
        scheme: Shown,
    },
    /// The token is longer than the configured cap (`max_token_bytes`).
    #[error("token is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// Not a compact JWS: wrong number of segments, bad base64url, bad JSON, …
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header's `alg` is not in the allow-list (`none` never is), or the key it selects
    /// does not allow it.
    #[error("token algorithm {alg} is not allowed{detail}")]
    AlgNotAllowed {
        /// The `alg` the token names.
        alg: Shown,
        /// Extra context, empty or starting with `: `.
        detail: String,
    },
    /// No key for the token: its `kid` is not in the key set (after a refresh, when one was
    /// allowed), or it has no `kid` and several keys could match.
    #[error("no key for this token: {0}")]
    UnknownKey(String),
    /// The signature does not match the header and payload under the selected key.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("token expired at {exp} (unix seconds); it is now {now}, leeway {leeway_secs} s")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The verifier's clock.
        now: i64,
        /// The allowed clock skew.
        leeway_secs: u64,
    },
    /// `nbf` is still in the future (beyond the leeway).
    #[error(
        "token is not valid before {nbf} (unix seconds); it is now {now}, leeway {leeway_secs} s"
    )]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The verifier's clock.
        now: i64,
        /// The allowed clock skew.
        leeway_secs: u64,
    },
    /// `iss` is missing or not one of the configured issuers.
    #[error("token issuer {} is not accepted", .0.as_ref().map_or_else(|| "(none)".to_owned(), Shown::to_string))]
    BadIssuer(Option<Shown>),
    /// `aud` is missing or names none of the configured audiences.
    #[error("token audience {} does not include an accepted audience", .0.as_ref().map_or_else(|| "(none)".to_owned(), Shown::to_string))]
    BadAudience(Option<Shown>),
    /// A claim listed in `required_claims` is absent.
    #[error("token has no {0} claim, which is required")]
    MissingClaim(Shown),
    /// A claim has the wrong type or a value that cannot be used (`exp` as a string, a
    /// forwarded claim with a line break, …).
    #[error("token claim {claim} {problem}")]
    BadClaim {
        /// Which claim.
        claim: Shown,
        /// What is wrong with it.
        problem: String,
    },
    /// The JWKS could not be fetched and no keys are cached: the fault is on the server side.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(#[source] Arc<JwksError>),
}

impl AuthError {
    /// A short, stable, machine-readable reason: `missing_token`, `bad_scheme`,
    /// `token_too_large`, `malformed`, `alg_not_allowed`, `unknown_key`, `bad_signature`,
    /// `expired`, `not_yet_valid`, `bad_issuer`, `bad_audience`, `missing_claim`, `bad_claim`,
    /// `keys_unavailable`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::BadScheme { .. } => "bad_scheme",
            AuthError::TooLarge { .. } => "token_too_large",
            AuthError::Malformed(_) => "malformed",
            AuthError::AlgNotAllowed { .. } => "alg_not_allowed",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired { .. } => "expired",
            AuthError::NotYetValid { .. } => "not_yet_valid",
            AuthError::BadIssuer(_) => "bad_issuer",
            AuthError::BadAudience(_) => "bad_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::BadClaim { .. } => "bad_claim",
            AuthError::KeysUnavailable(_) => "keys_unavailable",
        }
    }

    /// Whose fault: `true` only for [`AuthError::KeysUnavailable`] (the key server is down),
    /// where the client's token may well be fine.
    pub fn is_server_fault(&self) -> bool {
        matches!(self, AuthError::KeysUnavailable(_))
    }

    /// The status to answer: 401, or 503 for [`AuthError::KeysUnavailable`].
    pub fn status(&self) -> StatusCode {
        if self.is_server_fault() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        }
    }

    /// A `WWW-Authenticate` value as RFC 6750 §3 describes it: `Bearer` alone when the client
    /// sent no bearer token, else `Bearer error="invalid_token", error_description="<reason>"`.
    pub fn www_authenticate(&self) -> http::HeaderValue {
        match self {
            AuthError::MissingToken | AuthError::BadScheme { .. } => {
                http::HeaderValue::from_static("Bearer")
            }
            AuthError::Malformed(_) | AuthError::TooLarge { .. } => http::HeaderValue::from_static(
                "Bearer error=\"invalid_request\", error_description=\"malformed\"",
            ),
            other => {
                // reason() is a fixed lowercase ASCII word: always a valid header value.
                let text = format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    other.reason()
                );
                http::HeaderValue::from_str(&text)
                    .unwrap_or_else(|_| http::HeaderValue::from_static("Bearer"))
            }
        }
    }
}

/// Why a verified caller may not use a route (the gateway answers 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// `require = "any"`: the caller holds none of the listed roles and scopes.
    #[error("needs one of roles {roles:?} or scopes {scopes:?}; the token has none of them")]
    NoneOf {
        /// The rule's roles.
        roles: Vec<String>,
        /// The rule's scopes.
        scopes: Vec<String>,
    },
    /// `require = "all"`: the caller lacks some of the listed roles or scopes.
    #[error("missing roles {missing_roles:?} and scopes {missing_scopes:?}")]
    Missing {
        /// Listed roles the token does not hold.
        missing_roles: Vec<String>,
        /// Listed scopes the token does not hold.
        missing_scopes: Vec<String>,
    },
}

impl AuthzError {
    /// A short, stable, machine-readable reason: `insufficient_role` (only roles were
    /// missing), `insufficient_scope` (only scopes, RFC 6750's code), else `forbidden`.
    pub fn reason(&self) -> &'static str {
        let (roles, scopes) = match self {
            AuthzError::NoneOf { roles, scopes } => (roles, scopes),
            AuthzError::Missing {
                missing_roles,
                missing_scopes,
            } => (missing_roles, missing_scopes),
        };
        match (roles.is_empty(), scopes.is_empty()) {
            (false, true) => "insufficient_role",
            (true, false) => "insufficient_scope",
            _ => "forbidden",
        }
    }

    /// Always 403.
    pub fn status(&self) -> StatusCode {
        StatusCode::FORBIDDEN
    }
}

/// Why the JWKS could not be fetched or used. The previously fetched keys stay in use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The request failed: connect error, timeout, TLS.
    #[error("GET {url}: {source}")]
    Fetch {
        /// The JWKS URL.
        url: String,
        /// What reqwest said.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with a non-2xx status.
    #[error("GET {url}: status {status}")]
    Status {
        /// The JWKS URL.
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// The body was larger than the cap.
    #[error("GET {url}: body larger than {limit} bytes")]
    TooLarge {
        /// The JWKS URL.
        url: String,
        /// The cap.
        limit: usize,
    },
    /// The body was not a JWKS (`{"keys": [...]}`), or held no usable signing key.
    #[error("GET {url}: {reason}")]
    Invalid {
        /// The JWKS URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// Why a [`JwtConfig`](crate::JwtConfig) or an [`AuthzRule`](crate::AuthzRule) was rejected;
/// names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The text did not parse into the expected shape (unknown key, wrong type).
    #[error("authentication config: {0}")]
    Parse(String),
    /// A value was rejected; `key` is the key inside the table (`secret`,
    /// `algorithms[1]`, `forward_claims.sub`).
    #[error("authentication config {key}: {reason}")]
    Invalid {
        /// Where.
        key: String,
        /// Why.
        reason: String,
    },
}

impl ConfigError {
    /// The key that was wrong, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Parse(_) => None,
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_text_is_escaped_and_cut() {
        let s = Shown::new("a\r\nb");
        assert_eq!(s.to_string(), "\"a\\r\\nb\"");
        let long = "x".repeat(500);
        let s = Shown::new(&long);
        assert_eq!(s.as_str().chars().count(), SHOWN_MAX + 1);
        let e = AuthError::AlgNotAllowed {
            alg: Shown::new("none\nX-Injected: 1"),
            detail: String::new(),
        };
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn statuses_and_www_authenticate() {
        assert_eq!(AuthError::MissingToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(AuthError::MissingToken.www_authenticate(), "Bearer");
        assert_eq!(
            AuthError::BadSignature.www_authenticate(),
            "Bearer error=\"invalid_token\", error_description=\"bad_signature\""
        );
        let e = AuthError::KeysUnavailable(Arc::new(JwksError::Status {
            url: "http://x/jwks".into(),
            status: StatusCode::BAD_GATEWAY,
        }));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.reason(), "keys_unavailable");
    }

    #[test]
    fn authz_reasons() {
        let roles_only = AuthzError::Missing {
            missing_roles: vec!["admin".into()],
            missing_scopes: vec![],
        };
        assert_eq!(roles_only.reason(), "insufficient_role");
        let scopes_only = AuthzError::Missing {
            missing_roles: vec![],
            missing_scopes: vec!["a".into()],
        };
        assert_eq!(scopes_only.reason(), "insufficient_scope");
        let both = AuthzError::NoneOf {
            roles: vec!["admin".into()],
            scopes: vec!["a".into()],
        };
        assert_eq!(both.reason(), "forbidden");
        assert_eq!(both.status(), StatusCode::FORBIDDEN);
    }
}
