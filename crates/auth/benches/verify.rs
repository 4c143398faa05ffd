#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! verify() for HS256, RS256 and ES256 against two baselines measured in the same run:
//! base64url-decoding the same token's three segments (the floor of any verifier) and
//! `jsonwebtoken::decode` with the equivalent validation (the library on its own).
//! "first use" verifies 2,048 distinct tokens in turn, so every call misses the verifier's
//! cache of recently verified tokens and checks the signature; "same token" repeats one
//! token, as a client does on every request, and is answered from that cache.
//!
//! `cargo bench -p trellis-auth --bench verify` prints ns/op and the ratios.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use trellis_auth::JwtVerifier;

/// Median ns/op of 7 rounds of about 100 ms each (after a warm-up round).
fn measure(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calib = 0u64;
    while start.elapsed() < Duration::from_millis(50) && calib < 10_000_000 {
        f();
        calib += 1;
    }
    let per_round = (calib * 2).max(10);
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_round {
                f();
            }
            t.elapsed().as_nanos() as f64 / per_round as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[3]
}

fn b64_segments(token: &str) -> usize {
    token
        .split('.')
        .map(|s| URL_SAFE_NO_PAD.decode(s).map_or(0, |v| v.len()))
        .sum()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let claims = claims();
    let cases = [
        (
            "HS256",
            sign_hs(&claims, SECRET.as_bytes()),
            JwtVerifier::builder()
                .secret(SECRET)
                .issuer("https://idp.test")
                .audience("orders-api")
                .build()
                .unwrap(),
            DecodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        ),
        (
            "RS256",
            sign(rsa_a(), None, &claims),
            JwtVerifier::builder()
                .public_key_pem(&rsa_a().public_pem)
                .issuer("https://idp.test")
                .audience("orders-api")
                .build()
                .unwrap(),
            DecodingKey::from_rsa_pem(rsa_a().public_pem.as_bytes()).unwrap(),
            Algorithm::RS256,
        ),
        (
            "ES256",
            sign(ec_p256(), None, &claims),
            JwtVerifier::builder()
                .public_key_pem(&ec_p256().public_pem)
                .issuer("https://idp.test")
                .audience("orders-api")
                .build()
                .unwrap(),
            DecodingKey::from_ec_pem(ec_p256().public_pem.as_bytes()).unwrap(),
            Algorithm::ES256,
        ),
    ];
    println!(
        "token claims: {} bytes of JSON",
        serde_json::to_vec(&claims).unwrap().len()
    );
    println!(
        "{:<6} {:>12} {:>14} {:>12} {:>12} {:>14} {:>10} {:>10}",
        "alg",
        "base64 ns",
        "jsonwebtoken",
        "first use",
        "same token",
        "verify().await",
        "first÷jwt",
        "same÷jwt"
    );
    for (name, token, verifier, key, alg) in cases {
        // Distinct tokens (a `jti` each), more than the cache holds.
        let distinct: Vec<String> = (0..2_048)
            .map(|i| {
                let body = with(claims.clone(), "jti", serde_json::json!(format!("t{i}")));
                match name {
                    "HS256" => sign_hs(&body, SECRET.as_bytes()),
                    "RS256" => sign(rsa_a(), None, &body),
                    _ => sign(ec_p256(), None, &body),
                }
            })
            .collect();
        assert!(verifier.verify_cached(&token).is_ok());
        let mut validation = Validation::new(alg);
        validation.set_issuer(&["https://idp.test"]);
        validation.set_audience(&["orders-api"]);
        validation.leeway = 30;
        assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).is_ok());

        let base = measure(|| {
            black_box(b64_segments(black_box(&token)));
        });
        let lib = measure(|| {
            black_box(
                jsonwebtoken::decode::<serde_json::Value>(black_box(&token), &key, &validation)
                    .is_ok(),
            );
        });
        let mut next = 0usize;
        let first = measure(|| {
            next = (next + 1) % distinct.len();
            black_box(verifier.verify_cached(black_box(&distinct[next])).is_ok());
        });
        let cached = measure(|| {
            black_box(verifier.verify_cached(black_box(&token)).is_ok());
        });
        let asynced = rt.block_on(async {
            let mut total = 0.0;
            // measure() is sync; time a batch of awaited calls instead.
            let n = 2_000u32;
            for _ in 0..3 {
                let t = Instant::now();
                for _ in 0..n {
                    black_box(verifier.verify(black_box(&token)).await.is_ok());
                }
                total += t.elapsed().as_nanos() as f64 / f64::from(n);
            }
            total / 3.0
        });
        println!(
            "{name:<6} {base:>12.0} {lib:>14.0} {first:>12.0} {cached:>12.0} {asynced:>14.0} {:>9.2}x {:>9.2}x",
            first / lib,
            cached / lib
        );
    }
}
