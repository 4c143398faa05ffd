//! # trellis-cassandra-tests
//!
//! Integration tests only: the registry, the configuration manager and typed models of
//! Trellis running unchanged on a real Cassandra node through the store's `cassandra://`
//! backend — only the store URL differs from their SQLite tests. It lives apart from
//! `trellis-store` because the registry and the configuration manager depend on the store
//! (a dev-dependency back would be a cycle). It is not a library: this crate exports nothing.
//!
//! The node: `scripts/services up cassandra`; the URL: `TRELLIS_CASSANDRA_URL` (default
//! `cassandra://cassandra:cassandra@127.0.0.1:9042/trellis_test`). Without a node the tests
//! print a notice and pass, unless `TRELLIS_REQUIRE_ENGINES=1`, where they fail.
//!
//! ```
//! // Nothing to call: run `cargo test -p trellis-cassandra-tests`.
//! ```
