//! The [`EventBus`]: publish typed events, subscribe handlers in consumer groups.

use std::any::type_name;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use trellis_store::Store;
use trellis_tracing::opentelemetry::Context;
use trellis_tracing::opentelemetry::trace::TraceContextExt as _;
use trellis_tracing::{DistributedTracer, Span};
use uuid::Uuid;

use crate::embedded::EmbeddedTransport;
use crate::envelope::{
    ATTEMPTS_HEADER, ERROR_HEADER, Envelope, Event, GROUP_HEADER, Message, ORIGIN_HEADER,
};
use crate::error::{BoxError, EventError, Result, validate_name};
use crate::partitioner::partition_for_key;
use crate::transport::{
    BoxFuture, Fetch, JoinOptions, Membership, OutRecord, PartitionClaim, Record, StartFrom,
    Transport,
};

/// Suffix of the dead-letter topic: events of `orders` that could not be handled go to
/// `orders.dlq`.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Longest error text kept in a dead letter's header.
const MAX_ERROR_LEN: usize = 4_096;

/// Options of an [`EventBus`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BusOptions {
    /// Partitions of a topic the bus creates (on first publish or subscribe). Defaults to 4.
    pub partitions: u32,
    /// CloudEvents `source` of the events this bus publishes. Defaults to `trellis`.
    pub source: String,
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            partitions: 4,
            source: "trellis".to_owned(),
        }
    }
}

impl BusOptions {
    /// Sets [`partitions`](Self::partitions).
    #[must_use]
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets [`source`](Self::source).
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }
}

/// Where a published event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event id.
    pub id: Uuid,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The offset in that partition.
    pub offset: u64,
}

/// Exponential backoff between handler attempts: `initial`, then ×`multiplier` per attempt,
/// at most `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Pause after the first failure. Defaults to 100 ms.
    pub initial: Duration,
    /// Growth per attempt. Defaults to 2.
    pub multiplier: f64,
    /// Longest pause. Defaults to 10 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The pause after failed attempt number `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

/// Stops a subscription from anywhere (a handler, a signal handler). Cheap to clone.
#[derive(Debug, Clone)]
pub struct StopSignal {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for StopSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl StopSignal {
    /// A signal not yet given.
    pub fn new() -> Self {
        StopSignal {
            sender: Arc::new(watch::channel(false).0),
        }
    }

    /// Gives the signal: no handler call starts after this returns.
    pub fn stop(&self) {
        self.sender.send_replace(true);
    }

    /// Whether the signal was given.
    pub fn is_stopped(&self) -> bool {
        *self.sender.borrow()
    }

    fn receiver(&self) -> watch::Receiver<bool> {
        self.sender.subscribe()
    }
}

/// How a subscription consumes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Where the group starts in a partition it has no committed offset for. Defaults to
    /// [`StartFrom::Earliest`], so events published before the first subscriber are not
    /// missed.
    pub start: StartFrom,
    /// Handler calls per event before it goes to the dead-letter topic. Defaults to 5.
    pub max_attempts: u32,
    /// Pause between attempts.
    pub backoff: Backoff,
    /// Records fetched (and committed) at a time per partition. Defaults to 256.
    pub fetch_max: usize,
    /// At most this many handler calls at once across partitions; `None` (the default)
    /// runs one per owned partition. Within a partition calls are always one at a time.
    pub concurrency: Option<usize>,
    /// How long this member's partitions stay its own without a heartbeat. Defaults to 10 s.
    pub session_timeout: Duration,
    /// How often membership is checked for joins, leaves and released partitions (the
    /// embedded transport uses at least 10 ms). New events are noticed at the transport's
    /// own poll interval ([`EmbeddedOptions::poll_interval`](crate::EmbeddedOptions)).
    /// Defaults to 2 ms.
    pub poll_interval: Duration,
    /// Stops the subscription when given; [`Subscription::shutdown`] gives it too.
    pub stop: StopSignal,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            start: StartFrom::Earliest,
            max_attempts: 5,
            backoff: Backoff::default(),
            fetch_max: 256,
            concurrency: None,
            session_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(2),
            stop: StopSignal::new(),
        }
    }
}

