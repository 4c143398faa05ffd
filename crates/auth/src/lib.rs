//! # trellis-auth
//!
//! JWT authentication and per-route authorization for the Trellis gateway (the seed's
//! `authentication: { provider: 'jwt' }` and `middleware: ['authentication',
//! 'authorization']`), as a library the gateway calls:
//!
//! - [`JwtConfig`]: the `authentication` table of the gateway's TOML (`secret`,
//!   `public_key_pem` or `jwks_url`, `issuer`, `audience`, `algorithms`, `leeway`,
//!   `forward_claims`, …), validated with errors that name the key; [`JwtVerifierBuilder`]
//!   has the same knobs.
//! - [`JwtVerifier`]: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 through
//!   `jsonwebtoken` on aws-lc-rs; keys from a shared secret, a PEM public key or a JWKS URL
//!   (cached, refreshed periodically and on an unknown `kid`, rate-limited). Checks the
//!   token size (8 KiB by default), shape, the algorithm allow-list (`none` never passes; an
//!   HMAC algorithm never meets a public key, which defeats HS/RS confusion), the
//!   signature, then `exp`/`nbf` with a leeway, `iss`, `aud` and required claims.
//! - [`AuthError`]: why a token was refused, with a stable [`AuthError::reason`]
//!   (`expired`, `bad_signature`, `alg_not_allowed`, …) for a 401.
//! - [`Claims`]: subject, roles, scopes and the raw claims; [`ForwardClaims`] turns chosen
//!   claims into upstream headers, refusing CR/LF and other control characters.
//! - [`AuthzRule`]: `{ roles, scopes, require = "any" | "all" }`; its
//!   [`AuthzRule::authorize`] fails with an [`AuthzError`] for a 403.
//!
//! It is **not** an HTTP middleware (the gateway owns the request path and calls
//! [`JwtVerifier::verify_request`]), not a token issuer, and not an OAuth/OIDC client: no
//! discovery documents, no introspection, no encrypted tokens (JWE), and keys are never
//! taken from the token itself (`jku`, `x5u`, `jwk` headers are ignored).
//!
//! ```
//! use trellis_auth::{AuthzRule, JwtConfig, JwtVerifier};
//! # let token = jsonwebtoken::encode(
//! #     &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
//! #     &serde_json::json!({"sub": "user-42", "iss": "https://idp.example", "exp": 4_102_444_800u64,
//! #                         "roles": ["admin", "ops"], "scope": "orders:read"}),
//! #     &jsonwebtoken::EncodingKey::from_secret(b"an example secret of at least 32 bytes"),
//! # )?;
//! let config = JwtConfig::from_toml(r#"
//!     enabled = true
//!     provider = "jwt"
//!     secret = "an example secret of at least 32 bytes"
//!     issuer = "https://idp.example"
//!     forward_claims = { sub = "x-user-id", roles = "x-user-roles" }
//! "#)?;
//! let verifier = JwtVerifier::from_config(&config)?;
//!
//! // `token` was signed with HS256 and the secret above.
//! let claims = verifier.verify_cached(&token)?;
//! assert_eq!(claims.subject(), Some("user-42"));
//! assert!(claims.has_role("admin"));
//!
//! let headers = verifier.forward_headers(&claims)?;
//! assert!(headers.iter().any(|(name, value)| name == "x-user-id" && value == "user-42"));
//! assert!(headers.iter().any(|(name, value)| name == "x-user-roles" && value == "admin,ops"));
//!
//! AuthzRule::any().roles(["admin"]).authorize(&claims)?;
//! let denied = AuthzRule::all().scopes(["orders:write"]).authorize(&claims).unwrap_err();
//! assert_eq!(denied.reason(), "insufficient_scope");
//!
//! let refused = verifier.verify_cached("not.a.token").unwrap_err();
//! assert_eq!(refused.reason(), "malformed");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What the gateway does on a route with `middleware = ["authentication", "authorization"]`:
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use trellis_auth::{AuthzRule, JwtVerifier};
//!
//! async fn authenticate(
//!     verifier: &JwtVerifier,
//!     rule: Option<&AuthzRule>,
//!     headers: &mut HeaderMap,
//! ) -> Result<(), (StatusCode, &'static str)> {
//!     // A client must not be able to send x-user-id itself.
//!     for name in verifier.forward_claims().header_names() {
//!         headers.remove(name);
//!     }
//!     // 401 (or 503 when the JWKS is down) with a reason; e.www_authenticate() for the header.
//!     let claims = verifier.verify_request(headers).await.map_err(|e| (e.status(), e.reason()))?;
//!     if let Some(rule) = rule {
//!         rule.authorize(&claims).map_err(|e| (e.status(), e.reason()))?; // 403
//!     }
//!     for (name, value) in verifier.forward_headers(&claims).map_err(|e| (e.status(), e.reason()))? {
//!         headers.insert(name, value);
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Cost of one verification (`cargo bench -p trellis-auth --bench verify`, release, 2-core
//! development machine, 154-byte claims, issuer and audience checked), with two baselines
//! from the same run — base64url-decoding the token's three segments, and
//! `jsonwebtoken::decode` with the same checks:
//!
//! | alg | base64 only | jsonwebtoken::decode | `verify_cached` | `verify().await` |
//! |---|---|---|---|---|
//! | HS256 | 237 ns | 3.24 µs | 2.77 µs (11.7× base64, 0.85× jsonwebtoken) | 2.92 µs |
//! | RS256 | 353 ns | 21.6 µs | 20.7 µs (58.7× base64, 0.96× jsonwebtoken) | 20.9 µs |
//! | ES256 | 236 ns | 53.8 µs | 53.3 µs (0.99× jsonwebtoken) | 53.4 µs |
//!
//! The signature check dominates; the checks around it cost less than the library's own
//! `decode`.

mod authz;
mod claims;
mod config;
mod error;
mod forward;
mod jwks;
mod keys;
mod token;
mod verifier;

pub use authz::{AuthzRule, Require};
pub use claims::Claims;
pub use config::{JwtConfig, Provider, Secret};
pub use error::{AuthError, AuthzError, ConfigError, JwksError, SHOWN_MAX, Shown};
pub use forward::{ForwardClaims, MAX_FORWARDED_VALUE};
pub use keys::{JwtAlgorithm, UnknownAlgorithm};
pub use token::bearer_token;
pub use verifier::{JwtVerifier, JwtVerifierBuilder};
