//! The distributed backend: Apache Cassandra or ScyllaDB through the `scylla` driver
//! (feature `cassandra`), at `cassandra://[USER:PASSWORD@]HOST[:PORT][,HOST…]/KEYSPACE`.
//!
//! It keeps exactly the contract of the SQLite backend (the [`conformance`](crate::conformance)
//! suite passes on both); how each part of it maps onto CQL:
//!
//! - **Tables.** Logical table `name` is `KEYSPACE.t_name (pk text, ck text, value blob,
//!   version bigint, PRIMARY KEY ((pk), ck))`, created on the first write (`CREATE TABLE IF
//!   NOT EXISTS`, then the driver waits for schema agreement). Rows of a partition are ordered
//!   by `ck` in UTF-8 byte order, as on SQLite. Reads of a table that does not exist yet
//!   return nothing. Prepared statements are cached per table.
//! - **Every write is a lightweight transaction** (Paxos), because the row's `version` must
//!   count writes exactly: `UPDATE … SET value = ?, version = ? … IF version = ?` where the
//!   expected version is the one last seen (`null` for an absent row). A plain `put` reads the
//!   row, then loops: a rejected LWT returns the current version, so a contended put costs one
//!   more LWT per concurrent writer that got in first. Uncontended, a put costs one read and one
//!   LWT (four round trips between replicas); this is the price of versions that never repeat.
//!   Writing only through `UPDATE` (never `INSERT`) means rows have no row marker, so a row
//!   written with a TTL disappears completely when its cells expire.
//! - **TTL** is native (`USING TTL`). Cassandra counts whole seconds and expires a row at a
//!   second boundary, so the TTL sent is the requested one rounded up, plus one second: a row
//!   lives at least as long as asked and at most about a second longer. `expires_at` is
//!   computed from `TTL(value)` (whole seconds).
//! - **Compare-and-set** is `IF version = ?` / `IF version = null`; a rejected write is
//!   answered with the current row, read at SERIAL consistency. When the outcome of an LWT
//!   is unknown (a write timeout), the row is read at SERIAL consistency — which finishes any
//!   Paxos round in flight — to tell applied from not applied.
//! - **Batches** within one partition of one table are applied as one conditional (LWT)
//!   batch: the rows are read at SERIAL consistency, the mutations are played in order on
//!   that snapshot (which decides a rejection exactly as SQLite would), and the final state of
//!   each row is written with `IF version = <read version>` on every row — if anything
//!   changed meanwhile, the whole thing is read and tried again. Batches that span partitions
//!   or tables are applied as a LOGGED batch (atomic, eventually), which Cassandra cannot
//!   make conditional: they may not hold conditions ([`StoreError::InvalidInput`]), and the
//!   versions they write are computed from a read just before, so a concurrent writer of the
//!   same row can make a version repeat. Keep compare-and-set work within one partition.
//! - **Change markers** ([`StoreRequest::TableVersion`]) are not available: the answer is
//!   `None`, and callers (registry, config watch) re-read on their timer.
//! - **Ping** runs `SELECT now() FROM system.local`.
//!
//! Consistency is set per class of operation: reads, writes (and the commit of LWTs), and the
//! serial consistency of LWTs; see [`CassandraStore::open`] for every URL option, TLS
//! (`tls=true`, `tls_ca=/path/ca.pem`, `tls_verify_hostname=false`) included.
//!
//! Users who need CQL beyond the store contract use [`CassandraStore::execute`] (prepared and
//! cached) or the driver's [`Session`] itself ([`CassandraStore::session`]); both bypass the
//! store's middleware chain, which sees [`StoreRequest`]s only.

mod tls;
mod url;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use scylla::client::execution_profile::{ExecutionProfile, ExecutionProfileHandle};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    ConnectionError, ConnectionPoolError, DbError, ExecutionError, MetadataError, NewSessionError,
    PagerExecutionError, PrepareError, RequestAttemptError, WriteType,
};
use scylla::policies::load_balancing::{DefaultPolicy, LoadBalancingPolicy};
use scylla::policies::retry::{
    DefaultRetryPolicy, DowngradingConsistencyRetryPolicy, FallthroughRetryPolicy, RetryPolicy,
};
use scylla::policies::speculative_execution::SimpleSpeculativeExecutionPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch as CqlBatch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::CqlValue;

use crate::error::{BoxError, Result, StoreError};
use crate::request::{
    BatchOutcome, CasOutcome, Mutation, Page, Row, ScanQuery, StoreRequest, StoreResponse,
};
use crate::store::Store;
use url::{CassandraUrl, RetryChoice};

const BACKEND: &str = "cassandra";
/// Cassandra's largest TTL: 20 years.
const MAX_TTL_SECONDS: u64 = 630_720_000;
/// Attempts of a put (or a single-partition batch) that keeps losing to concurrent writers.
const CONTENDED_ATTEMPTS: usize = 100;
/// Attempts to settle a lightweight transaction whose outcome a timeout left unknown.
const UNKNOWN_OUTCOME_ATTEMPTS: usize = 4;
/// Raw CQL statements kept prepared by [`CassandraStore::execute`].
const RAW_CACHE_CAPACITY: usize = 256;
/// Rows per page fetched by scans.
const SCAN_PAGE_SIZE: i32 = 1_000;

/// Rows as read back: `(value, version, TTL(value))`.
type ValueColumns = (Option<Vec<u8>>, Option<i64>, Option<i32>);
/// Rows of a scan: `(ck, value, version, TTL(value))`.
type ScanColumns = (String, Option<Vec<u8>>, Option<i64>, Option<i32>);
/// Bound values of one statement in a batch of mixed statements.
type BatchRow = Vec<Option<CqlValue>>;

/// A connection to a Cassandra or ScyllaDB cluster serving the store contract.
///
/// Cheap to clone. [`CassandraStore::store`] gives the [`Store`] handle every Trellis
/// component takes ([`Store::open`] with a `cassandra://` URL does the same in one step);
/// [`CassandraStore::execute`] runs raw CQL on the same connections.
#[derive(Clone)]
pub struct CassandraStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraStore")
            .field("hosts", &self.inner.hosts)
            .field("keyspace", &self.inner.keyspace)
            .finish_non_exhaustive()
    }
}

struct Inner {
    session: Session,
    hosts: String,
    keyspace: String,
    read: ExecutionProfileHandle,
    write: ExecutionProfileHandle,
    serial_read: ExecutionProfileHandle,
    ping: PreparedStatement,
    tables: Mutex<HashMap<String, Arc<Statements>>>,
    creating: tokio::sync::Mutex<()>,
    raw: Mutex<HashMap<String, PreparedStatement>>,
}

/// The prepared statements of one table.
struct Statements {
    get: PreparedStatement,
    get_serial: PreparedStatement,
    get_many_serial: PreparedStatement,
    scan: PreparedStatement,
    scan_after: PreparedStatement,
    scan_from: PreparedStatement,
    update_if: PreparedStatement,
    delete_if_exists: PreparedStatement,
    delete_if: PreparedStatement,
    upsert: PreparedStatement,
    delete: PreparedStatement,
}

