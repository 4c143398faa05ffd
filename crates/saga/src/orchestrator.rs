//! The [`SagaOrchestrator`]: runs sagas, logs every step, compensates, recovers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};
use trellis_events::{EventBus, Message};
use trellis_resilience::retry::Backoff;
use trellis_store::Store;

use crate::definition::{Phase, Saga, StepContext, StepFuture};
use crate::error::{Result, SagaError, StepError};
use crate::log::{
    FORMAT, OperatorRequest, SagaLog, SagaRecord, SagaState, StepRecord, StepStatus, Versioned,
    lease_until, now_ms,
};

/// How old a retry request row may be while its record does not show the request yet
/// (the admin API writes the row first); older ones are dropped as stale.
const STALE_REQUEST_MS: u64 = 30_000;

/// Knobs of a [`SagaOrchestrator`].
#[derive(Clone)]
#[must_use]
pub struct SagaOptions {
    node_id: String,
    max_concurrent: usize,
    step_timeout: Duration,
    lease: Duration,
    compensation_retries: u32,
    backoff: Backoff,
    poll_interval: Duration,
    recovery_interval: Duration,
    events: Option<EventBus>,
    event_topic: String,
}

impl std::fmt::Debug for SagaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaOptions")
            .field("node_id", &self.node_id)
            .field("max_concurrent", &self.max_concurrent)
            .field("step_timeout", &self.step_timeout)
            .field("lease", &self.lease)
            .field("compensation_retries", &self.compensation_retries)
            .field("backoff", &self.backoff)
            .field("poll_interval", &self.poll_interval)
            .field("recovery_interval", &self.recovery_interval)
            .field("events", &self.events.is_some())
            .field("event_topic", &self.event_topic)
            .finish()
    }
}

impl Default for SagaOptions {
    fn default() -> Self {
        SagaOptions {
            node_id: format!("node-{}", uuid::Uuid::now_v7()),
            max_concurrent: 64,
            step_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(60),
            compensation_retries: 5,
            backoff: Backoff::default(),
            poll_interval: Duration::from_millis(500),
            recovery_interval: Duration::from_secs(10),
            events: None,
            event_topic: "sagas".into(),
        }
    }
}

impl SagaOptions {
    /// This orchestrator's identity in the log. A restarted process that keeps its node id
    /// takes its unfinished sagas back at once; others wait for their lease to run out. Two
    /// live processes must never share one. Defaults to a fresh `node-<uuid>`.
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = node_id.into();
        self
    }

    /// Most sagas driven at once (runs and recoveries); more wait. Defaults to 64.
    pub fn max_concurrent(mut self, max: usize) -> Self {
        self.max_concurrent = max;
        self
    }

    /// Time limit of one attempt of a step's action or compensation, unless the step sets
    /// its own. Defaults to 30 s.
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// How long a claim on a saga holds without a write; longer than any step timeout and
    /// backoff. Defaults to 60 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Further attempts of a failing compensation before the saga needs attention.
    /// Defaults to 5.
    pub fn compensation_retries(mut self, retries: u32) -> Self {
        self.compensation_retries = retries;
        self
    }

    /// Waits between attempts (exponential, full jitter). Defaults to 100 ms up to 10 s.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often the log is polled for operators' retry requests. Defaults to 500 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How often unfinished sagas whose owner's lease ran out are taken over. Defaults to
    /// 10 s.
    pub fn recovery_interval(mut self, interval: Duration) -> Self {
        self.recovery_interval = interval;
        self
    }

    /// Publishes `saga.started`, `saga.completed`, `saga.failed`, `saga.compensated`,
    /// `saga.needs_attention` and `saga.aborted` on this bus. Defaults to none.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// Topic of those events. Defaults to `sagas`.
    pub fn event_topic(mut self, topic: impl Into<String>) -> Self {
        self.event_topic = topic.into();
        self
    }

    /// Checks the options; the error names the option.
    pub fn validate(self) -> Result<Self> {
        let bad = |m: String| Err(SagaError::Invalid(m));
        if self.node_id.is_empty() || self.node_id.len() > 128 {
            return bad(format!(
                "node_id must be 1 to 128 bytes, got {} bytes",
                self.node_id.len()
            ));
        }
        if self.max_concurrent == 0 {
            return bad("max_concurrent must be at least 1".into());
        }
        if self.step_timeout.is_zero() || self.step_timeout >= self.lease {
            return bad(format!(
                "step_timeout ({:?}) must be above zero and shorter than the lease ({:?})",
                self.step_timeout, self.lease
            ));
        }
        if self.backoff.cap() >= self.lease {
            return bad(format!(
                "backoff cap ({:?}) must be shorter than the lease ({:?})",
                self.backoff.cap(),
                self.lease
            ));
        }
        if self.poll_interval.is_zero() || self.recovery_interval.is_zero() {
            return bad("poll_interval and recovery_interval must be above zero".into());
        }
        trellis_events::validate_name("event topic", &self.event_topic)
            .map_err(|e| SagaError::Invalid(e.to_string()))?;
        Ok(self)
    }
}

