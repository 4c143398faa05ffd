//! The `authentication` table of the gateway's TOML, parsed and validated here and nowhere
//! else:
//!
//! ```toml
//! authentication = { enabled = true, provider = "jwt", secret = "…" }
//! # or jwks_url = "https://idp.example/.well-known/jwks.json" / public_key_pem = """…""",
//! # plus issuer, audience, algorithms, leeway, forward_claims, …
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use trellis_core::HumanDuration;

use crate::error::{ConfigError, invalid};
use crate::forward::ForwardClaims;
use crate::keys::{Family, JwtAlgorithm, Key, parse_public_pem};

/// The identity provider kind. Only `jwt` exists today; the key keeps the seed's
/// `provider: 'jwt'` readable and leaves room for others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// Bearer JSON Web Tokens (JWS compact serialization).
    #[default]
    Jwt,
}

/// A shared secret. Its `Debug` output never shows the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret's bytes (its UTF-8 text, used as is — not base64-decoded).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted, {} bytes])", self.0.len())
    }
}

/// The `authentication` table: how bearer JWTs are verified and which claims go upstream.
///
/// Exactly one key source is given: `secret` (HMAC), `public_key_pem` (RSA or EC) or
/// `jwks_url`. Unknown keys are rejected; [`JwtConfig::validate`] names the bad key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Whether authentication is on. Defaults to `true` (writing the table means you want
    /// it); `false` keeps the table but builds no verifier.
    pub enabled: bool,
    /// The provider. Defaults to `jwt`, the only one.
    pub provider: Provider,
    /// HMAC shared secret, used as UTF-8 bytes; at least 32 bytes (48 for HS384, 64 for
    /// HS512, RFC 7518 §3.2). No default.
    pub secret: Option<Secret>,
    /// A PEM public key: `-----BEGIN PUBLIC KEY-----` (RSA or EC P-256/P-384) or
    /// `-----BEGIN RSA PUBLIC KEY-----`; RSA keys need 2048 bits or more. No default.
    pub public_key_pem: Option<String>,
    /// URL of a JSON Web Key Set (`http://`, or `https://` with the crate's `rustls`
    /// feature). Fetched on first use, cached, refreshed every `jwks_refresh_interval` and
    /// when a token names an unknown `kid`. No default.
    pub jwks_url: Option<String>,
    /// Accepted `iss` values, a string or a list; when set, tokens without a matching `iss`
    /// are refused. Defaults to empty: `iss` not checked.
    #[serde(deserialize_with = "one_or_many")]
    pub issuer: Vec<String>,
    /// Accepted audiences, a string or a list; when set, the token's `aud` (a string or a
    /// list) must contain one of them. Defaults to empty: `aud` not checked (set it).
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// The algorithm allow-list. Defaults to what the key can do: `["HS256"]` for a
    /// secret, `["RS256"]` for an RSA PEM, `["ES256"]`/`["ES384"]` for an EC PEM,
    /// `["RS256", "ES256"]` for a JWKS. Must fit the key: HMAC algorithms only with a
    /// secret, never with a public key or a JWKS.
    pub algorithms: Vec<JwtAlgorithm>,
    /// Clock skew allowed on `exp` and `nbf`, at most 10 minutes. Defaults to `30s`.
    pub leeway: HumanDuration,
    /// Claims a token must carry. Defaults to `["exp"]` (tokens that never expire are
    /// refused); `[]` accepts tokens without `exp`.
    pub required_claims: Vec<String>,
    /// Where the roles are: a claim name, or a dotted path for nested claims
    /// (`realm_access.roles`). The value is a list of strings or one string. Defaults to
    /// `roles`.
    pub roles_claim: String,
    /// Claims sent upstream as request headers: claim name (or dotted path) → header name,
    /// e.g. `{ sub = "x-user-id", roles = "x-user-roles" }`. Lists are comma-joined.
    /// Defaults to none.
    pub forward_claims: BTreeMap<String, String>,
    /// Longest token accepted, in bytes (512 to 65536); longer is refused before any
    /// decoding. Defaults to 8192.
    pub max_token_bytes: usize,
    /// How often the JWKS is fetched again, at least 1 s. Defaults to `5m`.
    pub jwks_refresh_interval: HumanDuration,
    /// Shortest time between two JWKS fetches caused by unknown `kid`s, so that a flood of
    /// made-up `kid`s cannot hammer the key server; `0` turns the limit off. Defaults to
    /// `10s`.
    pub jwks_min_refresh_interval: HumanDuration,
    /// Time limit of one JWKS fetch, 100 ms to 60 s. Defaults to `5s`.
    pub jwks_fetch_timeout: HumanDuration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            enabled: true,
            provider: Provider::Jwt,
            secret: None,
            public_key_pem: None,
            jwks_url: None,
            issuer: Vec::new(),
            audience: Vec::new(),
            algorithms: Vec::new(),
            leeway: Duration::from_secs(30).into(),
            required_claims: vec!["exp".to_owned()],
            roles_claim: "roles".to_owned(),
            forward_claims: BTreeMap::new(),
            max_token_bytes: 8192,
            jwks_refresh_interval: Duration::from_secs(300).into(),
            jwks_min_refresh_interval: Duration::from_secs(10).into(),
            jwks_fetch_timeout: Duration::from_secs(5).into(),
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a list of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Where a verifier's keys come from, parsed.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    Static(Key),
    Jwks(reqwest::Url),
}

