//! Keys generated per test binary, and token signing, for the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const SECRET: &str = "test secret: thirty-two bytes or more, for HS256";

/// A key pair: what signs (private PEM) and what verifies (public PEM, JWK).
pub struct TestKey {
    pub private_pem: String,
    pub public_pem: String,
    pub jwk: Value,
    pub alg: Algorithm,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn b64u(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn rsa_key() -> TestKey {
    let kp = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).unwrap();
    let private = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'_>>::as_der(&kp).unwrap();
    let public = kp.public_key();
    let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der<'_>>::as_der(public).unwrap();
    let parts = PublicKeyComponents::<Vec<u8>>::from(public);
    TestKey {
        private_pem: pem("PRIVATE KEY", private.as_ref()),
        public_pem: pem("PUBLIC KEY", spki.as_ref()),
        jwk: json!({"kty": "RSA", "n": b64u(&parts.n), "e": b64u(&parts.e), "use": "sig"}),
        alg: Algorithm::RS256,
    }
}

pub fn ec_key(p384: bool) -> TestKey {
    let alg = if p384 {
        &ECDSA_P384_SHA384_FIXED_SIGNING
    } else {
        &ECDSA_P256_SHA256_FIXED_SIGNING
    };
    let kp = EcdsaKeyPair::generate(alg).unwrap();
    let private = kp.to_pkcs8v1().unwrap();
    let public = kp.public_key();
    let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der<'_>>::as_der(public).unwrap();
    let point = public.as_ref();
    let size = if p384 { 48 } else { 32 };
    let (x, y) = point[1..].split_at(size);
    TestKey {
        private_pem: pem("PRIVATE KEY", private.as_ref()),
        public_pem: pem("PUBLIC KEY", spki.as_ref()),
        jwk: json!({"kty": "EC", "crv": if p384 { "P-384" } else { "P-256" }, "x": b64u(x), "y": b64u(y)}),
        alg: if p384 {
            Algorithm::ES384
        } else {
            Algorithm::ES256
        },
    }
}

/// Keys shared by the tests of one binary (RSA generation is slow in debug builds).
pub fn rsa_a() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(rsa_key)
}
pub fn rsa_b() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(rsa_key)
}
pub fn ec_p256() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(|| ec_key(false))
}
pub fn ec_p384() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(|| ec_key(true))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims valid for an hour from now.
pub fn claims() -> Value {
    json!({
        "sub": "user-42",
        "iss": "https://idp.test",
        "aud": "orders-api",
        "exp": now() + 3600,
        "iat": now(),
        "roles": ["admin", "ops"],
        "scope": "orders:read orders:write",
    })
}

pub fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

pub fn sign_hs(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

pub fn sign(key: &TestKey, kid: Option<&str>, claims: &Value) -> String {
    sign_as(key, key.alg, kid, claims)
}

pub fn sign_as(key: &TestKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let enc = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(key.private_pem.as_bytes()),
        _ => EncodingKey::from_rsa_pem(key.private_pem.as_bytes()),
    }
    .unwrap();
    jsonwebtoken::encode(&header, claims, &enc).unwrap()
}

/// A token from raw header and payload JSON and raw signature bytes.
pub fn raw_token(header: &str, payload: &str, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64u(header.as_bytes()),
        b64u(payload.as_bytes()),
        b64u(signature)
    )
}

/// HMAC-SHA256 over `header.payload` with `secret`, the way an attacker would sign.
pub fn hmac_sign(header: &str, payload: &str, secret: &[u8]) -> String {
    let message = format!("{}.{}", b64u(header.as_bytes()), b64u(payload.as_bytes()));
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, message.as_bytes());
    format!("{message}.{}", b64u(tag.as_ref()))
}

/// A JWKS with these keys, each under its kid.
pub fn jwks(keys: &[(&TestKey, &str)]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(k, kid)| {
            let mut jwk = k.jwk.clone();
            jwk["kid"] = json!(kid);
            jwk
        })
        .collect();
    json!({ "keys": keys })
}