/// How a saga ended (or stopped: `needs_attention`).
#[derive(Debug, Clone, PartialEq)]
pub struct SagaOutcome {
    /// The saga id.
    pub saga_id: String,
    /// The saga name.
    pub name: String,
    /// `completed`, `compensated`, `needs_attention` (or `aborted`).
    pub state: SagaState,
    /// The data as the last successful step left it.
    pub data: Value,
    /// Why it compensated or needs attention.
    pub error: Option<String>,
}

impl SagaOutcome {
    /// The data as `T`.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.data.clone()).map_err(|source| SagaError::Data {
            name: self.name.clone(),
            source,
        })
    }

    fn of(record: &SagaRecord) -> Self {
        SagaOutcome {
            saga_id: record.id.clone(),
            name: record.name.clone(),
            state: record.state,
            data: record.data.clone(),
            error: record.error.clone(),
        }
    }
}

/// What [`SagaOrchestrator::recover`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Sagas driven to an end (or to `needs_attention`), with their outcome.
    pub outcomes: Vec<SagaOutcome>,
    /// Sagas left alone: owned by a live orchestrator, of an unregistered version, or
    /// already being driven here.
    pub skipped: usize,
    /// Sagas that could not be recovered, with the error (corrupt entry, store failure).
    pub errors: Vec<(String, String)>,
}

struct ErasedStep {
    name: String,
    action: Arc<dyn Fn(StepContext, Value) -> StepFuture<Value> + Send + Sync>,
    compensation: Arc<dyn Fn(StepContext, Value) -> StepFuture<()> + Send + Sync>,
    idempotent: bool,
    timeout: Duration,
    retries: u32,
}

struct Definition {
    name: String,
    version: u32,
    steps: Vec<ErasedStep>,
}

struct Inner {
    log: SagaLog,
    options: SagaOptions,
    definitions: RwLock<HashMap<String, BTreeMap<u32, Arc<Definition>>>>,
    permits: Arc<Semaphore>,
    in_flight: Mutex<HashSet<String>>,
    background: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Runs sagas with a durable log in a [`Store`]: the seed's `DistributedSaga`.
///
/// Cheap to clone; clones share definitions, the concurrency limit and the background
/// task (which polls for operators' retry requests and takes over sagas whose owner died).
#[derive(Clone)]
pub struct SagaOrchestrator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SagaOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaOrchestrator")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// Removes a saga id from the in-flight set when dropped.
struct InFlight {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.inner.in_flight).remove(&self.id);
    }
}

impl SagaOrchestrator {
    /// Opens the saga log in `store` and starts the background task. Register definitions
    /// next, then call [`recover`](Self::recover) to resume what a previous run left.
    pub async fn start(store: &Store, options: SagaOptions) -> Result<Self> {
        let options = options.validate()?;
        let inner = Arc::new(Inner {
            log: SagaLog::new(store)?,
            permits: Arc::new(Semaphore::new(options.max_concurrent)),
            options,
            definitions: RwLock::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            background: Mutex::new(None),
        });
        let task = tokio::spawn(background(Arc::downgrade(&inner)));
        *lock(&inner.background) = Some(task);
        Ok(SagaOrchestrator { inner })
    }

    /// The options in force.
    pub fn options(&self) -> &SagaOptions {
        &self.inner.options
    }

    /// The node id written as owner into the log.
    pub fn node_id(&self) -> &str {
        &self.inner.options.node_id
    }

    /// The saga log (for reading records).
    pub fn log(&self) -> &SagaLog {
        &self.inner.log
    }

