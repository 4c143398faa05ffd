//! The embedded transport: a durable, partitioned log inside the [`Store`], so it lives in
//! the same SQLite file as everything else (and on Cassandra when the store moves there).
//!
//! Layout (every table is an ordinary store table):
//!
//! | table | partition key | clustering key | value |
//! |---|---|---|---|
//! | `event_topics` | topic | `""` | `{"partitions": n}`, written once with insert-if-absent |
//! | `event_log` | `{topic}/{partition}` | `head` | `{"next": n}`, the next offset; its row version is the append lock |
//! | `event_log` | `{topic}/{partition}` | `o/{offset:020}` | the envelope JSON |
//! | `event_groups` | `{group}/{topic}` | `owner/{partition:05}` | `{"member", "released"}` with a TTL: the partition lease |
//! | `event_groups` | `{group}/{topic}` | `offset/{partition:05}` | `{"next": n}`: the committed offset |
//! | `event_members` | `{group}/{topic}` | member id | heartbeat row with a TTL |
//! | `event_topics` | `/topics` | topic | `{"partitions": n}`: the topic index, for listing |
//! | `event_groups` | `/groups/{topic}` | group | `{}`: the group index of a topic, for listing |
//!
//! Names cannot contain `/`, so the index partitions never meet a topic or group. The
//! indexes are written after the rows they point to (a topic when this process first sees
//! it, a group when it joins or is reset), so topics and groups made before the indexes
//! existed are listed again as soon as any process uses them.
//!
//! - **Append** = one conditional batch inside one partition of `event_log`: update the head
//!   row if its version is still the one read, and put the new records at the offsets after
//!   it. A writer from another process that got there first makes the batch fail as a whole;
//!   the writer re-reads the head and tries again. Within a process, one task at a time
//!   writes a partition, with the head cached, and takes every append queued meanwhile into
//!   the same store batch (group commit): one store write serves many concurrent publishers.
//! - **Commit** = one conditional batch inside one partition of `event_groups`: renew the
//!   lease if its version is still this member's, and put the offset. A member whose lease ran
//!   out and was taken over is *fenced*: its commit fails and the new owner re-delivers.
//! - **Membership**: each member heartbeats its row; the live members, sorted, share the
//!   partitions round robin (partition `p` goes to member `p mod n`). A member claims a
//!   partition whose lease is absent (expired) or released; it is told to give back the ones
//!   no longer its own, and does so after finishing the event in hand.
//! - **Noticing new records**: one task per transport polls the log table's
//!   [`change_marker`](trellis_store::Table::change_marker) every `poll_interval` (a single
//!   indexed read) while someone waits for records; appends made by this process wake the
//!   readers at once.
//!
//! Atomicity relies on the store's batches being atomic and isolated; on SQLite they are
//! transactions. Every conditional batch stays within one partition of one table, which is
//! what Cassandra's lightweight transactions allow.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use trellis_store::{Batch, BatchOutcome, CasOutcome, ScanQuery, Store, Table};

use crate::envelope::Envelope;
use crate::error::{EventError, Result, validate_name};
use crate::transport::{
    BoxFuture, Fetch, JoinOptions, Membership, OutRecord, PartitionClaim, Record, StartFrom,
    Transport,
};

const HEAD: &str = "head";
/// Partition of `event_topics` listing every topic.
const TOPIC_INDEX: &str = "/topics";
const RECORD_PREFIX: &str = "o/";
/// Records per store batch when appending.
const APPEND_CHUNK: usize = 2_000;
/// How often an append retries after losing the head race to another process.
const MAX_APPEND_ATTEMPTS: u32 = 100;
/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1_024;

/// Tuning of the embedded transport.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbeddedOptions {
    /// How often a waiting consumer checks the store for records appended by other
    /// processes (records appended by this process wake it at once). Defaults to 2 ms: one
    /// indexed read per interval per transport, and at most that much added latency.
    pub poll_interval: Duration,
    /// How long records are kept (a TTL on every record row); `None` keeps them until the
    /// table is cleaned by hand. Defaults to 7 days, as Kafka's `retention.ms`.
    pub retention: Option<Duration>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            poll_interval: Duration::from_millis(2),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

impl EmbeddedOptions {
    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets [`retention`](Self::retention).
    #[must_use]
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    fn validate(self) -> Result<Self> {
        if self.poll_interval.is_zero() || self.poll_interval > Duration::from_secs(60) {
            return Err(EventError::InvalidOption {
                option: "poll_interval",
                reason: format!("{:?} must be between 1µs and 60s", self.poll_interval),
            });
        }
        if self.retention.is_some_and(|r| r < Duration::from_secs(1)) {
            return Err(EventError::InvalidOption {
                option: "retention",
                reason: "must be at least 1s".to_owned(),
            });
        }
        Ok(self)
    }
}

