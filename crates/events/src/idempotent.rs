//! Effectively-once effects on top of at-least-once delivery: remember which event ids were
//! processed, in the store.

use std::time::Duration;

use trellis_store::{Batch, BatchOutcome, CasOutcome, Store, Table};
use uuid::Uuid;

use crate::error::{EventError, Result, validate_name};

/// What [`Idempotency::apply`] and [`Idempotency::run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    /// First time this event id was seen: the effects were applied.
    Applied,
    /// The event id was processed before: nothing was done.
    Duplicate,
}

/// Deduplicates events by id, in the store's `processed` table (partition
/// `{scope}/{event id}`), each mark kept for a TTL.
///
/// The TTL must be longer than redeliveries can lag: a week by default, the embedded log's
/// retention.
///
/// - [`apply`](Idempotency::apply) is exactly once for effects that are store writes: the
///   writes and the mark commit in one batch, so either both happen or neither does.
/// - [`run`](Idempotency::run) is for effects elsewhere (an e-mail, an HTTP call): the mark is
///   written after the effect succeeded, so a crash between the two repeats the effect.
///
/// On Cassandra a batch with a condition must stay in one partition: use
/// [`apply`](Idempotency::apply) there only when the effects and the mark can share one.
#[derive(Debug, Clone)]
pub struct Idempotency {
    table: Table,
    scope: String,
    ttl: Duration,
}

impl Idempotency {
    /// Marks for `scope` (usually the consumer group) in `store`, kept 7 days.
    pub fn new(store: &Store, scope: &str) -> Result<Self> {
        validate_name("idempotency scope", scope)?;
        Ok(Idempotency {
            table: store.table("processed")?,
            scope: scope.to_owned(),
            ttl: Duration::from_secs(7 * 24 * 3600),
        })
    }

    /// Sets how long a mark is kept. Defaults to 7 days.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    fn partition(&self, id: Uuid) -> String {
        format!("{}/{id}", self.scope)
    }

    /// Whether `id` was marked as processed.
    pub async fn is_processed(&self, id: Uuid) -> Result<bool> {
        Ok(self.table.get(&self.partition(id), "").await?.is_some())
    }

    /// Marks `id` processed; false when it already was.
    pub async fn mark(&self, id: Uuid) -> Result<bool> {
        let outcome = self
            .table
            .insert_if_absent(&self.partition(id), "", Vec::new(), Some(self.ttl))
            .await?;
        Ok(matches!(outcome, CasOutcome::Applied { .. }))
    }

    /// Applies `effects` (store writes) and marks `id`, atomically, unless `id` was marked
    /// before. Also fails nothing when a concurrent consumer won: that one applied them.
    pub async fn apply(&self, id: Uuid, mut effects: Batch) -> Result<Dedup> {
        let mark = self.table.mutation_insert_if_absent(
            &self.partition(id),
            "",
            Vec::new(),
            Some(self.ttl),
        )?;
        effects.add(mark);
        let mark_index = effects.len() - 1;
        match self.table.store().batch(effects).await? {
            BatchOutcome::Applied { .. } => Ok(Dedup::Applied),
            BatchOutcome::Rejected { index, .. } if index == mark_index => Ok(Dedup::Duplicate),
            BatchOutcome::Rejected { index, current } => {
                Err(EventError::Store(trellis_store::StoreError::Conflict {
                    table: "effects".to_owned(),
                    partition: current
                        .as_ref()
                        .map(|r| r.partition.clone())
                        .unwrap_or_default(),
                    clustering: current.map(|r| r.clustering).unwrap_or_default(),
                    reason: format!(
                        "condition of mutation {index} of the effects failed; nothing was applied"
                    ),
                }))
            }
        }
    }

    /// Runs `effect` unless `id` was processed, then marks it. At least once if the process
    /// dies between the effect and the mark; once otherwise.
    pub async fn run<F, Fut, E>(&self, id: Uuid, effect: F) -> Result<Result<Dedup, E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        if self.is_processed(id).await? {
            return Ok(Ok(Dedup::Duplicate));
        }
        if let Err(e) = effect().await {
            return Ok(Err(e));
        }
        self.mark(id).await?;
        Ok(Ok(Dedup::Applied))
    }
}