impl SubscribeOptions {
    /// Sets [`start`](Self::start).
    #[must_use]
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }
    /// Sets [`max_attempts`](Self::max_attempts).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }
    /// Sets [`backoff`](Self::backoff).
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
    /// Sets [`fetch_max`](Self::fetch_max).
    #[must_use]
    pub fn fetch_max(mut self, fetch_max: usize) -> Self {
        self.fetch_max = fetch_max;
        self
    }
    /// Sets [`concurrency`](Self::concurrency).
    #[must_use]
    pub fn concurrency(mut self, concurrency: Option<usize>) -> Self {
        self.concurrency = concurrency;
        self
    }
    /// Sets [`session_timeout`](Self::session_timeout).
    #[must_use]
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }
    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
    /// Sets [`stop`](Self::stop).
    #[must_use]
    pub fn stop(mut self, stop: StopSignal) -> Self {
        self.stop = stop;
        self
    }

    fn validate(self) -> Result<Self> {
        let bad = |option, reason: String| Err(EventError::InvalidOption { option, reason });
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if self.fetch_max == 0 {
            return bad("fetch_max", "must be at least 1".into());
        }
        if self.concurrency == Some(0) {
            return bad("concurrency", "must be at least 1 when set".into());
        }
        if self.backoff.initial > self.backoff.max {
            return bad(
                "backoff",
                format!(
                    "initial {:?} is longer than max {:?}",
                    self.backoff.initial, self.backoff.max
                ),
            );
        }
        Ok(self)
    }
}

/// A handler of typed events: any `async fn(Event<T>) -> Result<(), E>` with `E` convertible
/// to a boxed error (a `String`, `&str`, or any error type).
pub trait Handler<T>: Send + Sync + 'static {
    /// Handles one event; an error makes the bus retry it.
    fn call(&self, event: Event<T>) -> BoxFuture<'static, Result<(), BoxError>>;
}

impl<T, F, Fut, E> Handler<T> for F
where
    F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn call(&self, event: Event<T>) -> BoxFuture<'static, Result<(), BoxError>> {
        let fut = self(event);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// Publishes events and subscribes handlers. Cheap to clone.
///
/// Delivery is at least once: a group's offset in a partition moves only after the handler
/// succeeded (or the event was dead-lettered), so a crash re-delivers what was in flight.
/// Use [`Idempotency`](crate::Idempotency) to make effects happen once.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

struct BusInner {
    transport: Arc<dyn Transport>,
    options: BusOptions,
    round_robin: AtomicU32,
    /// Producer and consumer spans; `None` (the default) costs nothing.
    tracer: Option<DistributedTracer>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("transport", &self.inner.transport.name())
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// A bus on the embedded log inside `store`, with default options.
    pub fn embedded(store: &Store) -> Result<EventBus> {
        Ok(EventBus::new(
            Arc::new(EmbeddedTransport::new(store)?),
            BusOptions::default(),
        ))
    }

    /// A bus on any transport.
    pub fn new(transport: Arc<dyn Transport>, options: BusOptions) -> EventBus {
        EventBus {
            inner: Arc::new(BusInner {
                transport,
                options,
                round_robin: AtomicU32::new(0),
                tracer: None,
            }),
        }
    }

    /// This bus with spans recorded by `tracer`:
    ///
    /// - [`publish`](Self::publish) and [`publish_batch`](Self::publish_batch) start a
    ///   producer span per event (kind `producer`, child of the current OpenTelemetry
    ///   context, else of the `traceparent` header already on the message), and write its
    ///   context into the event headers ([`TRACEPARENT`](crate::TRACEPARENT), `tracestate`,
    ///   `baggage`, B3); the span records the partition and offset, or the error;
    /// - every handler call runs inside a consumer span (kind `consumer`), child of and
    ///   linked to the producer span found in the headers (a new root when there is
    ///   none), with the attempt number; a failing handler marks it failed.
    ///
    /// Ready-made envelopes ([`publish_envelopes`](Self::publish_envelopes): the outbox
    /// relay, dead letters) keep the context they carry. A disabled tracer changes nothing.
    /// Clones made before this call keep their own setting.
    #[must_use]
    pub fn with_tracer(self, tracer: DistributedTracer) -> EventBus {
        EventBus {
            inner: Arc::new(BusInner {
                transport: self.inner.transport.clone(),
                options: self.inner.options.clone(),
                round_robin: AtomicU32::new(self.inner.round_robin.load(Ordering::Relaxed)),
                tracer: tracer.is_enabled().then_some(tracer),
            }),
        }
    }