/// A validated configuration with its key parsed.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) source: KeySource,
    pub(crate) algorithms: Vec<JwtAlgorithm>,
    pub(crate) forward: ForwardClaims,
    pub(crate) roles_path: Vec<String>,
}

const MAX_LEEWAY: Duration = Duration::from_secs(600);

impl JwtConfig {
    /// Parses a TOML document holding the table's content
    /// (`secret = "…"`, `issuer = "…"`, …) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str::<JwtConfig>(text)
            .map_err(|e| ConfigError::Parse(e.to_string().trim_end().to_owned()))?
            .validate()
    }

    /// Checks every value and parses the key; the error names the key that is wrong.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.enabled {
            self.resolve()?;
        } else {
            self.check_values()?;
        }
        Ok(self)
    }

    fn check_values(&self) -> Result<(), ConfigError> {
        if self.leeway.get() > MAX_LEEWAY {
            return Err(invalid("leeway", "must be at most 10m"));
        }
        if !(512..=65536).contains(&self.max_token_bytes) {
            return Err(invalid("max_token_bytes", "must be between 512 and 65536"));
        }
        if self.jwks_refresh_interval.get() < Duration::from_secs(1) {
            return Err(invalid("jwks_refresh_interval", "must be at least 1s"));
        }
        let timeout = self.jwks_fetch_timeout.get();
        if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(60) {
            return Err(invalid(
                "jwks_fetch_timeout",
                "must be between 100ms and 60s",
            ));
        }
        for (key, list) in [("issuer", &self.issuer), ("audience", &self.audience)] {
            if let Some(i) = list.iter().position(|s| s.is_empty()) {
                return Err(invalid(format!("{key}[{i}]"), "must not be empty"));
            }
        }
        if let Some(i) = self.required_claims.iter().position(|s| s.is_empty()) {
            return Err(invalid(
                format!("required_claims[{i}]"),
                "must not be empty",
            ));
        }
        if self.roles_claim.is_empty() || self.roles_claim.split('.').any(str::is_empty) {
            return Err(invalid(
                "roles_claim",
                "must be a claim name or a dotted path such as realm_access.roles",
            ));
        }
        ForwardClaims::new(&self.forward_claims)?;
        Ok(())
    }

    /// Validates and parses everything a verifier needs.
    pub(crate) fn resolve(&self) -> Result<Resolved, ConfigError> {
        if !self.enabled {
            return Err(invalid(
                "enabled",
                "authentication is disabled; there is no verifier to build",
            ));
        }
        self.check_values()?;
        let given: Vec<&str> = [
            ("secret", self.secret.is_some()),
            ("public_key_pem", self.public_key_pem.is_some()),
            ("jwks_url", self.jwks_url.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let source = match given.as_slice() {
            [] => {
                return Err(invalid(
                    "secret",
                    "one of secret, public_key_pem or jwks_url is required",
                ));
            }
            [_] => self.key_source()?,
            [_, second, ..] => {
                return Err(invalid(
                    *second,
                    format!(
                        "give only one of secret, public_key_pem, jwks_url (found {})",
                        given.join(", ")
                    ),
                ));
            }
        };
        let algorithms = self.algorithms_for(&source)?;
        Ok(Resolved {
            source,
            algorithms,
            forward: ForwardClaims::new(&self.forward_claims)?,
            roles_path: self.roles_claim.split('.').map(str::to_owned).collect(),
        })
    }

    fn key_source(&self) -> Result<KeySource, ConfigError> {
        if let Some(secret) = &self.secret {
            if secret.as_bytes().is_empty() {
                return Err(invalid("secret", "must not be empty"));
            }
            return Ok(KeySource::Static(Key::secret(secret.as_bytes())));
        }
        if let Some(pem) = &self.public_key_pem {
            return parse_public_pem(pem)
                .map(KeySource::Static)
                .map_err(|why| invalid("public_key_pem", why));
        }
        let url = self.jwks_url.as_deref().unwrap_or_default();
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| invalid("jwks_url", format!("{url:?} is not a URL: {e}")))?;
        match parsed.scheme() {
            "http" => {}
            "https" if cfg!(feature = "rustls") => {}
            "https" => {
                return Err(invalid(
                    "jwks_url",
                    "https needs trellis-auth's `rustls` feature (not enabled in this build)",
                ));
            }
            other => {
                return Err(invalid(
                    "jwks_url",
                    format!("scheme {other:?} is not supported; use http or https"),
                ));
            }
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("jwks_url", format!("{url:?} has no host")));
        }
        Ok(KeySource::Jwks(parsed))
    }

    fn algorithms_for(&self, source: &KeySource) -> Result<Vec<JwtAlgorithm>, ConfigError> {
        use JwtAlgorithm as A;
        let defaults = match source {
            KeySource::Static(key) => match key.family {
                Family::Hmac => vec![A::HS256],
                Family::Rsa => vec![A::RS256],
                Family::Ec(_) => A::ALL
                    .into_iter()
                    .filter(|a| a.family() == key.family)
                    .collect(),
            },
            KeySource::Jwks(_) => vec![A::RS256, A::ES256],
        };
        let list = if self.algorithms.is_empty() {
            defaults
        } else {
            self.explicit_algorithms(source, &defaults)?
        };
        if let Some(secret) = &self.secret {
            let have = secret.as_bytes().len();
            if let Some(alg) = list.iter().find(|a| have < a.min_secret_bytes()) {
                return Err(invalid(
                    "secret",
                    format!(
                        "is {have} bytes; {alg} needs at least {} (RFC 7518 §3.2)",
                        alg.min_secret_bytes()
                    ),
                ));
            }
        }
        Ok(list)
    }

    fn explicit_algorithms(
        &self,
        source: &KeySource,
        defaults: &[JwtAlgorithm],
    ) -> Result<Vec<JwtAlgorithm>, ConfigError> {
        let mut list = Vec::with_capacity(self.algorithms.len());
        for (i, alg) in self.algorithms.iter().copied().enumerate() {
            let key = format!("algorithms[{i}]");
            match source {
                KeySource::Static(k) if k.family == Family::Hmac => {
                    if !alg.is_symmetric() {
                        return Err(invalid(
                            key,
                            format!(
                                "{alg} needs a public key; `secret` only allows HS256, HS384, HS512"
                            ),
                        ));
                    }
                }
                KeySource::Static(k) => {
                    if !k.allows(alg) {
                        return Err(invalid(
                            key,
                            format!(
                                "{alg} does not fit the key in public_key_pem (it allows {})",
                                join(defaults)
                            ),
                        ));
                    }
                }
                KeySource::Jwks(_) => {
                    if alg.is_symmetric() {
                        return Err(invalid(
                            key,
                            format!("{alg} uses a shared secret, which a JWKS never provides"),
                        ));
                    }
                }
            }
            if !list.contains(&alg) {
                list.push(alg);
            }
        }
        Ok(list)
    }
}

