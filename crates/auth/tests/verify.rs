#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Real tokens, signed here with generated keys, through the verifier: what passes, and each
//! way of failing with its reason.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use jsonwebtoken::Algorithm;
use serde_json::json;
use trellis_auth::{AuthError, AuthzRule, JwtAlgorithm, JwtConfig, JwtVerifier};

fn hs_verifier() -> JwtVerifier {
    JwtVerifier::builder()
        .secret(SECRET)
        .issuer("https://idp.test")
        .audience("orders-api")
        .build()
        .unwrap()
}

fn rs_verifier() -> JwtVerifier {
    JwtVerifier::builder()
        .public_key_pem(&rsa_a().public_pem)
        .issuer("https://idp.test")
        .audience("orders-api")
        .build()
        .unwrap()
}

fn reason(v: &JwtVerifier, token: &str) -> &'static str {
    match v.verify_cached(token) {
        Ok(c) => panic!("token accepted: {c:?}"),
        Err(e) => {
            // Every refusal explains itself in words, not only in a code.
            assert!(!e.to_string().is_empty());
            e.reason()
        }
    }
}

#[tokio::test]
async fn valid_tokens_pass_and_their_claims_come_out() {
    let claims = claims();
    let cases = [
        (
            hs_verifier(),
            sign_hs(&claims, SECRET.as_bytes()),
            JwtAlgorithm::HS256,
        ),
        (
            rs_verifier(),
            sign(rsa_a(), Some("any-kid"), &claims),
            JwtAlgorithm::RS256,
        ),
        (
            JwtVerifier::builder()
                .public_key_pem(&ec_p256().public_pem)
                .build()
                .unwrap(),
            sign(ec_p256(), None, &claims),
            JwtAlgorithm::ES256,
        ),
        (
            JwtVerifier::builder()
                .public_key_pem(&ec_p384().public_pem)
                .build()
                .unwrap(),
            sign(ec_p384(), None, &claims),
            JwtAlgorithm::ES384,
        ),
    ];
    for (verifier, token, alg) in cases {
        let c = verifier.verify(&token).await.unwrap();
        assert_eq!(c.algorithm(), alg);
        assert_eq!(c.subject(), Some("user-42"));
        assert_eq!(c.issuer(), Some("https://idp.test"));
        assert_eq!(c.roles(), ["admin", "ops"]);
        assert_eq!(c.scopes(), ["orders:read", "orders:write"]);
        assert_eq!(c.get("aud"), Some(&json!("orders-api")));
        let exp = c
            .expires_at()
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(exp, claims["exp"].as_u64().unwrap());
        // The sync path agrees.
        assert_eq!(verifier.verify_cached(&token).unwrap(), c);
    }
}

#[tokio::test]
async fn rsa_pss_and_other_hash_sizes_when_allowed() {
    let v = JwtVerifier::builder()
        .public_key_pem(&rsa_a().public_pem)
        .algorithms(&[
            JwtAlgorithm::RS256,
            JwtAlgorithm::RS512,
            JwtAlgorithm::PS256,
        ])
        .build()
        .unwrap();
    for alg in [Algorithm::RS256, Algorithm::RS512, Algorithm::PS256] {
        let t = sign_as(rsa_a(), alg, None, &claims());
        assert!(v.verify_cached(&t).is_ok(), "{alg:?}");
    }
    let t = sign_as(rsa_a(), Algorithm::PS384, None, &claims());
    assert_eq!(reason(&v, &t), "alg_not_allowed");
}