    /// The tracer set with [`with_tracer`](Self::with_tracer), if any.
    pub fn tracer(&self) -> Option<&DistributedTracer> {
        self.inner.tracer.as_ref()
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The options in force.
    pub fn options(&self) -> &BusOptions {
        &self.inner.options
    }

    /// Publishes one event to `topic` (created with the bus's partition count if new).
    pub async fn publish<T: Serialize>(
        &self,
        topic: &str,
        message: Message<T>,
    ) -> Result<Published> {
        let mut envelope = message.into_envelope(topic, &self.inner.options.source)?;
        let span = self
            .inner
            .tracer
            .as_ref()
            .map(|tracer| producer_span(tracer, &mut envelope));
        let result = self
            .publish_envelopes(vec![envelope])
            .await
            .and_then(|mut published| published.pop().ok_or(EventError::Closed));
        if let Some(span) = span {
            record_publish(&span, &result);
        }
        result
    }

    /// Publishes several events to `topic`. Events of one partition are appended together
    /// (one store write per partition and chunk), which is much faster than one by one.
    pub async fn publish_batch<T: Serialize>(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = Message<T>>,
    ) -> Result<Vec<Published>> {
        let mut envelopes = messages
            .into_iter()
            .map(|m| m.into_envelope(topic, &self.inner.options.source))
            .collect::<Result<Vec<_>>>()?;
        let Some(tracer) = &self.inner.tracer else {
            return self.publish_envelopes(envelopes).await;
        };
        let spans: Vec<Span> = envelopes
            .iter_mut()
            .map(|envelope| producer_span(tracer, envelope))
            .collect();
        let result = self.publish_envelopes(envelopes).await;
        match &result {
            Ok(published) => {
                for (span, published) in spans.iter().zip(published) {
                    record_publish(span, &Ok(published.clone()));
                }
            }
            Err(e) => {
                for span in &spans {
                    span.set_error(e);
                }
            }
        }
        result
    }

    /// Publishes ready-made envelopes (each to its own `topic`) keeping their ids: the
    /// outbox relay and the dead-letter path use it.
    pub async fn publish_envelopes(&self, envelopes: Vec<Envelope>) -> Result<Vec<Published>> {
        let mut published = Vec::with_capacity(envelopes.len());
        // Topics in first-seen order, each with its envelopes in order.
        let mut by_topic: Vec<(String, Vec<Envelope>)> = Vec::new();
        for envelope in envelopes {
            match by_topic.iter_mut().find(|(t, _)| *t == envelope.topic) {
                Some((_, list)) => list.push(envelope),
                None => by_topic.push((envelope.topic.clone(), vec![envelope])),
            }
        }
        for (topic, envelopes) in by_topic {
            validate_name("topic", &topic)?;
            let partitions = self
                .inner
                .transport
                .ensure_topic(&topic, self.inner.options.partitions)
                .await?;
            let mut records = Vec::with_capacity(envelopes.len());
            for envelope in &envelopes {
                let partition = match &envelope.key {
                    Some(key) => partition_for_key(key, partitions),
                    None => self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % partitions,
                };
                records.push(OutRecord {
                    partition,
                    key: envelope.key.clone(),
                    value: envelope.to_bytes()?,
                });
            }
            let partitions_of: Vec<u32> = records.iter().map(|r| r.partition).collect();
            let offsets = self.inner.transport.append(&topic, records).await?;
            for ((envelope, partition), offset) in envelopes.iter().zip(partitions_of).zip(offsets)
            {
                published.push(Published {
                    id: envelope.id,
                    topic: topic.clone(),
                    partition,
                    offset,
                });
            }
        }
        Ok(published)
    }

    /// Subscribes `handler` to `topic` in consumer group `group` with default options.
    pub async fn subscribe<T, H>(
        &self,
        topic: &str,
        group: &str,
        handler: H,
    ) -> Result<Subscription>
    where
        T: DeserializeOwned + Send + 'static,
        H: Handler<T>,
    {
        self.subscribe_with(topic, group, SubscribeOptions::default(), handler)
            .await
    }

    /// Subscribes `handler` to `topic` in consumer group `group`.
    ///
    /// Every event of the topic is handled by one member of each group. Within a partition
    /// (so for one key) events are handled one at a time, in order. A failing handler is
    /// called again after [`Backoff`] pauses, up to `max_attempts` times; then the event goes
    /// to `<topic>.dlq` with the error in the `trellis-error` header, and the next one
    /// follows. A payload that does not deserialize into `T` goes there at once.
    pub async fn subscribe_with<T, H>(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
        handler: H,
    ) -> Result<Subscription>
    where
        T: DeserializeOwned + Send + 'static,
        H: Handler<T>,
    {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let options = options.validate()?;
        let member = Uuid::now_v7().to_string();
        let membership = self
            .inner
            .transport
            .join(
                topic,
                group,
                JoinOptions {
                    member: member.clone(),
                    partitions: self.inner.options.partitions,
                    start: options.start,
                    session_timeout: options.session_timeout,
                    poll_interval: options.poll_interval,
                },
            )
            .await?;
        let stats = Arc::new(Counters::default());
        let stop = options.stop.clone();
        let ctx = Arc::new(Consumer {
            bus: self.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            semaphore: options.concurrency.map(|n| Arc::new(Semaphore::new(n))),
            options,
            handler,
            stats: stats.clone(),
            _payload: std::marker::PhantomData,
        });
        let task = tokio::spawn(supervise(ctx, membership));
        Ok(Subscription {
            stop,
            task: Some(task),
            stats,
            member,
            topic: topic.to_owned(),
            group: group.to_owned(),
        })
    }

    /// Moves the committed offsets of an idle group: replay from an offset or a time, or
    /// skip to the end. Fails with [`EventError::GroupActive`] while members are running.
    pub async fn replay(&self, topic: &str, group: &str, from: StartFrom) -> Result<Vec<u64>> {
        self.inner.transport.reset_group(topic, group, from).await
    }
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    failures: AtomicU64,
    dead_lettered: AtomicU64,
    commits: AtomicU64,
}

/// Counts of what a subscription did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Events the handler succeeded on.
    pub handled: u64,
    /// Failed handler calls (each retry counts).
    pub failures: u64,
    /// Events sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Offset commits.
    pub commits: u64,
}