impl CassandraStore {
    /// Connects to the cluster named by `url`, creating the keyspace if allowed.
    ///
    /// `cassandra://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/KEYSPACE[?OPTIONS]`; ports
    /// default to 9042; `%XX` escapes are decoded in the user name and password. Options:
    ///
    /// | option | meaning | default |
    /// |---|---|---|
    /// | `replication` | for a created keyspace: `N` = SimpleStrategy with factor N; `dc1:3,dc2:2` = NetworkTopologyStrategy with a factor per datacenter | `1` |
    /// | `create_keyspace` | create the keyspace when missing (`true`/`false`) | `true` |
    /// | `consistency` | consistency of reads and writes (`one`, `quorum`, `local_quorum`, `all`, …) | `quorum` |
    /// | `read_consistency`, `write_consistency` | the same, for one class only | `quorum` |
    /// | `serial_consistency` | of lightweight transactions: `serial` or `local_serial` | `serial` |
    /// | `local_dc` | datacenter preferred by the token-aware load balancer | none |
    /// | `request_timeout` | client-side timeout of one request (`500ms`, `10s`, `1m`) | `10s` |
    /// | `connect_timeout` | timeout of opening one connection | `5s` |
    /// | `retry` | the driver's retry policy: `default`, `never` (fallthrough) or `downgrading` (downgrading consistency) | `default` |
    /// | `speculative` | speculative execution of reads: `COUNT:DELAY` (e.g. `2:50ms`) or `none` | `none` |
    /// | `tls` | connect with TLS (`true`/`false`) | `false` |
    /// | `tls_ca` | PEM file of the certificate authorities that sign the nodes' certificates; implies `tls=true` | the system's CAs |
    /// | `tls_verify_hostname` | check that a node's certificate names the address connected to; implies `tls=true` | `true` |
    ///
    /// **TLS** runs on rustls with the aws-lc-rs crypto provider (set on this connection, not
    /// taken from the process default). The driver connects to the addresses the cluster
    /// reports for its nodes and checks each certificate against the node's **IP address**, so
    /// node certificates need an IP subject alternative name (`IP:10.0.0.1`); when they only
    /// carry host names, `tls_verify_hostname=false` still requires the certificate to chain to
    /// a trusted CA, to be valid now and to be held by the node (the handshake is signed with
    /// its key), and accepts any name in it. Client certificates (mutual TLS) are not
    /// supported. A node with `client_encryption_options: {enabled: true, optional: true}`
    /// serves TLS and plain connections on the same port.
    ///
    /// Errors name the hosts and what failed: [`StoreError::InvalidUrl`] for a malformed URL,
    /// wrong credentials, a missing keyspace that may not be created, a CA file that cannot be
    /// read or holds no valid PEM certificate (naming the file), or a node certificate that
    /// fails verification (naming the host and the reason: unknown issuer, wrong name,
    /// expired); [`StoreError::Unavailable`] when no host answers or a TLS handshake breaks off
    /// (a node that does not speak TLS, for example).
    pub async fn open(url: &str) -> Result<CassandraStore> {
        let parsed = url::parse(url)?;
        let redacted = url::redact(url);
        let tls = if parsed.tls {
            Some(tls::client_config(&parsed, &redacted)?)
        } else {
            None
        };
        let hosts = parsed.hosts_label();
        let profiles = Profiles::new(&parsed);
        let mut builder = SessionBuilder::new()
            .known_nodes(&parsed.hosts)
            .connection_timeout(parsed.connect_timeout)
            .default_execution_profile_handle(profiles.write.clone())
            .tls_context(tls);
        if let Some((user, password)) = &parsed.credentials {
            builder = builder.user(user, password);
        }
        if let Some(dc) = &parsed.local_dc {
            builder = builder.prefer_datacenter(dc.clone());
        }
        // The driver bounds each connection attempt; this bounds the whole start-up.
        let limit = parsed.connect_timeout * 3 + parsed.request_timeout;
        let session = match tokio::time::timeout(limit, builder.build()).await {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => return Err(session_error(&redacted, &parsed, e)),
            Err(_) => {
                return Err(StoreError::Unavailable {
                    backend: BACKEND,
                    reason: format!("no answer from cassandra at {hosts} within {limit:?}"),
                    source: None,
                });
            }
        };
        prepare_keyspace(&session, &parsed, &redacted).await?;
        // A keyspace another client is creating at this very moment may not be usable yet
        // (the CREATE ... IF NOT EXISTS here returned before that schema change settled):
        // wait for schema agreement and retry for a short, bounded while.
        let mut attempts = 0;
        let used = loop {
            attempts += 1;
            match session.use_keyspace(&parsed.keyspace, false).await {
                Err(e) if attempts < 20 && e.to_string().contains("does not exist") => {
                    let _ = session.await_schema_agreement().await;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => break other,
            }
        };
        used.map_err(|e| StoreError::Unavailable {
            backend: BACKEND,
            reason: format!(
                "cassandra at {hosts}: cannot use keyspace {}: {e}",
                parsed.keyspace
            ),
            source: Some(Box::new(e)),
        })?;
        let mut ping = session
            .prepare("SELECT now() FROM system.local")
            .await
            .map_err(|e| prepare_error(&hosts, "ping", e))?;
        ping.set_execution_profile_handle(Some(profiles.read.clone()));
        ping.set_is_idempotent(true);
        Ok(CassandraStore {
            inner: Arc::new(Inner {
                session,
                hosts,
                keyspace: parsed.keyspace,
                read: profiles.read,
                write: profiles.write,
                serial_read: profiles.serial_read,
                ping,
                tables: Mutex::new(HashMap::new()),
                creating: tokio::sync::Mutex::new(()),
                raw: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The [`Store`] handle over this connection: every operation goes through the store's
    /// middleware chain down to this backend.
    pub fn store(&self) -> Store {
        Store::from_service(
            BACKEND,
            format!("{}/{}", self.inner.hosts, self.inner.keyspace),
            self.clone(),
        )
    }

    /// The keyspace holding the tables.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    /// The contact points, `host:port` joined by commas.
    pub fn hosts(&self) -> &str {
        &self.inner.hosts
    }

    /// The driver session, for anything the store contract does not cover. Its default
    /// execution profile uses the write consistency and serial consistency of the URL.
    pub fn session(&self) -> &Session {
        &self.inner.session
    }

    /// Runs one CQL statement with bound values, for users who need raw CQL.
    ///
    /// The statement is prepared once and cached (up to 256 statements), runs in the URL's
    /// keyspace with its write consistency and serial consistency, and is not retried on
    /// timeouts (it may not be idempotent). The answer is the driver's [`QueryResult`]: use
    /// [`QueryResult::into_rows_result`] for `SELECT`s. Raw CQL does not pass through the
    /// store's middleware chain.
    ///
    /// ```no_run
    /// # async fn demo(cassandra: trellis_store::CassandraStore) -> trellis_store::Result<()> {
    /// let result = cassandra
    ///     .execute("SELECT ck, version FROM t_users WHERE pk = ?", ("u1",))
    ///     .await?;
    /// let rows = result.into_rows_result().expect("a SELECT returns rows");
    /// for row in rows.rows::<(String, i64)>().expect("column types") {
    ///     let (clustering, version) = row.expect("a row");
    ///     println!("{clustering}: {version}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn execute(&self, cql: &str, values: impl SerializeRow) -> Result<QueryResult> {
        let inner = &self.inner;
        let cached = lock(&inner.raw).get(cql).cloned();
        let prepared = match cached {
            Some(prepared) => prepared,
            None => {
                let prepared = inner
                    .session
                    .prepare(cql)
                    .await
                    .map_err(|e| inner.prepare_failed("raw CQL", e))?;
                let mut cache = lock(&inner.raw);
                if cache.len() >= RAW_CACHE_CAPACITY {
                    cache.clear();
                }
                cache.insert(cql.to_owned(), prepared.clone());
                prepared
            }
        };
        inner
            .session
            .execute_unpaged(&prepared, values)
            .await
            .map_err(|e| inner.failed("raw CQL", None, e))
    }
}

impl tower::Service<StoreRequest> for CassandraStore {
    type Response = StoreResponse;
    type Error = StoreError;
    type Future = Pin<Box<dyn Future<Output = Result<StoreResponse>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.handle(request).await })
    }
}

/// The three execution profiles: reads, writes, SERIAL reads.
struct Profiles {
    read: ExecutionProfileHandle,
    write: ExecutionProfileHandle,
    serial_read: ExecutionProfileHandle,
}

impl Profiles {
    fn new(url: &CassandraUrl) -> Self {
        let mut balancing = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &url.local_dc {
            balancing = balancing.prefer_datacenter(dc.clone());
        }
        let balancing: Arc<dyn LoadBalancingPolicy> = balancing.build();
        let retry: Arc<dyn RetryPolicy> = match url.retry {
            RetryChoice::Default => Arc::new(DefaultRetryPolicy::new()),
            RetryChoice::Never => Arc::new(FallthroughRetryPolicy::new()),
            RetryChoice::Downgrading => Arc::new(DowngradingConsistencyRetryPolicy::new()),
        };
        let base = || {
            ExecutionProfile::builder()
                .request_timeout(Some(url.request_timeout))
                .serial_consistency(Some(url.serial_consistency))
                .load_balancing_policy(balancing.clone())
                .retry_policy(retry.clone())
        };
        // Speculative execution applies to statements marked idempotent: reads only.
        let speculative = url.speculative.map(|(count, delay)| {
            Arc::new(SimpleSpeculativeExecutionPolicy {
                max_retry_count: count,
                retry_interval: delay,
            }) as _
        });
        let serial = match url.serial_consistency {
            SerialConsistency::Serial => Consistency::Serial,
            SerialConsistency::LocalSerial => Consistency::LocalSerial,
        };
        Profiles {
            read: base()
                .consistency(url.read_consistency)
                .speculative_execution_policy(speculative)
                .build()
                .into_handle(),
            write: base()
                .consistency(url.write_consistency)
                .build()
                .into_handle(),
            serial_read: base().consistency(serial).build().into_handle(),
        }
    }
}

/// Checks that the keyspace exists, creating it when allowed.
async fn prepare_keyspace(session: &Session, url: &CassandraUrl, redacted: &str) -> Result<()> {
    let hosts = url.hosts_label();
    let user = url
        .credentials
        .as_ref()
        .map_or_else(|| "(anonymous)".to_owned(), |(user, _)| format!("{user:?}"));
    let found = session
        .query_unpaged(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (url.keyspace.as_str(),),
        )
        .await
        .map_err(|e| startup_failure(&hosts, "reading the schema", e))?
        .into_rows_result()
        .map(|rows| rows.rows_num() > 0)
        .unwrap_or(false);
    if found {
        return Ok(());
    }
    if !url.create_keyspace {
        return Err(StoreError::InvalidUrl {
            url: redacted.to_owned(),
            reason: format!(
                "keyspace {:?} does not exist on cassandra at {hosts} and create_keyspace=false",
                url.keyspace
            ),
        });
    }
    let cql = format!(
        "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}",
        url.keyspace,
        url.replication.to_cql()
    );
    match session.query_unpaged(cql, ()).await {
        Ok(_) => {
            tracing::info!(keyspace = %url.keyspace, %hosts, "created cassandra keyspace");
            Ok(())
        }
        Err(e) if db_error(&e).is_some_and(|db| matches!(db, DbError::Unauthorized)) => {
            Err(StoreError::InvalidUrl {
                url: redacted.to_owned(),
                reason: format!(
                    "keyspace {:?} does not exist on cassandra at {hosts} and user {user} has no \
                     permission to create it ({}); create it, or grant CREATE on ALL KEYSPACES",
                    url.keyspace,
                    server_message(&e)
                ),
            })
        }
        Err(e) if db_error(&e).is_some() => Err(StoreError::InvalidUrl {
            url: redacted.to_owned(),
            reason: format!(
                "cassandra at {hosts} refused to create keyspace {:?}: {}",
                url.keyspace,
                server_message(&e)
            ),
        }),
        Err(e) => Err(startup_failure(&hosts, "creating the keyspace", e)),
    }
}

fn startup_failure(hosts: &str, doing: &str, e: ExecutionError) -> StoreError {
    StoreError::Unavailable {
        backend: BACKEND,
        reason: format!("cassandra at {hosts}: {doing} failed: {e}"),
        source: Some(Box::new(e)),
    }
}

fn session_error(redacted: &str, url: &CassandraUrl, e: NewSessionError) -> StoreError {
    let hosts = url.hosts_label();
    if let Some(tls) = tls_failure(&e) {
        return tls_error(redacted, url, tls, &e);
    }
    let text = e.to_string();
    if text.contains("AuthenticationError")
        || text.contains("bad credentials")
        || text.contains("Authentication failed")
        || text.contains("Provided username")
    {
        let user = url.credentials.as_ref().map_or_else(
            || "no credentials".to_owned(),
            |(u, _)| format!("user {u:?}"),
        );
        return StoreError::InvalidUrl {
            url: redacted.to_owned(),
            reason: format!("cassandra at {hosts} rejected the login ({user}): {text}"),
        };
    }
    if text.contains("Authentication is required") || text.contains("requires authentication") {
        return StoreError::InvalidUrl {
            url: redacted.to_owned(),
            reason: format!(
                "cassandra at {hosts} requires a login: put USER:PASSWORD@ before the host ({text})"
            ),
        };
    }
    StoreError::Unavailable {
        backend: BACKEND,
        reason: format!("cannot connect to cassandra at {hosts}: {text}"),
        source: Some(Box::new(e)),
    }
}

/// The rustls error that broke the connections, when a TLS handshake is why no host answered.
fn tls_failure(e: &NewSessionError) -> Option<&rustls::Error> {
    let NewSessionError::MetadataError(MetadataError::ConnectionPoolError(
        ConnectionPoolError::Broken {
            last_connection_error: ConnectionError::IoError(io),
            ..
        },
    )) = e
    else {
        return None;
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A failed TLS handshake: a certificate the client refuses is a configuration error (not
/// retryable), anything else (a node that does not speak TLS, an alert) may pass.
fn tls_error(
    redacted: &str,
    url: &CassandraUrl,
    tls: &rustls::Error,
    e: &NewSessionError,
) -> StoreError {
    use rustls::CertificateError as Cert;
    let hosts = url.hosts_label();
    let trusted = url.tls_ca.as_ref().map_or_else(
        || "the system's CA certificates (no tls_ca given)".to_owned(),
        |path| format!("tls_ca ({path:?})"),
    );
    let rustls::Error::InvalidCertificate(cert) = tls else {
        return StoreError::Unavailable {
            backend: BACKEND,
            reason: format!(
                "TLS handshake with cassandra at {hosts} failed: {tls} (does the node accept \
                 TLS on this port? client_encryption_options must be enabled)"
            ),
            source: Some(Box::new(e.clone())),
        };
    };
    let why = match cert {
        Cert::UnknownIssuer | Cert::BadSignature => {
            format!("is not signed by a CA in {trusted}")
        }
        Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
            "does not name the address connected to (the driver checks the node's IP address); \
             give the node a certificate with an IP subject alternative name, or set \
             tls_verify_hostname=false"
                .to_owned()
        }
        Cert::Expired
        | Cert::ExpiredContext { .. }
        | Cert::NotValidYet
        | Cert::NotValidYetContext { .. } => "is expired or not yet valid".to_owned(),
        _ => "was refused".to_owned(),
    };
    StoreError::InvalidUrl {
        url: redacted.to_owned(),
        reason: format!(
            "TLS handshake with cassandra at {hosts} failed: the node's certificate {why} \
             ({tls})"
        ),
    }
}

fn prepare_error(hosts: &str, what: &str, e: PrepareError) -> StoreError {
    StoreError::Unavailable {
        backend: BACKEND,
        reason: format!("cassandra at {hosts}: preparing {what} failed: {e}"),
        source: Some(Box::new(e)),
    }
}

/// The server's error, if the request reached one.
fn db_error(e: &ExecutionError) -> Option<&DbError> {
    match e {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => Some(db),
        ExecutionError::PrepareError(PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(db, _),
        }) => Some(db),
        _ => None,
    }
}

fn server_message(e: &ExecutionError) -> String {
    match e {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(_, message)) => {
            message.clone()
        }
        other => other.to_string(),
    }
}

/// Whether a failed write may nevertheless have been applied.
fn outcome_unknown(e: &ExecutionError) -> bool {
    matches!(e, ExecutionError::RequestTimeout(_))
        || matches!(
            db_error(e),
            Some(DbError::WriteTimeout {
                write_type: WriteType::Cas | WriteType::Simple | WriteType::Batch,
                ..
            })
        )
}

fn is_missing_table(message: &str) -> bool {
    message.contains("does not exist") || message.contains("unconfigured table")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// TTL sent to Cassandra: rounded up to whole seconds, plus one (see the module docs); 0
/// means none.
fn ttl_seconds(ttl: Option<Duration>) -> i32 {
    match ttl {
        None => 0,
        Some(ttl) => {
            let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0) + 1;
            // Bounded by MAX_TTL_SECONDS, well inside i32.
            i32::try_from(secs.min(MAX_TTL_SECONDS)).unwrap_or(i32::MAX)
        }
    }
}

/// `expires_at` from the remaining seconds Cassandra reports.
fn expires_at(remaining: Option<i32>) -> Option<SystemTime> {
    remaining.map(|secs| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        UNIX_EPOCH + Duration::from_secs(now + u64::try_from(secs.max(0)).unwrap_or(0))
    })
}

fn make_row(partition: &str, clustering: String, columns: ValueColumns) -> Option<Row> {
    let (value, version, ttl) = columns;
    Some(Row {
        partition: partition.to_owned(),
        clustering,
        value: value?,
        version: u64::try_from(version?).ok()?,
        expires_at: expires_at(ttl),
    })
}

fn version_cql(version: Option<u64>) -> Option<i64> {
    version.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// What a lightweight transaction answered: applied, or the current version (if any).
enum Lwt {
    Applied,
    Rejected(Option<u64>),
}

/// The state of one row while a batch is played on a snapshot.
#[derive(Clone)]
struct Cell {
    value: Vec<u8>,
    version: u64,
    ttl: Option<Duration>,
    expires_at: Option<SystemTime>,
}

impl Inner {
    async fn handle(&self, request: StoreRequest) -> Result<StoreResponse> {
        match request {
            StoreRequest::Get {
                table,
                partition,
                clustering,
            } => Ok(StoreResponse::Row(
                self.get(&table, &partition, &clustering, false).await?,
            )),
            StoreRequest::Scan {
                table,
                partition,
                query,
            } => Ok(StoreResponse::Page(
                self.scan(&table, &partition, &query).await?,
            )),
            StoreRequest::TableVersion { .. } => Ok(StoreResponse::TableVersion(None)),
            StoreRequest::Ping => {
                self.session
                    .execute_unpaged(&self.ping, ())
                    .await
                    .map_err(|e| self.failed("ping", None, e))?;
                Ok(StoreResponse::Pong)
            }
            StoreRequest::Write(mutation) => self.write(mutation).await,
            StoreRequest::Batch(mutations) => {
                Ok(StoreResponse::Batch(self.batch(&mutations).await?))
            }
            // `StoreRequest` is non-exhaustive: a request this backend does not know yet.
            #[allow(unreachable_patterns)]
            other => Err(StoreError::Backend {
                backend: BACKEND,
                message: format!("unsupported request {:?}", other.operation()),
                source: None,
            }),
        }
    }

    /// Maps a driver error, naming the hosts, the operation and the table.
    fn failed(&self, operation: &str, table: Option<&str>, e: ExecutionError) -> StoreError {
        let target = match table {
            Some(table) => format!("{operation} on {}.t_{table}", self.keyspace),
            None => operation.to_owned(),
        };
        let retryable = match db_error(&e) {
            Some(db) => matches!(
                db,
                DbError::Unavailable { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
                    | DbError::ReadTimeout { .. }
                    | DbError::WriteTimeout { .. }
                    | DbError::ReadFailure { .. }
                    | DbError::WriteFailure { .. }
                    | DbError::TruncateError
                    | DbError::ServerError
                    | DbError::RateLimitReached { .. }
            ),
            None => !matches!(e, ExecutionError::BadQuery(_)),
        };
        let reason = format!("cassandra at {}: {target}: {e}", self.hosts);
        if retryable {
            StoreError::Unavailable {
                backend: BACKEND,
                reason,
                source: Some(Box::new(e)),
            }
        } else {
            StoreError::Backend {
                backend: BACKEND,
                message: reason,
                source: Some(Box::new(e)),
            }
        }
    }

    fn prepare_failed(&self, what: &str, e: PrepareError) -> StoreError {
        let db = matches!(
            e,
            PrepareError::AllAttemptsFailed {
                first_attempt: RequestAttemptError::DbError(..)
            }
        );
        let reason = format!("cassandra at {}: preparing {what}: {e}", self.hosts);
        if db {
            StoreError::Backend {
                backend: BACKEND,
                message: reason,
                source: Some(Box::new(e)),
            }
        } else {
            StoreError::Unavailable {
                backend: BACKEND,
                reason,
                source: Some(Box::new(e)),
            }
        }
    }

    /// The prepared statements of `table`; `None` when the table does not exist and
    /// `create` is false.
    async fn statements(&self, table: &str, create: bool) -> Result<Option<Arc<Statements>>> {
        if let Some(found) = lock(&self.tables).get(table) {
            return Ok(Some(found.clone()));
        }
        if create {
            // One creation at a time per process: concurrent schema changes on one node
            // are safe but slow, and pointless for the same table.
            let _creating = self.creating.lock().await;
            if let Some(found) = lock(&self.tables).get(table) {
                return Ok(Some(found.clone()));
            }
            let cql = format!(
                "CREATE TABLE IF NOT EXISTS {}.t_{table} (pk text, ck text, value blob, \
                 version bigint, PRIMARY KEY ((pk), ck))",
                self.keyspace
            );
            self.session
                .query_unpaged(cql, ())
                .await
                .map_err(|e| self.failed("create table", Some(table), e))?;
            tracing::debug!(table, keyspace = %self.keyspace, "created cassandra table");
            let _ = self.session.await_schema_agreement().await;
            return self.prepare_settled(table).await.map(Some);
        }
        match self.prepare_settled(table).await {
            Ok(statements) => Ok(Some(statements)),
            Err(StoreError::Backend { message, .. }) if is_missing_table(&message) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`prepare_table`](Self::prepare_table), waiting for the schema to settle: while
    /// another process creates the same table, a node can answer a prepare with "Unknown
    /// CF" (the id of the other creation). Such answers are retried after schema
    /// agreement, for a short, bounded while.
    async fn prepare_settled(&self, table: &str) -> Result<Arc<Statements>> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.prepare_table(table).await {
                Err(StoreError::Backend { message, .. })
                    if attempts < 20 && message.contains("Unknown CF") =>
                {
                    tracing::debug!(table, attempts, "table not settled yet; retrying");
                    let _ = self.session.await_schema_agreement().await;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    async fn prepare_table(&self, table: &str) -> Result<Arc<Statements>> {
        let t = format!("{}.t_{table}", self.keyspace);
        let prepare = |cql: String, profile: &ExecutionProfileHandle, idempotent: bool| {
            let profile = profile.clone();
            async move {
                let mut statement = self.session.prepare(cql).await.map_err(|e| {
                    self.prepare_failed(&format!("a statement of {t_name}", t_name = table), e)
                })?;
                statement.set_execution_profile_handle(Some(profile));
                statement.set_is_idempotent(idempotent);
                statement.set_page_size(SCAN_PAGE_SIZE);
                Ok::<_, StoreError>(statement)
            }
        };
        let select = format!("SELECT value, version, TTL(value) FROM {t} WHERE pk = ? AND ck = ?");
        let columns = "ck, value, version, TTL(value)";
        let (get, get_serial, get_many_serial, scan, scan_after, scan_from) = futures_util::try_join!(
            prepare(select.clone(), &self.read, true),
            prepare(select, &self.serial_read, true),
            prepare(
                format!("SELECT {columns} FROM {t} WHERE pk = ? AND ck IN ?"),
                &self.serial_read,
                true
            ),
            prepare(
                format!("SELECT {columns} FROM {t} WHERE pk = ? LIMIT ?"),
                &self.read,
                true
            ),
            prepare(
                format!("SELECT {columns} FROM {t} WHERE pk = ? AND ck > ? LIMIT ?"),
                &self.read,
                true
            ),
            prepare(
                format!("SELECT {columns} FROM {t} WHERE pk = ? AND ck >= ? LIMIT ?"),
                &self.read,
                true
            ),
        )?;
        let (update_if, delete_if_exists, delete_if, upsert, delete) = futures_util::try_join!(
            prepare(
                format!(
                    "UPDATE {t} USING TTL ? SET value = ?, version = ? WHERE pk = ? AND ck = ? IF version = ?"
                ),
                &self.write,
                false
            ),
            prepare(
                format!("DELETE FROM {t} WHERE pk = ? AND ck = ? IF EXISTS"),
                &self.write,
                false
            ),
            prepare(
                format!("DELETE FROM {t} WHERE pk = ? AND ck = ? IF version = ?"),
                &self.write,
                false
            ),
            prepare(
                format!(
                    "UPDATE {t} USING TTL ? SET value = ?, version = ? WHERE pk = ? AND ck = ?"
                ),
                &self.write,
                false
            ),
            prepare(
                format!("DELETE FROM {t} WHERE pk = ? AND ck = ?"),
                &self.write,
                false
            ),
        )?;
        let statements = Arc::new(Statements {
            get,
            get_serial,
            get_many_serial,
            scan,
            scan_after,
            scan_from,
            update_if,
            delete_if_exists,
            delete_if,
            upsert,
            delete,
        });
        lock(&self.tables).insert(table.to_owned(), statements.clone());
        Ok(statements)
    }

    async fn get(
        &self,
        table: &str,
        partition: &str,
        clustering: &str,
        serial: bool,
    ) -> Result<Option<Row>> {
        let Some(st) = self.statements(table, false).await? else {
            return Ok(None);
        };
        self.get_with(&st, table, partition, clustering, serial)
            .await
    }

    async fn get_with(
        &self,
        st: &Statements,
        table: &str,
        partition: &str,
        clustering: &str,
        serial: bool,
    ) -> Result<Option<Row>> {
        let statement = if serial { &st.get_serial } else { &st.get };
        let result = self
            .session
            .execute_unpaged(statement, (partition, clustering))
            .await
            .map_err(|e| self.failed("get", Some(table), e))?;
        let columns = result
            .into_rows_result()
            .map_err(|e| self.decode_failed("get", table, e))?
            .maybe_first_row::<ValueColumns>()
            .map_err(|e| self.decode_failed("get", table, e))?;
        Ok(columns.and_then(|c| make_row(partition, clustering.to_owned(), c)))
    }

    fn decode_failed(&self, operation: &str, table: &str, e: impl Into<BoxError>) -> StoreError {
        let e = e.into();
        StoreError::Backend {
            backend: BACKEND,
            message: format!(
                "cassandra at {}: {operation} on {}.t_{table}: unexpected answer: {e}",
                self.hosts, self.keyspace
            ),
            source: Some(e),
        }
    }

    async fn scan(&self, table: &str, partition: &str, query: &ScanQuery) -> Result<Page> {
        let Some(st) = self.statements(table, false).await? else {
            return Ok(Page::default());
        };
        let limit = query.page_size();
        let fetch = i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX);
        // Cassandra takes one lower bound per column: the tighter of `after` (exclusive)
        // and `prefix` (inclusive).
        let bound = match (&query.after, &query.prefix) {
            (Some(after), Some(prefix)) if after.as_str() >= prefix.as_str() => {
                Some((true, after.as_str()))
            }
            (_, Some(prefix)) => Some((false, prefix.as_str())),
            (Some(after), None) => Some((true, after.as_str())),
            (None, None) => None,
        };
        let pager = match bound {
            None => {
                self.session
                    .execute_iter(st.scan.clone(), (partition, fetch))
                    .await
            }
            Some((true, key)) => {
                self.session
                    .execute_iter(st.scan_after.clone(), (partition, key, fetch))
                    .await
            }
            Some((false, key)) => {
                self.session
                    .execute_iter(st.scan_from.clone(), (partition, key, fetch))
                    .await
            }
        }
        .map_err(|e| self.pager_failed(table, e))?;
        let mut stream = pager
            .rows_stream::<ScanColumns>()
            .map_err(|e| self.decode_failed("scan", table, e))?;
        let mut rows = Vec::new();
        let mut more = false;
        while let Some(next) = stream.next().await {
            let (ck, value, version, ttl) = next.map_err(|e| {
                let reason = format!(
                    "cassandra at {}: scan on {}.t_{table}: {e}",
                    self.hosts, self.keyspace
                );
                StoreError::Unavailable {
                    backend: BACKEND,
                    reason,
                    source: Some(Box::new(e)),
                }
            })?;
            if let Some(prefix) = &query.prefix {
                // Keys with a prefix are contiguous in byte order: the first miss ends them.
                if !ck.starts_with(prefix.as_str()) {
                    break;
                }
            }
            if rows.len() == limit {
                more = true;
                break;
            }
            if let Some(row) = make_row(partition, ck, (value, version, ttl)) {
                rows.push(row);
            }
        }
        let next = if more {
            rows.last().map(|r| r.clustering.clone())
        } else {
            None
        };
        Ok(Page { rows, next })
    }

    fn pager_failed(&self, table: &str, e: PagerExecutionError) -> StoreError {
        StoreError::Unavailable {
            backend: BACKEND,
            reason: format!(
                "cassandra at {}: scan on {}.t_{table}: {e}",
                self.hosts, self.keyspace
            ),
            source: Some(Box::new(e)),
        }
    }

    /// One `UPDATE … IF version = expected` (`null` for an absent row).
    async fn update_if(
        &self,
        st: &Statements,
        table: &str,
        key: (&str, &str),
        expected: Option<u64>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> std::result::Result<Lwt, ExecutionError> {
        let next = expected.map_or(1, |v| v + 1);
        let result = self
            .session
            .execute_unpaged(
                &st.update_if,
                (
                    ttl_seconds(ttl),
                    value,
                    version_cql(Some(next)),
                    key.0,
                    key.1,
                    version_cql(expected),
                ),
            )
            .await?;
        Ok(self.lwt_answer(table, result))
    }

    /// Reads `[applied]` and the current `version` out of an LWT answer.
    fn lwt_answer(&self, table: &str, result: QueryResult) -> Lwt {
        let Ok(rows) = result.into_rows_result() else {
            tracing::warn!(table, "LWT answer without rows; treating it as not applied");
            return Lwt::Rejected(None);
        };
        let specs = rows.column_specs();
        let applied_at = specs.get_by_name("[applied]").map(|(i, _)| i);
        let version_at = specs.get_by_name("version").map(|(i, _)| i);
        let Ok(Some(row)) = rows.maybe_first_row::<scylla::value::Row>() else {
            return Lwt::Rejected(None);
        };
        let column = |at: Option<usize>| at.and_then(|i| row.columns.get(i).cloned().flatten());
        match column(applied_at) {
            Some(CqlValue::Boolean(true)) => Lwt::Applied,
            _ => Lwt::Rejected(match column(version_at) {
                Some(CqlValue::BigInt(v)) => u64::try_from(v).ok(),
                _ => None,
            }),
        }
    }

    /// A conditional single-row write, settling unknown outcomes with a SERIAL read.
    async fn conditional(
        &self,
        st: &Statements,
        table: &str,
        key: (&str, &str),
        expected: Option<u64>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Lwt> {
        let next = expected.map_or(1, |v| v + 1);
        let mut last_error = None;
        for _ in 0..UNKNOWN_OUTCOME_ATTEMPTS {
            match self.update_if(st, table, key, expected, value, ttl).await {
                Ok(answer) => return Ok(answer),
                Err(e) if outcome_unknown(&e) => {
                    tracing::debug!(table, error = %e, "LWT outcome unknown; reading at SERIAL");
                    // A SERIAL read finishes any Paxos round in flight: after it, the row
                    // shows whether our write landed.
                    let current = self.get_with(st, table, key.0, key.1, true).await?;
                    match &current {
                        Some(row) if row.version == next && row.value == value => {
                            return Ok(Lwt::Applied);
                        }
                        Some(row) if Some(row.version) == expected => {}
                        None if expected.is_none() => {}
                        _ => return Ok(Lwt::Rejected(current.map(|r| r.version))),
                    }
                    last_error = Some(e);
                }
                Err(e) => return Err(self.failed("compare-and-set", Some(table), e)),
            }
        }
        Err(match last_error {
            Some(e) => self.failed("compare-and-set (timed out repeatedly)", Some(table), e),
            None => self.contended(table, key),
        })
    }

    fn vanished(&self, table: &str) -> StoreError {
        StoreError::Backend {
            backend: BACKEND,
            message: format!(
                "cassandra at {}: table {}.t_{table} is missing right after its creation",
                self.hosts, self.keyspace
            ),
            source: None,
        }
    }

    fn contended(&self, table: &str, key: (&str, &str)) -> StoreError {
        StoreError::Unavailable {
            backend: BACKEND,
            reason: format!(
                "cassandra at {}: {}.t_{table}/{}/{}: gave up after {CONTENDED_ATTEMPTS} attempts \
                 lost to concurrent writers",
                self.hosts, self.keyspace, key.0, key.1
            ),
            source: None,
        }
    }

    async fn write(&self, mutation: Mutation) -> Result<StoreResponse> {
        let table = mutation.table().to_owned();
        let st = self
            .statements(&table, true)
            .await?
            .ok_or_else(|| self.vanished(&table))?;
        let key = mutation.key();
        match &mutation {
            Mutation::Put { value, ttl, .. } => {
                let mut guess = self
                    .get_with(&st, &table, key.0, key.1, false)
                    .await?
                    .map(|r| r.version);
                for _ in 0..CONTENDED_ATTEMPTS {
                    match self
                        .conditional(&st, &table, key, guess, value, *ttl)
                        .await?
                    {
                        Lwt::Applied => {
                            let version = guess.map_or(1, |v| v + 1);
                            return Ok(StoreResponse::Written {
                                version,
                                existed: guess.is_some(),
                            });
                        }
                        Lwt::Rejected(current) => guess = current,
                    }
                }
                Err(self.contended(&table, key))
            }
            Mutation::Delete { .. } => {
                let result = self
                    .session
                    .execute_unpaged(&st.delete_if_exists, key)
                    .await
                    .map_err(|e| self.failed("delete", Some(&table), e))?;
                let existed = matches!(self.lwt_answer(&table, result), Lwt::Applied);
                Ok(StoreResponse::Written {
                    version: 0,
                    existed,
                })
            }
            Mutation::InsertIfAbsent { value, ttl, .. } => {
                self.cas(&st, &table, key, None, value, *ttl).await
            }
            Mutation::UpdateIfVersion {
                expected,
                value,
                ttl,
                ..
            } => {
                self.cas(&st, &table, key, Some(*expected), value, *ttl)
                    .await
            }
        }
    }

    async fn cas(
        &self,
        st: &Statements,
        table: &str,
        key: (&str, &str),
        expected: Option<u64>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<StoreResponse> {
        let outcome = match self
            .conditional(st, table, key, expected, value, ttl)
            .await?
        {
            Lwt::Applied => CasOutcome::Applied {
                version: expected.map_or(1, |v| v + 1),
            },
            Lwt::Rejected(_) => CasOutcome::Rejected {
                current: self.get_with(st, table, key.0, key.1, true).await?,
            },
        };
        Ok(StoreResponse::Cas(outcome))
    }

    async fn batch(&self, mutations: &[Mutation]) -> Result<BatchOutcome> {
        let Some(first) = mutations.first() else {
            return Ok(BatchOutcome::Applied {
                versions: Vec::new(),
            });
        };
        let one_partition = mutations
            .iter()
            .all(|m| m.table() == first.table() && m.key().0 == first.key().0);
        if one_partition {
            return self.partition_batch(mutations).await;
        }
        if let Some(m) = mutations.iter().find(|m| m.is_conditional()) {
            let (partition, clustering) = m.key();
            return Err(StoreError::invalid(
                "batch",
                format!(
                    "on Cassandra a batch with conditions must stay within one partition of one \
                     table; this one writes {}/{} and {}/{partition} ({} {clustering:?})",
                    first.table(),
                    first.key().0,
                    m.table(),
                    m.operation()
                ),
            ));
        }
        self.logged_batch(mutations).await
    }

    /// Conditional (LWT) batch on one partition of one table; see the module docs.
    async fn partition_batch(&self, mutations: &[Mutation]) -> Result<BatchOutcome> {
        let Some(first) = mutations.first() else {
            return Ok(BatchOutcome::Applied {
                versions: Vec::new(),
            });
        };
        let table = first.table().to_owned();
        let partition = first.key().0.to_owned();
        let st = self
            .statements(&table, true)
            .await?
            .ok_or_else(|| self.vanished(&table))?;
        let mut keys: Vec<&str> = mutations.iter().map(|m| m.key().1).collect();
        keys.sort_unstable();
        keys.dedup();
        for _ in 0..CONTENDED_ATTEMPTS {
            let snapshot = self
                .read_many_serial(&st, &table, &partition, &keys)
                .await?;
            let (state, versions) = match play(&partition, mutations, &snapshot) {
                Ok(played) => played,
                Err(rejected) => return Ok(rejected),
            };
            let mut batch = CqlBatch::new(BatchType::Logged);
            batch.set_execution_profile_handle(Some(self.write.clone()));
            let mut values: Vec<BatchRow> = Vec::with_capacity(keys.len());
            for key in &keys {
                let read = snapshot
                    .get(*key)
                    .and_then(|c| c.as_ref().map(|c| c.version));
                let expected = version_cql(read).map(CqlValue::BigInt);
                match state.get(*key).cloned().flatten() {
                    Some(cell) => {
                        batch.append_statement(st.update_if.clone());
                        values.push(vec![
                            Some(CqlValue::Int(ttl_seconds(cell.ttl))),
                            Some(CqlValue::Blob(cell.value)),
                            version_cql(Some(cell.version)).map(CqlValue::BigInt),
                            Some(CqlValue::Text(partition.clone())),
                            Some(CqlValue::Text((*key).to_owned())),
                            expected,
                        ]);
                    }
                    None => {
                        batch.append_statement(st.delete_if.clone());
                        values.push(vec![
                            Some(CqlValue::Text(partition.clone())),
                            Some(CqlValue::Text((*key).to_owned())),
                            expected,
                        ]);
                    }
                }
            }
            let result = self.session.batch(&batch, values).await.map_err(|e| {
                if outcome_unknown(&e) {
                    self.failed(
                        "batch (outcome unknown: it may or may not have been applied)",
                        Some(&table),
                        e,
                    )
                } else {
                    self.failed("batch", Some(&table), e)
                }
            })?;
            if matches!(self.lwt_answer(&table, result), Lwt::Applied) {
                return Ok(BatchOutcome::Applied { versions });
            }
            // A row changed between the read and the batch: read again.
        }
        Err(self.contended(&table, (&partition, keys.first().copied().unwrap_or(""))))
    }

    async fn read_many_serial(
        &self,
        st: &Statements,
        table: &str,
        partition: &str,
        keys: &[&str],
    ) -> Result<BTreeMap<String, Option<Cell>>> {
        let result = self
            .session
            .execute_unpaged(&st.get_many_serial, (partition, keys))
            .await
            .map_err(|e| self.failed("batch read", Some(table), e))?;
        let rows = result
            .into_rows_result()
            .map_err(|e| self.decode_failed("batch read", table, e))?;
        let mut snapshot: BTreeMap<String, Option<Cell>> =
            keys.iter().map(|k| ((*k).to_owned(), None)).collect();
        for row in rows
            .rows::<ScanColumns>()
            .map_err(|e| self.decode_failed("batch read", table, e))?
        {
            let (ck, value, version, ttl) =
                row.map_err(|e| self.decode_failed("batch read", table, e))?;
            if let Some(row) = make_row(partition, ck, (value, version, ttl)) {
                snapshot.insert(
                    row.clustering,
                    Some(Cell {
                        value: row.value,
                        version: row.version,
                        ttl: None,
                        expires_at: row.expires_at,
                    }),
                );
            }
        }
        Ok(snapshot)
    }

    /// Unconditional batch across partitions or tables: one LOGGED batch.
    async fn logged_batch(&self, mutations: &[Mutation]) -> Result<BatchOutcome> {
        let mut tables: HashMap<&str, Arc<Statements>> = HashMap::new();
        for m in mutations {
            if !tables.contains_key(m.table()) {
                let st = self
                    .statements(m.table(), true)
                    .await?
                    .ok_or_else(|| self.vanished(m.table()))?;
                tables.insert(m.table(), st);
            }
        }
        // Current versions of every row written, read concurrently.
        let mut rows: Vec<(&str, &str, &str)> = mutations
            .iter()
            .map(|m| (m.table(), m.key().0, m.key().1))
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let reads = rows.iter().map(|(table, partition, clustering)| {
            let st = tables.get(table).cloned();
            async move {
                match st {
                    Some(st) => {
                        self.get_with(&st, table, partition, clustering, false)
                            .await
                    }
                    None => Ok(None),
                }
            }
        });
        let found = futures_util::future::try_join_all(reads).await?;
        let mut versions_now: HashMap<(&str, &str, &str), Option<u64>> = rows
            .iter()
            .copied()
            .zip(found.into_iter().map(|row| row.map(|r| r.version)))
            .collect();
        let mut batch = CqlBatch::new(BatchType::Logged);
        batch.set_execution_profile_handle(Some(self.write.clone()));
        let mut values: Vec<BatchRow> = Vec::with_capacity(mutations.len());
        let mut versions = Vec::with_capacity(mutations.len());
        for m in mutations {
            let (partition, clustering) = m.key();
            let Some(st) = tables.get(m.table()) else {
                continue;
            };
            let slot = versions_now
                .entry((m.table(), partition, clustering))
                .or_insert(None);
            match m {
                Mutation::Put { value, ttl, .. } => {
                    let version = slot.map_or(1, |v| v + 1);
                    *slot = Some(version);
                    batch.append_statement(st.upsert.clone());
                    values.push(vec![
                        Some(CqlValue::Int(ttl_seconds(*ttl))),
                        Some(CqlValue::Blob(value.clone())),
                        version_cql(Some(version)).map(CqlValue::BigInt),
                        Some(CqlValue::Text(partition.to_owned())),
                        Some(CqlValue::Text(clustering.to_owned())),
                    ]);
                    versions.push(version);
                }
                Mutation::Delete { .. } => {
                    *slot = None;
                    batch.append_statement(st.delete.clone());
                    values.push(vec![
                        Some(CqlValue::Text(partition.to_owned())),
                        Some(CqlValue::Text(clustering.to_owned())),
                    ]);
                    versions.push(0);
                }
                Mutation::InsertIfAbsent { .. } | Mutation::UpdateIfVersion { .. } => {
                    return Err(StoreError::invalid(
                        "batch",
                        "on Cassandra a batch with conditions must stay within one partition of one table",
                    ));
                }
            }
        }
        let table = mutations.first().map_or("", Mutation::table);
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| self.failed("logged batch", Some(table), e))?;
        Ok(BatchOutcome::Applied { versions })
    }
}

/// Plays `mutations` in order on `snapshot`, as SQLite's transaction would: the final state
/// of every row and the versions, or the rejection.
#[allow(clippy::type_complexity)]
fn play(
    partition: &str,
    mutations: &[Mutation],
    snapshot: &BTreeMap<String, Option<Cell>>,
) -> std::result::Result<(BTreeMap<String, Option<Cell>>, Vec<u64>), BatchOutcome> {
    let mut state = snapshot.clone();
    let mut versions = Vec::with_capacity(mutations.len());
    for (index, m) in mutations.iter().enumerate() {
        let clustering = m.key().1;
        let slot = state.entry(clustering.to_owned()).or_insert(None);
        let current = || {
            slot.as_ref().map(|cell| Row {
                partition: partition.to_owned(),
                clustering: clustering.to_owned(),
                value: cell.value.clone(),
                version: cell.version,
                expires_at: cell.expires_at,
            })
        };
        let next = slot.as_ref().map_or(1, |c| c.version + 1);
        match m {
            Mutation::Put { value, ttl, .. } => {
                *slot = Some(Cell::written(value, next, *ttl));
                versions.push(next);
            }
            Mutation::Delete { .. } => {
                *slot = None;
                versions.push(0);
            }
            Mutation::InsertIfAbsent { value, ttl, .. } => {
                if slot.is_some() {
                    return Err(BatchOutcome::Rejected {
                        index,
                        current: current(),
                    });
                }
                *slot = Some(Cell::written(value, 1, *ttl));
                versions.push(1);
            }
            Mutation::UpdateIfVersion {
                expected,
                value,
                ttl,
                ..
            } => {
                if slot.as_ref().map(|c| c.version) != Some(*expected) {
                    return Err(BatchOutcome::Rejected {
                        index,
                        current: current(),
                    });
                }
                *slot = Some(Cell::written(value, next, *ttl));
                versions.push(next);
            }
        }
    }
    Ok((state, versions))
}

impl Cell {
    fn written(value: &[u8], version: u64, ttl: Option<Duration>) -> Cell {
        Cell {
            value: value.to_vec(),
            version,
            ttl,
            expires_at: ttl.map(|t| SystemTime::now() + t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn ttl_is_rounded_up_plus_one_second() {
        assert_eq!(ttl_seconds(None), 0);
        assert_eq!(ttl_seconds(Some(Duration::from_secs(1))), 2);
        assert_eq!(ttl_seconds(Some(Duration::from_millis(1500))), 3);
        assert_eq!(ttl_seconds(Some(Duration::from_millis(1))), 2);
        assert_eq!(
            ttl_seconds(Some(Duration::from_secs(20 * 365 * 24 * 3600))),
            630_720_000,
            "capped at Cassandra's maximum"
        );
    }

    fn put(clustering: &str, value: &str) -> Mutation {
        Mutation::Put {
            table: Arc::from("t"),
            partition: "p".into(),
            clustering: clustering.into(),
            value: value.as_bytes().to_vec(),
            ttl: None,
        }
    }

    #[test]
    fn batches_play_in_order_on_the_snapshot() {
        let mut snapshot = BTreeMap::new();
        snapshot.insert("taken".to_owned(), Some(Cell::written(b"old", 4, None)));
        snapshot.insert("a".to_owned(), None);
        let mutations = [
            put("a", "1"),
            put("a", "2"),
            Mutation::UpdateIfVersion {
                table: Arc::from("t"),
                partition: "p".into(),
                clustering: "taken".into(),
                expected: 4,
                value: b"new".to_vec(),
                ttl: None,
            },
            Mutation::Delete {
                table: Arc::from("t"),
                partition: "p".into(),
                clustering: "a".into(),
            },
        ];
        let (state, versions) = play("p", &mutations, &snapshot).expect("applies");
        assert_eq!(versions, [1, 2, 5, 0]);
        assert!(state["a"].is_none());
        assert_eq!(state["taken"].as_ref().map(|c| c.version), Some(5));

        let rejected = [
            put("taken", "x"),
            Mutation::InsertIfAbsent {
                table: Arc::from("t"),
                partition: "p".into(),
                clustering: "taken".into(),
                value: b"y".to_vec(),
                ttl: None,
            },
        ];
        match play("p", &rejected, &snapshot) {
            Err(BatchOutcome::Rejected { index, current }) => {
                assert_eq!(index, 1);
                let current = current.expect("the row put just before");
                assert_eq!((current.value.as_slice(), current.version), (&b"x"[..], 5));
            }
            _ => panic!("insert-if-absent after a put of the same row must be rejected"),
        }
    }
}
