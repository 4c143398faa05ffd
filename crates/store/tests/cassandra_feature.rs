//! Without the `cassandra` feature, a `cassandra://` URL is refused with a reason that says
//! so (and never echoes the credentials).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[cfg(not(feature = "cassandra"))]
#[tokio::test(flavor = "current_thread")]
async fn cassandra_urls_need_the_feature() {
    let err = trellis_store::Store::open("cassandra://app:secret@127.0.0.1:9042/trellis")
        .await
        .unwrap_err();
    assert!(
        matches!(err, trellis_store::StoreError::InvalidUrl { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("built without the cassandra feature"),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
}

#[cfg(feature = "cassandra")]
#[tokio::test(flavor = "current_thread")]
async fn cassandra_urls_are_understood() {
    let err = trellis_store::Store::open("cassandra://127.0.0.1:9042/Not-A-Keyspace")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("keyspace"), "{err}");
}
