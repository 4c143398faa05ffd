//! [`JwtVerifier`]: checks a bearer token and returns its [`Claims`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::claims::{ClaimRules, Claims};
use crate::config::{JwtConfig, KeySource, Secret};
use crate::error::{AuthError, ConfigError, JwksError, invalid};
use crate::forward::ForwardClaims;
use crate::jwks::{Fetcher, Jwks, Pick, pick};
use crate::keys::{JwtAlgorithm, Key};
use crate::token::{self, Parsed, bearer_token, decode_payload};

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

enum Keys {
    Static(Key),
    Jwks(Arc<Jwks>),
}

struct Inner {
    keys: Keys,
    algorithms: Vec<JwtAlgorithm>,
    max_token_bytes: usize,
    rules: ClaimRules,
    forward: ForwardClaims,
    clock: Clock,
    verified: VerifiedCache,
}

/// Tokens that passed every check recently, keyed by their exact text, so that a client
/// sending the same token with each request pays for the signature once a minute (as
/// Envoy's and Kong's JWT caches do). A hit re-checks `exp` and `nbf` against the clock; a
/// token differing in one byte is another key and is verified in full. Entries last
/// [`VERIFIED_TTL`], and a JWKS refresh (a new key-set generation) voids them. At most
/// [`VERIFIED_ENTRIES`] tokens of at most [`VERIFIED_TOKEN_BYTES`] bytes are held; a full
/// cache is emptied and refilled.
#[derive(Default)]
struct VerifiedCache {
    entries: Mutex<TokenMap>,
}

/// Looked up on every authenticated request; a collision costs only a longer probe (the
/// whole token is compared), and only verified tokens are ever inserted.
type TokenMap = HashMap<Box<str>, Verified, foldhash::quality::RandomState>;

struct Verified {
    claims: Claims,
    /// The key-set generation it was verified with (0 for a secret or a PEM key).
    generation: u64,
    until: Instant,
}

const VERIFIED_TTL: Duration = Duration::from_secs(60);
const VERIFIED_ENTRIES: usize = 1024;
const VERIFIED_TOKEN_BYTES: usize = 4096;

impl VerifiedCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, TokenMap> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, token: &str, generation: u64) -> Option<Claims> {
        let entries = self.lock();
        let hit = entries.get(token)?;
        (hit.generation == generation && Instant::now() < hit.until).then(|| hit.claims.clone())
    }

    fn put(&self, token: &str, generation: u64, claims: &Claims) {
        if token.len() > VERIFIED_TOKEN_BYTES {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= VERIFIED_ENTRIES && !entries.contains_key(token) {
            entries.clear();
        }
        entries.insert(
            token.into(),
            Verified {
                claims: claims.clone(),
                generation,
                until: Instant::now() + VERIFIED_TTL,
            },
        );
    }
}