/// The embedded transport. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EmbeddedTransport {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    next: u64,
    /// Row version of the head row; `None` when it does not exist yet.
    version: Option<u64>,
}

/// Appends waiting for a partition's writer, with where to send their first offset.
type Waiting = Vec<(Vec<Vec<u8>>, tokio::sync::oneshot::Sender<Result<u64>>)>;

/// One partition's append state in this process.
#[derive(Default)]
struct PartitionWriter {
    /// The cached head; holding this lock makes a task the partition's writer.
    head: tokio::sync::Mutex<Option<Head>>,
    /// Appends queued while another task writes: the next writer takes them all in one
    /// store batch (group commit).
    waiting: Mutex<Waiting>,
}

type HeadSlot = Arc<PartitionWriter>;

struct Inner {
    log: Table,
    topics: Table,
    groups: Table,
    members: Table,
    options: EmbeddedOptions,
    heads: Mutex<HashMap<(String, u32), HeadSlot>>,
    partition_counts: Mutex<HashMap<String, u32>>,
    /// Groups this process wrote into the group index, as `(topic, group)`.
    indexed_groups: Mutex<BTreeSet<(String, String)>>,
    /// Bumped whenever the log may have new records.
    wake: watch::Sender<u64>,
    poller: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedTransport")
            .field("store", self.log.store())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.poller).take() {
            task.abort();
        }
    }
}

#[derive(Serialize, Deserialize)]
struct TopicMeta {
    partitions: u32,
}

#[derive(Serialize, Deserialize)]
struct Next {
    next: u64,
}

#[derive(Serialize, Deserialize, Clone)]
struct Owner {
    member: String,
    #[serde(default)]
    released: bool,
}

#[derive(Serialize, Deserialize)]
struct MemberRow {
    member: String,
}

fn log_partition(topic: &str, partition: u32) -> String {
    format!("{topic}/{partition}")
}

fn offset_key(offset: u64) -> String {
    format!("{RECORD_PREFIX}{offset:020}")
}

fn parse_offset_key(key: &str) -> Option<u64> {
    key.strip_prefix(RECORD_PREFIX)?.parse().ok()
}

fn owner_key(partition: u32) -> String {
    format!("owner/{partition:05}")
}

fn committed_key(partition: u32) -> String {
    format!("offset/{partition:05}")
}

fn group_partition(group: &str, topic: &str) -> String {
    format!("{group}/{topic}")
}

/// Partition of `event_groups` listing the groups of `topic`.
fn group_index(topic: &str) -> String {
    format!("/groups/{topic}")
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| EventError::codec(what.to_owned(), e))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EmbeddedTransport {
    /// The log inside `store`, with default options.
    pub fn new(store: &Store) -> Result<Self> {
        Self::with_options(store, EmbeddedOptions::default())
    }

    /// The log inside `store`.
    pub fn with_options(store: &Store, options: EmbeddedOptions) -> Result<Self> {
        let options = options.validate()?;
        let (wake, _) = watch::channel(0);
        Ok(EmbeddedTransport {
            inner: Arc::new(Inner {
                log: store.table("event_log")?,
                topics: store.table("event_topics")?,
                groups: store.table("event_groups")?,
                members: store.table("event_members")?,
                options,
                heads: Mutex::new(HashMap::new()),
                partition_counts: Mutex::new(HashMap::new()),
                indexed_groups: Mutex::new(BTreeSet::new()),
                wake,
                poller: Mutex::new(None),
            }),
        })
    }

    /// The options in force.
    pub fn options(&self) -> &EmbeddedOptions {
        &self.inner.options
    }

    /// Reads up to `max` records of one partition from `offset` on, without a group (for
    /// tools and tests).
    pub async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Record>> {
        self.inner.read(topic, partition, offset, max).await
    }
}

impl Inner {
    fn head_slot(&self, topic: &str, partition: u32) -> HeadSlot {
        lock(&self.heads)
            .entry((topic.to_owned(), partition))
            .or_default()
            .clone()
    }