    /// Registers a definition. Several versions of one name may be registered: new runs use
    /// the highest, recovery uses the one a saga started with.
    pub fn register<D>(&self, saga: Saga<D>) -> Result<()>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        let default_timeout = self.inner.options.step_timeout;
        let lease = self.inner.options.lease;
        let mut steps = Vec::with_capacity(saga.steps.len());
        for step in saga.steps {
            let timeout = step.timeout.unwrap_or(default_timeout);
            if timeout >= lease {
                return Err(SagaError::Invalid(format!(
                    "saga {}: step {}: timeout {timeout:?} must be shorter than the lease {lease:?}",
                    saga.name, step.name
                )));
            }
            steps.push(ErasedStep {
                name: step.name,
                action: step.action,
                compensation: step.compensation,
                idempotent: step.idempotent,
                timeout,
                retries: step.retries,
            });
        }
        let definition = Arc::new(Definition {
            name: saga.name.clone(),
            version: saga.version,
            steps,
        });
        let mut definitions = write(&self.inner.definitions);
        let versions = definitions.entry(saga.name.clone()).or_default();
        if versions.contains_key(&saga.version) {
            return Err(SagaError::Invalid(format!(
                "saga {} version {} is already registered",
                saga.name, saga.version
            )));
        }
        versions.insert(saga.version, definition);
        Ok(())
    }

    /// Runs a new saga `name` (its highest registered version) on `data`, up to its end:
    /// `completed`, `compensated` or `needs_attention`. Waits for a slot when
    /// `max_concurrent` sagas are running.
    pub async fn run<T: Serialize + ?Sized>(&self, name: &str, data: &T) -> Result<SagaOutcome> {
        let definition = self
            .inner
            .latest(name)
            .ok_or_else(|| SagaError::UnknownSaga {
                name: name.to_owned(),
            })?;
        let data = serde_json::to_value(data).map_err(|source| SagaError::Data {
            name: name.to_owned(),
            source,
        })?;
        let _permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SagaError::Shutdown)?;
        let id = uuid::Uuid::now_v7().to_string();
        let guard = self.inner.enter(&id).ok_or(SagaError::Shutdown)?;
        let span = info_span!("saga", saga = %definition.name, id = %id);
        let inner = self.inner.clone();
        async move {
            let now = now_ms();
            let mut steps: Vec<StepRecord> = definition
                .steps
                .iter()
                .map(|s| StepRecord::new(&s.name, s.idempotent))
                .collect();
            if let Some(first) = steps.first_mut() {
                first.status = StepStatus::Running;
                first.attempts = 1;
                first.started_at_ms = Some(now);
            }
            let mut record = SagaRecord {
                format: FORMAT,
                id: id.clone(),
                name: definition.name.clone(),
                version: definition.version,
                state: SagaState::Running,
                data,
                steps,
                error: None,
                owner: inner.options.node_id.clone(),
                lease_until_ms: lease_until(inner.options.lease),
                created_at_ms: now,
                updated_at_ms: now,
                request: None,
                history: Vec::new(),
            };
            record.note("started", None, None);
            record.note("step.intent", Some(&definition.steps[0].name), None);
            let mut current = inner.log.create(&record).await?;
            inner.publish("saga.started", &current.record).await;
            let outcome = inner.drive(&definition, &mut current).await;
            drop(guard);
            outcome
        }
        .instrument(span)
        .await
    }

    /// Resumes every unfinished saga of the registered names, as at start-up: a saga
    /// interrupted during a step that is safe to repeat goes forward, otherwise it is
    /// compensated; a compensation in progress is finished. Sagas whose owner is another
    /// live orchestrator (lease not run out) are skipped. Also picks up operators' retry
    /// requests. Returns when every resumed saga has ended.
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let names: Vec<String> = read(&self.inner.definitions).keys().cloned().collect();
        let mut report = RecoveryReport::default();
        let mut tasks = JoinSet::new();
        for name in names {
            for id in self.inner.log.active_ids(&name).await? {
                let Some(guard) = self.inner.enter(&id) else {
                    report.skipped += 1;
                    continue;
                };
                let permit = self
                    .inner
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| SagaError::Shutdown)?;
                let inner = self.inner.clone();
                let name = name.clone();
                tasks.spawn(async move {
                    let result = inner.resume(&name, &guard.id).await;
                    drop(permit);
                    (guard.id.clone(), result)
                });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(Some(outcome)))) => report.outcomes.push(outcome),
                Ok((_, Ok(None))) => report.skipped += 1,
                Ok((id, Err(e))) => report.errors.push((id, e.to_string())),
                Err(e) => report.errors.push((String::new(), e.to_string())),
            }
        }
        self.inner.poll_requests().await;
        Ok(report)
    }

    /// Picks up operators' retry requests now (the background task does it every
    /// `poll_interval`); returns the sagas started again.
    pub async fn poll_requests(&self) -> usize {
        self.inner.poll_requests().await
    }

    /// Stops the background task. Sagas being run finish with their callers.
    pub fn shutdown(&self) {
        if let Some(task) = lock(&self.inner.background).take() {
            task.abort();
        }
    }
}