fn join(algs: &[JwtAlgorithm]) -> String {
    algs.iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn err_key(text: &str) -> String {
        match JwtConfig::from_toml(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an Invalid error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn the_seed_table_parses_with_defaults() {
        let c = JwtConfig::from_toml(&format!(
            "enabled = true\nprovider = \"jwt\"\nsecret = \"{SECRET}\""
        ))
        .unwrap();
        assert_eq!(c.leeway.get(), Duration::from_secs(30));
        assert_eq!(c.max_token_bytes, 8192);
        assert_eq!(c.required_claims, vec!["exp"]);
        let r = c.resolve().unwrap();
        assert_eq!(r.algorithms, vec![JwtAlgorithm::HS256]);
        assert!(
            !format!("{c:?}").contains(SECRET),
            "secret leaked into Debug"
        );
    }

    #[test]
    fn issuer_and_audience_take_a_string_or_a_list() {
        let c = JwtConfig::from_toml(&format!(
            "secret = \"{SECRET}\"\nissuer = \"https://idp\"\naudience = [\"a\", \"b\"]"
        ))
        .unwrap();
        assert_eq!(c.issuer, vec!["https://idp"]);
        assert_eq!(c.audience, vec!["a", "b"]);
        let e = JwtConfig::from_toml(&format!("secret = \"{SECRET}\"\nissuer = 3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a string or a list of strings"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(err_key(""), "secret");
        assert_eq!(
            err_key(&format!(
                "secret = \"{SECRET}\"\njwks_url = \"http://x/jwks\""
            )),
            "jwks_url"
        );
        assert_eq!(err_key("secret = \"short\""), "secret");
        assert_eq!(
            err_key(&format!(
                "secret = \"{SECRET}\"\nalgorithms = [\"HS256\", \"RS256\"]"
            )),
            "algorithms[1]"
        );
        assert_eq!(
            err_key(&format!("secret = \"{SECRET}\"\nalgorithms = [\"HS512\"]")),
            "secret"
        );
        assert_eq!(
            err_key("jwks_url = \"http://x/jwks\"\nalgorithms = [\"HS256\"]"),
            "algorithms[0]"
        );
        assert_eq!(err_key("jwks_url = \"ftp://x/jwks\""), "jwks_url");
        assert_eq!(err_key("jwks_url = \"not a url\""), "jwks_url");
        assert_eq!(err_key("public_key_pem = \"nope\""), "public_key_pem");
        assert_eq!(
            err_key(&format!("secret = \"{SECRET}\"\nleeway = \"1h\"")),
            "leeway"
        );
        assert_eq!(
            err_key(&format!("secret = \"{SECRET}\"\nmax_token_bytes = 10")),
            "max_token_bytes"
        );
        assert_eq!(
            err_key(&format!(
                "secret = \"{SECRET}\"\njwks_fetch_timeout = \"0s\""
            )),
            "jwks_fetch_timeout"
        );
        assert_eq!(
            err_key(&format!("secret = \"{SECRET}\"\nroles_claim = \"a..b\"")),
            "roles_claim"
        );
        assert_eq!(
            err_key(&format!("secret = \"{SECRET}\"\nissuer = [\"\"]")),
            "issuer[0]"
        );
        assert_eq!(
            err_key(&format!(
                "secret = \"{SECRET}\"\nforward_claims = {{ sub = \"bad header\" }}"
            )),
            "forward_claims.sub"
        );
    }

    #[test]
    fn unknown_keys_and_algorithms_are_parse_errors() {
        let e = JwtConfig::from_toml(&format!("secret = \"{SECRET}\"\nsecrte = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("secrte"), "{e}");
        let e = JwtConfig::from_toml(&format!("secret = \"{SECRET}\"\nalgorithms = [\"none\"]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none"), "{e}");
        let e = JwtConfig::from_toml("provider = \"saml\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("saml"), "{e}");
    }

    #[test]
    fn disabled_needs_no_key_but_builds_nothing() {
        let c = JwtConfig::from_toml("enabled = false").unwrap();
        assert_eq!(c.resolve().unwrap_err().key(), Some("enabled"));
    }
}