    async fn read_head(&self, topic: &str, partition: u32) -> Result<Head> {
        let pk = log_partition(topic, partition);
        Ok(match self.log.get(&pk, HEAD).await? {
            Some(row) => Head {
                next: from_json::<Next>("log head", &row.value)?.next,
                version: Some(row.version),
            },
            None => Head {
                next: 0,
                version: None,
            },
        })
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        if let Some(n) = lock(&self.partition_counts).get(topic) {
            return Ok(Some(*n));
        }
        let Some(row) = self.topics.get(topic, "").await? else {
            return Ok(None);
        };
        let n = from_json::<TopicMeta>("topic metadata", &row.value)?.partitions;
        // Once per topic and process: topics made before the index existed get listed.
        self.index_topic(topic, n).await?;
        lock(&self.partition_counts).insert(topic.to_owned(), n);
        Ok(Some(n))
    }

    async fn index_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        self.topics
            .put(TOPIC_INDEX, topic, to_json(&TopicMeta { partitions }), None)
            .await?;
        Ok(())
    }

    /// Records `group` in the group index of `topic` (once per process).
    async fn index_group(&self, topic: &str, group: &str) -> Result<()> {
        let key = (topic.to_owned(), group.to_owned());
        if lock(&self.indexed_groups).contains(&key) {
            return Ok(());
        }
        self.groups
            .put(&group_index(topic), group, b"{}".to_vec(), None)
            .await?;
        lock(&self.indexed_groups).insert(key);
        Ok(())
    }

    /// Every topic in the index, sorted.
    async fn list_topics(&self) -> Result<Vec<String>> {
        Ok(self
            .topics
            .scan_all(TOPIC_INDEX, None)
            .await?
            .into_iter()
            .map(|row| row.clustering)
            .collect())
    }

    /// The groups of `topic` in the index, sorted.
    async fn list_groups(&self, topic: &str) -> Result<Vec<String>> {
        if self.partitions(topic).await?.is_none() {
            return Err(EventError::UnknownTopic(topic.to_owned()));
        }
        Ok(self
            .groups
            .scan_all(&group_index(topic), None)
            .await?
            .into_iter()
            .map(|row| row.clustering)
            .collect())
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32> {
        validate_name("topic", topic)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(EventError::InvalidOption {
                option: "partitions",
                reason: format!("{partitions} must be between 1 and {MAX_PARTITIONS}"),
            });
        }
        if let Some(n) = self.partitions(topic).await? {
            return Ok(n);
        }
        let meta = to_json(&TopicMeta { partitions });
        match self.topics.insert_if_absent(topic, "", meta, None).await? {
            CasOutcome::Applied { .. } => {
                self.index_topic(topic, partitions).await?;
                lock(&self.partition_counts).insert(topic.to_owned(), partitions);
                Ok(partitions)
            }
            CasOutcome::Rejected { .. } => self
                .partitions(topic)
                .await?
                .ok_or_else(|| EventError::UnknownTopic(topic.to_owned())),
        }
    }

    async fn append(&self, topic: &str, records: Vec<OutRecord>) -> Result<Vec<u64>> {
        let partitions = self
            .partitions(topic)
            .await?
            .ok_or_else(|| EventError::UnknownTopic(topic.to_owned()))?;
        let mut offsets = vec![0u64; records.len()];
        // Group by partition, keeping order and each record's input index.
        let mut by_partition: HashMap<u32, Vec<(usize, Vec<u8>)>> = HashMap::new();
        for (index, record) in records.into_iter().enumerate() {
            if record.partition >= partitions {
                return Err(EventError::InvalidOption {
                    option: "partition",
                    reason: format!(
                        "{} is out of range: topic {topic} has {partitions} partitions",
                        record.partition
                    ),
                });
            }
            by_partition
                .entry(record.partition)
                .or_default()
                .push((index, record.value));
        }
        for (partition, items) in by_partition {
            let (indexes, values): (Vec<usize>, Vec<Vec<u8>>) = items.into_iter().unzip();
            let first = self.append_partition(topic, partition, values).await?;
            for (i, index) in indexes.into_iter().enumerate() {
                offsets[index] = first + i as u64;
            }
        }
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
        Ok(offsets)
    }

    /// Appends `values` to one partition; returns the offset of the first.
    ///
    /// Group commit: the append is queued; the task that holds the partition's writer lock
    /// drains the queue and writes everything queued in as few store batches as it can. So
    /// concurrent one-by-one publishers share store writes instead of taking turns.
    async fn append_partition(
        &self,
        topic: &str,
        partition: u32,
        values: Vec<Vec<u8>>,
    ) -> Result<u64> {
        let slot = self.head_slot(topic, partition);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        lock(&slot.waiting).push((values, sender));
        {
            let mut head = slot.head.lock().await;
            // Our append is either still queued, or a previous writer took and answered it.
            let waiting = std::mem::take(&mut *lock(&slot.waiting));
            let mut group: Vec<(usize, tokio::sync::oneshot::Sender<Result<u64>>)> = Vec::new();
            let mut values: Vec<Vec<u8>> = Vec::new();
            for (vs, sender) in waiting {
                // Keep one store batch within APPEND_CHUNK records where possible.
                if !values.is_empty() && values.len() + vs.len() > APPEND_CHUNK {
                    self.write_group(
                        &mut head,
                        topic,
                        partition,
                        std::mem::take(&mut values),
                        std::mem::take(&mut group),
                    )
                    .await;
                }
                group.push((vs.len(), sender));
                values.extend(vs);
            }
            if !group.is_empty() {
                self.write_group(&mut head, topic, partition, values, group)
                    .await;
            }
        }
        receiver.await.map_err(|_| EventError::Closed)?
    }

    /// Writes one group's values (in chunks) and answers each member of the group.
    async fn write_group(
        &self,
        head: &mut Option<Head>,
        topic: &str,
        partition: u32,
        values: Vec<Vec<u8>>,
        group: Vec<(usize, tokio::sync::oneshot::Sender<Result<u64>>)>,
    ) {
        let mut first = None;
        let mut failure = None;
        for chunk in values.chunks(APPEND_CHUNK) {
            match self.append_chunk(head, topic, partition, chunk).await {
                Ok(offset) => {
                    first.get_or_insert(offset);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut next = first.unwrap_or(0);
        for (count, sender) in group {
            let answer = match &failure {
                None => Ok(next),
                Some(e) => Err(EventError::Transport {
                    transport: "embedded",
                    message: format!("append to {topic}/{partition} failed: {e}"),
                    retryable: e.is_retryable(),
                    source: None,
                }),
            };
            next += count as u64;
            // The publisher may have gone away (cancelled); its records are written anyway.
            let _ = sender.send(answer);
        }
    }

    /// Appends one chunk atomically; returns the offset of its first record.
    async fn append_chunk(
        &self,
        cached: &mut Option<Head>,
        topic: &str,
        partition: u32,
        chunk: &[Vec<u8>],
    ) -> Result<u64> {
        let pk = log_partition(topic, partition);
        for _ in 0..MAX_APPEND_ATTEMPTS {
            let head = match *cached {
                Some(head) => head,
                None => self.read_head(topic, partition).await?,
            };
            let next = head.next + chunk.len() as u64;
            let head_value = to_json(&Next { next });
            let mut batch = Batch::new();
            batch.add(match head.version {
                Some(v) => self
                    .log
                    .mutation_update_if_version(&pk, HEAD, v, head_value, None)?,
                None => self
                    .log
                    .mutation_insert_if_absent(&pk, HEAD, head_value, None)?,
            });
            for (i, value) in chunk.iter().enumerate() {
                batch.add(self.log.mutation_put(
                    &pk,
                    &offset_key(head.next + i as u64),
                    value.clone(),
                    self.options.retention,
                )?);
            }
            match self.log.store().batch(batch).await {
                Ok(BatchOutcome::Applied { versions }) => {
                    *cached = Some(Head {
                        next,
                        version: versions.first().copied(),
                    });
                    return Ok(head.next);
                }
                Ok(BatchOutcome::Rejected { .. }) => *cached = None,
                Err(e) => {
                    *cached = None;
                    return Err(e.into());
                }
            }
        }
        Err(EventError::Contention {
            topic: topic.to_owned(),
            partition,
            attempts: MAX_APPEND_ATTEMPTS,
        })
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Record>> {
        let page = self
            .log
            .scan(
                &log_partition(topic, partition),
                ScanQuery {
                    prefix: Some(RECORD_PREFIX.to_owned()),
                    after: offset.checked_sub(1).map(offset_key),
                    limit: max.max(1),
                },
            )
            .await?;
        Ok(page
            .rows
            .into_iter()
            .filter_map(|row| {
                Some(Record {
                    partition,
                    offset: parse_offset_key(&row.clustering)?,
                    value: row.value,
                })
            })
            .collect())
    }

    async fn first_offset(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        Ok(self
            .read(topic, partition, 0, 1)
            .await?
            .first()
            .map(|r| r.offset))
    }

    /// The offset a group starts at in `partition` for `start`.
    async fn resolve(&self, topic: &str, partition: u32, start: StartFrom) -> Result<u64> {
        let end = self.read_head(topic, partition).await?.next;
        Ok(match start {
            StartFrom::Latest => end,
            StartFrom::Earliest => self.first_offset(topic, partition).await?.unwrap_or(end),
            StartFrom::Offset(n) => n.min(end),
            StartFrom::Time(t) => {
                // Binary search for the first record produced at or after `t`; expired
                // records count as older.
                let mut low = self.first_offset(topic, partition).await?.unwrap_or(end);
                let mut high = end;
                let pk = log_partition(topic, partition);
                while low < high {
                    let mid = low + (high - low) / 2;
                    let older = match self.log.get(&pk, &offset_key(mid)).await? {
                        Some(row) => Envelope::from_bytes(&row.value).map_or(true, |e| e.time < t),
                        None => true,
                    };
                    if older {
                        low = mid + 1;
                    } else {
                        high = mid;
                    }
                }
                low
            }
        })
    }

    /// Starts the change poller if it is not running.
    fn ensure_poller(self: &Arc<Self>) {
        let mut poller = lock(&self.poller);
        if poller.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(self);
        let interval = self.options.poll_interval;
        let log = self.log.clone();
        *poller = Some(tokio::spawn(async move {
            let mut seen: Option<Option<u64>> = None;
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.wake.receiver_count() == 0 {
                    // Nobody waits: check again later without touching the store.
                    seen = None;
                    continue;
                }
                match log.change_marker().await {
                    Ok(marker) => {
                        // `None` (the backend cannot tell) wakes readers on every tick.
                        if marker.is_none() || seen.is_some_and(|s| s != marker) {
                            inner.wake.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        seen = Some(marker);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event log change poll failed");
                        inner.wake.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
            }
        }));
    }
}

impl Transport for EmbeddedTransport {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(self.inner.list_topics())
    }

    fn groups<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(self.inner.list_groups(topic))
    }

    fn ensure_topic<'a>(&'a self, topic: &'a str, partitions: u32) -> BoxFuture<'a, Result<u32>> {
        Box::pin(self.inner.ensure_topic(topic, partitions))
    }

    fn partition_count<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Option<u32>>> {
        Box::pin(self.inner.partitions(topic))
    }

    fn append<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<OutRecord>,
    ) -> BoxFuture<'a, Result<Vec<u64>>> {
        Box::pin(self.inner.append(topic, records))
    }

    fn join<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: JoinOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Membership>>> {
        Box::pin(async move {
            validate_name("group", group)?;
            if options.session_timeout < Duration::from_millis(100) {
                return Err(EventError::InvalidOption {
                    option: "session_timeout",
                    reason: format!("{:?} is too short; at least 100ms", options.session_timeout),
                });
            }
            let partitions = self.inner.ensure_topic(topic, options.partitions).await?;
            self.inner.index_group(topic, group).await?;
            self.inner.ensure_poller();
            let ctx = Arc::new(GroupCtx {
                inner: self.inner.clone(),
                topic: topic.to_owned(),
                group: group.to_owned(),
                pk: group_partition(group, topic),
                partitions,
                options,
                held: Mutex::new(HashMap::new()),
                nudge: Notify::new(),
            });
            ctx.heartbeat().await?;
            let (claims_tx, claims_rx) = mpsc::unbounded_channel();
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(member_loop(ctx.clone(), claims_tx, stop_rx));
            Ok(Box::new(EmbeddedMembership {
                ctx,
                claims: claims_rx,
                stop: stop_tx,
                task: Some(task),
            }) as Box<dyn Membership>)
        })
    }

    fn reset_group<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        to: StartFrom,
    ) -> BoxFuture<'a, Result<Vec<u64>>> {
        Box::pin(async move {
            validate_name("group", group)?;
            let partitions = self
                .inner
                .partitions(topic)
                .await?
                .ok_or_else(|| EventError::UnknownTopic(topic.to_owned()))?;
            let pk = group_partition(group, topic);
            let mut holders = BTreeSet::new();
            for p in 0..partitions {
                if let Some(row) = self.inner.groups.get(&pk, &owner_key(p)).await? {
                    let owner: Owner = from_json("partition owner", &row.value)?;
                    if !owner.released {
                        holders.insert(owner.member);
                    }
                }
            }
            if holders.is_empty() {
                self.inner.index_group(topic, group).await?;
            } else {
                return Err(EventError::GroupActive {
                    topic: topic.to_owned(),
                    group: group.to_owned(),
                    members: holders.into_iter().collect::<Vec<_>>().join(", "),
                });
            }
            let mut result = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                let next = self.inner.resolve(topic, p, to).await?;
                self.inner
                    .groups
                    .put(&pk, &committed_key(p), to_json(&Next { next }), None)
                    .await?;
                result.push(next);
            }
            Ok(result)
        })
    }

    fn committed<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>>> {
        Box::pin(async move {
            let partitions = self
                .inner
                .partitions(topic)
                .await?
                .ok_or_else(|| EventError::UnknownTopic(topic.to_owned()))?;
            let pk = group_partition(group, topic);
            let mut result = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                result.push(match self.inner.groups.get(&pk, &committed_key(p)).await? {
                    Some(row) => Some(from_json::<Next>("committed offset", &row.value)?.next),
                    None => None,
                });
            }
            Ok(result)
        })
    }

    fn end_offsets<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Vec<u64>>> {
        Box::pin(async move {
            let partitions = self
                .inner
                .partitions(topic)
                .await?
                .ok_or_else(|| EventError::UnknownTopic(topic.to_owned()))?;
            let mut result = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                result.push(self.inner.read_head(topic, p).await?.next);
            }
            Ok(result)
        })
    }
}

