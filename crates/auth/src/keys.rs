//! Keys: the algorithm list, a shared secret, a PEM public key, and the keys of a JWKS.
//!
//! Every key knows its family (HMAC, RSA, EC and, for EC, its curve); a token is checked
//! against a key only when its `alg` belongs to the key's family. That is what defeats the
//! HS/RS confusion attack: an `HS256` token "signed" with an RSA public key's PEM text never
//! reaches an HMAC check, because no HMAC key exists in an RSA verifier and `HS256` is not in
//! its allow-list.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde::{Deserialize, Serialize};

/// The signature algorithms a verifier may allow. `none` is not one of them, and never
/// will be.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 (shared secret of at least 32 bytes).
    HS256,
    /// HMAC with SHA-384 (shared secret of at least 48 bytes).
    HS384,
    /// HMAC with SHA-512 (shared secret of at least 64 bytes).
    HS512,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
}

/// Which kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Hmac,
    Rsa,
    Ec(Curve),
}

/// The elliptic curves of ES256 and ES384.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Curve {
    P256,
    P384,
}

impl JwtAlgorithm {
    /// Every algorithm, in declaration order.
    pub const ALL: [JwtAlgorithm; 11] = [
        JwtAlgorithm::HS256,
        JwtAlgorithm::HS384,
        JwtAlgorithm::HS512,
        JwtAlgorithm::RS256,
        JwtAlgorithm::RS384,
        JwtAlgorithm::RS512,
        JwtAlgorithm::PS256,
        JwtAlgorithm::PS384,
        JwtAlgorithm::PS512,
        JwtAlgorithm::ES256,
        JwtAlgorithm::ES384,
    ];

    /// The name as it appears in a JWT header (`"RS256"`).
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 => "HS256",
            JwtAlgorithm::HS384 => "HS384",
            JwtAlgorithm::HS512 => "HS512",
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::RS384 => "RS384",
            JwtAlgorithm::RS512 => "RS512",
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::PS384 => "PS384",
            JwtAlgorithm::PS512 => "PS512",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::ES384 => "ES384",
        }
    }

    /// `true` for the HMAC (shared secret) algorithms.
    pub fn is_symmetric(self) -> bool {
        matches!(self.family(), Family::Hmac)
    }

    pub(crate) fn family(self) -> Family {
        match self {
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512 => Family::Hmac,
            JwtAlgorithm::RS256
            | JwtAlgorithm::RS384
            | JwtAlgorithm::RS512
            | JwtAlgorithm::PS256
            | JwtAlgorithm::PS384
            | JwtAlgorithm::PS512 => Family::Rsa,
            JwtAlgorithm::ES256 => Family::Ec(Curve::P256),
            JwtAlgorithm::ES384 => Family::Ec(Curve::P384),
        }
    }

    /// Shortest secret RFC 7518 §3.2 allows: the hash output size.
    pub(crate) fn min_secret_bytes(self) -> usize {
        match self {
            JwtAlgorithm::HS384 => 48,
            JwtAlgorithm::HS512 => 64,
            _ => 32,
        }
    }

    pub(crate) fn to_jwt(self) -> jsonwebtoken::Algorithm {
        use jsonwebtoken::Algorithm as A;
        match self {
            JwtAlgorithm::HS256 => A::HS256,
            JwtAlgorithm::HS384 => A::HS384,
            JwtAlgorithm::HS512 => A::HS512,
            JwtAlgorithm::RS256 => A::RS256,
            JwtAlgorithm::RS384 => A::RS384,
            JwtAlgorithm::RS512 => A::RS512,
            JwtAlgorithm::PS256 => A::PS256,
            JwtAlgorithm::PS384 => A::PS384,
            JwtAlgorithm::PS512 => A::PS512,
            JwtAlgorithm::ES256 => A::ES256,
            JwtAlgorithm::ES384 => A::ES384,
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `alg` that is not one of [`JwtAlgorithm`] (the names are case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a supported algorithm; use one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 (`none` is never accepted)"
)]
pub struct UnknownAlgorithm(pub String);

impl FromStr for JwtAlgorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JwtAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAlgorithm(s.to_owned()))
    }
}

