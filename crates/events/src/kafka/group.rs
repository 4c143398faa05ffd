//! Consumer-group membership on Kafka: one `BaseConsumer` per member, served by its own
//! thread, whose rebalance callback turns assignments into [`PartitionClaim`]s and waits for
//! revoked claims to be released.
//!
//! Why a thread of its own: librdkafka runs the rebalance callback on the thread that polls
//! the consumer, and a revocation must block there until the partition's worker committed
//! and released it. Blocking a Tokio worker that long could starve the very worker it waits
//! for; a dedicated thread blocks nobody else.
//!
//! Each assigned partition's messages are split into their own librdkafka queue *before*
//! the partition is assigned (librdkafka then never forwards it to the consumer's main
//! queue). The claim's `fetch` drains that queue without blocking and otherwise waits for
//! the queue's non-empty callback, so a cancelled fetch consumes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol,
    base_consumer::PartitionQueue,
};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc, watch};

use super::{
    Inner, KafkaTransport, MIN_SESSION_TIMEOUT, blocking, is_membership_error, kafka_error, lock,
    log_line, millis, partition_index, plain_error,
};
use crate::error::{EventError, Result, validate_name};
use crate::transport::{
    BoxFuture, Fetch, JoinOptions, Membership, PartitionClaim, Record, StartFrom,
};

/// How long the member thread waits in one poll of the consumer.
const POLL: Duration = Duration::from_millis(100);

/// How often an idle fetch looks at its queue even without a wake-up (a safety net).
const IDLE_RECHECK: Duration = Duration::from_millis(200);

pub(super) async fn join(
    inner: Arc<Inner>,
    topic: &str,
    group: &str,
    options: JoinOptions,
) -> Result<Box<dyn Membership>> {
    validate_name("group", group)?;
    inner.ensure_topic(topic, options.partitions).await?;
    let partitions = inner.existing_partitions(topic).await?;
    // "Latest" means the events published from this join on, not from whenever the group
    // gets around to assigning a partition.
    let latest = match options.start {
        StartFrom::Latest => {
            let meta = inner.clone();
            let name = topic.to_owned();
            blocking(move || {
                (0..partitions)
                    .map(|p| Ok(meta.watermarks(&name, partition_index(p)?)?.1))
                    .collect::<Result<Vec<u64>>>()
            })
            .await?
        }
        _ => Vec::new(),
    };
    let session = options.session_timeout.max(MIN_SESSION_TIMEOUT);
    let heartbeat = (session / 10).clamp(Duration::from_millis(100), Duration::from_secs(3));
    let group_id = KafkaTransport::group_id(group, topic);
    let mut config = inner.options.client_config();
    config
        .set("group.id", &group_id)
        .set("client.id", &options.member)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            if options.start == StartFrom::Latest {
                "latest"
            } else {
                "earliest"
            },
        )
        .set("session.timeout.ms", millis(session))
        .set("heartbeat.interval.ms", millis(heartbeat))
        .set("partition.assignment.strategy", "cooperative-sticky");
    for (key, value) in &inner.options.config {
        config.set(key, value);
    }
    let (claims_tx, claims_rx) = mpsc::unbounded_channel();
    let context = GroupContext {
        inner: inner.clone(),
        topic: topic.to_owned(),
        group: group.to_owned(),
        start: options.start,
        latest,
        consumer: OnceLock::new(),
        claims: claims_tx,
        held: Mutex::new(HashMap::new()),
    };
    let consumer: BaseConsumer<GroupContext> = config
        .create_with_context(context)
        .map_err(|e| kafka_error(format!("creating a consumer for group {group_id}"), e))?;
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer
        .subscribe(&[topic])
        .map_err(|e| kafka_error(format!("subscribing group {group_id} to {topic}"), e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ended_tx, ended_rx) = watch::channel(None);
    let thread_stop = stop.clone();
    let leave_timeout = inner.options.request_timeout;
    std::thread::Builder::new()
        .name(format!("trellis-kafka-{}", short(&options.member)))
        .spawn(move || {
            let outcome = serve(&consumer, &thread_stop, leave_timeout);
            // Drops the last handle unless a claim is still alive: closing leaves the group.
            drop(consumer);
            ended_tx.send_replace(Some(outcome));
        })
        .map_err(|e| plain_error(format!("starting the consumer thread: {e}"), false))?;
    Ok(Box::new(KafkaMembership {
        inner,
        group_id,
        member: options.member,
        claims: claims_rx,
        stop,
        ended: ended_rx,
    }))
}

fn short(member: &str) -> &str {
    member
        .get(member.len().saturating_sub(8)..)
        .unwrap_or(member)
}