/// One member's view of its group.
struct GroupCtx {
    inner: Arc<Inner>,
    topic: String,
    group: String,
    /// Partition key of this group's rows.
    pk: String,
    partitions: u32,
    options: JoinOptions,
    held: Mutex<HashMap<u32, Arc<ClaimState>>>,
    /// Wakes the member loop (a claim was released).
    nudge: Notify,
}

/// Shared between a claim's worker and the member loop.
struct ClaimState {
    partition: u32,
    /// Version of our lease row; `None` once lost or released.
    lease: tokio::sync::Mutex<Option<u64>>,
    revoked: AtomicBool,
    revoke: Notify,
    released: AtomicBool,
}

impl ClaimState {
    fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        self.revoke.notify_one();
    }
}

impl GroupCtx {
    fn owner_value(&self, released: bool) -> Vec<u8> {
        to_json(&Owner {
            member: self.options.member.clone(),
            released,
        })
    }

    async fn heartbeat(&self) -> Result<()> {
        let row = to_json(&MemberRow {
            member: self.options.member.clone(),
        });
        self.inner
            .members
            .put(
                &self.pk,
                &self.options.member,
                row,
                Some(self.options.session_timeout),
            )
            .await?;
        Ok(())
    }

    fn fenced(&self, partition: u32, reason: String) -> EventError {
        EventError::Fenced {
            topic: self.topic.clone(),
            group: self.group.clone(),
            partition,
            reason,
        }
    }

