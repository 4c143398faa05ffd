//! The embedded backend: one SQLite file in WAL mode, shared safely by every process on the
//! machine.
//!
//! Design:
//! - one physical table `t_<name>` per logical table, `(pk, ck)` primary key, `WITHOUT ROWID`;
//! - every write runs in a `BEGIN IMMEDIATE` transaction on the process's single writer
//!   connection (writers in one process queue on a mutex instead of spinning on the file
//!   lock); other processes are waited for by a short-sleep busy handler and, past
//!   `busy_timeout`, a retry loop bounded by `lock_timeout` — so "database is locked" does not
//!   reach callers under ordinary contention;
//! - reads use a small pool of reader connections (WAL readers never block the writer);
//! - rows written with a TTL carry `expires_at` (ms since the epoch); reads hide expired rows
//!   and writers purge them now and then;
//! - every write transaction bumps a per-table counter in `trellis_changes`, which is what
//!   [`Table::change_marker`](crate::Table::change_marker) returns: other processes poll it
//!   to notice changes cheaply;
//! - before each operation the file's identity (device and inode) is compared with the one
//!   opened: a removed file makes operations fail with [`StoreError::Unavailable`] instead of
//!   silently writing to an unlinked inode; a replaced file is reopened.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};

use crate::error::{Result, StoreError};
use crate::request::{
    BatchOutcome, CasOutcome, Mutation, Page, Row, ScanQuery, StoreRequest, StoreResponse,
};
use crate::store::Store;

const BACKEND: &str = "sqlite";
const PURGE_EVERY: Duration = Duration::from_secs(30);
const MAX_IDLE_READERS: usize = 8;

/// Tuning of the SQLite backend, read from the URL's query string.
#[derive(Debug, Clone)]
struct Options {
    /// How long SQLite's own busy handler waits for another process's lock.
    busy_timeout: Duration,
    /// How long an operation keeps retrying a busy database before failing.
    lock_timeout: Duration,
    /// `PRAGMA synchronous`: NORMAL (default; durable across process crashes) or FULL.
    synchronous_full: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            busy_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(30),
            synchronous_full: false,
        }
    }
}

/// File identity: device and inode.
type Identity = (u64, u64);

struct WriterState {
    conn: Option<(Connection, Identity)>,
    created: HashSet<String>,
    last_purge: HashMap<String, Instant>,
}

struct Shared {
    path: PathBuf,
    options: Options,
    writer: Mutex<WriterState>,
    readers: Mutex<Vec<(Connection, Identity)>>,
}

/// The tower service of the SQLite backend.
#[derive(Clone)]
pub(crate) struct SqliteStore {
    shared: Arc<Shared>,
}

impl SqliteStore {
    /// Opens `sqlite://PATH[?busy_timeout=5s&lock_timeout=30s&synchronous=normal|full]`.
    pub(crate) async fn open_url(url: &str) -> Result<Store> {
        let (path, options) = parse_url(url)?;
        let shared = tokio::task::spawn_blocking(move || Shared::open(path, options))
            .await
            .map_err(|e| StoreError::Backend {
                backend: BACKEND,
                message: format!("opening task failed: {e}"),
                source: None,
            })??;
        let location = shared.path.display().to_string();
        Ok(Store::from_service(
            BACKEND,
            location,
            SqliteStore {
                shared: Arc::new(shared),
            },
        ))
    }
}

impl tower::Service<StoreRequest> for SqliteStore {
    type Response = StoreResponse;
    type Error = StoreError;
    type Future = Pin<Box<dyn Future<Output = Result<StoreResponse>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || shared.execute(request))
                .await
                .map_err(|e| StoreError::Backend {
                    backend: BACKEND,
                    message: format!("store task failed: {e}"),
                    source: None,
                })?
        })
    }
}