/// Verifies bearer JWTs: size, shape, algorithm allow-list, key, signature, then `exp`,
/// `nbf`, `iss`, `aud` and the required claims — in that order, so nothing about the claims
/// of a forged token is ever looked at.
///
/// A token that passed is remembered for up to a minute by its exact text (at most 1,024
/// tokens of up to 4 KiB), so repeating it skips the signature check; `exp` and `nbf` are
/// checked again on every use, and a JWKS refresh forgets every remembered token.
///
/// Cheap to clone (one `Arc`); share one per gateway. With a JWKS URL it must be built inside
/// a tokio runtime, which runs the periodic refresh until the last clone is dropped.
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.inner.keys {
            Keys::Static(k) => format!("{k:?}"),
            Keys::Jwks(j) => format!("{j:?}"),
        };
        f.debug_struct("JwtVerifier")
            .field("keys", &keys)
            .field("algorithms", &self.inner.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A builder with the defaults of [`JwtConfig`]; give it one key source.
    pub fn builder() -> JwtVerifierBuilder {
        JwtVerifierBuilder {
            config: JwtConfig::default(),
            clock: None,
            client: None,
        }
    }

    /// Builds a verifier from the `authentication` table.
    pub fn from_config(config: &JwtConfig) -> Result<Self, ConfigError> {
        JwtVerifierBuilder {
            config: config.clone(),
            clock: None,
            client: None,
        }
        .build()
    }

    /// The algorithm allow-list in force.
    pub fn algorithms(&self) -> &[JwtAlgorithm] {
        &self.inner.algorithms
    }

    /// The claim → header mapping in force.
    pub fn forward_claims(&self) -> &ForwardClaims {
        &self.inner.forward
    }

    /// The headers to add upstream for `claims` (see [`ForwardClaims::headers`]).
    pub fn forward_headers(
        &self,
        claims: &Claims,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, AuthError> {
        self.inner.forward.headers(claims)
    }

    /// Verifies the bearer token of a request's headers.
    pub async fn verify_request(&self, headers: &HeaderMap) -> Result<Claims, AuthError> {
        // A remembered token is looked up before the header is checked byte by byte: only
        // a token that passed every check is remembered, so `Bearer <token>` exactly as
        // a client sends it finds it, and any other text takes the full path.
        if let Some(token) = plain_bearer(headers) {
            let inner = &*self.inner;
            if let Some(claims) = inner.cached(token, inner.generation()) {
                return claims;
            }
        }
        self.verify(bearer_token(headers)?).await
    }

    /// Verifies a token. With a JWKS, a `kid` missing from the cache triggers a fetch (at
    /// most one per `jwks_min_refresh_interval`, shared by concurrent callers); the first
    /// call fetches the key set if the background refresh has not yet.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let inner = &*self.inner;
        let generation = inner.generation();
        if let Some(claims) = inner.cached(token, generation) {
            return claims;
        }
        let claims = self.verify_uncached(token).await?;
        inner.verified.put(token, generation, &claims);
        Ok(claims)
    }

    async fn verify_uncached(&self, token: &str) -> Result<Claims, AuthError> {
        let inner = &*self.inner;
        let parsed = token::parse(token, inner.max_token_bytes, &inner.algorithms)?;
        let jwks = match &inner.keys {
            Keys::Static(key) => return inner.finish(&parsed, key),
            Keys::Jwks(jwks) => jwks,
        };
        let seen = jwks.generation();
        let keys = jwks.keys();
        match pick(&keys, &parsed) {
            Pick::Found(key) => return inner.finish(&parsed, key),
            Pick::Refused(e) => return Err(e),
            Pick::Missing(_) => {}
        }
        jwks.refresh_for_unknown_kid(seen).await;
        let keys = jwks.keys();
        match pick(&keys, &parsed) {
            Pick::Found(key) => inner.finish(&parsed, key),
            Pick::Refused(e) => Err(e),
            Pick::Missing(why) => Err(missing(jwks, &keys, why)),
        }
    }

    /// Verifies a token with the keys at hand, never waiting: with a JWKS, a `kid` missing
    /// from the cache is [`AuthError::UnknownKey`] without a fetch. For a secret or a PEM key
    /// it is the same as [`JwtVerifier::verify`].
    pub fn verify_cached(&self, token: &str) -> Result<Claims, AuthError> {
        let inner = &*self.inner;
        let generation = inner.generation();
        if let Some(claims) = inner.cached(token, generation) {
            return claims;
        }
        let parsed = token::parse(token, inner.max_token_bytes, &inner.algorithms)?;
        let claims = match &inner.keys {
            Keys::Static(key) => inner.finish(&parsed, key),
            Keys::Jwks(jwks) => {
                let keys = jwks.keys();
                match pick(&keys, &parsed) {
                    Pick::Found(key) => inner.finish(&parsed, key),
                    Pick::Refused(e) => Err(e),
                    Pick::Missing(why) => Err(missing(jwks, &keys, why)),
                }
            }
        }?;
        inner.verified.put(token, generation, &claims);
        Ok(claims)
    }

    /// Fetches the JWKS now, ignoring the rate limit (call it at start-up to fail early);
    /// returns how many keys are usable. A secret or PEM verifier has one key and fetches
    /// nothing.
    pub async fn refresh_keys(&self) -> Result<usize, Arc<JwksError>> {
        match &self.inner.keys {
            Keys::Static(_) => Ok(1),
            Keys::Jwks(jwks) => jwks.refresh_now().await,
        }
    }
}