#[test]
fn each_bad_token_is_refused_with_its_reason() {
    let hs = hs_verifier();
    let rs = rs_verifier();
    let now = now();
    let base = claims();

    // expired, beyond the 30 s leeway
    let t = sign_hs(
        &with(base.clone(), "exp", json!(now - 120)),
        SECRET.as_bytes(),
    );
    assert_eq!(reason(&hs, &t), "expired");
    let t = sign(rsa_a(), None, &with(base.clone(), "exp", json!(now - 120)));
    assert_eq!(reason(&rs, &t), "expired");
    // not yet valid
    let t = sign_hs(
        &with(base.clone(), "nbf", json!(now + 600)),
        SECRET.as_bytes(),
    );
    assert_eq!(reason(&hs, &t), "not_yet_valid");
    // wrong issuer / audience
    let t = sign_hs(
        &with(base.clone(), "iss", json!("https://evil.test")),
        SECRET.as_bytes(),
    );
    assert_eq!(reason(&hs, &t), "bad_issuer");
    let t = sign(
        rsa_a(),
        None,
        &with(base.clone(), "aud", json!(["web", "other"])),
    );
    assert_eq!(reason(&rs, &t), "bad_audience");
    // tampered payload: header and signature of a real token, roles rewritten
    let good = sign(rsa_a(), None, &base);
    let parts: Vec<&str> = good.split('.').collect();
    let forged = with(base.clone(), "roles", json!(["admin", "root"]));
    let forged_payload = base64_url(&serde_json::to_vec(&forged).unwrap());
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_eq!(reason(&rs, &tampered), "bad_signature");
    let good = sign_hs(&base, SECRET.as_bytes());
    let parts: Vec<&str> = good.split('.').collect();
    assert_eq!(
        reason(
            &hs,
            &format!("{}.{}.{}", parts[0], forged_payload, parts[2])
        ),
        "bad_signature"
    );
    // wrong key: another RSA key, another secret
    assert_eq!(reason(&rs, &sign(rsa_b(), None, &base)), "bad_signature");
    assert_eq!(
        reason(
            &hs,
            &sign_hs(&base, b"another secret that is long enough!!")
        ),
        "bad_signature"
    );
    // alg: none, with and without a signature
    let payload = serde_json::to_string(&base).unwrap();
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None"}"#,
        r#"{"alg":"NONE"}"#,
    ] {
        assert_eq!(
            reason(&hs, &raw_token(header, &payload, b"")),
            "alg_not_allowed"
        );
        assert_eq!(
            reason(&rs, &raw_token(header, &payload, b"")),
            "alg_not_allowed"
        );
        assert_eq!(
            reason(&rs, &raw_token(header, &payload, b"sig")),
            "alg_not_allowed"
        );
    }
}

/// The classic confusion attack: the attacker takes the server's RSA public key (public,
/// after all), uses its PEM text as an HMAC secret and signs an HS256 token with it.
#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let payload = serde_json::to_string(&with(claims(), "roles", json!(["admin"]))).unwrap();
    let attack = hmac_sign(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &payload,
        rsa_a().public_pem.as_bytes(),
    );
    // Default allow-list of a PEM verifier.
    let rs = rs_verifier();
    assert_eq!(reason(&rs, &attack), "alg_not_allowed");
    // Explicit RS256 allow-list.
    let rs = JwtVerifier::builder()
        .public_key_pem(&rsa_a().public_pem)
        .algorithms(&[JwtAlgorithm::RS256])
        .build()
        .unwrap();
    assert_eq!(reason(&rs, &attack), "alg_not_allowed");
    // And no configuration can allow HS256 next to a public key.
    let e = JwtVerifier::builder()
        .public_key_pem(&rsa_a().public_pem)
        .algorithms(&[JwtAlgorithm::RS256, JwtAlgorithm::HS256])
        .build()
        .unwrap_err();
    assert_eq!(e.key(), Some("algorithms[1]"));
    // Same attack with the key's base64 body only (no PEM armour) or its trimmed text.
    let body: String = rsa_a()
        .public_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let attack = hmac_sign(r#"{"alg":"HS256"}"#, &payload, body.as_bytes());
    assert_eq!(reason(&rs, &attack), "alg_not_allowed");
    // The EC flavour: ES256 key, HS256 token.
    let es = JwtVerifier::builder()
        .public_key_pem(&ec_p256().public_pem)
        .build()
        .unwrap();
    let attack = hmac_sign(
        r#"{"alg":"HS256"}"#,
        &payload,
        ec_p256().public_pem.as_bytes(),
    );
    assert_eq!(reason(&es, &attack), "alg_not_allowed");
}