fn parse_url(url: &str) -> Result<(PathBuf, Options)> {
    let bad = |reason: String| StoreError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let rest = url
        .strip_prefix("sqlite://")
        .ok_or_else(|| bad("expected sqlite://PATH".into()))?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(bad(
            "the path is empty; for example sqlite://./trellis-data/trellis.db".into(),
        ));
    }
    let mut options = Options::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("query parameter {pair:?} has no value")))?;
        match key {
            "busy_timeout" => {
                options.busy_timeout =
                    parse_duration(value).map_err(|e| bad(format!("busy_timeout: {e}")))?
            }
            "lock_timeout" => {
                options.lock_timeout =
                    parse_duration(value).map_err(|e| bad(format!("lock_timeout: {e}")))?
            }
            "synchronous" => {
                options.synchronous_full = match value.to_ascii_lowercase().as_str() {
                    "normal" => false,
                    "full" => true,
                    other => {
                        return Err(bad(format!(
                            "synchronous: {other:?} is neither normal nor full"
                        )));
                    }
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?}; known: busy_timeout, lock_timeout, synchronous"
                )));
            }
        }
    }
    Ok((PathBuf::from(path), options))
}

/// `250ms`, `5s`, `1m` or a number of milliseconds.
fn parse_duration(value: &str) -> std::result::Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{value:?} is not a duration such as 500ms, 5s or 1m"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        _ => return Err(format!("{value:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Ok(Duration::from_millis(ms))
}

fn identity_of(path: &Path) -> std::io::Result<Identity> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Ok((0, 0))
    }
}

