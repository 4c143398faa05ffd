//! The durable saga log: its format in the store, and the reads and conditional writes the
//! orchestrator and the admin API make on it.
//!
//! # Format (version 1)
//!
//! Two tables, written through the [`Store`] API only, so the log works unchanged on SQLite
//! and on Cassandra:
//!
//! - **`saga_log`** — one row per saga: partition = saga id (a UUID v7, so ids sort by start
//!   time), clustering key `""`, value = a [`SagaRecord`] as JSON. The row is the single
//!   source of truth. **Every change is a compare-and-set on the row's version**
//!   ([`Table::update_if_version`]): an orchestrator that finds the version moved has lost
//!   the saga to another one and stops, so two orchestrators never both drive a saga.
//!   Before a step runs, its intent is in the row (step `running`, `attempts` counted,
//!   `started_at_ms`); after it, its result (`done` with the new data, or `failed` with the
//!   error). To save a write, the result of step *i* and the intent of step *i + 1* go in
//!   one write. Compensations are logged the same way (`compensating` → `compensated`).
//! - **`saga_index`** — lookup rows, written unconditionally around the record's CAS and
//!   therefore *hints*: readers always check the record.
//!   - partition `active:<name>`, clustering = saga id: sagas an orchestrator must drive
//!     (`running`, `compensating`); recovery scans it.
//!   - partition `state:<state>`, clustering = saga id, value = saga name: the admin API's
//!     list by state.
//!   - partition `requests:<name>`, clustering = saga id, value = request time (ms): an
//!     operator asked to retry a saga in `needs_attention`; the orchestrator that has
//!     `<name>` registered polls it.
//!
//! Ownership: a record carries `owner` (the orchestrator's node id) and `lease_until_ms`,
//! renewed by every write. Recovery takes over a saga when the owner is itself (it
//! restarted) or when the lease ran out. Step timeouts are shorter than the lease, so a
//! step never runs in two places at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_store::{Batch, CasOutcome, Row, ScanQuery, Store, Table};

use crate::error::{Result, SagaError};

/// Table of saga records.
pub const LOG_TABLE: &str = "saga_log";
/// Table of index rows.
pub const INDEX_TABLE: &str = "saga_index";
/// Current record format.
pub const FORMAT: u32 = 1;
/// Most history entries kept in a record (the oldest are dropped first).
pub const MAX_HISTORY: usize = 200;

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Steps are running forward.
    Running,
    /// A step failed; completed steps are being undone in reverse order.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was undone.
    Compensated,
    /// A compensation still failed after its retries; an operator must `retry` or `abort`.
    NeedsAttention,
    /// An operator gave up on a saga in `needs_attention`; nothing more is done.
    Aborted,
}

impl SagaState {
    /// Every state, in lifecycle order.
    pub const ALL: [SagaState; 6] = [
        SagaState::Running,
        SagaState::Compensating,
        SagaState::Completed,
        SagaState::Compensated,
        SagaState::NeedsAttention,
        SagaState::Aborted,
    ];

    /// The name used in the log, the API and events (`needs_attention`).
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Completed => "completed",
            SagaState::Compensated => "compensated",
            SagaState::NeedsAttention => "needs_attention",
            SagaState::Aborted => "aborted",
        }
    }

    /// Whether an orchestrator drives the saga on its own (`running`, `compensating`).
    pub fn is_active(self) -> bool {
        matches!(self, SagaState::Running | SagaState::Compensating)
    }

    /// Whether nothing more will ever happen (`completed`, `compensated`, `aborted`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SagaState::Completed | SagaState::Compensated | SagaState::Aborted
        )
    }
}

impl std::fmt::Display for SagaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SagaState {
    type Err = SagaError;

    fn from_str(s: &str) -> Result<Self> {
        SagaState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                SagaError::Invalid(format!(
                    "unknown saga state {s:?}; known: {}",
                    SagaState::ALL.map(SagaState::as_str).join(", ")
                ))
            })
    }
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Intent logged: the action is running (or was, when the orchestrator died).
    Running,
    /// The action succeeded.
    Done,
    /// The action failed; its effect did not happen.
    Failed,
    /// The action failed in a way that leaves its effect unknown (timeout, crash during a
    /// step that is not safe to repeat); it is compensated like a done step.
    InDoubt,
    /// Compensation intent logged: the compensation is running (or was).
    Compensating,
    /// The compensation succeeded.
    Compensated,
    /// The compensation failed after its retries.
    CompensationFailed,
}

impl StepStatus {
    /// Whether the step's effect may exist and must be undone when the saga compensates.
    pub fn needs_compensation(self) -> bool {
        matches!(
            self,
            StepStatus::Done
                | StepStatus::InDoubt
                | StepStatus::Compensating
                | StepStatus::CompensationFailed
        )
    }
}

