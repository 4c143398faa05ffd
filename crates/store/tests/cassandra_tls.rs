//! TLS to a real Cassandra node: `cassandra://…?tls=true&tls_ca=…` against the node of
//! `scripts/services up cassandra`, which serves TLS and plain CQL on the same port with a
//! certificate signed by its own test CA.
//!
//! The node: `TRELLIS_CASSANDRA_URL` (default
//! `cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test`, plain). Its CA:
//! `TRELLIS_CASSANDRA_TLS_CA`, default `$TRELLIS_SERVICES_HOME/cassandra/tls/ca.pem`
//! (`TRELLIS_SERVICES_HOME` defaults to the repository's `.services`). Without a node, or
//! without its CA file, the tests print a notice and pass, unless `TRELLIS_REQUIRE_ENGINES=1`
//! (the project's test command), where they fail.

#![cfg(feature = "cassandra")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use trellis_store::{CassandraStore, Store, StoreError};

const DEFAULT_URL: &str = "cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test";

fn required() -> bool {
    std::env::var("TRELLIS_REQUIRE_ENGINES").as_deref() == Ok("1")
}

fn skip(why: &str) {
    assert!(
        !required(),
        "Cassandra with TLS is required (TRELLIS_REQUIRE_ENGINES=1): {why}; \
         start it with scripts/services up cassandra"
    );
    eprintln!("SKIPPED: {why}; start it with scripts/services up cassandra");
}

/// The plain URL without its query.
fn base_url() -> String {
    let url = std::env::var("TRELLIS_CASSANDRA_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    url.split('?').next().unwrap().to_owned()
}

/// The URL with TLS options (percent-escaping the spaces a path may hold).
fn tls_url(query: &str) -> String {
    format!("{}?{}", base_url(), query.replace(' ', "%20"))
}

/// The host part of the URL, as the store names it in messages (`127.0.0.1:9042`).
fn host() -> String {
    let url = base_url();
    let rest = url.strip_prefix("cassandra://").unwrap();
    let authority = rest.split('/').next().unwrap();
    authority.rsplit('@').next().unwrap().to_owned()
}

/// The CA of the node, or `None` (after a notice) when there is no node to test against.
async fn node_ca() -> Option<PathBuf> {
    match CassandraStore::open(&base_url()).await {
        Ok(_) => {}
        Err(e) if e.is_unavailable() => {
            skip(&format!("no Cassandra node ({e})"));
            return None;
        }
        Err(e) => panic!("cannot open {}: {e}", base_url()),
    }
    let ca = match std::env::var_os("TRELLIS_CASSANDRA_TLS_CA") {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("TRELLIS_SERVICES_HOME").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.services"),
                PathBuf::from,
            );
            home.join("cassandra/tls/ca.pem")
        }
    };
    if ca.is_file() {
        Some(ca)
    } else {
        skip(&format!(
            "the node runs but its CA {} is missing (TLS not set up by scripts/services)",
            ca.display()
        ));
        None
    }
}

fn fixture(name: &str) -> String {
    format!("{}/tests/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}")
}

/// Ping and a put/get round trip over the connection.
async fn round_trip(store: &Store) {
    store.ping().await.unwrap();
    let table = store.table("tls_round_trip").unwrap();
    let partition = nonce();
    let version = table
        .put(&partition, "c", b"over tls".to_vec(), None)
        .await
        .unwrap();
    let row = table.get(&partition, "c").await.unwrap().unwrap();
    assert_eq!(row.value, b"over tls");
    assert_eq!(row.version, version);
    assert!(table.delete(&partition, "c").await.unwrap());
    assert_eq!(table.get(&partition, "c").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_node_ca_serves_the_store() {
    let Some(ca) = node_ca().await else { return };
    let url = tls_url(&format!("tls=true&tls_ca={}", ca.display()));
    let store = Store::open(&url).await.unwrap();
    round_trip(&store).await;
    // The driver's own connection really is encrypted: the node lists it in
    // system_views.clients with ssl_enabled = true.
    let cassandra = CassandraStore::open(&url).await.unwrap();
    let rows = cassandra
        .execute(
            "SELECT ssl_enabled, ssl_protocol FROM system_views.clients",
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let clients: Vec<(Option<bool>, Option<String>)> = rows
        .rows::<(Option<bool>, Option<String>)>()
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        clients.iter().any(|(ssl, protocol)| *ssl == Some(true)
            && protocol.as_deref().is_some_and(|p| p.starts_with("TLS"))),
        "no TLS client among {clients:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_hostname_verification_still_works_with_the_right_ca() {
    let Some(ca) = node_ca().await else { return };
    let url = tls_url(&format!(
        "tls_ca={}&tls_verify_hostname=false",
        ca.display()
    ));
    let store = Store::open(&url).await.unwrap();
    round_trip(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_connections_still_work_beside_tls() {
    let Some(_) = node_ca().await else { return };
    let store = Store::open(&base_url()).await.unwrap();
    round_trip(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_clear_verification_error_naming_the_host() {
    let Some(_) = node_ca().await else { return };
    for query in [
        format!("tls=true&tls_ca={}", fixture("ca.pem")),
        format!(
            "tls_ca={}&tls_verify_hostname=false",
            fixture("other-ca.pem")
        ),
    ] {
        let url = tls_url(&format!("{query}&connect_timeout=2s"));
        let err = Store::open(&url).await.unwrap_err();
        let text = err.to_string();
        eprintln!("{text}");
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{text}");
        assert!(!err.is_retryable(), "{text}");
        assert!(
            text.contains(&host())
                && text.contains("TLS")
                && text.contains("certificate")
                && text.contains("not signed by a CA in tls_ca"),
            "{text}"
        );
        assert!(!text.contains(":cassandra@"), "password leaked: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_ca_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no such ca.pem");
    let url = tls_url(&format!("tls_ca={}", missing.display()));
    let err = Store::open(&url).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{text}");
    assert!(
        text.contains("cannot read the CA file")
            && text.contains(&format!("{:?}", missing.display().to_string())),
        "{text}"
    );

    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let url = tls_url(&format!("tls=true&tls_ca={}", bad.display()));
    let text = Store::open(&url).await.unwrap_err().to_string();
    assert!(
        text.contains("is not valid PEM") && text.contains("bad.pem"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_server_that_does_not_speak_it_says_so() {
    // No node needed: a listener that answers every connection with plain bytes, as a CQL
    // port without TLS would answer a ClientHello with a protocol error.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        // Bounded: the driver makes a handful of attempts within the connect timeout.
        for _ in 0..64 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let _ = socket.write_all(b"this is not TLS\r\n\r\n").await;
        }
    });
    let url = format!(
        "cassandra://127.0.0.1:{port}/ks?tls_ca={}&connect_timeout=2s",
        fixture("ca.pem")
    );
    let err = Store::open(&url).await.unwrap_err();
    server.abort();
    let text = err.to_string();
    eprintln!("{text}");
    assert!(err.is_unavailable(), "{text}");
    assert!(
        text.contains(&format!(
            "TLS handshake with cassandra at 127.0.0.1:{port} failed"
        )) && text.contains("does the node accept TLS"),
        "{text}"
    );
}