/// A verification key and its family.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) family: Family,
    pub(crate) key: DecodingKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl Key {
    pub(crate) fn secret(secret: &[u8]) -> Key {
        Key {
            family: Family::Hmac,
            key: DecodingKey::from_secret(secret),
        }
    }

    /// Can this key check a token signed with `alg`?
    pub(crate) fn allows(&self, alg: JwtAlgorithm) -> bool {
        self.family == alg.family()
    }
}

const MIN_RSA_MODULUS_BYTES: usize = 256;

fn rsa_from_components(n: &[u8], e: &[u8]) -> Result<Key, String> {
    let n = strip_leading_zeros(n);
    if n.len() < MIN_RSA_MODULUS_BYTES {
        return Err(format!(
            "RSA key has {} bits; at least 2048 are required",
            n.len() * 8
        ));
    }
    if e.is_empty() {
        return Err("RSA key has an empty exponent".into());
    }
    Ok(Key {
        family: Family::Rsa,
        key: DecodingKey::from_rsa_raw_components(n, e),
    })
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn ec_from_point(point: &[u8]) -> Result<Key, String> {
    let curve = match point.len() {
        65 => Curve::P256,
        97 => Curve::P384,
        n => {
            return Err(format!(
                "EC key point has {n} bytes; only P-256 and P-384 keys are supported"
            ));
        }
    };
    if point.first() != Some(&4) {
        return Err("EC key point is not in uncompressed form".into());
    }
    Ok(Key {
        family: Family::Ec(curve),
        key: DecodingKey::from_ec_der(point),
    })
}

/// Parses a PEM public key (`-----BEGIN PUBLIC KEY-----` with an RSA or EC key, or
/// `-----BEGIN RSA PUBLIC KEY-----`). Private keys and certificates are refused with a hint.
pub(crate) fn parse_public_pem(text: &str) -> Result<Key, String> {
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .collect();
    match labels.as_slice() {
        [] => return Err("is not PEM: no `-----BEGIN PUBLIC KEY-----` line".into()),
        [label] if label.contains("PRIVATE") => {
            return Err(
                "holds a private key; give the public key (`-----BEGIN PUBLIC KEY-----`)".into(),
            );
        }
        [label] if label.contains("CERTIFICATE") => {
            return Err(
                "holds a certificate; give its public key (`openssl x509 -pubkey -noout`)".into(),
            );
        }
        ["PUBLIC KEY"] | ["RSA PUBLIC KEY"] => {}
        [label] => return Err(format!("holds a {label:?} block; expected PUBLIC KEY")),
        _ => return Err(format!("holds {} PEM blocks; expected one", labels.len())),
    }
    if let Ok(rsa) = DecodingKey::from_rsa_pem(text.as_bytes()) {
        let der = rsa
            .try_get_as_bytes()
            .map_err(|e| format!("RSA key: {e}"))?;
        let (n, e) = (jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER
            .key_utils
            .rsa_pub_components_from_public_key)(der)
        .map_err(|e| format!("is not a valid RSA public key: {e}"))?;
        return rsa_from_components(&n, &e);
    }
    match DecodingKey::from_ec_pem(text.as_bytes()) {
        Ok(ec) => {
            let point = ec.try_get_as_bytes().map_err(|e| format!("EC key: {e}"))?;
            ec_from_point(point)
        }
        Err(e) => Err(format!("is neither an RSA nor an EC public key: {e}")),
    }
}

/// One usable key of a JWKS.
#[derive(Debug, Clone)]
pub(crate) struct JwkKey {
    pub(crate) kid: Option<String>,
    /// The JWK's own `alg`, when it names one: then only that algorithm may use it.
    pub(crate) alg: Option<JwtAlgorithm>,
    pub(crate) key: Key,
}

impl JwkKey {
    pub(crate) fn allows(&self, alg: JwtAlgorithm) -> bool {
        self.key.allows(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Most keys a JWKS may contribute; the rest are ignored.
pub(crate) const MAX_JWKS_KEYS: usize = 64;

/// Parses a JWKS document: the usable signing keys, and why each other key was skipped.
/// Symmetric (`oct`) keys are always skipped: a key set served over HTTP is public.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<(Vec<JwkKey>, Vec<String>), String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body)
        .map_err(|e| format!("not a JWKS (`{{\"keys\": [...]}}`): {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in set.keys.into_iter().enumerate() {
        if keys.len() >= MAX_JWKS_KEYS {
            skipped.push(format!("keys[{i}]: more than {MAX_JWKS_KEYS} keys"));
            continue;
        }
        match serde_json::from_value::<RawJwk>(value)
            .map_err(|e| e.to_string())
            .and_then(jwk_key)
        {
            Ok(key) => keys.push(key),
            Err(why) => skipped.push(format!("keys[{i}]: {why}")),
        }
    }
    Ok((keys, skipped))
}

fn b64(field: &str, value: Option<&String>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("no {field:?}"))?;
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|e| format!("{field:?} is not base64url: {e}"))
}

fn jwk_key(raw: RawJwk) -> Result<JwkKey, String> {
    if let Some(u) = &raw.use_
        && u != "sig"
    {
        return Err(format!("use {u:?} is not \"sig\""));
    }
    if let Some(ops) = &raw.key_ops
        && !ops.iter().any(|o| o == "verify")
    {
        return Err("key_ops does not include \"verify\"".into());
    }
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(a) => Some(a.parse::<JwtAlgorithm>().map_err(|e| e.to_string())?),
    };
    let key = match raw.kty.as_deref() {
        Some("RSA") => rsa_from_components(&b64("n", raw.n.as_ref())?, &b64("e", raw.e.as_ref())?)?,
        Some("EC") => {
            let (curve, size) = match raw.crv.as_deref() {
                Some("P-256") => (Curve::P256, 32),
                Some("P-384") => (Curve::P384, 48),
                other => return Err(format!("curve {other:?} is not supported")),
            };
            let x = b64("x", raw.x.as_ref())?;
            let y = b64("y", raw.y.as_ref())?;
            if x.len() != size || y.len() != size {
                return Err(format!("x and y must be {size} bytes for {curve:?}"));
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            ec_from_point(&point)?
        }
        Some("oct") => return Err("symmetric (oct) keys are never taken from a JWKS".into()),
        other => return Err(format!("kty {other:?} is not supported")),
    };
    if let Some(a) = alg
        && !key.allows(a)
    {
        return Err(format!("alg {a} does not fit a {:?} key", key.family));
    }
    Ok(JwkKey {
        kid: raw.kid,
        alg,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip_and_none_is_unknown() {
        for a in JwtAlgorithm::ALL {
            assert_eq!(a.as_str().parse::<JwtAlgorithm>(), Ok(a));
        }
        for bad in ["none", "None", "hs256", "EdDSA", ""] {
            assert!(bad.parse::<JwtAlgorithm>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pem_refuses_private_keys_certificates_and_junk() {
        let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(
            parse_public_pem(private)
                .unwrap_err()
                .contains("private key")
        );
        let rsa_private = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(
            parse_public_pem(rsa_private)
                .unwrap_err()
                .contains("private key")
        );
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(parse_public_pem(cert).unwrap_err().contains("certificate"));
        assert!(parse_public_pem("hello").unwrap_err().contains("not PEM"));
        let junk = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(parse_public_pem(junk).is_err());
    }

    #[test]
    fn jwks_skips_what_it_cannot_use() {
        let body = br#"{"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "s"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "small"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AA"},
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
            "not an object"
        ]}"#;
        let (keys, skipped) = parse_jwks(body).unwrap();
        assert!(keys.is_empty());
        assert_eq!(skipped.len(), 7, "{skipped:?}");
        assert!(skipped[0].contains("oct"), "{}", skipped[0]);
        assert!(skipped[1].contains("2048"), "{}", skipped[1]);
        assert!(parse_jwks(b"[]").unwrap_err().contains("not a JWKS"));
    }
}