/// One step in a [`SagaRecord`]: status, timings, attempts and errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step name.
    pub name: String,
    /// Whether the step may be run again after a crash (it is idempotent or sends an
    /// idempotency key).
    pub idempotent: bool,
    /// Where it is.
    pub status: StepStatus,
    /// Action attempts made so far.
    pub attempts: u32,
    /// When the first action attempt started (ms since the Unix epoch).
    pub started_at_ms: Option<u64>,
    /// When the action finished (ms).
    pub finished_at_ms: Option<u64>,
    /// The action's last error.
    pub error: Option<String>,
    /// Compensation attempts made so far.
    pub compensation_attempts: u32,
    /// When the compensation first started (ms).
    pub compensation_started_at_ms: Option<u64>,
    /// When the compensation finished (ms).
    pub compensation_finished_at_ms: Option<u64>,
    /// The compensation's last error.
    pub compensation_error: Option<String>,
}

impl StepRecord {
    pub(crate) fn new(name: &str, idempotent: bool) -> Self {
        StepRecord {
            name: name.to_owned(),
            idempotent,
            status: StepStatus::Pending,
            attempts: 0,
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            compensation_attempts: 0,
            compensation_started_at_ms: None,
            compensation_finished_at_ms: None,
            compensation_error: None,
        }
    }
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// What: `started`, `step.intent`, `step.done`, `step.failed`, `compensation.intent`,
    /// `compensation.done`, `compensation.failed`, `recovered`, `retry`, `aborted`, or a
    /// final state.
    pub event: String,
    /// The step concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The error, for failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The orchestrator node that wrote the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A request an operator made through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRequest {
    /// Run the failed compensations again.
    Retry,
}

/// The saga log's record of one saga (the value of its `saga_log` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// Record format ([`FORMAT`]).
    pub format: u32,
    /// Saga id (UUID v7).
    pub id: String,
    /// Saga name.
    pub name: String,
    /// Definition version.
    pub version: u32,
    /// Where the saga is.
    pub state: SagaState,
    /// The saga data, as the last successful step left it.
    pub data: Value,
    /// The steps, in definition order.
    pub steps: Vec<StepRecord>,
    /// The error that made the saga compensate, then the one that needs attention.
    pub error: Option<String>,
    /// The node id of the orchestrator driving the saga.
    pub owner: String,
    /// Until when the owner's claim holds (ms).
    pub lease_until_ms: u64,
    /// When the saga started (ms).
    pub created_at_ms: u64,
    /// Last change (ms).
    pub updated_at_ms: u64,
    /// A pending operator request.
    #[serde(default)]
    pub request: Option<OperatorRequest>,
    /// What happened, oldest first (at most [`MAX_HISTORY`] entries).
    pub history: Vec<HistoryEntry>,
}

