//! # trellis-store
//!
//! The store every other Trellis component keeps its state in (the seed's `client`):
//! tables of rows addressed by a **partition key** and a **clustering key**, holding bytes,
//! with an optional **TTL**, a per-row **version** for compare-and-set, and **atomic batches**.
//!
//! - Backends are chosen by URL: `sqlite://PATH` is the embedded default, shared safely by
//!   every process on one machine; `cassandra://host1,host2/keyspace` (feature `cassandra`)
//!   runs the same contract on Apache Cassandra or ScyllaDB.
//! - Every operation is a [`StoreRequest`] sent through a tower [`Service`](tower::Service);
//!   [`Store::layer`] wraps it in middleware (tracing, metrics) — one middleware model for
//!   all of Trellis.
//! - [`Models`] gives typed access for `T: Serialize + DeserializeOwned`.
//! - [`conformance`] is the contract as a test suite, which every backend passes.
//!
//! It is not a query engine: no secondary indexes, no joins, no cross-partition scans.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), trellis_store::StoreError> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let url = format!("sqlite://{}/doc.db", dir.path().display());
//! use trellis_store::{CasOutcome, Store};
//!
//! let store = Store::open(&url).await?;
//! let users = store.table("users")?;
//! users.put("u1", "", br#"{"email":"a@example.com"}"#.to_vec(), None).await?;
//! let row = users.get("u1", "").await?.expect("just written");
//! assert_eq!(row.version, 1);
//! // Compare-and-set: only one of two writers that read version 1 wins.
//! let won = users.update_if_version("u1", "", 1, b"{}".to_vec(), None).await?;
//! let lost = users.update_if_version("u1", "", 1, b"{}".to_vec(), None).await?;
//! assert!(won.applied() && !lost.applied());
//! # Ok(()) }
//! ```

#[cfg(feature = "cassandra")]
mod cassandra;
pub mod conformance;
mod error;
pub mod json;
mod model;
mod request;
mod sqlite;
mod store;

#[cfg(feature = "cassandra")]
pub use cassandra::CassandraStore;
pub use error::{BoxError, Result, StoreError};
pub use model::{Key, Model, Models, Versioned};
pub use request::{
    BatchOutcome, CasOutcome, Mutation, Page, Row, ScanQuery, StoreRequest, StoreResponse,
};
/// The `scylla` driver the Cassandra backend is built on, re-exported so that users of
/// [`CassandraStore::execute`] and [`CassandraStore::session`] name the same version.
#[cfg(feature = "cassandra")]
pub use scylla;
pub use store::{
    Batch, MAX_KEY_BYTES, MAX_TABLE_NAME, MAX_VALUE_BYTES, Store, StoreService, Table,
    validate_table_name,
};