    /// Renews the lease of `state`; marks it lost when another member holds it now.
    async fn renew(&self, state: &ClaimState) -> Result<()> {
        let mut lease = state.lease.lock().await;
        let Some(version) = *lease else {
            return Ok(());
        };
        let outcome = self
            .inner
            .groups
            .update_if_version(
                &self.pk,
                &owner_key(state.partition),
                version,
                self.owner_value(false),
                Some(self.options.session_timeout),
            )
            .await?;
        match outcome {
            CasOutcome::Applied { version } => *lease = Some(version),
            CasOutcome::Rejected { .. } => {
                tracing::warn!(topic = %self.topic, group = %self.group, partition = state.partition, "partition lease lost");
                *lease = None;
                state.revoke();
            }
        }
        Ok(())
    }

    /// Commits `next` for the partition of `state`, renewing its lease in the same batch.
    async fn commit(&self, state: &ClaimState, next: u64) -> Result<()> {
        let mut lease = state.lease.lock().await;
        let partition = state.partition;
        let Some(version) = *lease else {
            return Err(self.fenced(partition, "the lease was lost or released".to_owned()));
        };
        let batch = Batch::new()
            .push(self.inner.groups.mutation_update_if_version(
                &self.pk,
                &owner_key(partition),
                version,
                self.owner_value(false),
                Some(self.options.session_timeout),
            )?)
            .push(self.inner.groups.mutation_put(
                &self.pk,
                &committed_key(partition),
                to_json(&Next { next }),
                None,
            )?);
        match self.inner.groups.store().batch(batch).await? {
            BatchOutcome::Applied { versions } => {
                *lease = versions.first().copied();
                Ok(())
            }
            BatchOutcome::Rejected { current, .. } => {
                *lease = None;
                state.revoke();
                let holder = current
                    .and_then(|row| serde_json::from_slice::<Owner>(&row.value).ok())
                    .map_or_else(|| "nobody (lease expired)".to_owned(), |o| o.member);
                Err(self.fenced(
                    partition,
                    format!("the lease is now held by {holder}; offset {next} not committed"),
                ))
            }
        }
    }