async fn background(inner: Weak<Inner>) {
    let (poll, sweep) = match inner.upgrade() {
        Some(i) => (i.options.poll_interval, i.options.recovery_interval),
        None => return,
    };
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(poll).await;
        let Some(inner) = inner.upgrade() else { return };
        inner.poll_requests().await;
        if last_sweep.elapsed() >= sweep {
            last_sweep = tokio::time::Instant::now();
            let orchestrator = SagaOrchestrator {
                inner: inner.clone(),
            };
            // Sagas resumed in the background end on their own; errors are logged.
            tokio::spawn(async move {
                match orchestrator.recover().await {
                    Ok(report) => {
                        for (id, error) in report.errors {
                            warn!(saga = %id, %error, "saga recovery failed");
                        }
                    }
                    Err(error) => warn!(%error, "saga recovery sweep failed"),
                }
            });
        }
    }
}

impl Inner {
    fn latest(&self, name: &str) -> Option<Arc<Definition>> {
        read(&self.definitions)
            .get(name)
            .and_then(|v| v.values().next_back().cloned())
    }

    fn definition(&self, name: &str, version: u32) -> Option<Arc<Definition>> {
        read(&self.definitions)
            .get(name)
            .and_then(|v| v.get(&version).cloned())
    }

    /// Marks `id` as driven here; `None` when it already is.
    fn enter(self: &Arc<Self>, id: &str) -> Option<InFlight> {
        lock(&self.in_flight)
            .insert(id.to_owned())
            .then(|| InFlight {
                inner: self.clone(),
                id: id.to_owned(),
            })
    }

    fn may_claim(&self, record: &SagaRecord) -> bool {
        record.owner == self.options.node_id || record.lease_until_ms <= now_ms()
    }

    /// Takes over saga `id` if it is unfinished and claimable, and drives it to its end.
    /// `None` when it was left alone.
    async fn resume(&self, name: &str, id: &str) -> Result<Option<SagaOutcome>> {
        let Some(mut current) = self.log.get_versioned(id).await? else {
            // The index row was written, the record was not (yet): nothing ran. Another
            // process may be between the two writes, so only an old row is dropped.
            if started_ms(id).is_some_and(|t| t.saturating_add(lease_ms(&self.options)) < now_ms())
            {
                self.log.drop_active(name, id).await?;
            }
            return Ok(None);
        };
        let record = current.record.clone();
        if !record.state.is_active() {
            // Ended (or needs attention) but the index still lists it: repair the index.
            self.log.reindex(&record, None).await?;
            return Ok(None);
        }
        let Some(definition) = self.definition(&record.name, record.version) else {
            debug!(saga = %id, version = record.version, "version not registered here");
            return Ok(None);
        };
        check_steps(&definition, &record)?;
        if !self.may_claim(&record) {
            return Ok(None);
        }
        let span = info_span!("saga", saga = %record.name, id = %id);
        async {
            let mut next = record.clone();
            next.owner = self.options.node_id.clone();
            next.note("recovered", None, None);
            if next.state == SagaState::Running {
                match next.steps.iter().position(|s| s.status != StepStatus::Done) {
                    Some(i) if next.steps[i].status == StepStatus::Running && !next.steps[i].idempotent => {
                        let message = format!(
                            "the orchestrator stopped during step {}, which is not safe to repeat; its outcome is unknown",
                            next.steps[i].name
                        );
                        next.steps[i].status = StepStatus::InDoubt;
                        next.steps[i].error = Some(message.clone());
                        next.note("step.in_doubt", Some(&definition.steps[i].name), Some(&message));
                        next.error = Some(message);
                        next.state = SagaState::Compensating;
                        start_next_compensation(&mut next);
                    }
                    Some(i) => {
                        next.steps[i].status = StepStatus::Running;
                        next.steps[i].attempts += 1;
                        next.steps[i].started_at_ms.get_or_insert(now_ms());
                        next.note("step.intent", Some(&definition.steps[i].name), None);
                    }
                    None => next.state = SagaState::Completed,
                }
            } else {
                start_next_compensation(&mut next);
            }
            let previous = record.state;
            self.save(&mut current, next).await?;
            if current.record.state != previous {
                self.log.reindex(&current.record, Some(previous)).await?;
                self.announce(&current.record).await;
            }
            if current.record.state.is_active() {
                self.drive(&definition, &mut current).await.map(Some)
            } else {
                Ok(Some(SagaOutcome::of(&current.record)))
            }
        }
        .instrument(span)
        .await
    }