/// A running subscription. Dropping it stops it in the background; [`shutdown`] waits.
///
/// [`shutdown`]: Subscription::shutdown
#[derive(Debug)]
pub struct Subscription {
    stop: StopSignal,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
    stats: Arc<Counters>,
    member: String,
    topic: String,
    group: String,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

impl Subscription {
    /// This member's id in the group.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// What happened so far.
    pub fn stats(&self) -> SubscriptionStats {
        SubscriptionStats {
            handled: self.stats.handled.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
            dead_lettered: self.stats.dead_lettered.load(Ordering::Relaxed),
            commits: self.stats.commits.load(Ordering::Relaxed),
        }
    }

    /// The signal that stops this subscription.
    pub fn stop_signal(&self) -> StopSignal {
        self.stop.clone()
    }

    /// True once the subscription stopped (shut down or failed).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops taking new events, lets handlers in flight finish, commits their offsets,
    /// gives the partitions back to the group and leaves it.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop.stop();
        self.wait().await
    }

    /// Waits until the subscription stops (after its [`StopSignal`] was given).
    pub async fn wait(&mut self) -> Result<()> {
        match self.task.take() {
            Some(task) => task.await.map_err(|e| EventError::Transport {
                transport: "bus",
                message: format!("subscription task failed: {e}"),
                retryable: false,
                source: None,
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

struct Consumer<T, H> {
    bus: EventBus,
    topic: String,
    group: String,
    options: SubscribeOptions,
    semaphore: Option<Arc<Semaphore>>,
    handler: H,
    stats: Arc<Counters>,
    _payload: std::marker::PhantomData<fn() -> T>,
}

enum Outcome {
    /// Handled or dead-lettered: the offset may move past it.
    Done,
    /// The subscription is stopping; the event stays uncommitted.
    Stopped,
}

async fn supervise<T, H>(
    ctx: Arc<Consumer<T, H>>,
    mut membership: Box<dyn Membership>,
) -> Result<()>
where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    let mut stop = ctx.options.stop.receiver();
    let mut workers = JoinSet::new();
    loop {
        tokio::select! {
            claim = membership.next_claim() => match claim {
                Ok(claim) => { workers.spawn(run_partition(ctx.clone(), claim)); }
                Err(e) => {
                    tracing::warn!(error = %e, topic = %ctx.topic, group = %ctx.group, "membership ended");
                    break;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
            Some(done) = workers.join_next(), if !workers.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, topic = %ctx.topic, group = %ctx.group, "partition worker failed");
                }
            }
        }
    }
    ctx.options.stop.stop();
    while let Some(done) = workers.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, topic = %ctx.topic, group = %ctx.group, "partition worker failed");
        }
    }
    membership.leave().await
}