/// The text after `Bearer ` (any case, one space) in the only `Authorization` header;
/// unchecked, for a lookup among verified tokens only.
fn plain_bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let bytes = value.as_bytes();
    let (scheme, token) = bytes.split_at_checked(7)?;
    if !scheme[..6].eq_ignore_ascii_case(b"bearer") || scheme[6] != b' ' {
        return None;
    }
    std::str::from_utf8(token).ok()
}

fn missing(jwks: &Jwks, keys: &[crate::keys::JwkKey], why: String) -> AuthError {
    match (keys.is_empty(), jwks.last_error()) {
        (true, Some(e)) => AuthError::KeysUnavailable(e),
        _ => AuthError::UnknownKey(why),
    }
}

impl Inner {
    /// The key-set generation (0 for a secret or a PEM key).
    fn generation(&self) -> u64 {
        match &self.keys {
            Keys::Static(_) => 0,
            Keys::Jwks(jwks) => jwks.generation(),
        }
    }

    /// A recently verified token's claims, with `exp` and `nbf` checked again now.
    fn cached(&self, token: &str, generation: u64) -> Option<Result<Claims, AuthError>> {
        let claims = self.verified.get(token, generation)?;
        Some(
            self.rules
                .check_times(claims.raw(), (self.clock)())
                .map(|()| claims),
        )
    }

    fn finish(&self, parsed: &Parsed<'_>, key: &Key) -> Result<Claims, AuthError> {
        if !key.allows(parsed.alg) {
            // The allow-list was checked against the key at build time; this is a second
            // wall against algorithm confusion.
            return Err(AuthError::AlgNotAllowed {
                alg: crate::error::Shown::new(parsed.alg.as_str()),
                detail: ": the key is of another family".into(),
            });
        }
        let verified = jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.message.as_bytes(),
            &key.key,
            parsed.alg.to_jwt(),
        );
        match verified {
            Ok(true) => {}
            Ok(false) => return Err(AuthError::BadSignature),
            Err(e) => {
                return Err(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::Base64(_) => {
                        AuthError::Malformed("signature is not base64url".into())
                    }
                    _ => {
                        tracing::debug!(error = %e, "signature check failed");
                        AuthError::BadSignature
                    }
                });
            }
        }
        let raw = decode_payload(parsed.payload)?;
        self.rules
            .check(raw, parsed.alg, parsed.kid.clone(), (self.clock)())
    }
}

/// Builds a [`JwtVerifier`] with the knobs of [`JwtConfig`], one per method.
#[must_use]
pub struct JwtVerifierBuilder {
    config: JwtConfig,
    clock: Option<Clock>,
    client: Option<reqwest::Client>,
}