#[test]
fn algorithms_of_the_wrong_curve_or_family_are_refused() {
    let es256 = JwtVerifier::builder()
        .public_key_pem(&ec_p256().public_pem)
        .build()
        .unwrap();
    assert_eq!(es256.algorithms(), [JwtAlgorithm::ES256]);
    assert_eq!(
        reason(&es256, &sign(ec_p384(), None, &claims())),
        "alg_not_allowed"
    );
    assert_eq!(
        reason(&es256, &sign(rsa_a(), None, &claims())),
        "alg_not_allowed"
    );
    let e = JwtVerifier::builder()
        .public_key_pem(&ec_p256().public_pem)
        .algorithms(&[JwtAlgorithm::ES384])
        .build()
        .unwrap_err();
    assert_eq!(e.key(), Some("algorithms[0]"));
    let hs = hs_verifier();
    assert_eq!(
        reason(&hs, &sign(rsa_a(), None, &claims())),
        "alg_not_allowed"
    );
}

#[test]
fn malformed_tokens_are_refused_without_panicking() {
    let hs = hs_verifier();
    let good = sign_hs(&claims(), SECRET.as_bytes());
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        ("", "missing_token"),
        ("x", "malformed"),
        ("a.b", "malformed"),
        ("a.b.c.d", "malformed"),
        ("a.b.c.d.e", "malformed"),
        ("...", "malformed"),
        ("ééé.a.b", "malformed"),
        ("a b.c.d", "malformed"),
        ("YQ.YQ.YQ", "malformed"),
    ];
    for (t, want) in cases {
        assert_eq!(reason(&hs, t), want, "{t:?}");
    }
    // bad base64 in each segment
    assert_eq!(
        reason(&hs, &format!("{}!.{}.{}", parts[0], parts[1], parts[2])),
        "malformed"
    );
    assert_eq!(
        reason(&hs, &format!("A{}.{}.{}", parts[0], parts[1], parts[2])),
        "malformed"
    );
    assert_eq!(
        reason(&hs, &format!("{}.{}.{}AA", parts[0], parts[1], parts[2])),
        "malformed"
    );
    // One more base64 character decodes to one more byte: a wrong signature, not a bad shape.
    assert_eq!(
        reason(&hs, &format!("{}.{}.{}A", parts[0], parts[1], parts[2])),
        "bad_signature"
    );
    // A payload that is not JSON, signed correctly: refused as malformed, after the signature.
    let t = hmac_sign(r#"{"alg":"HS256"}"#, "not json", SECRET.as_bytes());
    assert_eq!(reason(&hs, &t), "malformed");
    let t = hmac_sign(r#"{"alg":"HS256"}"#, "[1,2]", SECRET.as_bytes());
    assert_eq!(reason(&hs, &t), "malformed");
    // Deeply nested JSON stops at serde_json's recursion limit instead of the stack's.
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(3000), "]".repeat(3000));
    let v = JwtVerifier::builder()
        .secret(SECRET)
        .max_token_bytes(65536)
        .build()
        .unwrap();
    let t = hmac_sign(r#"{"alg":"HS256"}"#, &deep, SECRET.as_bytes());
    assert_eq!(reason(&v, &t), "malformed");
    // Huge tokens are cut off before decoding.
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(10_000), parts[2]);
    assert_eq!(reason(&hs, &huge), "token_too_large");
    let e = hs.verify_cached(&"a".repeat(1 << 20)).unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::TooLarge {
                len: 1_048_576,
                max: 8192
            }
        ),
        "{e:?}"
    );
}