/// Consumes one claimed partition until it is revoked, lost, or the subscription stops.
async fn run_partition<T, H>(ctx: Arc<Consumer<T, H>>, mut claim: Box<dyn PartitionClaim>)
where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    let partition = claim.partition();
    let mut stop = ctx.options.stop.receiver();
    let mut transport_failures = 0u32;
    let mut lost = false;
    'fetching: loop {
        if *stop.borrow() {
            break;
        }
        let fetched = tokio::select! {
            fetched = claim.fetch(ctx.options.fetch_max) => fetched,
            _ = stop.wait_for(|s| *s) => break,
        };
        let records = match fetched {
            Ok(Fetch::Records(records)) => {
                transport_failures = 0;
                records
            }
            Ok(Fetch::Revoked) => break,
            Err(e) => {
                transport_failures += 1;
                tracing::warn!(error = %e, topic = %ctx.topic, partition, "fetch failed; retrying");
                if ctx.pause(transport_failures, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        let mut next = None;
        for record in &records {
            match ctx.process(record, &mut stop).await {
                Outcome::Done => next = Some(record.offset + 1),
                Outcome::Stopped => break,
            }
        }
        let Some(next) = next else { continue };
        let mut attempt = 0;
        loop {
            match claim.commit(next).await {
                Ok(()) => {
                    ctx.stats.commits.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e @ EventError::Fenced { .. }) => {
                    tracing::warn!(error = %e, "partition taken over; its new owner re-delivers from the last commit");
                    lost = true;
                    break 'fetching;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, topic = %ctx.topic, partition, "commit failed; retrying");
                    if ctx.pause(attempt, &mut stop).await {
                        break 'fetching;
                    }
                }
            }
        }
    }
    if !lost && let Err(e) = claim.release().await {
        tracing::warn!(error = %e, topic = %ctx.topic, partition, "release failed; the lease will expire");
    }
}

impl<T, H> Consumer<T, H>
where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    /// Waits the backoff for `attempt`; true when the subscription stopped meanwhile.
    async fn pause(&self, attempt: u32, stop: &mut watch::Receiver<bool>) -> bool {
        let stopped = tokio::select! {
            () = tokio::time::sleep(self.options.backoff.delay(attempt)) => false,
            () = async { let _ = stop.wait_for(|s| *s).await; } => true,
        };
        stopped || *stop.borrow()
    }

    async fn process(&self, record: &Record, stop: &mut watch::Receiver<bool>) -> Outcome {
        let envelope = match Envelope::from_bytes(&record.value) {
            Ok(envelope) => envelope,
            Err(e) => {
                let raw = undecodable(&self.topic, record);
                return self.dead_letter(raw, record, e.to_string(), 0, stop).await;
            }
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let payload: T = match envelope.payload_as() {
                Ok(payload) => payload,
                Err(e) => {
                    let error = format!(
                        "payload does not deserialize into {}: {e}",
                        type_name::<T>()
                    );
                    return self.dead_letter(envelope, record, error, 0, stop).await;
                }
            };
            let event =
                Event::from_envelope(&envelope, payload, record.partition, record.offset, attempt);
            let permit = match &self.semaphore {
                Some(semaphore) => semaphore.clone().acquire_owned().await.ok(),
                None => None,
            };
            // Checked with the permit held, so that a handler that stops the subscription
            // is the last one called.
            if *stop.borrow() {
                return Outcome::Stopped;
            }
            let span = self.bus.inner.tracer.as_ref().map(|tracer| {
                let span = tracer.consumer_span(&self.topic, &self.group, &envelope.headers);
                if span.is_recording() {
                    span.set_tag("messaging.message.id", envelope.id.to_string());
                    span.set_tag(
                        "messaging.destination.partition.id",
                        record.partition.to_string(),
                    );
                    span.set_tag("trellis.offset", record.offset as i64);
                    span.set_tag("trellis.attempt", i64::from(attempt));
                }
                span
            });
            let call = AssertUnwindSafe(self.handler.call(event)).catch_unwind();
            let result = match &span {
                Some(span) => span.in_scope(call).await,
                None => call.await,
            };
            drop(permit);
            let error = match result {
                Ok(Ok(())) => {
                    self.stats.handled.fetch_add(1, Ordering::Relaxed);
                    return Outcome::Done;
                }
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!("handler panicked: {}", panic_message(&panic)),
            };
            if let Some(span) = span {
                span.set_error(&error);
            }
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(topic = %self.topic, group = %self.group, id = %envelope.id, attempt, error, "handler failed");
            if attempt >= self.options.max_attempts {
                return self
                    .dead_letter(envelope, record, error, attempt, stop)
                    .await;
            }
            if self.pause(attempt, stop).await {
                return Outcome::Stopped;
            }
        }
    }

    async fn dead_letter(
        &self,
        mut envelope: Envelope,
        record: &Record,
        mut error: String,
        attempts: u32,
        stop: &mut watch::Receiver<bool>,
    ) -> Outcome {
        if error.len() > MAX_ERROR_LEN {
            let mut end = MAX_ERROR_LEN;
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            error.truncate(end);
        }
        tracing::warn!(topic = %self.topic, group = %self.group, id = %envelope.id, attempts, error, "event dead-lettered");
        envelope.topic = format!("{}{DLQ_SUFFIX}", self.topic);
        envelope.headers.insert(ERROR_HEADER.to_owned(), error);
        envelope
            .headers
            .insert(ATTEMPTS_HEADER.to_owned(), attempts.to_string());
        envelope.headers.insert(
            ORIGIN_HEADER.to_owned(),
            format!("{}/{}/{}", self.topic, record.partition, record.offset),
        );
        envelope
            .headers
            .insert(GROUP_HEADER.to_owned(), self.group.clone());
        let mut failures = 0;
        loop {
            match self.bus.publish_envelopes(vec![envelope.clone()]).await {
                Ok(_) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    return Outcome::Done;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, topic = %self.topic, "dead-letter publish failed; retrying");
                    if self.pause(failures, stop).await {
                        return Outcome::Stopped;
                    }
                }
            }
        }
    }
}