    /// Writes `record` as the next state of `current` (renewing the lease).
    async fn save(&self, current: &mut Versioned, mut record: SagaRecord) -> Result<()> {
        record.lease_until_ms = lease_until(self.options.lease);
        record.updated_at_ms = now_ms();
        self.log.update(current, record).await
    }

    /// Drives an active saga whose current intent is logged in `current`.
    async fn drive(&self, definition: &Definition, current: &mut Versioned) -> Result<SagaOutcome> {
        let mut round_attempts = 0u32;
        loop {
            let record = current.record.clone();
            match record.state {
                SagaState::Running => {
                    let Some(i) = record
                        .steps
                        .iter()
                        .position(|s| s.status != StepStatus::Done)
                    else {
                        let mut next = record;
                        next.state = SagaState::Completed;
                        next.note("completed", None, None);
                        self.save(current, next).await?;
                        self.finish(current, SagaState::Running).await?;
                        continue;
                    };
                    self.forward(definition, current, i).await?;
                }
                SagaState::Compensating => {
                    let Some(i) = record
                        .steps
                        .iter()
                        .rposition(|s| s.status.needs_compensation())
                    else {
                        let mut next = record;
                        next.state = SagaState::Compensated;
                        next.note("compensated", None, None);
                        self.save(current, next).await?;
                        self.finish(current, SagaState::Compensating).await?;
                        continue;
                    };
                    if record.steps[i].status != StepStatus::Compensating {
                        let mut next = record;
                        mark_compensating(&mut next, i);
                        self.save(current, next).await?;
                        continue;
                    }
                    round_attempts += 1;
                    if self
                        .compensate(definition, current, i, round_attempts)
                        .await?
                    {
                        round_attempts = 0;
                    }
                }
                _ => return Ok(SagaOutcome::of(&current.record)),
            }
        }
    }

