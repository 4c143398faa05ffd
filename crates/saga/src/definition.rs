//! Saga definitions: a name, a version and steps, each with an action and a compensation.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use trellis_client::ServiceClient;
use trellis_core::{NameKind, validate_name};

use crate::error::{Result, SagaError, StepError};

/// Header carrying the idempotency key of a step's call.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Which way a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The action.
    Action,
    /// The compensation.
    Compensation,
}

impl Phase {
    /// `action` or `compensation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        }
    }
}

/// What a step's action or compensation is told about the call it makes.
#[derive(Debug, Clone)]
pub struct StepContext {
    saga_id: Arc<str>,
    saga_name: Arc<str>,
    step: Arc<str>,
    phase: Phase,
    attempt: u32,
}

impl StepContext {
    pub(crate) fn new(
        saga_id: &str,
        saga_name: &str,
        step: &str,
        phase: Phase,
        attempt: u32,
    ) -> Self {
        StepContext {
            saga_id: Arc::from(saga_id),
            saga_name: Arc::from(saga_name),
            step: Arc::from(step),
            phase,
            attempt,
        }
    }

    /// The saga id.
    pub fn saga_id(&self) -> &str {
        &self.saga_id
    }

    /// The saga name.
    pub fn saga_name(&self) -> &str {
        &self.saga_name
    }

    /// The step name.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// Action or compensation.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The attempt (1 for the first, counted across crashes and restarts).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The idempotency key of this call: `SAGA_ID:STEP:PHASE` — the same on every attempt,
    /// in every process, so a service that remembers keys applies the effect once.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}:{}", self.saga_id, self.step, self.phase.as_str())
    }

    /// The seed's `callService(service, action, payload)`: `POST /{action}` with `payload`
    /// as JSON to the service behind `client`, carrying the [`IDEMPOTENCY_KEY`] header, and
    /// marked retryable for the client (the key makes repeats safe). Decodes the JSON answer.
    pub async fn call_service<P, T>(
        &self,
        client: &ServiceClient,
        action: &str,
        payload: &P,
    ) -> Result<T, StepError>
    where
        P: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let key = HeaderValue::from_str(&self.idempotency_key())
            .map_err(|e| StepError::permanent(format!("idempotency key: {e}")))?;
        let response = client
            .post(&format!("/{}", action.trim_start_matches('/')))
            .header(IDEMPOTENCY_KEY, key)
            .json(payload)
            .retryable()
            .send()
            .await?;
        Ok(response.json::<T>().await?)
    }
}

/// The future a step returns.
pub type StepFuture<T> = Pin<Box<dyn Future<Output = Result<T, StepError>> + Send>>;

type ErasedAction = Arc<dyn Fn(StepContext, Value) -> StepFuture<Value> + Send + Sync>;
type ErasedCompensation = Arc<dyn Fn(StepContext, Value) -> StepFuture<()> + Send + Sync>;

/// One step: an action that takes the saga data and returns it (updated), and a
/// compensation that undoes the action.
///
/// Compensations must be idempotent and must accept being called for an action whose
/// effect never happened (after a crash or a timeout the outcome can be unknown); calls
/// made with [`StepContext::call_service`] carry an idempotency key for that.
pub struct Step<D> {
    pub(crate) name: String,
    pub(crate) action: ErasedAction,
    pub(crate) compensation: ErasedCompensation,
    pub(crate) idempotent: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: u32,
    _data: PhantomData<fn(D) -> D>,
}

impl<D> std::fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("idempotent", &self.idempotent)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl<D> Step<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    /// A step named `name` (letters, digits, `.`, `_`, `-`). Not idempotent, the
    /// orchestrator's default timeout, no forward retries.
    pub fn new<A, AF, C, CF>(name: &str, action: A, compensation: C) -> Self
    where
        A: Fn(StepContext, D) -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<D, StepError>> + Send + 'static,
        C: Fn(StepContext, D) -> CF + Send + Sync + 'static,
        CF: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let action: ErasedAction =
            Arc::new(move |ctx, value| match serde_json::from_value::<D>(value) {
                Ok(data) => {
                    let future = action(ctx, data);
                    Box::pin(async move {
                        let data = future.await?;
                        Ok(serde_json::to_value(data)?)
                    })
                }
                Err(e) => Box::pin(async move { Err(StepError::from(e)) }),
            });
        let compensation: ErasedCompensation =
            Arc::new(move |ctx, value| match serde_json::from_value::<D>(value) {
                Ok(data) => Box::pin(compensation(ctx, data)),
                Err(e) => Box::pin(async move { Err(StepError::from(e)) }),
            });
        Step {
            name: name.to_owned(),
            action,
            compensation,
            idempotent: false,
            timeout: None,
            retries: 0,
            _data: PhantomData,
        }
    }

    /// Marks the action safe to run again (it is idempotent or sends
    /// [`StepContext::idempotency_key`]): after a crash during the step, recovery runs it
    /// again and goes forward instead of compensating. Defaults to not idempotent.
    #[must_use]
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Time limit of one attempt of the action or the compensation. Defaults to the
    /// orchestrator's `step_timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Further attempts of a failing action, for retryable errors of an idempotent step
    /// (with the orchestrator's backoff). Defaults to 0.
    #[must_use]
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
}