/// The member thread: serves callbacks until told to stop, then leaves the group.
fn serve(
    consumer: &BaseConsumer<GroupContext>,
    stop: &AtomicBool,
    leave_timeout: Duration,
) -> std::result::Result<(), String> {
    let mut outcome = Ok(());
    while !stop.load(Ordering::Acquire) {
        match consumer.poll(POLL) {
            None => {}
            Some(Ok(message)) => {
                // Every assigned partition is split off before assignment; a message here is
                // not handled and not committed, so it is delivered again later.
                tracing::warn!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    "message on the consumer's main queue ignored"
                );
            }
            Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                tracing::error!(%code, "fatal kafka consumer error; the membership ends");
                outcome = Err(format!("fatal consumer error: {code}"));
                break;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "kafka consumer error (librdkafka retries)");
            }
        }
    }
    // Leave: revoke (workers released their claims already), then the group.
    consumer.unsubscribe();
    let deadline = Instant::now() + leave_timeout;
    loop {
        consumer.poll(Duration::from_millis(20));
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        if (assigned == 0 && lock(&consumer.context().held).is_empty())
            || Instant::now() >= deadline
        {
            break;
        }
    }
    outcome
}

/// Shared between a claim's worker and the rebalance callback.
struct ClaimShared {
    partition: i32,
    /// Wakes a waiting fetch: new messages, or the partition was revoked.
    wake: Notify,
    revoked: AtomicBool,
    /// `true` once the partition is no longer ours; held while committing, so a revocation
    /// never completes in the middle of a commit and no commit follows it.
    gone: Mutex<bool>,
    released: Mutex<bool>,
    released_changed: Condvar,
}

impl ClaimShared {
    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn mark_released(&self) {
        *lock(&self.released) = true;
        self.released_changed.notify_all();
    }

    /// Waits until released or `deadline`; true when released.
    fn wait_released(&self, deadline: Instant) -> bool {
        let mut released = lock(&self.released);
        while !*released {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            released = self
                .released_changed
                .wait_timeout(released, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        true
    }
}

/// The consumer's context: rebalance callbacks and logs.
struct GroupContext {
    inner: Arc<Inner>,
    topic: String,
    group: String,
    start: StartFrom,
    /// High watermarks when the member joined (for [`StartFrom::Latest`]).
    latest: Vec<u64>,
    /// The consumer itself, to split partition queues off in the callback.
    consumer: OnceLock<Weak<BaseConsumer<GroupContext>>>,
    claims: mpsc::UnboundedSender<Box<dyn PartitionClaim>>,
    held: Mutex<HashMap<i32, Arc<ClaimShared>>>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", %error, reason, group = %self.group, "kafka consumer error (librdkafka retries)");
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                tracing::warn!(error = ?other, group = %self.group, topic = %self.topic, "rebalance failed; giving up every partition");
                let all: Vec<i32> = lock(&self.held).keys().copied().collect();
                self.give_up(&all, false);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
        }
    }
}

impl GroupContext {
    fn cooperative(consumer: &BaseConsumer<Self>) -> bool {
        matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        )
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let starts = self.start_offsets(consumer, &partitions);
        for (partition, start) in &starts {
            if let Some(start) = start
                && let Err(e) =
                    tpl.set_partition_offset(&self.topic, *partition, Offset::Offset(*start as i64))
            {
                tracing::warn!(error = %e, partition, "could not set the start offset");
            }
        }
        let mut claims = Vec::with_capacity(partitions.len());
        if let Some(me) = self.consumer.get().and_then(Weak::upgrade) {
            for (partition, start) in starts {
                let Some(mut queue) = me.split_partition_queue(&self.topic, partition) else {
                    tracing::warn!(partition, topic = %self.topic, "cannot split the partition's queue");
                    continue;
                };
                let shared = Arc::new(ClaimShared {
                    partition,
                    wake: Notify::new(),
                    revoked: AtomicBool::new(false),
                    gone: Mutex::new(false),
                    released: Mutex::new(false),
                    released_changed: Condvar::new(),
                });
                let waker = shared.clone();
                queue.set_nonempty_callback(move || waker.wake.notify_one());
                claims.push(KafkaClaim {
                    shared,
                    queue,
                    consumer: me.clone(),
                    topic: self.topic.clone(),
                    group: self.group.clone(),
                    position: start.unwrap_or(0),
                });
            }
        }
        let assigned = if Self::cooperative(consumer) {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(e) = assigned {
            tracing::error!(error = %e, group = %self.group, topic = %self.topic, "assigning partitions failed");
            return;
        }
        let mut held = lock(&self.held);
        for claim in claims {
            held.insert(claim.shared.partition, claim.shared.clone());
            tracing::debug!(group = %self.group, topic = %self.topic, partition = claim.shared.partition, position = claim.position, "partition assigned");
            if self.claims.send(Box::new(claim)).is_err() {
                // The membership is gone; the partitions go back when the thread leaves.
                break;
            }
        }
    }