    /// Runs the action of step `i` (its intent is logged) and logs the result.
    async fn forward(
        &self,
        definition: &Definition,
        current: &mut Versioned,
        i: usize,
    ) -> Result<()> {
        let step = &definition.steps[i];
        let mut tries = 0u32;
        loop {
            let record = &current.record;
            let ctx = StepContext::new(
                &record.id,
                &record.name,
                &step.name,
                Phase::Action,
                record.steps[i].attempts,
            );
            let result =
                match tokio::time::timeout(step.timeout, (step.action)(ctx, record.data.clone()))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(StepError::timed_out(&step.name, step.timeout)),
                };
            let mut next = current.record.clone();
            let now = now_ms();
            match result {
                Ok(data) => {
                    next.data = data;
                    next.steps[i].status = StepStatus::Done;
                    next.steps[i].finished_at_ms = Some(now);
                    next.steps[i].error = None;
                    next.note("step.done", Some(&step.name), None);
                    if let Some(following) = definition.steps.get(i + 1) {
                        let s = &mut next.steps[i + 1];
                        s.status = StepStatus::Running;
                        s.attempts += 1;
                        s.started_at_ms = Some(now);
                        next.note("step.intent", Some(&following.name), None);
                        self.save(current, next).await?;
                    } else {
                        next.state = SagaState::Completed;
                        next.note("completed", None, None);
                        self.save(current, next).await?;
                        self.finish(current, SagaState::Running).await?;
                    }
                    return Ok(());
                }
                Err(error) if error.is_retryable() && step.idempotent && tries < step.retries => {
                    tries += 1;
                    next.steps[i].attempts += 1;
                    next.steps[i].error = Some(error.to_string());
                    next.note("step.retry", Some(&step.name), Some(error.message()));
                    self.save(current, next).await?;
                    tokio::time::sleep(self.options.backoff.delay(tries - 1)).await;
                }
                Err(error) => {
                    next.steps[i].status = if error.is_in_doubt() {
                        StepStatus::InDoubt
                    } else {
                        StepStatus::Failed
                    };
                    next.steps[i].finished_at_ms = Some(now);
                    next.steps[i].error = Some(error.to_string());
                    next.error = Some(format!("step {} failed: {error}", step.name));
                    next.note("step.failed", Some(&step.name), Some(error.message()));
                    next.state = SagaState::Compensating;
                    start_next_compensation(&mut next);
                    self.save(current, next).await?;
                    self.log
                        .reindex(&current.record, Some(SagaState::Running))
                        .await?;
                    self.publish("saga.failed", &current.record).await;
                    return Ok(());
                }
            }
        }
    }

    /// Runs the compensation of step `i` (its intent is logged) once and logs the result.
    /// True when it succeeded.
    async fn compensate(
        &self,
        definition: &Definition,
        current: &mut Versioned,
        i: usize,
        round_attempts: u32,
    ) -> Result<bool> {
        let step = &definition.steps[i];
        let record = &current.record;
        let ctx = StepContext::new(
            &record.id,
            &record.name,
            &step.name,
            Phase::Compensation,
            record.steps[i].compensation_attempts,
        );
        let result =
            match tokio::time::timeout(step.timeout, (step.compensation)(ctx, record.data.clone()))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(StepError::timed_out(&step.name, step.timeout)),
            };
        let mut next = current.record.clone();
        let now = now_ms();
        match result {
            Ok(()) => {
                next.steps[i].status = StepStatus::Compensated;
                next.steps[i].compensation_finished_at_ms = Some(now);
                next.steps[i].compensation_error = None;
                next.note("compensation.done", Some(&step.name), None);
                start_next_compensation(&mut next);
                self.save(current, next).await?;
                Ok(true)
            }
            Err(error) if round_attempts <= self.options.compensation_retries => {
                next.steps[i].compensation_error = Some(error.to_string());
                next.steps[i].compensation_attempts += 1;
                next.note(
                    "compensation.retry",
                    Some(&step.name),
                    Some(error.message()),
                );
                self.save(current, next).await?;
                tokio::time::sleep(self.options.backoff.delay(round_attempts - 1)).await;
                Ok(false)
            }
            Err(error) => {
                next.steps[i].status = StepStatus::CompensationFailed;
                next.steps[i].compensation_finished_at_ms = Some(now);
                next.steps[i].compensation_error = Some(error.to_string());
                next.error = Some(format!(
                    "compensation of step {} failed after {round_attempts} attempts: {error}",
                    step.name
                ));
                next.note(
                    "compensation.failed",
                    Some(&step.name),
                    Some(error.message()),
                );
                next.state = SagaState::NeedsAttention;
                next.note("needs_attention", None, None);
                self.save(current, next).await?;
                self.finish(current, SagaState::Compensating).await?;
                Ok(false)
            }
        }
    }

    /// Index and event after the saga left `previous` for a state that is not active.
    async fn finish(&self, current: &Versioned, previous: SagaState) -> Result<()> {
        self.log.reindex(&current.record, Some(previous)).await?;
        self.announce(&current.record).await;
        Ok(())
    }

    async fn announce(&self, record: &SagaRecord) {
        let event = match record.state {
            SagaState::Completed => "saga.completed",
            SagaState::Compensated => "saga.compensated",
            SagaState::NeedsAttention => "saga.needs_attention",
            SagaState::Aborted => "saga.aborted",
            SagaState::Compensating => "saga.failed",
            SagaState::Running => return,
        };
        self.publish(event, record).await;
    }

    /// Publishes a state change; a failure to publish is logged, never fails the saga (the
    /// log is the truth, events are notifications).
    async fn publish(&self, event: &str, record: &SagaRecord) {
        let Some(bus) = &self.options.events else {
            return;
        };
        let payload = json!({
            "saga_id": record.id,
            "name": record.name,
            "version": record.version,
            "state": record.state,
            "error": record.error,
            "node": self.options.node_id,
        });
        let message = Message::new(payload)
            .key(record.id.clone())
            .event_type(event);
        if let Err(error) = bus.publish(&self.options.event_topic, message).await {
            warn!(saga = %record.id, event, %error, "could not publish saga event");
        }
    }

    /// Handles operators' retry requests for the registered names; returns how many sagas
    /// were started again.
    async fn poll_requests(self: &Arc<Self>) -> usize {
        let names: Vec<String> = read(&self.definitions).keys().cloned().collect();
        let mut started = 0;
        for name in names {
            let requests = match self.log.requests(&name).await {
                Ok(r) => r,
                Err(error) => {
                    warn!(saga = %name, %error, "could not read saga retry requests");
                    continue;
                }
            };
            for (id, at_ms) in requests {
                match self.take_request(&name, &id, at_ms).await {
                    Ok(true) => started += 1,
                    Ok(false) => {}
                    Err(error) => warn!(saga = %id, %error, "saga retry request failed"),
                }
            }
        }
        started
    }

    async fn take_request(self: &Arc<Self>, name: &str, id: &str, at_ms: u64) -> Result<bool> {
        let Some(guard) = self.enter(id) else {
            return Ok(false);
        };
        let Some(mut current) = self.log.get_versioned(id).await? else {
            self.log.drop_request(name, id).await?;
            return Ok(false);
        };
        let record = current.record.clone();
        if record.state != SagaState::NeedsAttention {
            self.log.drop_request(name, id).await?;
            return Ok(false);
        }
        if record.request != Some(OperatorRequest::Retry) {
            if now_ms().saturating_sub(at_ms) > STALE_REQUEST_MS {
                self.log.drop_request(name, id).await?;
            }
            return Ok(false);
        }
        let Some(definition) = self.definition(&record.name, record.version) else {
            return Ok(false);
        };
        check_steps(&definition, &record)?;
        let mut next = record;
        next.owner = self.options.node_id.clone();
        next.request = None;
        next.state = SagaState::Compensating;
        next.note("retry", None, None);
        start_next_compensation(&mut next);
        self.save(&mut current, next).await?;
        self.log
            .reindex(&current.record, Some(SagaState::NeedsAttention))
            .await?;
        self.log.drop_request(name, id).await?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SagaError::Shutdown)?;
        let inner = self.clone();
        let span = info_span!("saga", saga = %definition.name, id = %id);
        tokio::spawn(
            async move {
                if let Err(error) = inner.drive(&definition, &mut current).await {
                    warn!(%error, "retried saga stopped");
                }
                drop(permit);
                drop(guard);
            }
            .instrument(span),
        );
        Ok(true)
    }
}