    async fn release(&self, state: &ClaimState) -> Result<()> {
        let mut lease = state.lease.lock().await;
        if let Some(version) = lease.take() {
            self.inner
                .groups
                .update_if_version(
                    &self.pk,
                    &owner_key(state.partition),
                    version,
                    self.owner_value(true),
                    Some(self.options.session_timeout),
                )
                .await?;
        }
        state.released.store(true, Ordering::SeqCst);
        self.nudge.notify_one();
        Ok(())
    }

    /// Takes partition `p` if nobody holds it; returns the claim.
    async fn try_claim(self: &Arc<Self>, p: u32) -> Result<Option<EmbeddedClaim>> {
        let groups = &self.inner.groups;
        let key = owner_key(p);
        let ttl = Some(self.options.session_timeout);
        let outcome = match groups.get(&self.pk, &key).await? {
            None => {
                groups
                    .insert_if_absent(&self.pk, &key, self.owner_value(false), ttl)
                    .await?
            }
            Some(row) => {
                let owner: Owner = from_json("partition owner", &row.value)?;
                if !owner.released && owner.member != self.options.member {
                    return Ok(None);
                }
                groups
                    .update_if_version(&self.pk, &key, row.version, self.owner_value(false), ttl)
                    .await?
            }
        };
        let CasOutcome::Applied { version } = outcome else {
            return Ok(None);
        };
        let state = Arc::new(ClaimState {
            partition: p,
            lease: tokio::sync::Mutex::new(Some(version)),
            revoked: AtomicBool::new(false),
            revoke: Notify::new(),
            released: AtomicBool::new(false),
        });
        let position = match groups.get(&self.pk, &committed_key(p)).await? {
            Some(row) => from_json::<Next>("committed offset", &row.value)?.next,
            None => {
                // Pin the start now, so a later owner does not skip what was published
                // between this claim and the first commit.
                let start = self
                    .inner
                    .resolve(&self.topic, p, self.options.start)
                    .await?;
                self.commit(&state, start).await?;
                start
            }
        };
        Ok(Some(EmbeddedClaim {
            ctx: self.clone(),
            state,
            position,
            wake: self.inner.wake.subscribe(),
        }))
    }