    /// Where each newly assigned partition starts: the committed offset, else the start
    /// position of the subscription. `None` leaves it to librdkafka (committed offset or
    /// `auto.offset.reset`) when the lookup failed.
    fn start_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &[i32],
    ) -> Vec<(i32, Option<u64>)> {
        let timeout = self.inner.options.request_timeout;
        let mut query = TopicPartitionList::with_capacity(partitions.len());
        for p in partitions {
            query.add_partition(&self.topic, *p);
        }
        let committed = match consumer.committed_offsets(query, timeout) {
            Ok(committed) => committed,
            Err(e) => {
                tracing::warn!(error = %e, group = %self.group, "reading committed offsets failed; librdkafka will look them up");
                return partitions.iter().map(|p| (*p, None)).collect();
            }
        };
        partitions
            .iter()
            .map(|&p| {
                let start = match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o >= 0 => Some(o as u64),
                    _ => {
                        let latest = usize::try_from(p).ok().and_then(|i| self.latest.get(i));
                        match self.inner.resolve(&self.topic, p, self.start, latest.copied()) {
                            Ok(start) => Some(start),
                            Err(e) => {
                                tracing::warn!(error = %e, partition = p, "resolving the start offset failed; using auto.offset.reset");
                                None
                            }
                        }
                    }
                };
                (p, start)
            })
            .collect()
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        // A lost assignment (expired session) cannot be committed any more: do not wait.
        self.give_up(&partitions, !consumer.assignment_lost());
        let unassigned = if Self::cooperative(consumer) {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(e) = unassigned {
            tracing::warn!(error = %e, group = %self.group, "unassigning partitions failed");
        }
    }

    /// Revokes claims of `partitions`; waits for their release when `wait`; then refuses
    /// any further commit of them.
    fn give_up(&self, partitions: &[i32], wait: bool) {
        let revoked: Vec<Arc<ClaimShared>> = {
            let mut held = lock(&self.held);
            partitions.iter().filter_map(|p| held.remove(p)).collect()
        };
        for claim in &revoked {
            claim.revoke();
        }
        if wait {
            let deadline = Instant::now() + self.inner.options.revoke_timeout;
            for claim in &revoked {
                if !claim.wait_released(deadline) {
                    tracing::warn!(
                        group = %self.group, topic = %self.topic, partition = claim.partition,
                        timeout = ?self.inner.options.revoke_timeout,
                        "revoked partition not released in time; its later commits are refused"
                    );
                }
            }
        }
        for claim in &revoked {
            *lock(&claim.gone) = true;
        }
    }
}

/// One member of a group on Kafka.
struct KafkaMembership {
    inner: Arc<Inner>,
    group_id: String,
    member: String,
    claims: mpsc::UnboundedReceiver<Box<dyn PartitionClaim>>,
    stop: Arc<AtomicBool>,
    /// Set by the member thread when it ended, with its outcome.
    ended: watch::Receiver<Option<std::result::Result<(), String>>>,
}

impl KafkaMembership {
    /// Stops the member thread. Claims assigned but never taken are dropped (released), so
    /// the revocation on leaving does not wait for them.
    fn stop(&mut self) {
        self.claims.close();
        while let Ok(claim) = self.claims.try_recv() {
            drop(claim);
        }
        self.stop.store(true, Ordering::Release);
    }
}

impl Drop for KafkaMembership {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Membership for KafkaMembership {
    fn next_claim(&mut self) -> BoxFuture<'_, Result<Box<dyn PartitionClaim>>> {
        Box::pin(async move {
            tokio::select! {
                claim = self.claims.recv() => claim.ok_or(EventError::Closed),
                ended = self.ended.wait_for(Option::is_some) => {
                    let reason = match ended.as_deref() {
                        Ok(Some(Err(reason))) => reason.clone(),
                        _ => "the consumer stopped".to_owned(),
                    };
                    Err(plain_error(format!("group {}: {reason}", self.group_id), true))
                }
            }
        })
    }

