//! The transactional outbox: a model write and the events it causes commit in one store
//! batch; a relay publishes the events afterwards.
//!
//! - [`Outbox::stage`] adds the event to the caller's [`Batch`] as a row of the `outbox`
//!   table. If the batch is rejected or fails, there is no row, so no event. If it commits,
//!   the row is as durable as the model write.
//! - The [`Relay`] publishes outbox rows in order and deletes them after the publish
//!   succeeded. A crash between the two publishes the event again on restart, with the same
//!   id (consumers deduplicate with [`Idempotency`](crate::Idempotency)): nothing is lost.
//! - Relays in several processes take turns through a lease row, so events leave in order.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trellis_store::{Batch, CasOutcome, ScanQuery, Store, Table};
use trellis_tracing::DistributedTracer;
use uuid::Uuid;

use crate::bus::{EventBus, producer_span};
use crate::envelope::{Envelope, Message};
use crate::error::{EventError, Result};

const PENDING: &str = "pending";
const LEASE_PARTITION: &str = "relay";

/// Stages events in the `outbox` table of a store.
#[derive(Debug, Clone)]
pub struct Outbox {
    table: Table,
    source: String,
    tracer: Option<DistributedTracer>,
}

impl Outbox {
    /// The outbox of `store`; staged events get source `trellis`.
    pub fn new(store: &Store) -> Result<Self> {
        Ok(Outbox {
            table: store.table("outbox")?,
            source: "trellis".to_owned(),
            tracer: None,
        })
    }

    /// Sets the CloudEvents `source` of staged events.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Records a producer span when an event is staged (child of the current OpenTelemetry
    /// context) and stores its context in the event headers, so that the relay, however
    /// late, publishes the event with the context captured at write time and consumers
    /// join that trace. Defaults to none.
    #[must_use]
    pub fn tracer(mut self, tracer: DistributedTracer) -> Self {
        self.tracer = tracer.is_enabled().then_some(tracer);
        self
    }

    /// Adds `message` for `topic` to `batch`; returns the event id. Nothing is published
    /// unless the batch commits.
    pub fn stage<T: serde::Serialize>(
        &self,
        batch: &mut Batch,
        topic: &str,
        message: Message<T>,
    ) -> Result<Uuid> {
        let mut envelope = message.into_envelope(topic, &self.source)?;
        if let Some(tracer) = &self.tracer {
            let span = producer_span(tracer, &mut envelope);
            span.set_tag("trellis.outbox", true);
        }
        // UUID v7 text sorts by creation time: the relay publishes in staging order.
        let mutation = self.table.mutation_put(
            PENDING,
            &envelope.id.to_string(),
            envelope.to_bytes()?,
            None,
        )?;
        batch.add(mutation);
        Ok(envelope.id)
    }

    /// Events staged and not yet relayed, oldest first (at most `limit`).
    pub async fn pending(&self, limit: usize) -> Result<Vec<Envelope>> {
        let page = self
            .table
            .scan(
                PENDING,
                ScanQuery {
                    limit: limit.max(1),
                    ..ScanQuery::default()
                },
            )
            .await?;
        page.rows
            .iter()
            .map(|row| Envelope::from_bytes(&row.value))
            .collect()
    }