/// Starts the producer span of `envelope` and writes its context into the headers. The
/// parent is the current OpenTelemetry context, else a `traceparent` the publisher put on
/// the message itself.
pub(crate) fn producer_span(tracer: &DistributedTracer, envelope: &mut Envelope) -> Span {
    let current = Context::current();
    let parent = if current.span().span_context().is_valid() {
        current
    } else {
        tracer.propagator().extract_map(&envelope.headers)
    };
    let span = tracer.producer_span_with_parent(&parent, &envelope.topic, &mut envelope.headers);
    if span.is_recording() {
        span.set_tag("messaging.message.id", envelope.id.to_string());
        if let Some(key) = &envelope.key {
            span.set_tag("trellis.key", key.clone());
        }
    }
    span
}

/// Records where the event landed, or why it did not, on its producer span.
fn record_publish(span: &Span, result: &Result<Published>) {
    match result {
        Ok(published) => {
            span.set_tag(
                "messaging.destination.partition.id",
                published.partition.to_string(),
            );
            span.set_tag("trellis.offset", published.offset as i64);
        }
        Err(e) => span.set_error(e),
    }
}

/// An envelope for a record that is not an envelope at all: the raw text as the payload.
fn undecodable(topic: &str, record: &Record) -> Envelope {
    let text = String::from_utf8_lossy(&record.value).into_owned();
    let payload = serde_json::value::to_raw_value(&text)
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
    Envelope {
        specversion: crate::envelope::SPEC_VERSION.to_owned(),
        id: Uuid::now_v7(),
        source: "trellis".to_owned(),
        event_type: "trellis.undecodable".to_owned(),
        time: std::time::SystemTime::now(),
        topic: topic.to_owned(),
        key: None,
        headers: Default::default(),
        datacontenttype: "application/json".to_owned(),
        payload,
        partition: None,
        offset: None,
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=6).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
        let flat = Backoff {
            multiplier: 0.5,
            ..b
        };
        assert_eq!(flat.delay(5), Duration::from_millis(100), "never shrinks");
    }

    #[test]
    fn options_are_validated() {
        for (options, needle) in [
            (SubscribeOptions::default().max_attempts(0), "max_attempts"),
            (SubscribeOptions::default().fetch_max(0), "fetch_max"),
            (
                SubscribeOptions::default().concurrency(Some(0)),
                "concurrency",
            ),
            (
                SubscribeOptions::default().backoff(Backoff {
                    initial: Duration::from_secs(5),
                    multiplier: 2.0,
                    max: Duration::from_secs(1),
                }),
                "backoff",
            ),
        ] {
            let err = options.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