    fn leave(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.stop();
        Box::pin(async move {
            let timeout = self.inner.options.request_timeout;
            // The thread revokes, leaves the group and closes the consumer.
            let ended = tokio::time::timeout(timeout * 2, self.ended.wait_for(Option::is_some))
                .await
                .is_ok();
            if !ended {
                return Err(plain_error(
                    format!(
                        "group {}: the consumer did not close within {:?}",
                        self.group_id,
                        timeout * 2
                    ),
                    true,
                ));
            }
            // Wait until the coordinator no longer lists this member, so that whoever
            // looks next (a replay, the other members) sees the group without it.
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let inner = self.inner.clone();
                let group_id = self.group_id.clone();
                let members = blocking(move || inner.group_members(&group_id)).await;
                match members {
                    Ok(members) if !members.contains(&self.member) => return Ok(()),
                    Ok(_) | Err(_) if tokio::time::Instant::now() >= deadline => {
                        tracing::warn!(group = %self.group_id, member = %self.member, "member still listed after leaving; its session will expire");
                        return Ok(());
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    }
}

/// One assigned partition, read from its own queue.
struct KafkaClaim {
    shared: Arc<ClaimShared>,
    queue: PartitionQueue<GroupContext>,
    consumer: Arc<BaseConsumer<GroupContext>>,
    topic: String,
    group: String,
    position: u64,
}

impl Drop for KafkaClaim {
    fn drop(&mut self) {
        // Released or abandoned: either way a revocation need not wait for it.
        self.shared.mark_released();
    }
}

impl KafkaClaim {
    /// Takes up to `max` messages already in the queue, without waiting.
    fn drain(&mut self, max: usize) -> Result<Vec<Record>> {
        let partition = self.shared.partition as u32;
        let mut records = Vec::new();
        while records.len() < max {
            match self.queue.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => records.push(Record {
                    partition,
                    offset: message.offset().max(0) as u64,
                    value: message.payload().unwrap_or_default().to_vec(),
                }),
                Some(Err(e)) if records.is_empty() => {
                    return Err(kafka_error(
                        format!("reading {}/{partition}", self.topic),
                        e,
                    ));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic = %self.topic, partition, "kafka read error after records");
                    break;
                }
            }
        }
        if let Some(last) = records.last() {
            self.position = last.offset + 1;
        }
        Ok(records)
    }
}

impl PartitionClaim for KafkaClaim {
    fn partition(&self) -> u32 {
        self.shared.partition as u32
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn fetch(&mut self, max: usize) -> BoxFuture<'_, Result<Fetch>> {
        Box::pin(async move {
            loop {
                if self.shared.revoked.load(Ordering::Acquire) {
                    return Ok(Fetch::Revoked);
                }
                let records = self.drain(max.max(1))?;
                if !records.is_empty() {
                    return Ok(Fetch::Records(records));
                }
                // Nothing consumed above; a cancelled wait loses nothing.
                let _ = tokio::time::timeout(IDLE_RECHECK, self.shared.wake.notified()).await;
            }
        })
    }

    fn commit(&mut self, next: u64) -> BoxFuture<'_, Result<()>> {
        let shared = self.shared.clone();
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let group = self.group.clone();
        Box::pin(async move {
            blocking(move || {
                let partition = shared.partition;
                let fenced = |reason: String| EventError::Fenced {
                    topic: topic.clone(),
                    group: group.clone(),
                    partition: partition as u32,
                    reason,
                };
                let gone = lock(&shared.gone);
                if *gone {
                    return Err(fenced(
                        "the partition was revoked from this member".to_owned(),
                    ));
                }
                let mut offsets = TopicPartitionList::with_capacity(1);
                offsets
                    .add_partition_offset(&topic, partition, Offset::Offset(next as i64))
                    .map_err(|e| kafka_error("building a commit", e))?;
                let result = consumer.commit(&offsets, CommitMode::Sync);
                drop(gone);
                match result {
                    Ok(()) => Ok(()),
                    // The partition is being taken away: its next owner re-delivers.
                    Err(e) if is_membership_error(&e) && shared.revoked.load(Ordering::Acquire) => {
                        Err(fenced(format!("the commit was refused: {e}")))
                    }
                    // The group's generation moved on under a rebalance that lets this
                    // member keep the partition (or has not told it yet): the same commit
                    // succeeds once librdkafka rejoined, or turns into a revocation.
                    Err(e) if is_membership_error(&e) => Err(EventError::Transport {
                        transport: "kafka",
                        message: format!(
                            "committing {topic}/{partition} at {next} during a rebalance: {e}"
                        ),
                        retryable: true,
                        source: Some(Box::new(e)),
                    }),
                    Err(e) => Err(kafka_error(
                        format!("committing {topic}/{partition} at {next}"),
                        e,
                    )),
                }
            })
            .await
        })
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        drop(self);
        Box::pin(async { Ok(()) })
    }
}