fn unavailable(reason: String, source: Option<rusqlite::Error>) -> StoreError {
    StoreError::Unavailable {
        backend: BACKEND,
        reason,
        source: source.map(|e| Box::new(e) as _),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn to_system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Short sleeps, growing, with jitter: contention between processes resolves in
/// microseconds, SQLite's default handler would sleep whole milliseconds.
fn busy_handler(attempt: i32) -> bool {
    let step = 50u64 << attempt.clamp(0, 7);
    let jitter = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos() % 50));
    std::thread::sleep(Duration::from_micros(step.min(5_000) + jitter));
    // ~5 s of waiting in all; past that the operation's own retry loop takes over.
    attempt < 1_000
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn is_missing_table(error: &rusqlite::Error) -> bool {
    error.to_string().contains("no such table")
}

fn physical(table: &str) -> String {
    // Table names are validated to [a-z][a-z0-9_]* by `Store::table`.
    format!("\"t_{table}\"")
}

impl Shared {
    fn open(path: PathBuf, options: Options) -> Result<Shared> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Unavailable {
                backend: BACKEND,
                reason: format!("cannot create folder {}: {e}", parent.display()),
                source: Some(Box::new(e)),
            })?;
        }
        let shared = Shared {
            path,
            options,
            writer: Mutex::new(WriterState {
                conn: None,
                created: HashSet::new(),
                last_purge: HashMap::new(),
            }),
            readers: Mutex::new(Vec::new()),
        };
        let conn = shared.connect(true)?;
        let conn_id = identity_of(&shared.path).map_err(|e| {
            unavailable(
                format!(
                    "database file {} vanished while opening: {e}",
                    shared.path.display()
                ),
                None,
            )
        })?;
        shared.retry_busy(|| {
            let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %shared.path.display(), mode, "could not switch to WAL");
            }
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS trellis_changes (tbl TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID",
            )
        })?;
        lock(&shared.writer).conn = Some((conn, conn_id));
        Ok(shared)
    }

    /// Opens a connection. Only the first open may create the file: a file that vanished
    /// later is an outage, not an invitation to start over with an empty database.
    fn connect(&self, create: bool) -> Result<Connection> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let mut conn = Connection::open_with_flags(&self.path, flags).map_err(|e| {
            unavailable(
                format!("cannot open database file {}: {e}", self.path.display()),
                Some(e),
            )
        })?;
        conn.busy_timeout(self.options.busy_timeout)
            .and_then(|()| conn.busy_handler(Some(busy_handler)))
            .and_then(|()| {
                conn.execute_batch(if self.options.synchronous_full {
                    "PRAGMA synchronous=FULL"
                } else {
                    "PRAGMA synchronous=NORMAL"
                })
            })
            .map_err(|e| self.map_error(e))?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    /// The file's identity now, or `Unavailable` when it is gone.
    fn current_identity(&self) -> Result<Identity> {
        identity_of(&self.path).map_err(|e| {
            unavailable(
                format!(
                    "database file {} is not reachable ({e}); it was removed or renamed after it was opened",
                    self.path.display()
                ),
                None,
            )
        })
    }

    fn map_error(&self, error: rusqlite::Error) -> StoreError {
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => unavailable(
                format!(
                    "database file {} stayed locked by another process for {:?}",
                    self.path.display(),
                    self.options.lock_timeout
                ),
                Some(error),
            ),
            Some(
                ErrorCode::CannotOpen
                | ErrorCode::NotADatabase
                | ErrorCode::SystemIoFailure
                | ErrorCode::ReadOnly
                | ErrorCode::PermissionDenied
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::DiskFull,
            ) => unavailable(
                format!("database file {}: {error}", self.path.display()),
                Some(error),
            ),
            _ => StoreError::Backend {
                backend: BACKEND,
                message: format!("{}: {error}", self.path.display()),
                source: Some(Box::new(error)),
            },
        }
    }

    /// Runs `op` again while the database is busy, up to `lock_timeout`.
    fn retry_busy<T>(&self, mut op: impl FnMut() -> rusqlite::Result<T>) -> Result<T> {
        let deadline = Instant::now() + self.options.lock_timeout;
        let mut attempt = 0u32;
        loop {
            match op() {
                Ok(value) => return Ok(value),
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    attempt += 1;
                    let pause = Duration::from_micros(200 * u64::from(attempt.min(50)));
                    std::thread::sleep(pause);
                }
                Err(e) => return Err(self.map_error(e)),
            }
        }
    }

    fn execute(&self, request: StoreRequest) -> Result<StoreResponse> {
        match request {
            StoreRequest::Get {
                table,
                partition,
                clustering,
            } => self.read(|conn| {
                read_row(conn, &table, &partition, &clustering, now_ms()).map(StoreResponse::Row)
            }),
            StoreRequest::Scan {
                table,
                partition,
                query,
            } => self.read(|conn| scan(conn, &table, &partition, &query).map(StoreResponse::Page)),
            StoreRequest::TableVersion { table } => self.read(|conn| {
                let seq: Option<i64> = conn
                    .prepare_cached("SELECT seq FROM trellis_changes WHERE tbl = ?1")?
                    .query_row([&*table], |r| r.get(0))
                    .optional()?;
                Ok(StoreResponse::TableVersion(Some(seq.unwrap_or(0) as u64)))
            }),
            StoreRequest::Ping => self.read(|conn| {
                conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
                Ok(StoreResponse::Pong)
            }),
            StoreRequest::Write(mutation) => {
                let conditional = mutation.is_conditional();
                match self.write(std::slice::from_ref(&mutation))? {
                    BatchOutcome::Applied { versions } => {
                        let version = versions.first().copied().unwrap_or(0);
                        if conditional {
                            Ok(StoreResponse::Cas(CasOutcome::Applied { version }))
                        } else {
                            // `existed` is smuggled through the version of a delete: see `apply`.
                            Ok(written(&mutation, version))
                        }
                    }
                    BatchOutcome::Rejected { current, .. } => {
                        Ok(StoreResponse::Cas(CasOutcome::Rejected { current }))
                    }
                }
            }
            StoreRequest::Batch(mutations) => {
                let outcome = self.write(&mutations)?;
                Ok(StoreResponse::Batch(match outcome {
                    BatchOutcome::Applied { versions } => BatchOutcome::Applied {
                        versions: versions
                            .into_iter()
                            .zip(&mutations)
                            .map(|(v, m)| {
                                if matches!(m, Mutation::Delete { .. }) {
                                    0
                                } else {
                                    v
                                }
                            })
                            .collect(),
                    },
                    rejected => rejected,
                }))
            }
        }
    }

    /// Runs a read on a pooled reader connection.
    fn read<T>(&self, op: impl Fn(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let identity = self.current_identity()?;
        let pooled = {
            let mut readers = lock(&self.readers);
            // Connections to a replaced file are dropped.
            readers.retain(|(_, id)| *id == identity);
            readers.pop()
        };
        let (conn, id) = match pooled {
            Some(pair) => pair,
            None => (self.connect(false)?, identity),
        };
        let result = self.retry_busy(|| op(&conn));
        let mut readers = lock(&self.readers);
        if readers.len() < MAX_IDLE_READERS {
            readers.push((conn, id));
        }
        result
    }

    /// Applies mutations in one immediate transaction on the writer connection.
    fn write(&self, mutations: &[Mutation]) -> Result<BatchOutcome> {
        let identity = self.current_identity()?;
        let mut state = lock(&self.writer);
        let state = &mut *state;
        if state.conn.as_ref().is_none_or(|(_, id)| *id != identity) {
            state.conn = None;
            state.created.clear();
            state.conn = Some((self.connect(false)?, identity));
        }
        let Some((conn, _)) = state.conn.as_mut() else {
            return Err(unavailable("no writer connection".into(), None));
        };
        let created = &mut state.created;
        let last_purge = &mut state.last_purge;
        self.retry_busy(|| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = now_ms();
            let mut tables: Vec<&str> = Vec::new();
            for m in mutations {
                if !tables.contains(&m.table()) {
                    tables.push(m.table());
                }
            }
            for table in &tables {
                if !created.contains(*table) {
                    tx.execute_batch(&format!(
                        "CREATE TABLE IF NOT EXISTS {} (pk TEXT NOT NULL, ck TEXT NOT NULL, value BLOB NOT NULL, version INTEGER NOT NULL, expires_at INTEGER, PRIMARY KEY (pk, ck)) WITHOUT ROWID",
                        physical(table)
                    ))?;
                }
            }
            let mut versions = Vec::with_capacity(mutations.len());
            for (index, m) in mutations.iter().enumerate() {
                match apply(&tx, m, now)? {
                    Ok(version) => versions.push(version),
                    Err(current) => {
                        tx.rollback()?;
                        return Ok(BatchOutcome::Rejected { index, current });
                    }
                }
            }
            for table in &tables {
                tx.prepare_cached(
                    "INSERT INTO trellis_changes (tbl, seq) VALUES (?1, 1) ON CONFLICT(tbl) DO UPDATE SET seq = seq + 1",
                )?
                .execute([table])?;
                let due = last_purge
                    .get(*table)
                    .is_none_or(|at| at.elapsed() >= PURGE_EVERY);
                if due {
                    tx.execute(
                        &format!(
                            "DELETE FROM {} WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                            physical(table)
                        ),
                        [now],
                    )?;
                }
            }
            tx.commit()?;
            for table in tables {
                created.insert(table.to_owned());
                last_purge
                    .entry(table.to_owned())
                    .and_modify(|at| {
                        if at.elapsed() >= PURGE_EVERY {
                            *at = Instant::now();
                        }
                    })
                    .or_insert_with(Instant::now);
            }
            Ok(BatchOutcome::Applied { versions })
        })
    }
}