impl std::fmt::Debug for JwtVerifierBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifierBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl JwtVerifierBuilder {
    /// HMAC shared secret. No default.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.config.secret = Some(Secret::new(secret));
        self
    }

    /// PEM public key (RSA or EC). No default.
    pub fn public_key_pem(mut self, pem: impl Into<String>) -> Self {
        self.config.public_key_pem = Some(pem.into());
        self
    }

    /// JWKS URL. No default.
    pub fn jwks_url(mut self, url: impl Into<String>) -> Self {
        self.config.jwks_url = Some(url.into());
        self
    }

    /// Adds an accepted issuer. Defaults to none (`iss` not checked).
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.config.issuer.push(issuer.into());
        self
    }

    /// Adds an accepted audience. Defaults to none (`aud` not checked).
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.config.audience.push(audience.into());
        self
    }

    /// The algorithm allow-list. Defaults to what the key can do (see
    /// [`JwtConfig::algorithms`]).
    pub fn algorithms(mut self, algorithms: &[JwtAlgorithm]) -> Self {
        self.config.algorithms = algorithms.to_vec();
        self
    }

    /// Clock skew allowed on `exp` and `nbf`. Defaults to 30 s.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.config.leeway = leeway.into();
        self
    }

    /// Claims a token must carry. Defaults to `["exp"]`.
    pub fn required_claims(mut self, claims: &[&str]) -> Self {
        self.config.required_claims = claims.iter().map(|c| (*c).to_owned()).collect();
        self
    }

    /// Where the roles are (a name or a dotted path). Defaults to `roles`.
    pub fn roles_claim(mut self, claim: impl Into<String>) -> Self {
        self.config.roles_claim = claim.into();
        self
    }

    /// Forwards `claim` upstream as header `header`. Defaults to nothing forwarded.
    pub fn forward_claim(mut self, claim: impl Into<String>, header: impl Into<String>) -> Self {
        self.config
            .forward_claims
            .insert(claim.into(), header.into());
        self
    }

    /// Longest token accepted. Defaults to 8192 bytes.
    pub fn max_token_bytes(mut self, max: usize) -> Self {
        self.config.max_token_bytes = max;
        self
    }

    /// Period of the JWKS refresh. Defaults to 5 min.
    pub fn jwks_refresh_interval(mut self, interval: Duration) -> Self {
        self.config.jwks_refresh_interval = interval.into();
        self
    }

    /// Shortest time between unknown-`kid` JWKS fetches. Defaults to 10 s.
    pub fn jwks_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.config.jwks_min_refresh_interval = interval.into();
        self
    }

    /// Time limit of one JWKS fetch. Defaults to 5 s.
    pub fn jwks_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.config.jwks_fetch_timeout = timeout.into();
        self
    }

    /// The clock `exp` and `nbf` are checked against. Defaults to [`SystemTime::now`].
    pub fn clock(mut self, now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(now));
        self
    }

    /// The HTTP client for JWKS fetches (to share a pool or set TLS roots). Defaults to a
    /// client of its own.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Validates everything and builds. With a JWKS URL, must run inside a tokio runtime.
    pub fn build(self) -> Result<JwtVerifier, ConfigError> {
        let config = self.config;
        let resolved = config.resolve()?;
        let keys = match resolved.source {
            KeySource::Static(key) => Keys::Static(key),
            KeySource::Jwks(url) => {
                let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                    invalid(
                        "jwks_url",
                        "a JWKS verifier must be built inside a tokio runtime (it refreshes keys in the background)",
                    )
                })?;
                let client = match self.client {
                    Some(c) => c,
                    None => reqwest::Client::builder()
                        .user_agent("trellis-auth")
                        .redirect(reqwest::redirect::Policy::limited(3))
                        .build()
                        .map_err(|e| invalid("jwks_url", format!("HTTP client: {e}")))?,
                };
                let fetcher = Fetcher::Http {
                    client,
                    url,
                    timeout: config.jwks_fetch_timeout.get(),
                };
                let jwks = Jwks::new(
                    fetcher,
                    config.jwks_refresh_interval.get(),
                    config.jwks_min_refresh_interval.get(),
                );
                jwks.start(&handle);
                Keys::Jwks(jwks)
            }
        };
        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                keys,
                algorithms: resolved.algorithms,
                max_token_bytes: config.max_token_bytes,
                rules: ClaimRules {
                    leeway: config.leeway.get(),
                    issuers: config.issuer,
                    audiences: config.audience,
                    required: config.required_claims,
                    roles_path: resolved.roles_path,
                },
                forward: resolved.forward,
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemTime::now)),
                verified: VerifiedCache::default(),
            }),
        })
    }
}