/// A named, versioned saga over data `D`; build one with [`Saga::builder`].
pub struct Saga<D> {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) steps: Vec<Step<D>>,
}

impl<D> std::fmt::Debug for Saga<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .finish()
    }
}

impl<D> Saga<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    /// Starts a definition of saga `name` (letters, digits, `.`, `_`, `-`, at most 63
    /// bytes), version `version` (from 1).
    pub fn builder(name: &str, version: u32) -> SagaBuilder<D> {
        SagaBuilder {
            name: name.to_owned(),
            version,
            steps: Vec::new(),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Step names in order.
    pub fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }
}

/// Builds a [`Saga`].
#[must_use]
pub struct SagaBuilder<D> {
    name: String,
    version: u32,
    steps: Vec<Step<D>>,
}

impl<D> SagaBuilder<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    /// Adds a step with an action and its compensation (see [`Step::new`]).
    pub fn step<A, AF, C, CF>(self, name: &str, action: A, compensation: C) -> Self
    where
        A: Fn(StepContext, D) -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<D, StepError>> + Send + 'static,
        C: Fn(StepContext, D) -> CF + Send + Sync + 'static,
        CF: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.add_step(Step::new(name, action, compensation))
    }

    /// Adds a configured [`Step`].
    pub fn add_step(mut self, step: Step<D>) -> Self {
        self.steps.push(step);
        self
    }

    /// Checks and returns the saga: a valid name, version ≥ 1, at least one step, step
    /// names valid and distinct.
    pub fn build(self) -> Result<Saga<D>> {
        validate_name(NameKind::Service, &self.name)
            .map_err(|e| SagaError::Invalid(format!("saga name: {e}")))?;
        if self.version == 0 {
            return Err(SagaError::Invalid(format!(
                "saga {}: version must be at least 1",
                self.name
            )));
        }
        if self.steps.is_empty() {
            return Err(SagaError::Invalid(format!(
                "saga {}: has no steps",
                self.name
            )));
        }
        for (i, step) in self.steps.iter().enumerate() {
            validate_name(NameKind::Service, &step.name).map_err(|e| {
                SagaError::Invalid(format!("saga {}: step {}: {e}", self.name, i + 1))
            })?;
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(SagaError::Invalid(format!(
                    "saga {}: step name {:?} is used twice",
                    self.name, step.name
                )));
            }
            if step.timeout == Some(Duration::ZERO) {
                return Err(SagaError::Invalid(format!(
                    "saga {}: step {}: timeout must be above zero",
                    self.name, step.name
                )));
            }
        }
        Ok(Saga {
            name: self.name,
            version: self.version,
            steps: self.steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> SagaBuilder<u32> {
        Saga::builder("s", 1)
    }

    #[test]
    fn bad_definitions_name_the_problem() {
        let step = |name: &str| {
            Step::new(
                name,
                |_, d: u32| async move { Ok(d) },
                |_, _| async { Ok(()) },
            )
        };
        let cases: Vec<(SagaBuilder<u32>, &str)> = vec![
            (
                Saga::builder("bad name", 1).add_step(step("a")),
                "saga name",
            ),
            (
                Saga::builder("s", 0).add_step(step("a")),
                "version must be at least 1",
            ),
            (noop(), "has no steps"),
            (noop().add_step(step("a")).add_step(step("a")), "used twice"),
            (noop().add_step(step("a/b")), "step 1"),
            (
                noop().add_step(step("a").timeout(Duration::ZERO)),
                "above zero",
            ),
        ];
        for (builder, expected) in cases {
            let err = builder.build().unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let saga = noop()
            .add_step(step("a").idempotent())
            .add_step(step("b"))
            .build()
            .unwrap();
        assert_eq!(saga.step_names(), ["a", "b"]);
        assert!(saga.steps[0].idempotent && !saga.steps[1].idempotent);
    }

    #[test]
    fn idempotency_keys_are_stable_per_step_and_phase() {
        let a = StepContext::new("id1", "s", "pay", Phase::Action, 1);
        let b = StepContext::new("id1", "s", "pay", Phase::Action, 3);
        let c = StepContext::new("id1", "s", "pay", Phase::Compensation, 1);
        assert_eq!(a.idempotency_key(), b.idempotency_key());
        assert_eq!(a.idempotency_key(), "id1:pay:action");
        assert_ne!(a.idempotency_key(), c.idempotency_key());
    }
}