fn written(mutation: &Mutation, version: u64) -> StoreResponse {
    match mutation {
        // `apply` returns 1 for a delete that removed a live row, 0 otherwise.
        Mutation::Delete { .. } => StoreResponse::Written {
            version: 0,
            existed: version == 1,
        },
        _ => StoreResponse::Written {
            version,
            existed: version > 1,
        },
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain connection state behind, still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_row(
    conn: &Connection,
    table: &str,
    partition: &str,
    clustering: &str,
    now: i64,
) -> rusqlite::Result<Option<Row>> {
    let sql = format!(
        "SELECT value, version, expires_at FROM {} WHERE pk = ?1 AND ck = ?2",
        physical(table)
    );
    let found = match conn.prepare_cached(&sql) {
        Ok(mut stmt) => stmt
            .query_row(params![partition, clustering], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })
            .optional()?,
        Err(e) if is_missing_table(&e) => None,
        Err(e) => return Err(e),
    };
    Ok(found.and_then(|(value, version, expires_at)| {
        if expires_at.is_some_and(|at| at <= now) {
            return None;
        }
        Some(Row {
            partition: partition.to_owned(),
            clustering: clustering.to_owned(),
            value,
            version: version as u64,
            expires_at: expires_at.map(to_system_time),
        })
    }))
}

fn scan(
    conn: &Connection,
    table: &str,
    partition: &str,
    query: &ScanQuery,
) -> rusqlite::Result<Page> {
    let limit = query.page_size();
    let mut sql = format!(
        "SELECT ck, value, version, expires_at FROM {} WHERE pk = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
        physical(table)
    );
    if query.after.is_some() {
        sql.push_str(" AND ck > ?3");
    }
    if query.prefix.is_some() {
        sql.push_str(" AND ck >= ?4");
    }
    sql.push_str(" ORDER BY ck LIMIT ?5");
    let mut stmt = match conn.prepare_cached(&sql) {
        Ok(stmt) => stmt,
        Err(e) if is_missing_table(&e) => return Ok(Page::default()),
        Err(e) => return Err(e),
    };
    let mut binds: Vec<(usize, rusqlite::types::Value)> = vec![
        (1, partition.to_owned().into()),
        (2, now_ms().into()),
        (5, (limit as i64).saturating_add(1).into()),
    ];
    if let Some(after) = &query.after {
        binds.push((3, after.clone().into()));
    }
    if let Some(prefix) = &query.prefix {
        binds.push((4, prefix.clone().into()));
    }
    for (index, value) in binds {
        stmt.raw_bind_parameter(index, value)?;
    }
    let mut rows = Vec::new();
    let mut more = false;
    let mut cursor = stmt.raw_query();
    while let Some(r) = cursor.next()? {
        let ck: String = r.get(0)?;
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
        rows.push(Row {
            partition: partition.to_owned(),
            clustering: ck,
            value: r.get(1)?,
            version: r.get::<_, i64>(2)? as u64,
            expires_at: r.get::<_, Option<i64>>(3)?.map(to_system_time),
        });
    }
    let next = if more {
        rows.last().map(|r| r.clustering.clone())
    } else {
        None
    };
    Ok(Page { rows, next })
}

/// Applies one mutation inside a transaction: `Ok(Ok(version))` when applied,
/// `Ok(Err(current))` when its condition failed.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    mutation: &Mutation,
    now: i64,
) -> rusqlite::Result<std::result::Result<u64, Option<Row>>> {
    let (partition, clustering) = mutation.key();
    let table = mutation.table();
    let current = read_row(tx, table, partition, clustering, now)?;
    let upsert = |value: &[u8], version: u64, ttl: Option<Duration>| -> rusqlite::Result<()> {
        let expires_at = ttl.map(|t| now.saturating_add(t.as_millis() as i64));
        tx.prepare_cached(&format!(
            "INSERT INTO {} (pk, ck, value, version, expires_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT(pk, ck) DO UPDATE SET value = excluded.value, version = excluded.version, expires_at = excluded.expires_at",
            physical(table)
        ))?
        .execute(params![partition, clustering, value, version as i64, expires_at])?;
        Ok(())
    };
    let next_version = current.as_ref().map_or(1, |row| row.version + 1);
    match mutation {
        Mutation::Put { value, ttl, .. } => {
            upsert(value, next_version, *ttl)?;
            Ok(Ok(next_version))
        }
        Mutation::Delete { .. } => {
            tx.prepare_cached(&format!(
                "DELETE FROM {} WHERE pk = ?1 AND ck = ?2",
                physical(table)
            ))?
            .execute(params![partition, clustering])?;
            Ok(Ok(u64::from(current.is_some())))
        }
        Mutation::InsertIfAbsent { value, ttl, .. } => {
            if current.is_some() {
                return Ok(Err(current));
            }
            upsert(value, 1, *ttl)?;
            Ok(Ok(1))
        }
        Mutation::UpdateIfVersion {
            expected,
            value,
            ttl,
            ..
        } => match &current {
            Some(row) if row.version == *expected => {
                upsert(value, next_version, *ttl)?;
                Ok(Ok(next_version))
            }
            _ => Ok(Err(current)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing_names_the_problem() {
        let (path, options) =
            parse_url("sqlite://./data/x.db?busy_timeout=2s&synchronous=full").expect("valid url");
        assert_eq!(path, PathBuf::from("./data/x.db"));
        assert_eq!(options.busy_timeout, Duration::from_secs(2));
        assert!(options.synchronous_full);
        for (url, needle) in [
            ("sqlite://", "path is empty"),
            ("sqlite://x.db?busy_timeout=fast", "busy_timeout"),
            ("sqlite://x.db?colour=blue", "unknown parameter \"colour\""),
            ("sqlite://x.db?synchronous=off", "neither normal nor full"),
            ("sqlite://x.db?lock_timeout", "has no value"),
        ] {
            let err = parse_url(url).expect_err(url).to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