/// The highest step whose effect must be undone becomes `compensating` (intent), unless one
/// already is.
fn start_next_compensation(record: &mut SagaRecord) {
    if let Some(i) = record
        .steps
        .iter()
        .rposition(|s| s.status.needs_compensation())
        && record.steps[i].status != StepStatus::Compensating
    {
        mark_compensating(record, i);
    }
}

fn mark_compensating(record: &mut SagaRecord, i: usize) {
    let step = &mut record.steps[i];
    step.status = StepStatus::Compensating;
    step.compensation_attempts += 1;
    step.compensation_started_at_ms.get_or_insert(now_ms());
    let name = step.name.clone();
    record.note("compensation.intent", Some(&name), None);
}

fn check_steps(definition: &Definition, record: &SagaRecord) -> Result<()> {
    let same = definition.steps.len() == record.steps.len()
        && definition
            .steps
            .iter()
            .zip(&record.steps)
            .all(|(d, r)| d.name == r.name);
    if same {
        Ok(())
    } else {
        Err(SagaError::CorruptLog {
            id: record.id.clone(),
            reason: format!(
                "its steps do not match saga {} version {} as registered",
                definition.name, definition.version
            ),
        })
    }
}

/// When saga `id` (a UUID v7) was started, in ms since the epoch.
fn started_ms(id: &str) -> Option<u64> {
    let (secs, nanos) = uuid::Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    Some(secs.saturating_mul(1000) + u64::from(nanos / 1_000_000))
}

fn lease_ms(options: &SagaOptions) -> u64 {
    u64::try_from(options.lease.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