    /// One pass of the rebalance logic; returns whether some partition this member should
    /// own is still held by another.
    async fn rebalance(
        self: &Arc<Self>,
        claims: &mpsc::UnboundedSender<Box<dyn PartitionClaim>>,
    ) -> Result<bool> {
        let mut live: Vec<String> = self
            .inner
            .members
            .scan_all(&self.pk, None)
            .await?
            .into_iter()
            .map(|row| row.clustering)
            .collect();
        if !live.contains(&self.options.member) {
            live.push(self.options.member.clone());
        }
        live.sort();
        let me = live
            .iter()
            .position(|m| *m == self.options.member)
            .unwrap_or(0);
        let n = live.len();
        let desired: BTreeSet<u32> = (0..self.partitions)
            .filter(|p| (*p as usize) % n == me)
            .collect();
        let to_claim: Vec<u32> = {
            let mut held = lock(&self.held);
            held.retain(|_, state| !state.released.load(Ordering::SeqCst));
            for (p, state) in held.iter() {
                if !desired.contains(p) && !state.revoked.load(Ordering::SeqCst) {
                    state.revoke();
                }
            }
            desired
                .iter()
                .copied()
                .filter(|p| !held.contains_key(p))
                .collect()
        };
        let mut pending = false;
        for p in to_claim {
            match self.try_claim(p).await? {
                Some(claim) => {
                    lock(&self.held).insert(p, claim.state.clone());
                    tracing::debug!(topic = %self.topic, group = %self.group, partition = p, member = %self.options.member, "partition claimed");
                    if claims.send(Box::new(claim)).is_err() {
                        return Ok(false);
                    }
                }
                None => pending = true,
            }
        }
        Ok(pending)
    }
}