#[test]
fn leeway_is_configurable() {
    let fixed = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let exp = with(claims(), "exp", json!(1_000_000 - 40));
    let token = sign_hs(&exp, SECRET.as_bytes());
    let strict = JwtVerifier::builder()
        .secret(SECRET)
        .clock(move || fixed)
        .build()
        .unwrap();
    assert_eq!(reason(&strict, &token), "expired");
    let lenient = JwtVerifier::builder()
        .secret(SECRET)
        .leeway(Duration::from_secs(60))
        .clock(move || fixed)
        .build()
        .unwrap();
    assert!(lenient.verify_cached(&token).is_ok());
    let zero = JwtVerifier::builder()
        .secret(SECRET)
        .leeway(Duration::ZERO)
        .clock(move || fixed)
        .build()
        .unwrap();
    let nbf = with(claims(), "nbf", json!(1_000_001));
    let nbf = with(nbf, "exp", json!(2_000_000));
    assert_eq!(
        reason(&zero, &sign_hs(&nbf, SECRET.as_bytes())),
        "not_yet_valid"
    );
    assert!(
        strict
            .verify_cached(&sign_hs(&nbf, SECRET.as_bytes()))
            .is_ok()
    );
    // A token without exp is refused by default, accepted when exp is not required.
    let no_exp = json!({"sub": "x"});
    assert_eq!(
        reason(&strict, &sign_hs(&no_exp, SECRET.as_bytes())),
        "missing_claim"
    );
    let open = JwtVerifier::builder()
        .secret(SECRET)
        .required_claims(&[])
        .build()
        .unwrap();
    assert!(
        open.verify_cached(&sign_hs(&no_exp, SECRET.as_bytes()))
            .is_ok()
    );
    let _ = SystemTime::now();
}

#[tokio::test]
async fn verify_request_reads_the_bearer_header() {
    let hs = hs_verifier();
    let token = sign_hs(&claims(), SECRET.as_bytes());
    let mut headers = HeaderMap::new();
    assert_eq!(
        hs.verify_request(&headers).await.unwrap_err().reason(),
        "missing_token"
    );
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("bEaReR {token}")).unwrap(),
    );
    assert_eq!(
        hs.verify_request(&headers).await.unwrap().subject(),
        Some("user-42")
    );
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    let e = hs.verify_request(&headers).await.unwrap_err();
    assert_eq!(e.reason(), "bad_scheme");
    assert_eq!(e.www_authenticate(), "Bearer");
}

/// Once a token is remembered, requests that repeat it skip the signature check; the
/// header around it is judged as before.
#[tokio::test]
async fn a_remembered_token_is_found_only_in_a_well_formed_header() {
    let hs = hs_verifier();
    let token = sign_hs(&claims(), SECRET.as_bytes());
    let header = |text: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(text).unwrap());
        headers
    };
    for text in [
        format!("Bearer {token}"),
        format!("bearer {token}"),
        format!("Bearer   {token} "),
        format!("Bearer\t{token}"),
    ] {
        for _ in 0..2 {
            let claims = hs.verify_request(&header(&text)).await;
            assert_eq!(claims.unwrap().subject(), Some("user-42"), "{text:?}");
        }
    }
    // The same remembered token in headers that are refused without it.
    let mut two = header(&format!("Bearer {token}"));
    two.append(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let e = hs.verify_request(&two).await.unwrap_err();
    assert_eq!(e.reason(), "malformed");
    for (text, reason) in [
        (format!("Bearer {token} x"), "malformed"),
        (format!("Token {token}"), "bad_scheme"),
        (format!("Bearer{token}"), "bad_scheme"),
        (format!("Bearer {token}x"), "bad_signature"),
    ] {
        let e = hs.verify_request(&header(&text)).await.unwrap_err();
        assert_eq!(e.reason(), reason, "{text:?}");
    }
}

