//! Arbitrary bytes as a token, as an `Authorization` header, and as the payload of a
//! correctly signed token: the verifier must refuse or accept, never panic.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;
use trellis_auth::{AuthzRule, JwtVerifier, bearer_token};

const SECRET: &str = "fuzzing secret, thirty-two bytes or more";

/// A fresh RSA public key in PEM form, for the second verifier (the fuzzer never has the
/// private half, so it exercises every refusal path of RS256).
fn rsa_public_pem() -> String {
    use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
    use aws_lc_rs::signature::KeyPair as _;
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("RSA key");
    let der: PublicKeyX509Der<'_> = kp.public_key().as_der().expect("SPKI");
    let body = STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

fn verifiers() -> &'static (JwtVerifier, JwtVerifier) {
    static V: OnceLock<(JwtVerifier, JwtVerifier)> = OnceLock::new();
    V.get_or_init(|| {
        let hs = JwtVerifier::builder()
            .secret(SECRET)
            .issuer("https://idp.test")
            .audience("api")
            .roles_claim("realm.roles")
            .forward_claim("sub", "x-user-id")
            .forward_claim("roles", "x-user-roles")
            .forward_claim("realm.roles", "x-realm-roles")
            .required_claims(&[])
            .build()
            .expect("HS256 verifier");
        let rs = JwtVerifier::builder()
            .public_key_pem(rsa_public_pem())
            .build()
            .expect("RS256 verifier");
        (hs, rs)
    })
}

fuzz_target!(|data: &[u8]| {
    let (hs, rs) = verifiers();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        // The bytes as a token.
        0 => {
            let text = String::from_utf8_lossy(rest);
            let _ = hs.verify_cached(&text);
            let _ = rs.verify_cached(&text);
        }
        // The bytes as an Authorization header value.
        1 => {
            if let Ok(value) = http::HeaderValue::from_bytes(rest) {
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::AUTHORIZATION, value);
                if let Ok(token) = bearer_token(&headers) {
                    let _ = hs.verify_cached(token);
                }
            }
        }
        // The bytes as the payload of a correctly signed HS256 token: exercises the claim
        // checks, roles/scopes extraction, header forwarding and authorization.
        _ => {
            use jsonwebtoken::{Algorithm, EncodingKey};
            let header = r#"{"alg":"HS256","typ":"JWT"}"#;
            let message = format!("{}.{}", b64(header.as_bytes()), b64(rest));
            let key = EncodingKey::from_secret(SECRET.as_bytes());
            let Ok(sig) = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
            else {
                return;
            };
            let token = format!("{message}.{sig}");
            if let Ok(claims) = hs.verify_cached(&token) {
                if let Ok(headers) = hs.forward_headers(&claims) {
                    for (_, value) in headers {
                        assert!(!value.as_bytes().iter().any(|b| *b == b'\r' || *b == b'\n'));
                    }
                }
                let _ = AuthzRule::all()
                    .roles(["admin"])
                    .scopes(["a"])
                    .authorize(&claims);
                let _ = AuthzRule::any()
                    .roles(["admin"])
                    .scopes(["a"])
                    .authorize(&claims);
            }
        }
    }
});

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
