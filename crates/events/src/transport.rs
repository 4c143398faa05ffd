//! The boundary between the bus and a transport: what the embedded log implements today and
//! the Kafka transport (rdkafka) implements next.
//!
//! The bus owns everything above delivery — envelopes, typed payloads, retries with backoff,
//! dead letters, ordering of handler calls within a partition, graceful shutdown. A transport
//! owns the log: topics with partitions, appends, consumer-group membership, partition
//! assignment and committed offsets.
//!
//! Shape of a consumer, and how Kafka maps onto it:
//!
//! - [`Transport::join`] makes this process a member of a consumer group
//!   (Kafka: a `StreamConsumer` with `group.id`, `enable.auto.commit=false`, subscribed).
//! - [`Membership::next_claim`] yields each partition the group assigns to this member, as a
//!   [`PartitionClaim`] (Kafka: a partition from the rebalance callback's assign list, read
//!   through `split_partition_queue`).
//! - The bus runs one worker per claim: [`PartitionClaim::fetch`], handle every record in
//!   order, [`PartitionClaim::commit`] the next offset once they succeeded (Kafka: `commit`
//!   of that partition's offset, synchronous).
//! - When the group takes the partition away, `fetch` answers [`Fetch::Revoked`]; the worker
//!   finishes the event in hand, commits and calls [`PartitionClaim::release`] (Kafka: the
//!   revoke callback waits for the worker's release before returning, so the next owner
//!   starts from the committed offset). A member that lost a partition without being told
//!   (its lease ran out) gets [`EventError::Fenced`](crate::EventError::Fenced) from `commit`
//!   and drops the claim; the new owner re-delivers from the last commit — at least once.
//!
//! Futures are boxed so that transports can be used as `dyn Transport`.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::error::Result;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Partition, already chosen by the bus from the key.
    pub partition: u32,
    /// Ordering key, if any (Kafka: the record key).
    pub key: Option<String>,
    /// The encoded [`Envelope`](crate::Envelope).
    pub value: Vec<u8>,
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partition it is in.
    pub partition: u32,
    /// Its offset in that partition, from 0, without gaps on the embedded log.
    pub offset: u64,
    /// The encoded [`Envelope`](crate::Envelope).
    pub value: Vec<u8>,
}

/// Where a consumer group starts reading a partition it has no committed offset for, or
/// where [`Transport::reset_group`] moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The oldest retained event.
    Earliest,
    /// Only events published from now on (Kafka's `auto.offset.reset=latest`).
    #[default]
    Latest,
    /// This offset in every partition (clamped to the partition's end).
    Offset(u64),
    /// The first event produced at or after this time.
    Time(SystemTime),
}

/// How a member joins a group.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Unique id of the member (the bus uses a UUID v7).
    pub member: String,
    /// Partitions the topic gets if this join creates it.
    pub partitions: u32,
    /// Where to start a partition the group has no committed offset for.
    pub start: StartFrom,
    /// How long a member's partitions stay its own without a heartbeat (Kafka:
    /// `session.timeout.ms`).
    pub session_timeout: Duration,
    /// How often an idle claim looks for new records published by other processes.
    pub poll_interval: Duration,
}

/// What [`PartitionClaim::fetch`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// Records from the claim's position on, in offset order (never empty).
    Records(Vec<Record>),
    /// The group gave the partition to another member: commit what is done and release.
    Revoked,
}

/// A transport: topics, appends, consumer groups.
pub trait Transport: Send + Sync + 'static {
    /// Short name: `embedded`, `kafka`.
    fn name(&self) -> &'static str;

    /// Creates `topic` with `partitions` partitions unless it exists; returns its actual
    /// partition count.
    fn ensure_topic<'a>(&'a self, topic: &'a str, partitions: u32) -> BoxFuture<'a, Result<u32>>;

    /// The partition count of `topic`, `None` when it does not exist.
    fn partition_count<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Option<u32>>>;

    /// Appends records to `topic` (which exists); returns their offsets in input order.
    /// Records of one partition keep their relative order and are appended atomically in
    /// chunks (2,000 on the embedded log); on error a prefix may have been appended, and the
    /// caller may publish again (at-least-once, the ids stay the same).
    fn append<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<OutRecord>,
    ) -> BoxFuture<'a, Result<Vec<u64>>>;

    /// Joins consumer group `group` on `topic`.
    fn join<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: JoinOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Membership>>>;

    /// Moves the committed offsets of an idle group (replay, or skip ahead); returns the new
    /// next offset per partition. Fails with
    /// [`EventError::GroupActive`](crate::EventError::GroupActive) while members hold
    /// partitions.
    fn reset_group<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        to: StartFrom,
    ) -> BoxFuture<'a, Result<Vec<u64>>>;

    /// The committed next offset of `group` per partition (`None`: nothing committed).
    fn committed<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>>>;

    /// The next offset to be written, per partition (the "high watermark").
    fn end_offsets<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Vec<u64>>>;

    /// Every topic, sorted by name (dead-letter topics included; Kafka's internal `__…`
    /// topics left out).
    fn topics(&self) -> BoxFuture<'_, Result<Vec<String>>>;

    /// The consumer groups of `topic` (those that joined it or had their offsets reset),
    /// sorted. Fails with [`EventError::UnknownTopic`](crate::EventError::UnknownTopic)
    /// when the topic does not exist.
    fn groups<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Vec<String>>>;
}

/// This process's membership in one consumer group on one topic.
pub trait Membership: Send {
    /// The next partition assigned to this member; waits until there is one. Cancel-safe.
    fn next_claim(&mut self) -> BoxFuture<'_, Result<Box<dyn PartitionClaim>>>;

    /// Leaves the group: stops heartbeating and lets other members take over at once.
    /// Claims still held are released; call it after the workers released theirs.
    fn leave(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
}

/// One partition owned by this member, read and committed by one worker.
pub trait PartitionClaim: Send {
    /// The partition.
    fn partition(&self) -> u32;

    /// The next offset `fetch` reads (starts at the committed offset).
    fn position(&self) -> u64;

    /// Waits for records at the position and returns up to `max` of them, advancing the
    /// position past them, or [`Fetch::Revoked`]. Cancel-safe: a cancelled fetch consumes
    /// nothing.
    fn fetch(&mut self, max: usize) -> BoxFuture<'_, Result<Fetch>>;

    /// Commits `next` (the offset after the last record handled) for the group. Fails with
    /// [`EventError::Fenced`](crate::EventError::Fenced) when the partition is no longer
    /// this member's.
    fn commit(&mut self, next: u64) -> BoxFuture<'_, Result<()>>;

    /// Hands the partition back to the group (after the last commit).
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
}