#[test]
fn claims_are_forwarded_as_headers_and_line_breaks_are_refused() {
    let v = JwtVerifier::builder()
        .secret(SECRET)
        .forward_claim("sub", "X-User-Id")
        .forward_claim("roles", "x-user-roles")
        .forward_claim("tenant.id", "x-tenant")
        .forward_claim("email", "x-user-email")
        .build()
        .unwrap();
    let names: Vec<&str> = v
        .forward_claims()
        .header_names()
        .iter()
        .map(|h| h.as_str())
        .collect();
    // In claim-name order.
    assert_eq!(
        names,
        ["x-user-email", "x-user-roles", "x-user-id", "x-tenant"]
    );
    let c = v
        .verify_cached(&sign_hs(
            &with(claims(), "tenant", json!({"id": 7})),
            SECRET.as_bytes(),
        ))
        .unwrap();
    let h = v.forward_headers(&c).unwrap();
    let pairs: Vec<(&str, &str)> = h
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
        .collect();
    // No email claim: no header.
    assert_eq!(
        pairs,
        [
            ("x-user-roles", "admin,ops"),
            ("x-user-id", "user-42"),
            ("x-tenant", "7")
        ]
    );

    for (claim, value) in [
        ("sub", json!("alice\r\nx-admin: true")),
        ("sub", json!("alice\nx")),
        ("sub", json!("nul\u{0}byte")),
        ("roles", json!(["admin", "ops\r\nx-admin: 1"])),
        ("roles", json!(["user,admin"])),
        ("sub", json!("x".repeat(5000))),
    ] {
        let t = sign_hs(&with(claims(), claim, value.clone()), SECRET.as_bytes());
        let c = v.verify_cached(&t).unwrap();
        let e = v.forward_headers(&c).unwrap_err();
        assert_eq!(e.reason(), "bad_claim", "{value}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
    // Non-ASCII text is fine.
    let t = sign_hs(&with(claims(), "sub", json!("josé")), SECRET.as_bytes());
    let h = v.forward_headers(&v.verify_cached(&t).unwrap()).unwrap();
    assert_eq!(h[1].1.as_bytes(), "josé".as_bytes());

    // Header names are checked when the verifier is built.
    for bad in [
        "x user",
        "x-user\r\n",
        "host",
        "Authorization",
        "x-forwarded-for",
        "proxy-foo",
        "",
    ] {
        let e = JwtVerifier::builder()
            .secret(SECRET)
            .forward_claim("sub", bad)
            .build()
            .unwrap_err();
        assert_eq!(e.key(), Some("forward_claims.sub"), "{bad:?}");
    }
    let e = JwtVerifier::builder()
        .secret(SECRET)
        .forward_claim("sub", "x-user")
        .forward_claim("email", "X-User")
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("already used"), "{e}");
}

#[test]
fn authorization_any_and_all_on_roles_and_scopes() {
    let v = hs_verifier();
    let c = v
        .verify_cached(&sign_hs(&claims(), SECRET.as_bytes()))
        .unwrap();
    // roles admin, ops; scopes orders:read, orders:write
    let ok = [
        AuthzRule::any().roles(["admin"]),
        AuthzRule::any().roles(["root", "ops"]),
        AuthzRule::any().scopes(["billing"]).roles(["admin"]),
        AuthzRule::any().scopes(["orders:write"]),
        AuthzRule::all().roles(["admin", "ops"]),
        AuthzRule::all()
            .roles(["admin"])
            .scopes(["orders:read", "orders:write"]),
    ];
    for rule in ok {
        assert_eq!(rule.authorize(&c), Ok(()), "{rule:?}");
    }
    let denied = [
        (AuthzRule::any().roles(["root"]), "insufficient_role"),
        (AuthzRule::any().scopes(["billing"]), "insufficient_scope"),
        (
            AuthzRule::any().roles(["root"]).scopes(["billing"]),
            "forbidden",
        ),
        (
            AuthzRule::all().roles(["admin", "root"]),
            "insufficient_role",
        ),
        (
            AuthzRule::all().roles(["admin"]).scopes(["billing"]),
            "insufficient_scope",
        ),
        (
            AuthzRule::all().roles(["root"]).scopes(["billing"]),
            "forbidden",
        ),
        (AuthzRule::all(), "forbidden"),
        (AuthzRule::any(), "forbidden"),
    ];
    for (rule, want) in denied {
        let e = rule.authorize(&c).unwrap_err();
        assert_eq!(e.reason(), want, "{rule:?}");
        assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
    }
    let e = AuthzRule::all()
        .roles(["admin", "root"])
        .authorize(&c)
        .unwrap_err();
    assert!(
        e.to_string().contains("root") && !e.to_string().contains("\"admin\""),
        "{e}"
    );

    // The serde form, as a route would hold it.
    let rule: AuthzRule =
        toml::from_str("roles = [\"admin\"]\nscopes = [\"orders:write\"]\nrequire = \"all\"")
            .unwrap();
    assert_eq!(
        rule,
        AuthzRule::all().roles(["admin"]).scopes(["orders:write"])
    );
    assert!(toml::from_str::<AuthzRule>("roles = [\"a\"]\nrequire = \"most\"").is_err());
    assert!(toml::from_str::<AuthzRule>("role = [\"a\"]").is_err());
    assert_eq!(
        AuthzRule::any().validate().unwrap_err().key(),
        Some("roles")
    );
    assert_eq!(
        AuthzRule::any()
            .scopes(["a", " "])
            .validate()
            .unwrap_err()
            .key(),
        Some("scopes[1]")
    );
}

#[test]
fn config_from_the_gateway_table() {
    let toml = format!(
        r#"
        enabled = true
        provider = "jwt"
        public_key_pem = """
{}"""
        issuer = ["https://idp.test", "https://idp2.test"]
        audience = "orders-api"
        algorithms = ["RS256"]
        leeway = "5s"
        forward_claims = {{ sub = "x-user-id", roles = "x-user-roles" }}
        "#,
        rsa_a().public_pem
    );
    let config = JwtConfig::from_toml(&toml).unwrap();
    let v = JwtVerifier::from_config(&config).unwrap();
    let c = v.verify_cached(&sign(rsa_a(), None, &claims())).unwrap();
    assert_eq!(v.forward_headers(&c).unwrap().len(), 2);
    // A private key pasted by mistake is named.
    let toml = format!("public_key_pem = \"\"\"\n{}\"\"\"", rsa_a().private_pem);
    let e = JwtConfig::from_toml(&toml).unwrap_err();
    assert_eq!(e.key(), Some("public_key_pem"));
    assert!(e.to_string().contains("private key"), "{e}");
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A verified token is remembered (by its exact text), but never beyond what a full
/// verification would accept: its `exp` is checked again on every use, and a token that
/// differs in one byte is verified from scratch.
#[test]
fn a_remembered_token_still_expires_and_a_changed_one_is_verified_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = now.clone();
    let verifier = JwtVerifier::builder()
        .secret(SECRET)
        .leeway(Duration::ZERO)
        .clock(move || UNIX_EPOCH + Duration::from_secs(clock.load(Ordering::SeqCst)))
        .build()
        .unwrap();
    let body = with(json!({"sub": "alice"}), "exp", json!(1_000_010));
    let token = sign_hs(&body, SECRET.as_bytes());
    for _ in 0..3 {
        let claims = verifier.verify_cached(&token).unwrap();
        assert_eq!(claims.subject(), Some("alice"));
    }
    // One byte changed in the signature, then in the payload: refused, not remembered.
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        reason(&verifier, std::str::from_utf8(&forged).unwrap()),
        "bad_signature"
    );
    let (head, rest) = token.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let other_body =
        base64_url(&serde_json::to_vec(&with(body.clone(), "sub", json!("mallory"))).unwrap());
    assert_eq!(
        reason(&verifier, &format!("{head}.{other_body}.{signature}")),
        "bad_signature"
    );
    assert_eq!(
        verifier.verify_cached(&token).unwrap().subject(),
        Some("alice")
    );
    // Past its exp, the remembered token is refused like any other.
    now.store(1_000_010, Ordering::SeqCst);
    assert_eq!(reason(&verifier, &token), "expired");
    now.store(1_000_000, Ordering::SeqCst);
    assert!(verifier.verify_cached(&token).is_ok());
}