    /// Publishes every pending event to `bus` and deletes it; returns how many were relayed.
    /// Without a lease: call it from one place at a time, or use [`Relay`].
    pub async fn relay_once(&self, bus: &EventBus) -> Result<usize> {
        let mut total = 0;
        loop {
            let page = self
                .table
                .scan(
                    PENDING,
                    ScanQuery {
                        limit: 500,
                        ..ScanQuery::default()
                    },
                )
                .await?;
            if page.rows.is_empty() {
                return Ok(total);
            }
            let envelopes = page
                .rows
                .iter()
                .map(|row| {
                    Envelope::from_bytes(&row.value).map_err(|e| match e {
                        EventError::Codec { source, .. } => EventError::Codec {
                            what: format!("outbox row {}", row.clustering),
                            source,
                        },
                        other => other,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            bus.publish_envelopes(envelopes).await?;
            let mut delete = Batch::new();
            for row in &page.rows {
                delete.add(self.table.mutation_delete(PENDING, &row.clustering)?);
            }
            self.table.store().batch(delete).await?;
            total += page.rows.len();
        }
    }
}

/// Options of a [`Relay`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayOptions {
    /// How often the relay checks the outbox for new rows (one indexed read). Defaults to
    /// 10 ms.
    pub poll_interval: Duration,
    /// How long the relay lease lasts without renewal (another process takes over after).
    /// Defaults to 10 s.
    pub lease_ttl: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            poll_interval: Duration::from_millis(10),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
}

/// A background task that relays the outbox to a bus. Stop it with [`Relay::shutdown`];
/// dropping it stops it too.
#[derive(Debug)]
pub struct Relay {
    stop: Arc<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying `outbox` to `bus`. Rows already there (a crash before they were
    /// relayed) go first.
    pub fn spawn(outbox: Outbox, bus: EventBus, options: RelayOptions) -> Relay {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let holder = Uuid::now_v7().to_string();
            let mut lease: Option<u64> = None;
            let mut marker = None;
            let mut first = true;
            let mut renewed = tokio::time::Instant::now();
            loop {
                if !first {
                    tokio::select! {
                        () = tokio::time::sleep(options.poll_interval) => {}
                        _ = stopped.wait_for(|s| *s) => break,
                    }
                }
                let renew_due = renewed.elapsed() >= options.lease_ttl / 3;
                let changed = match outbox.table.change_marker().await {
                    Ok(now) => {
                        let changed = now != marker || now.is_none();
                        marker = now;
                        changed
                    }
                    Err(_) => true,
                };
                if !(first || changed || renew_due || lease.is_none()) {
                    continue;
                }
                first = false;
                if lease.is_none() || renew_due {
                    // Renewing writes the table; only when due, or the marker never rests.
                    match take_lease(&outbox.table, &holder, lease, options.lease_ttl).await {
                        Ok(Some(version)) => {
                            lease = Some(version);
                            renewed = tokio::time::Instant::now();
                        }
                        Ok(None) => {
                            lease = None;
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox relay lease failed");
                            lease = None;
                            continue;
                        }
                    }
                }
                if let Err(e) = outbox.relay_once(&bus).await {
                    tracing::warn!(error = %e, "outbox relay failed; retrying");
                    // Re-read on the next tick even if nothing changed.
                    marker = None;
                }
            }
            if let Some(version) = lease {
                // Let another process take over at once.
                let _ = outbox
                    .table
                    .update_if_version(
                        LEASE_PARTITION,
                        "",
                        version,
                        serde_json::to_vec(&Lease {
                            holder: String::new(),
                        })
                        .unwrap_or_default(),
                        Some(Duration::from_millis(1)),
                    )
                    .await;
            }
        });
        Relay {
            stop: Arc::new(stop),
            task: Some(task),
        }
    }

    /// Stops the relay after the pass in progress.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Takes or renews the relay lease; `Some(version)` while held.
async fn take_lease(
    table: &Table,
    holder: &str,
    held: Option<u64>,
    ttl: Duration,
) -> Result<Option<u64>> {
    let value = serde_json::to_vec(&Lease {
        holder: holder.to_owned(),
    })
    .map_err(|e| EventError::codec("relay lease", e))?;
    let outcome = match held {
        Some(version) => {
            table
                .update_if_version(LEASE_PARTITION, "", version, value, Some(ttl))
                .await?
        }
        None => match table.get(LEASE_PARTITION, "").await? {
            None => {
                table
                    .insert_if_absent(LEASE_PARTITION, "", value, Some(ttl))
                    .await?
            }
            Some(row) => {
                let current: Lease = serde_json::from_slice(&row.value)
                    .map_err(|e| EventError::codec("relay lease", e))?;
                if !current.holder.is_empty() && current.holder != holder {
                    return Ok(None);
                }
                table
                    .update_if_version(LEASE_PARTITION, "", row.version, value, Some(ttl))
                    .await?
            }
        },
    };
    Ok(match outcome {
        CasOutcome::Applied { version } => Some(version),
        CasOutcome::Rejected { .. } => None,
    })
}