impl SagaRecord {
    /// Appends a history entry (dropping the oldest beyond [`MAX_HISTORY`]).
    pub(crate) fn note(&mut self, event: &str, step: Option<&str>, error: Option<&str>) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
        }
        self.history.push(HistoryEntry {
            at_ms: now_ms(),
            event: event.to_owned(),
            step: step.map(str::to_owned),
            error: error.map(str::to_owned),
            node: Some(self.owner.clone()),
        });
    }

    /// How long the saga ran (or has been running), in ms.
    pub fn elapsed_ms(&self) -> u64 {
        self.updated_at_ms.saturating_sub(self.created_at_ms)
    }

    fn decode(id: &str, bytes: &[u8]) -> Result<Self> {
        let record: SagaRecord =
            serde_json::from_slice(bytes).map_err(|e| SagaError::CorruptLog {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
        if record.format != FORMAT {
            return Err(SagaError::CorruptLog {
                id: id.to_owned(),
                reason: format!(
                    "record format {} is not the supported {FORMAT}",
                    record.format
                ),
            });
        }
        Ok(record)
    }
}

/// A record with the row version it was read or written at.
#[derive(Debug, Clone)]
pub(crate) struct Versioned {
    pub(crate) record: SagaRecord,
    pub(crate) version: u64,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Checks a saga id given from outside (admin API): a UUID's characters, bounded length.
pub(crate) fn validate_id(id: &str) -> Result<()> {
    let ok =
        !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(SagaError::Invalid(format!(
            "saga id {:?} is not a saga id (1 to 64 hex digits and dashes)",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// The saga log in a store.
#[derive(Debug, Clone)]
pub struct SagaLog {
    log: Table,
    index: Table,
}

impl SagaLog {
    /// The log in `store` (tables [`LOG_TABLE`] and [`INDEX_TABLE`]).
    pub fn new(store: &Store) -> Result<Self> {
        Ok(SagaLog {
            log: store.table(LOG_TABLE)?,
            index: store.table(INDEX_TABLE)?,
        })
    }

    /// Reads one saga's record.
    pub async fn get(&self, id: &str) -> Result<Option<SagaRecord>> {
        Ok(self.get_versioned(id).await?.map(|v| v.record))
    }

    pub(crate) async fn get_versioned(&self, id: &str) -> Result<Option<Versioned>> {
        match self.log.get(id, "").await? {
            None => Ok(None),
            Some(row) => Ok(Some(Versioned {
                record: SagaRecord::decode(id, &row.value)?,
                version: row.version,
            })),
        }
    }

    /// Writes a new saga: its index rows first (hints), then the record itself.
    pub(crate) async fn create(&self, record: &SagaRecord) -> Result<Versioned> {
        let name_partition = active_partition(&record.name);
        let batch = Batch::new()
            .push(
                self.index
                    .mutation_put(&name_partition, &record.id, Vec::new(), None)?,
            )
            .push(self.index.mutation_put(
                &state_partition(record.state),
                &record.id,
                record.name.clone().into_bytes(),
                None,
            )?);
        self.index.store().batch(batch).await?;
        let bytes = encode(record)?;
        match self
            .log
            .insert_if_absent(&record.id, "", bytes, None)
            .await?
        {
            CasOutcome::Applied { version } => Ok(Versioned {
                record: record.clone(),
                version,
            }),
            CasOutcome::Rejected { .. } => Err(SagaError::LostOwnership {
                id: record.id.clone(),
            }),
        }
    }

    /// Writes `record` if the row is still at `version`; `LostOwnership` otherwise.
    pub(crate) async fn update(&self, current: &mut Versioned, record: SagaRecord) -> Result<()> {
        let bytes = encode(&record)?;
        match self
            .log
            .update_if_version(&record.id, "", current.version, bytes, None)
            .await?
        {
            CasOutcome::Applied { version } => {
                current.version = version;
                current.record = record;
                Ok(())
            }
            CasOutcome::Rejected { .. } => Err(SagaError::LostOwnership {
                id: record.id.clone(),
            }),
        }
    }

    /// Brings the index rows of a saga in line with its record's state (`previous` is the
    /// state whose row to drop).
    pub(crate) async fn reindex(
        &self,
        record: &SagaRecord,
        previous: Option<SagaState>,
    ) -> Result<()> {
        let mut batch = Batch::new().push(self.index.mutation_put(
            &state_partition(record.state),
            &record.id,
            record.name.clone().into_bytes(),
            None,
        )?);
        let stale: Vec<SagaState> = match previous {
            Some(p) if p != record.state => vec![p],
            Some(_) => Vec::new(),
            None => SagaState::ALL
                .into_iter()
                .filter(|s| *s != record.state)
                .collect(),
        };
        for state in stale {
            batch.add(
                self.index
                    .mutation_delete(&state_partition(state), &record.id)?,
            );
        }
        let active = active_partition(&record.name);
        if record.state.is_active() {
            batch.add(
                self.index
                    .mutation_put(&active, &record.id, Vec::new(), None)?,
            );
        } else {
            batch.add(self.index.mutation_delete(&active, &record.id)?);
        }
        self.index.store().batch(batch).await?;
        Ok(())
    }

    /// Ids of sagas of `name` that an orchestrator must drive (index hints).
    pub(crate) async fn active_ids(&self, name: &str) -> Result<Vec<String>> {
        let rows = self.index.scan_all(&active_partition(name), None).await?;
        Ok(rows.into_iter().map(|r| r.clustering).collect())
    }

    pub(crate) async fn drop_active(&self, name: &str, id: &str) -> Result<()> {
        self.index.delete(&active_partition(name), id).await?;
        Ok(())
    }

    /// Sagas in `state`, oldest first, at most `limit`, after saga id `after`; the cursor
    /// of the next page. Index rows whose record is in another state are skipped.
    pub async fn list(
        &self,
        state: SagaState,
        limit: usize,
        after: Option<String>,
    ) -> Result<(Vec<SagaRecord>, Option<String>)> {
        if limit == 0 {
            return Ok((Vec::new(), after));
        }
        let mut found = Vec::new();
        let mut cursor = after;
        loop {
            let page = self
                .index
                .scan(
                    &state_partition(state),
                    ScanQuery {
                        prefix: None,
                        after: cursor.clone(),
                        limit,
                    },
                )
                .await?;
            let rows = page.rows.len();
            for (i, row) in page.rows.into_iter().enumerate() {
                cursor = Some(row.clustering.clone());
                if let Some(record) = self.get(&row.clustering).await?
                    && record.state == state
                {
                    found.push(record);
                    if found.len() == limit {
                        // More may follow when this page or the partition goes on.
                        let more = i + 1 < rows || page.next.is_some();
                        return Ok((found, cursor.filter(|_| more)));
                    }
                }
            }
            if page.next.is_none() {
                return Ok((found, None));
            }
        }
    }

    /// Records an operator's retry request for a saga in `needs_attention`: a request row
    /// (for the orchestrator owning `name` to find), then the record, conditionally.
    pub async fn request_retry(&self, id: &str) -> Result<SagaRecord> {
        let current = self
            .get_versioned(id)
            .await?
            .ok_or_else(|| SagaError::NotFound { id: id.to_owned() })?;
        let mut record = current.record.clone();
        if record.state != SagaState::NeedsAttention {
            return Err(SagaError::WrongState {
                id: id.to_owned(),
                state: record.state.to_string(),
                operation: "retry",
                expected: "needs_attention",
            });
        }
        self.index
            .put(
                &requests_partition(&record.name),
                id,
                now_ms().to_string().into_bytes(),
                None,
            )
            .await?;
        if record.request == Some(OperatorRequest::Retry) {
            return Ok(record);
        }
        record.request = Some(OperatorRequest::Retry);
        record.updated_at_ms = now_ms();
        record.note("retry.requested", None, None);
        let mut current = current;
        self.update(&mut current, record).await?;
        Ok(current.record)
    }

    /// Aborts a saga in `needs_attention`: it becomes `aborted` and is never touched again.
    pub async fn abort(&self, id: &str) -> Result<SagaRecord> {
        let mut current = self
            .get_versioned(id)
            .await?
            .ok_or_else(|| SagaError::NotFound { id: id.to_owned() })?;
        let mut record = current.record.clone();
        if record.state != SagaState::NeedsAttention {
            return Err(SagaError::WrongState {
                id: id.to_owned(),
                state: record.state.to_string(),
                operation: "abort",
                expected: "needs_attention",
            });
        }
        let previous = record.state;
        record.state = SagaState::Aborted;
        record.request = None;
        record.updated_at_ms = now_ms();
        record.note("aborted", None, None);
        self.update(&mut current, record).await?;
        self.reindex(&current.record, Some(previous)).await?;
        self.index
            .delete(&requests_partition(&current.record.name), id)
            .await?;
        Ok(current.record)
    }

    /// Pending retry requests for sagas of `name`: (saga id, request time in ms).
    pub(crate) async fn requests(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let rows: Vec<Row> = self.index.scan_all(&requests_partition(name), None).await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let at = std::str::from_utf8(&r.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                (r.clustering, at)
            })
            .collect())
    }

    pub(crate) async fn drop_request(&self, name: &str, id: &str) -> Result<()> {
        self.index.delete(&requests_partition(name), id).await?;
        Ok(())
    }
}

fn encode(record: &SagaRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|source| SagaError::Data {
        name: record.name.clone(),
        source,
    })
}

fn active_partition(name: &str) -> String {
    format!("active:{name}")
}

fn state_partition(state: SagaState) -> String {
    format!("state:{}", state.as_str())
}

fn requests_partition(name: &str) -> String {
    format!("requests:{name}")
}

/// A lease of `lease` from now, in ms since the epoch.
pub(crate) fn lease_until(lease: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_unknown_names_are_named() {
        for state in SagaState::ALL {
            assert_eq!(state.as_str().parse::<SagaState>().unwrap(), state);
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                Value::String(state.as_str().into())
            );
        }
        let err = "done".parse::<SagaState>().unwrap_err().to_string();
        assert!(
            err.contains("\"done\"") && err.contains("needs_attention"),
            "{err}"
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("0192f0c1-7c1a-7aa0-b1c2-0123456789ab").is_ok());
        for bad in ["", "../etc", "x y", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_record_of_another_format_is_refused_with_its_format() {
        let mut record = SagaRecord {
            format: 2,
            id: "a".into(),
            name: "n".into(),
            version: 1,
            state: SagaState::Running,
            data: Value::Null,
            steps: vec![],
            error: None,
            owner: "n1".into(),
            lease_until_ms: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            request: None,
            history: vec![],
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        let err = SagaRecord::decode("a", &bytes).unwrap_err().to_string();
        assert!(err.contains("format 2"), "{err}");
        record.format = FORMAT;
        for _ in 0..MAX_HISTORY + 5 {
            record.note("x", None, None);
        }
        assert_eq!(record.history.len(), MAX_HISTORY);
        assert!(SagaRecord::decode("a", b"{").is_err());
    }
}