async fn member_loop(
    ctx: Arc<GroupCtx>,
    claims: mpsc::UnboundedSender<Box<dyn PartitionClaim>>,
    mut stop: watch::Receiver<bool>,
) {
    let tick = ctx.options.poll_interval.max(Duration::from_millis(10));
    let heartbeat_every = ctx.options.session_timeout / 4;
    let mut last_heartbeat = Instant::now();
    let mut marker = None;
    let mut pending = true;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = ctx.nudge.notified() => {}
                _ = stop.changed() => {}
            }
        }
        first = false;
        if *stop.borrow() {
            return;
        }
        let mut due = pending;
        if last_heartbeat.elapsed() >= heartbeat_every {
            due = true;
            match ctx.heartbeat().await {
                Ok(()) => last_heartbeat = Instant::now(),
                Err(e) => tracing::warn!(error = %e, group = %ctx.group, "heartbeat failed"),
            }
            let held: Vec<Arc<ClaimState>> = lock(&ctx.held).values().cloned().collect();
            for state in held {
                if let Err(e) = ctx.renew(&state).await {
                    tracing::warn!(error = %e, group = %ctx.group, partition = state.partition, "lease renewal failed");
                }
            }
        }
        match ctx.inner.members.change_marker().await {
            Ok(now) => {
                if now != marker || now.is_none() {
                    due = true;
                }
                marker = now;
            }
            Err(_) => due = true,
        }
        if lock(&ctx.held)
            .values()
            .any(|s| s.released.load(Ordering::SeqCst))
        {
            due = true;
        }
        if due {
            match ctx.rebalance(&claims).await {
                Ok(p) => pending = p,
                Err(e) => {
                    pending = true;
                    tracing::warn!(error = %e, group = %ctx.group, "rebalance failed");
                }
            }
        }
    }
}

struct EmbeddedMembership {
    ctx: Arc<GroupCtx>,
    claims: mpsc::UnboundedReceiver<Box<dyn PartitionClaim>>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for EmbeddedMembership {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Membership for EmbeddedMembership {
    fn next_claim(&mut self) -> BoxFuture<'_, Result<Box<dyn PartitionClaim>>> {
        Box::pin(async move { self.claims.recv().await.ok_or(EventError::Closed) })
    }

    fn leave(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let _ = self.stop.send(true);
            if let Some(task) = self.task.take() {
                let _ = task.await;
            }
            self.claims.close();
            let held: Vec<Arc<ClaimState>> = lock(&self.ctx.held).drain().map(|(_, s)| s).collect();
            let mut first_error = None;
            for state in held {
                if let Err(e) = self.ctx.release(&state).await {
                    first_error.get_or_insert(e);
                }
            }
            if let Err(e) = self
                .ctx
                .inner
                .members
                .delete(&self.ctx.pk, &self.ctx.options.member)
                .await
            {
                first_error.get_or_insert(e.into());
            }
            first_error.map_or(Ok(()), Err)
        })
    }
}

struct EmbeddedClaim {
    ctx: Arc<GroupCtx>,
    state: Arc<ClaimState>,
    position: u64,
    wake: watch::Receiver<u64>,
}

impl PartitionClaim for EmbeddedClaim {
    fn partition(&self) -> u32 {
        self.state.partition
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn fetch(&mut self, max: usize) -> BoxFuture<'_, Result<Fetch>> {
        Box::pin(async move {
            loop {
                if self.state.revoked.load(Ordering::SeqCst) {
                    return Ok(Fetch::Revoked);
                }
                self.wake.borrow_and_update();
                let records = self
                    .ctx
                    .inner
                    .read(&self.ctx.topic, self.state.partition, self.position, max)
                    .await?;
                if let Some(last) = records.last() {
                    self.position = last.offset + 1;
                    return Ok(Fetch::Records(records));
                }
                tokio::select! {
                    changed = self.wake.changed() => {
                        if changed.is_err() {
                            tokio::time::sleep(self.ctx.options.poll_interval).await;
                        }
                    }
                    () = self.state.revoke.notified() => {}
                }
            }
        })
    }

    fn commit(&mut self, next: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.ctx.commit(&self.state, next).await })
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move { self.ctx.release(&self.state).await })
    }
}

impl Drop for EmbeddedClaim {
    /// A claim dropped without [`release`](PartitionClaim::release) — its worker was
    /// fenced, or stopped — is no longer consumed by anyone here: mark it released in this
    /// member, so that the next rebalance may claim the partition again. (Without this, a
    /// member whose lease expired during a long stall kept the partition in its `held` map,
    /// never consumed it again, and, heartbeating, kept the other members away from it.)
    fn drop(&mut self) {
        if !self.state.released.swap(true, Ordering::SeqCst) {
            self.ctx.nudge.notify_one();
        }
    }
}
