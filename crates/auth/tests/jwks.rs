#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The JWKS path against a real HTTP server on 127.0.0.1: rotation, the unknown-`kid` rate
//! limit (counted at the server), periodic refresh, and an unreachable or useless key set.

mod common;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use common::*;
use serde_json::{Value, json};
use trellis_auth::{AuthError, JwtVerifier};

#[derive(Clone)]
struct Jwks {
    hits: Arc<AtomicUsize>,
    body: Arc<Mutex<Value>>,
    status: Arc<AtomicU16>,
}

impl Jwks {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn serve(&self, body: Value) {
        *self.body.lock().unwrap() = body;
    }
}

async fn handler(State(s): State<Jwks>) -> (StatusCode, axum::Json<Value>) {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let status = StatusCode::from_u16(s.status.load(Ordering::SeqCst)).unwrap();
    (status, axum::Json(s.body.lock().unwrap().clone()))
}

/// Starts a JWKS server serving `body` at `/jwks`; returns its URL and handle.
async fn jwks_server(body: Value) -> (String, Jwks) {
    let state = Jwks {
        hits: Arc::new(AtomicUsize::new(0)),
        body: Arc::new(Mutex::new(body)),
        status: Arc::new(AtomicU16::new(200)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/jwks", get(handler))
        .with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/jwks"), state)
}

fn verifier(url: &str, min_refresh: Duration) -> JwtVerifier {
    JwtVerifier::builder()
        .jwks_url(url)
        .jwks_min_refresh_interval(min_refresh)
        .issuer("https://idp.test")
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_on_its_unknown_kid() {
    let (url, server) = jwks_server(jwks(&[(rsa_a(), "key-a")])).await;
    let v = verifier(&url, Duration::ZERO);
    let token_a = sign(rsa_a(), Some("key-a"), &claims());
    assert_eq!(v.verify(&token_a).await.unwrap().key_id(), Some("key-a"));
    assert_eq!(server.hits(), 1);

    // The identity provider rotates: key A out, key B (an EC key) in.
    server.serve(jwks(&[(ec_p256(), "key-b")]));
    let token_b = sign(ec_p256(), Some("key-b"), &claims());
    // Nothing fetched yet: the cached set does not know key-b.
    assert_eq!(
        v.verify_cached(&token_b).unwrap_err().reason(),
        "unknown_key"
    );
    let c = v.verify(&token_b).await.unwrap();
    assert_eq!((c.key_id(), c.subject()), (Some("key-b"), Some("user-42")));
    assert_eq!(server.hits(), 2);
    // Key A is gone after the refresh.
    assert_eq!(
        v.verify(&token_a).await.unwrap_err().reason(),
        "unknown_key"
    );
    assert!(v.verify_cached(&token_b).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_refreshes_are_rate_limited_at_the_server() {
    let (url, server) = jwks_server(jwks(&[(rsa_a(), "key-a")])).await;
    let v = verifier(&url, Duration::from_secs(3600));
    let token_a = sign(rsa_a(), Some("key-a"), &claims());
    v.verify(&token_a).await.unwrap();
    assert_eq!(server.hits(), 1);

    // 200 tokens with made-up kids, 50 at a time: none may reach the JWKS server.
    let forged: Vec<String> = (0..200)
        .map(|i| sign(rsa_b(), Some(&format!("random-{i}")), &claims()))
        .collect();
    for chunk in forged.chunks(50) {
        let mut set = tokio::task::JoinSet::new();
        for t in chunk {
            let (v, t) = (v.clone(), t.clone());
            set.spawn(async move { v.verify(&t).await });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap_err().reason(), "unknown_key");
        }
    }
    assert_eq!(server.hits(), 1, "unknown kids reached the JWKS server");
    // The price of the limit: a genuinely new key waits for the cooldown or the period.
    server.serve(jwks(&[(rsa_a(), "key-a"), (rsa_b(), "key-b")]));
    let token_b = sign(rsa_b(), Some("key-b"), &claims());
    assert_eq!(
        v.verify(&token_b).await.unwrap_err().reason(),
        "unknown_key"
    );
    assert_eq!(server.hits(), 1);
    // An explicit refresh is not rate-limited.
    assert_eq!(v.refresh_keys().await.unwrap(), 2);
    assert!(v.verify(&token_b).await.is_ok());
    assert_eq!(server.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_allows_one_fetch_per_interval_under_a_steady_flood() {
    let (url, server) = jwks_server(jwks(&[(rsa_a(), "key-a")])).await;
    let min = Duration::from_millis(200);
    let v = verifier(&url, min);
    v.verify(&sign(rsa_a(), Some("key-a"), &claims()))
        .await
        .unwrap();
    let start = Instant::now();
    let forged = sign(rsa_b(), Some("random"), &claims());
    let mut sent = 0;
    // A bounded flood: 1 s or 20 000 requests, whichever comes first.
    while sent < 20_000 && start.elapsed() < Duration::from_secs(1) {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (v, t) = (v.clone(), forged.clone());
            set.spawn(async move { v.verify(&t).await });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap_err().reason(), "unknown_key");
        }
        sent += 20;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let allowed = 1 + (elapsed.as_millis() / min.as_millis()) as usize + 1;
    let hits = server.hits();
    eprintln!(
        "{sent} forged tokens in {elapsed:?}: {hits} JWKS fetches (at most {allowed} allowed)"
    );
    assert!(
        hits <= allowed,
        "{hits} JWKS fetches for {sent} forged tokens in {elapsed:?}; at most {allowed} allowed"
    );
    assert!(
        hits >= 2,
        "the cooldown never ended: {hits} fetches in {elapsed:?}"
    );
}

#[tokio::test]
async fn keys_are_refreshed_periodically_without_any_token_asking() {
    let (url, server) = jwks_server(jwks(&[(rsa_a(), "key-a")])).await;
    let v = JwtVerifier::builder()
        .jwks_url(&url)
        .jwks_refresh_interval(Duration::from_secs(1))
        .jwks_min_refresh_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    v.refresh_keys().await.unwrap();
    server.serve(jwks(&[(rsa_b(), "key-b")]));
    let token_b = sign(rsa_b(), Some("key-b"), &claims());
    // verify_cached never fetches: only the periodic refresh can make this pass.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match v.verify_cached(&token_b) {
            Ok(_) => break,
            Err(e) => assert_eq!(e.reason(), "unknown_key"),
        }
        assert!(Instant::now() < deadline, "no periodic refresh within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.hits() >= 2);
}

#[tokio::test]
async fn key_selection_by_kid_and_alg() {
    let (url, _server) = jwks_server(jwks(&[(rsa_a(), "rsa"), (ec_p256(), "ec")])).await;
    let v = verifier(&url, Duration::ZERO);
    // An RS256 token naming the EC key's kid.
    let t = sign(rsa_a(), Some("ec"), &claims());
    assert_eq!(v.verify(&t).await.unwrap_err().reason(), "alg_not_allowed");
    // No kid, and a key of each family: each alg has exactly one candidate.
    assert!(v.verify(&sign(rsa_a(), None, &claims())).await.is_ok());
    assert!(v.verify(&sign(ec_p256(), None, &claims())).await.is_ok());
    // HS/RS confusion through the JWKS: HS256 signed with the RSA key's PEM, kid "rsa".
    let payload = serde_json::to_string(&claims()).unwrap();
    let attack = hmac_sign(
        r#"{"alg":"HS256","kid":"rsa"}"#,
        &payload,
        rsa_a().public_pem.as_bytes(),
    );
    assert_eq!(
        v.verify(&attack).await.unwrap_err().reason(),
        "alg_not_allowed"
    );
    // Wrong key under a known kid.
    let t = sign(rsa_b(), Some("rsa"), &claims());
    assert_eq!(v.verify(&t).await.unwrap_err().reason(), "bad_signature");
    // Two RSA keys and no kid: ambiguous, refused without a refetch.
    let (url, server) = jwks_server(jwks(&[(rsa_a(), "a"), (rsa_b(), "b")])).await;
    let v = verifier(&url, Duration::ZERO);
    v.refresh_keys().await.unwrap();
    let e = v.verify(&sign(rsa_a(), None, &claims())).await.unwrap_err();
    assert_eq!(e.reason(), "unknown_key");
    assert!(e.to_string().contains("kid is required"), "{e}");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn an_unusable_key_server_is_a_server_fault() {
    // 500 from the server.
    let (url, server) = jwks_server(jwks(&[(rsa_a(), "key-a")])).await;
    server.status.store(500, Ordering::SeqCst);
    let v = verifier(&url, Duration::from_secs(3600));
    let t = sign(rsa_a(), Some("key-a"), &claims());
    let e = v.verify(&t).await.unwrap_err();
    assert_eq!(e.reason(), "keys_unavailable", "{e}");
    assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(e.to_string().contains("500"), "{e}");
    let hits = server.hits();
    // The failure is rate-limited too.
    assert!(matches!(
        v.verify(&t).await,
        Err(AuthError::KeysUnavailable(_))
    ));
    assert_eq!(server.hits(), hits);
    // Back up: an explicit refresh recovers.
    server.status.store(200, Ordering::SeqCst);
    v.refresh_keys().await.unwrap();
    assert!(v.verify(&t).await.is_ok());
    // Then down again: the keys fetched before stay in use.
    server.status.store(503, Ordering::SeqCst);
    assert!(v.refresh_keys().await.is_err());
    assert!(v.verify(&t).await.is_ok());

    // A key set with no usable signing key.
    let (url, _s) =
        jwks_server(json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]})).await;
    let e = verifier(&url, Duration::ZERO).verify(&t).await.unwrap_err();
    assert_eq!(e.reason(), "keys_unavailable");
    assert!(e.to_string().contains("oct"), "{e}");

    // Nobody listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let v = verifier(&format!("http://{addr}/jwks"), Duration::ZERO);
    let e = v.verify(&t).await.unwrap_err();
    assert_eq!(e.reason(), "keys_unavailable");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}

#[test]
fn a_jwks_verifier_needs_a_runtime_and_a_usable_url() {
    let e = JwtVerifier::builder()
        .jwks_url("http://127.0.0.1:9/jwks")
        .build()
        .unwrap_err();
    assert_eq!(e.key(), Some("jwks_url"));
    assert!(e.to_string().contains("tokio runtime"), "{e}");
    let e = JwtVerifier::builder()
        .jwks_url("https://idp.test/jwks")
        .build()
        .unwrap_err();
    assert_eq!(e.key(), Some("jwks_url"));
}
