//! Blue-green deployment — the seed's `blueGreenDeploy`: start the new version (green) beside
//! the running one (blue), split traffic between them through each instance's `weight`
//! metadata (read by the gateway's `weighted` load balancer), judge green from the gateway's
//! metrics over an analysis window, then promote it or roll it back.
//!
//! The steps, each recorded as a [`Decision`] with the figures it was based on (and a
//! `tracing` event):
//!
//! 1. **Split.** Blue's instances get the weight of blue's share *before* green exists, and
//!    green's instances are registered with green's share from their first registration, so
//!    green never takes more than its share. Weights are scaled by the other side's replica
//!    count, so the split is exact whatever the counts: with 2 blue and 1 green replicas and
//!    90/10, each blue instance has weight 9 and the green one 2 (18:2).
//! 2. **Start.** Green's replicas are started and registered once ready (see the local
//!    platform); if they do not become ready, green is stopped and blue is left alone.
//! 3. **Analyse.** Every `interval` until `window` has passed: green's replicas must all be
//!    running, registered and not unhealthy, none restarted; and once green has served
//!    `min_requests`, its error rate (5xx answers over requests) and p99 latency since the
//!    analysis began must stay within `max_error_rate` and `max_p99_latency`. The figures are
//!    differences between scrapes of the gateway's per-version counters — how Flagger reads
//!    Prometheus. Before `min_requests`, green already fails when its errors are too many
//!    for any outcome (errors / `min_requests` above the limit): a gateway that ejects a
//!    failing instance may never send it `min_requests`. A failed check ends the analysis at
//!    once; reaching the end of the window with fewer than `min_requests` fails too (green
//!    was never judged).
//! 4. **Promote** (passed): blue's weight goes to 0, green's weight metadata is removed
//!    (all of the traffic), blue is deregistered, drained for the platform's `drain`
//!    time, then stopped. **Roll back** (failed, `rollback_on_failure`): green's weight goes to
//!    0, green is deregistered, drained and stopped, blue's weights are removed again; blue's
//!    processes are never touched. **Hold** (failed, no rollback): both stay as they are.

pub mod metrics;

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use trellis_registry::InstanceStatus;

use crate::error::{DeployError, FieldError};
use crate::local::{ReplicaPhase, ReplicaStatus, check_version};
use crate::spec::{DeploySpec, Platform};
use metrics::{Figures, MetricsSource};

/// Percentages of traffic for blue (the running version) and green (the new one), adding
/// up to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrafficSplit {
    /// Share of blue, 0 to 99.
    pub blue: u32,
    /// Share of green, 1 to 100.
    pub green: u32,
}

impl Default for TrafficSplit {
    /// 90/10.
    fn default() -> Self {
        TrafficSplit {
            blue: 90,
            green: 10,
        }
    }
}

/// How green is judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalysisOptions {
    /// How long green is watched before it is promoted. Defaults to 60 s.
    pub window: Duration,
    /// Time between checks. Defaults to 10 s.
    pub interval: Duration,
    /// Highest acceptable share of 5xx answers, 0 to 1. Defaults to 0.01.
    pub max_error_rate: f64,
    /// Highest acceptable 99th percentile latency. Defaults to 500 ms.
    pub max_p99_latency: Duration,
    /// Requests green must have served before its figures are judged; fewer by the end of
    /// the window fails the analysis. Defaults to 20.
    pub min_requests: u64,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        AnalysisOptions {
            window: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            max_error_rate: 0.01,
            max_p99_latency: Duration::from_millis(500),
            min_requests: 20,
        }
    }
}

/// The seed's `blueGreenDeploy` options.
#[derive(Debug, Clone, PartialEq)]
pub struct BlueGreenOptions {
    /// The version running now (blue).
    pub current_version: String,
    /// The version to roll out (green).
    pub new_version: String,
    /// What to run as green. Defaults to blue's spec, with the image's tag set to
    /// `new_version` when it has an image.
    pub spec: Option<DeploySpec>,
    /// Traffic shares during the analysis. Defaults to 90/10.
    pub traffic_split: TrafficSplit,
    /// Stop green and restore blue when the analysis fails. Defaults to true.
    pub rollback_on_failure: bool,
    /// How green is judged.
    pub analysis: AnalysisOptions,
}

impl BlueGreenOptions {
    /// Options moving from `current_version` to `new_version` with the defaults.
    pub fn new(current_version: impl Into<String>, new_version: impl Into<String>) -> Self {
        BlueGreenOptions {
            current_version: current_version.into(),
            new_version: new_version.into(),
            spec: None,
            traffic_split: TrafficSplit::default(),
            rollback_on_failure: true,
            analysis: AnalysisOptions::default(),
        }
    }

    /// Sets what green runs.
    #[must_use]
    pub fn spec(mut self, spec: DeploySpec) -> Self {
        self.spec = Some(spec);
        self
    }

    /// Sets the traffic shares (percent).
    #[must_use]
    pub fn traffic_split(mut self, blue: u32, green: u32) -> Self {
        self.traffic_split = TrafficSplit { blue, green };
        self
    }

    /// Sets whether a failed analysis rolls back.
    #[must_use]
    pub fn rollback_on_failure(mut self, rollback: bool) -> Self {
        self.rollback_on_failure = rollback;
        self
    }

    /// Sets the analysis.
    #[must_use]
    pub fn analysis(mut self, analysis: AnalysisOptions) -> Self {
        self.analysis = analysis;
        self
    }

    /// Checks every option; all problems are reported, each naming its key. The spec, when
    /// given, is checked for the local platform.
    pub fn validate(&self, name: &str) -> Result<(), DeployError> {
        self.validate_for(name, crate::spec::Platform::Local)
    }

    /// [`validate`](Self::validate), checking the spec for `platform`.
    pub(crate) fn validate_for(
        &self,
        name: &str,
        platform: crate::spec::Platform,
    ) -> Result<(), DeployError> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, reason: String| {
            errors.push(FieldError {
                field: field.to_owned(),
                reason,
            })
        };
        for (field, version) in [
            ("current_version", &self.current_version),
            ("new_version", &self.new_version),
        ] {
            if let Err(DeployError::Invalid { errors: found, .. }) = check_version(name, version) {
                for e in found {
                    fail(field, e.reason);
                }
            }
        }
        if self.current_version == self.new_version {
            fail(
                "new_version",
                format!("is the current version {:?}", self.current_version),
            );
        }
        let TrafficSplit { blue, green } = self.traffic_split;
        if blue.checked_add(green) != Some(100) {
            fail(
                "traffic_split",
                format!("blue {blue} + green {green} must add up to 100"),
            );
        } else if green == 0 {
            fail(
                "traffic_split.green",
                "is 0; green needs traffic to be judged".into(),
            );
        }
        let a = &self.analysis;
        if a.interval.is_zero() {
            fail("analysis.interval", "must be greater than zero".into());
        }
        if a.window < a.interval {
            fail(
                "analysis.window",
                format!(
                    "{:?} is shorter than the interval {:?}",
                    a.window, a.interval
                ),
            );
        }
        if !(0.0..=1.0).contains(&a.max_error_rate) {
            fail(
                "analysis.max_error_rate",
                format!("{} is not a share between 0 and 1", a.max_error_rate),
            );
        }
        if a.max_p99_latency.is_zero() {
            fail(
                "analysis.max_p99_latency",
                "must be greater than zero".into(),
            );
        }
        if let Some(spec) = &self.spec
            && let Err(DeployError::Invalid {
                errors: spec_errors,
                ..
            }) = spec.validate(name, platform)
        {
            for e in spec_errors {
                fail(&format!("spec.{}", e.field), e.reason);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DeployError::Invalid {
                name: name.to_owned(),
                errors,
            })
        }
    }
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Green was started and is ready.
    Start,
    /// Traffic was split between blue and green.
    Split,
    /// An analysis check passed (or waited for traffic).
    Check,
    /// Green got all of the traffic; blue was stopped.
    Promote,
    /// Green was stopped; blue has all of the traffic again.
    Rollback,
    /// The analysis failed and rollback was off: both versions stay as they are.
    Hold,
}

impl Action {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Split => "split",
            Action::Check => "check",
            Action::Promote => "promote",
            Action::Rollback => "rollback",
            Action::Hold => "hold",
        }
    }
}

/// One step of a blue-green deployment and the figures it was based on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// When it was taken.
    pub at: SystemTime,
    /// What it did.
    pub action: Action,
    /// The version it is about (green, except for a split).
    pub version: String,
    /// Requests green served since the analysis began.
    pub requests: u64,
    /// Of those, 5xx answers.
    pub errors: u64,
    /// `errors / requests`, when there were requests.
    pub error_rate: Option<f64>,
    /// Green's 99th percentile latency, when known.
    pub p99: Option<Duration>,
    /// Why, in words, with the thresholds.
    pub reason: String,
}

/// How a blue-green deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Green runs alone.
    Promoted,
    /// Blue runs alone, as before.
    RolledBack,
    /// Both run, split as during the analysis.
    Held,
}

/// What [`ServiceDeployer::blue_green_deploy`](crate::ServiceDeployer::blue_green_deploy)
/// did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlueGreenReport {
    /// The service.
    pub service: String,
    /// Blue.
    pub current_version: String,
    /// Green.
    pub new_version: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Every decision, in order.
    pub decisions: Vec<Decision>,
    /// From the start until green was ready and registered.
    pub green_ready_after: Option<Duration>,
    /// Length of the analysis.
    pub analysis_took: Duration,
    /// From the verdict until the losing version was deregistered, drained and stopped.
    pub switch_took: Option<Duration>,
    /// The replicas running at the end.
    pub replicas: Vec<ReplicaStatus>,
}

/// Per-instance weights giving each side exactly its share: each side's share times the
/// other side's replica count, reduced.
pub(crate) fn split_weights(
    split: TrafficSplit,
    blue_count: usize,
    green_count: usize,
) -> (u32, u32) {
    let bc = u32::try_from(blue_count.max(1)).unwrap_or(u32::MAX);
    let gc = u32::try_from(green_count.max(1)).unwrap_or(u32::MAX);
    let blue = split.blue.saturating_mul(gc);
    let green = split.green.saturating_mul(bc);
    let divisor = gcd(blue, green).max(1);
    (blue / divisor, green / divisor)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Green's health as the supervisor and the registry see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GreenHealth {
    pub(crate) replicas: usize,
    /// Running and registered, not unhealthy.
    pub(crate) serving: usize,
    /// Why the others are not, one line each.
    pub(crate) problems: Vec<String>,
    pub(crate) restarts: u32,
}

pub(crate) fn green_health(replicas: &[ReplicaStatus]) -> GreenHealth {
    let mut health = GreenHealth {
        replicas: replicas.len(),
        ..GreenHealth::default()
    };
    for r in replicas {
        health.restarts += r.restarts;
        if r.phase != ReplicaPhase::Running || !r.registered {
            health.problems.push(format!(
                "{} is {:?}{}",
                r.instance_id,
                r.phase,
                r.last_exit
                    .as_deref()
                    .map(|e| format!(" (last exit: {e})"))
                    .unwrap_or_default()
            ));
        } else if r.health == Some(InstanceStatus::Unhealthy) {
            health
                .problems
                .push(format!("{} fails its health check", r.instance_id));
        } else {
            health.serving += 1;
        }
    }
    health
}

/// Collects decisions and emits each as a tracing event.
pub(crate) struct Recorder<'a> {
    pub(crate) decisions: Vec<Decision>,
    sink: &'a (dyn Fn(&Decision) + Send + Sync),
    service: String,
}

impl<'a> Recorder<'a> {
    pub(crate) fn new(service: &str, sink: &'a (dyn Fn(&Decision) + Send + Sync)) -> Self {
        Recorder {
            decisions: Vec::new(),
            sink,
            service: service.to_owned(),
        }
    }

    pub(crate) fn record(
        &mut self,
        action: Action,
        version: &str,
        figures: Figures,
        reason: impl Into<String>,
    ) {
        let decision = Decision {
            at: SystemTime::now(),
            action,
            version: version.to_owned(),
            requests: figures.requests,
            errors: figures.errors,
            error_rate: figures.error_rate,
            p99: figures.p99,
            reason: reason.into(),
        };
        tracing::info!(
            service = %self.service,
            version = %decision.version,
            action = decision.action.as_str(),
            requests = decision.requests,
            errors = decision.errors,
            error_rate = decision.error_rate,
            p99_ms = decision.p99.map(|d| d.as_secs_f64() * 1000.0),
            reason = %decision.reason,
            "blue-green decision"
        );
        (self.sink)(&decision);
        self.decisions.push(decision);
    }
}

/// The analysis verdict.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    pub(crate) passed: bool,
    pub(crate) figures: Figures,
    pub(crate) reason: String,
}

fn percent(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

/// Watches green for the analysis window; see the module docs for the rules.
pub(crate) async fn analyse(
    source: Option<&dyn MetricsSource>,
    service: &str,
    version: &str,
    options: &AnalysisOptions,
    probe: &(dyn Fn() -> GreenHealth + Send + Sync),
    recorder: &mut Recorder<'_>,
) -> Verdict {
    let fail = |figures: Figures, reason: String| Verdict {
        passed: false,
        figures,
        reason,
    };
    let base = match source {
        Some(source) => match source.sample(service, version).await {
            Ok(sample) => Some(sample),
            Err(e) => return fail(Figures::default(), format!("cannot read metrics: {e}")),
        },
        None => None,
    };
    let initial_restarts = probe().restarts;
    let start = tokio::time::Instant::now();
    let deadline = start + options.window;
    loop {
        let next = (tokio::time::Instant::now() + options.interval).min(deadline);
        tokio::time::sleep_until(next).await;
        let health = probe();
        let mut figures = Figures::default();
        if let (Some(source), Some(base)) = (source, &base) {
            match source.sample(service, version).await {
                Ok(sample) => figures = sample.since(base),
                Err(e) => return fail(figures, format!("cannot read metrics: {e}")),
            }
        }
        if health.restarts > initial_restarts {
            return fail(
                figures,
                format!(
                    "green restarted {} time(s) during the analysis",
                    health.restarts - initial_restarts
                ),
            );
        }
        if health.serving < health.replicas {
            return fail(
                figures,
                format!(
                    "{} of {} green replicas serving: {}",
                    health.serving,
                    health.replicas,
                    health.problems.join("; ")
                ),
            );
        }
        let judged = source.is_some() && figures.requests >= options.min_requests;
        // Before min_requests, errors already too many for any outcome: even if every
        // request up to min_requests succeeded, the rate would be above the limit. (A
        // gateway that ejects a failing instance may never send it min_requests.)
        let floor = figures.errors as f64 / figures.requests.max(options.min_requests) as f64;
        if source.is_some() && !judged && floor > options.max_error_rate {
            return fail(
                figures,
                format!(
                    "{} errors in {} requests: the error rate is at least {} by min_requests {}, above max_error_rate {}",
                    figures.errors,
                    figures.requests,
                    percent(floor),
                    options.min_requests,
                    percent(options.max_error_rate)
                ),
            );
        }
        if judged {
            if let Some(rate) = figures.error_rate
                && rate > options.max_error_rate
            {
                return fail(
                    figures,
                    format!(
                        "error rate {} over {} requests is above max_error_rate {}",
                        percent(rate),
                        figures.requests,
                        percent(options.max_error_rate)
                    ),
                );
            }
            if let Some(p99) = figures.p99
                && p99 > options.max_p99_latency
            {
                return fail(
                    figures,
                    format!(
                        "p99 latency {p99:?} is above max_p99_latency {:?}",
                        options.max_p99_latency
                    ),
                );
            }
        }
        let done = tokio::time::Instant::now() >= deadline;
        let reason = match (source, judged) {
            (None, _) => format!(
                "{} of {} replicas serving; no metrics source, health only",
                health.serving, health.replicas
            ),
            (Some(_), false) => format!(
                "waiting for traffic: {} of min_requests {}",
                figures.requests, options.min_requests
            ),
            (Some(_), true) => format!(
                "within limits: error rate {} (max {}), p99 {} (max {:?})",
                figures.error_rate.map_or_else(|| "-".into(), percent),
                percent(options.max_error_rate),
                figures
                    .p99
                    .map_or_else(|| "unknown".into(), |p| format!("{p:?}")),
                options.max_p99_latency
            ),
        };
        if done {
            if source.is_some() && !judged {
                return fail(
                    figures,
                    format!(
                        "only {} requests reached green within the {:?} window; min_requests is {}",
                        figures.requests, options.window, options.min_requests
                    ),
                );
            }
            return Verdict {
                passed: true,
                figures,
                reason: format!("analysis passed over {:?}: {reason}", options.window),
            };
        }
        recorder.record(Action::Check, version, figures, reason);
    }
}

/// Green's spec when the options give none: blue's, with the image tag set to the new
/// version.
pub(crate) fn green_spec(blue: &DeploySpec, new_version: &str) -> DeploySpec {
    let mut spec = blue.clone();
    if let Some(image) = &blue.image
        && let Ok(mut reference) = crate::image::ImageReference::parse(image)
    {
        reference.tag = Some(new_version.to_owned());
        reference.digest = None;
        spec.image = Some(reference.to_string());
    }
    spec
}

/// What blue-green needs from a platform, for one service: the local platform and the
/// docker backend run the same [`run_blue_green`] through it. A *version* is one version's
/// replicas as the platform tracks them.
pub(crate) trait GreenPlatform: Sync {
    /// One version's replicas.
    type Version: Send + Sync;

    /// The service.
    fn service(&self) -> &str;

    /// The platform green's spec is checked for.
    fn platform(&self) -> Platform;

    /// The running `version` of the service, if there is one.
    async fn version(&self, version: &str) -> Result<Option<Self::Version>, DeployError>;

    /// Every version of the service running (for the error when blue is not one of them).
    async fn running_versions(&self) -> Result<Vec<String>, DeployError>;

    /// The spec `version` runs, when the platform keeps it (green's default is blue's).
    fn spec_of<'a>(&self, version: &'a Self::Version) -> Option<&'a DeploySpec>;

    /// How many replicas `version` has.
    fn replica_count(&self, version: &Self::Version) -> usize;

    /// Starts `spec` as `version`, each replica registered with `weight` once ready.
    async fn start(&self, version: &str, spec: &DeploySpec, weight: u32) -> Started<Self::Version>;

    /// The reason of the `start` decision: green's replicas ready after `after`.
    fn started(&self, green: &Self::Version, after: Duration) -> String;

    /// Sets (or with `None` removes) the `weight` metadata of every registered instance of
    /// `version` through the registry.
    async fn set_weight(
        &self,
        version: &Self::Version,
        weight: Option<u32>,
    ) -> Result<(), DeployError>;

    /// Brings what [`replicas_of`](Self::replicas_of) reports for `version` up to date (a
    /// no-op where it is always current); called before the analysis and every
    /// `min(interval, 500 ms)` during it.
    async fn refresh(&self, version: &Self::Version) -> Result<(), DeployError>;

    /// The replicas of `version` with their registration and health, as last refreshed.
    fn replicas_of(&self, version: &Self::Version) -> Vec<ReplicaStatus>;

    /// Retires `version`: deregisters it, drains, then stops or removes its replicas.
    async fn retire(&self, version: &Self::Version) -> Result<(), DeployError>;

    /// What happened to a retired version's replicas, for the decisions: "stopped" or
    /// "removed".
    fn retired(&self) -> &'static str;

    /// How many replicas of `version` a promotion retires, for its decision (after
    /// [`retired`](Self::retired); empty where the platform does not say).
    fn retired_count(&self, version: &Self::Version) -> String;

    /// The replicas for the report: those of `only`, or every replica of the service.
    async fn report(&self, only: Option<&Self::Version>) -> Vec<ReplicaStatus>;
}

/// What [`GreenPlatform::start`] did: the outer error ends the deployment; the inner one is
/// green failing to start, with nothing of it left running or registered.
pub(crate) type Started<V> = Result<Result<V, DeployError>, DeployError>;

/// The error when green's spec is neither given nor known from blue.
pub(crate) fn missing_spec(name: &str, platform: Platform) -> DeployError {
    DeployError::Invalid {
        name: name.to_owned(),
        errors: vec![FieldError {
            field: "spec".to_owned(),
            reason: format!("missing; blue-green on {platform} needs green's spec"),
        }],
    }
}

/// Runs a blue-green deployment of the service on `platform`: split, start, analyse, then
/// promote, roll back or hold, recording every decision (see the module docs).
pub(crate) async fn run_blue_green<P: GreenPlatform>(
    platform: &P,
    source: Option<&dyn MetricsSource>,
    options: &BlueGreenOptions,
    sink: &(dyn Fn(&Decision) + Send + Sync),
) -> Result<BlueGreenReport, DeployError> {
    let name = platform.service();
    options.validate_for(name, platform.platform())?;
    let current = options.current_version.as_str();
    let new = options.new_version.as_str();
    let Some(blue) = platform.version(current).await? else {
        let running = platform.running_versions().await?;
        if running.is_empty() {
            return Err(DeployError::NotDeployed {
                name: name.to_owned(),
                version: Some(current.to_owned()),
            });
        }
        return Err(DeployError::VersionMismatch {
            name: name.to_owned(),
            expected: current.to_owned(),
            running,
        });
    };
    if platform.version(new).await?.is_some() {
        return Err(DeployError::AlreadyDeployed {
            name: name.to_owned(),
            version: new.to_owned(),
        });
    }
    let Some(spec) = options.spec.clone().or_else(|| {
        platform
            .spec_of(&blue)
            .map(|blue_spec| green_spec(blue_spec, new))
    }) else {
        return Err(missing_spec(name, platform.platform()));
    };
    spec.validate(name, platform.platform())?;
    let green_count = usize::try_from(spec.replicas).unwrap_or(0);
    let blue_count = platform.replica_count(&blue);
    let (blue_weight, green_weight) = split_weights(options.traffic_split, blue_count, green_count);
    let mut recorder = Recorder::new(name, sink);
    let started = Instant::now();

    // 1. Blue's share first, so green never takes more than its own.
    platform.set_weight(&blue, Some(blue_weight)).await?;
    // 2. Green, registered with its share from the start.
    let green = match platform.start(new, &spec, green_weight).await? {
        Ok(green) => green,
        Err(e) => {
            platform.set_weight(&blue, None).await?;
            recorder.record(
                Action::Rollback,
                new,
                Figures::default(),
                format!("green did not start: {e}; blue keeps all of the traffic"),
            );
            return Ok(BlueGreenReport {
                service: name.to_owned(),
                current_version: current.to_owned(),
                new_version: new.to_owned(),
                outcome: Outcome::RolledBack,
                decisions: recorder.decisions,
                green_ready_after: None,
                analysis_took: Duration::ZERO,
                switch_took: None,
                replicas: platform.report(Some(&blue)).await,
            });
        }
    };
    let green_ready_after = started.elapsed();
    recorder.record(
        Action::Start,
        new,
        Figures::default(),
        platform.started(&green, green_ready_after),
    );
    recorder.record(
        Action::Split,
        new,
        Figures::default(),
        format!(
            "blue {current} {}% (weight {blue_weight} on each of {blue_count}), green {new} {}% (weight {green_weight} on each of {})",
            options.traffic_split.blue,
            options.traffic_split.green,
            platform.replica_count(&green)
        ),
    );

    // 3. Analysis: green is refreshed every interval (at most every 500 ms) while the
    //    analysis waits; the probe reads the latest refresh.
    let analysis_started = Instant::now();
    platform.refresh(&green).await?;
    let probe = || green_health(&platform.replicas_of(&green));
    let verdict = {
        let analysis = analyse(source, name, new, &options.analysis, &probe, &mut recorder);
        tokio::pin!(analysis);
        let period = options.analysis.interval.min(Duration::from_millis(500));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                verdict = &mut analysis => break verdict,
                _ = tick.tick() => {
                    if let Err(e) = platform.refresh(&green).await {
                        tracing::warn!(service = %name, version = %new, error = %e, "cannot inspect green");
                    }
                }
            }
        }
    };
    let analysis_took = analysis_started.elapsed();

    // 4. Verdict. The losing version is deregistered before it is stopped.
    let switch_started = Instant::now();
    let outcome = if verdict.passed {
        platform.set_weight(&blue, Some(0)).await?;
        platform.set_weight(&green, None).await?;
        platform.retire(&blue).await?;
        recorder.record(
            Action::Promote,
            new,
            verdict.figures,
            format!(
                "{}; blue {current} deregistered, drained and {}{}",
                verdict.reason,
                platform.retired(),
                platform.retired_count(&blue)
            ),
        );
        Outcome::Promoted
    } else if options.rollback_on_failure {
        platform.set_weight(&green, Some(0)).await?;
        platform.retire(&green).await?;
        platform.set_weight(&blue, None).await?;
        recorder.record(
            Action::Rollback,
            new,
            verdict.figures,
            format!(
                "{}; green deregistered and {}, blue {current} has all of the traffic",
                verdict.reason,
                platform.retired()
            ),
        );
        Outcome::RolledBack
    } else {
        recorder.record(
            Action::Hold,
            new,
            verdict.figures,
            format!(
                "{}; rollback_on_failure is off: both versions keep the split",
                verdict.reason
            ),
        );
        Outcome::Held
    };
    let switch_took = (outcome != Outcome::Held).then(|| switch_started.elapsed());
    Ok(BlueGreenReport {
        service: name.to_owned(),
        current_version: current.to_owned(),
        new_version: new.to_owned(),
        outcome,
        decisions: recorder.decisions,
        green_ready_after: Some(green_ready_after),
        analysis_took,
        switch_took,
        replicas: platform.report(None).await,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::metrics::{BoxFuture, VersionSample};
    use super::*;

    #[test]
    fn weights_give_each_side_its_share_exactly() {
        let s = TrafficSplit {
            blue: 90,
            green: 10,
        };
        assert_eq!(split_weights(s, 1, 1), (9, 1));
        assert_eq!(split_weights(s, 2, 1), (9, 2)); // 18 : 2
        assert_eq!(split_weights(s, 3, 2), (6, 1)); // 18 : 2
        let (b, g) = split_weights(s, 3, 2);
        assert_eq!((b * 3) * 10, (g * 2) * 90);
        let all_green = TrafficSplit {
            blue: 0,
            green: 100,
        };
        assert_eq!(split_weights(all_green, 2, 2), (0, 1));
    }

    #[test]
    fn options_are_validated_naming_each_key() {
        let ok = BlueGreenOptions::new("1.1.0", "1.2.0");
        assert!(ok.validate("users").is_ok());
        let bad = BlueGreenOptions::new("1.1.0", "1.1.0")
            .traffic_split(80, 30)
            .analysis(AnalysisOptions {
                window: Duration::from_secs(1),
                interval: Duration::from_secs(2),
                max_error_rate: 1.5,
                ..AnalysisOptions::default()
            })
            .spec(DeploySpec {
                replicas: -1,
                ..DeploySpec::default()
            });
        let err = bad.validate("users").unwrap_err();
        assert_eq!(
            err.fields(),
            [
                "new_version",
                "traffic_split",
                "analysis.window",
                "analysis.max_error_rate",
                "spec.command",
                "spec.replicas"
            ]
        );
        let zero = BlueGreenOptions::new("1", "2").traffic_split(100, 0);
        assert_eq!(
            zero.validate("users").unwrap_err().fields(),
            ["traffic_split.green"]
        );
        let slash = BlueGreenOptions::new("1", "2/x");
        let err = slash.validate("users").unwrap_err();
        assert_eq!(err.fields(), ["new_version"]);
        assert!(err.to_string().contains("'/'"), "{err}");
    }

    #[test]
    fn green_spec_retags_the_image() {
        let blue = DeploySpec {
            image: Some("docker.io/org/users:1.1.0".into()),
            ..DeploySpec::default()
        };
        assert_eq!(
            green_spec(&blue, "1.2.0").image.as_deref(),
            Some("docker.io/org/users:1.2.0")
        );
    }

    /// Cumulative samples: each call returns the next, the last one repeats.
    #[derive(Debug)]
    struct Scripted(Mutex<Vec<VersionSample>>);

    impl Scripted {
        fn new(samples: &[(u64, u64, f64)]) -> Self {
            // (requests, errors, latency of all requests in seconds)
            let samples = samples
                .iter()
                .map(|&(requests, errors, latency)| VersionSample {
                    requests,
                    errors,
                    buckets: vec![
                        (0.01, if latency <= 0.01 { requests } else { 0 }),
                        (1.0, requests),
                        (f64::INFINITY, requests),
                    ],
                })
                .rev()
                .collect();
            Scripted(Mutex::new(samples))
        }
    }

    impl MetricsSource for Scripted {
        fn sample<'a>(
            &'a self,
            _service: &'a str,
            _version: &'a str,
        ) -> BoxFuture<'a, Result<VersionSample, DeployError>> {
            let mut samples = self.0.lock().unwrap();
            let next = if samples.len() > 1 {
                samples.pop().unwrap()
            } else {
                samples[0].clone()
            };
            Box::pin(async move { Ok(next) })
        }
    }

    fn healthy() -> GreenHealth {
        GreenHealth {
            replicas: 2,
            serving: 2,
            problems: Vec::new(),
            restarts: 0,
        }
    }

    fn options() -> AnalysisOptions {
        AnalysisOptions {
            window: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            max_error_rate: 0.05,
            max_p99_latency: Duration::from_millis(100),
            min_requests: 20,
        }
    }

    async fn run(
        source: Option<&dyn MetricsSource>,
        probe: fn() -> GreenHealth,
    ) -> (Verdict, Vec<Decision>, Duration) {
        let sink = |_: &Decision| {};
        let mut recorder = Recorder::new("users", &sink);
        let started = tokio::time::Instant::now();
        let verdict = analyse(source, "users", "1.2.0", &options(), &probe, &mut recorder).await;
        (verdict, recorder.decisions, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_green_passes_after_the_whole_window() {
        let source = Scripted::new(&[(0, 0, 0.0), (30, 0, 0.005), (60, 1, 0.005), (90, 1, 0.005)]);
        let (verdict, decisions, took) = run(Some(&source), healthy).await;
        assert!(verdict.passed, "{verdict:?}");
        assert_eq!(took, Duration::from_secs(30));
        assert_eq!(verdict.figures.requests, 90);
        assert_eq!(verdict.figures.errors, 1);
        assert_eq!(decisions.len(), 2, "a check at 10 s and 20 s");
        assert!(decisions.iter().all(|d| d.action == Action::Check));
        assert_eq!(decisions[0].requests, 30);
        assert_eq!(decisions[0].p99, Some(Duration::from_secs_f64(0.0099)));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_fail_at_the_first_check_with_enough_requests() {
        // 1 error in 10 requests: 1 of 20 (5%) is not above 5%, so wait for traffic.
        let source = Scripted::new(&[(0, 0, 0.0), (10, 1, 0.005), (40, 4, 0.005)]);
        let (verdict, decisions, took) = run(Some(&source), healthy).await;
        assert!(!verdict.passed);
        assert_eq!(
            took,
            Duration::from_secs(20),
            "10 requests at 10 s are too few to judge"
        );
        assert_eq!(verdict.figures.requests, 40);
        assert_eq!(verdict.figures.error_rate, Some(0.1));
        assert!(
            verdict.reason.contains("error rate 10.00%"),
            "{}",
            verdict.reason
        );
        assert_eq!(decisions.len(), 1);
        assert!(
            decisions[0]
                .reason
                .contains("waiting for traffic: 10 of min_requests 20")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_too_many_for_min_requests_fail_early() {
        // 5 errors in 5 requests (the gateway ejected green): at least 25% by 20 requests.
        let source = Scripted::new(&[(0, 0, 0.0), (5, 5, 0.005)]);
        let (verdict, decisions, took) = run(Some(&source), healthy).await;
        assert!(!verdict.passed);
        assert_eq!(took, Duration::from_secs(10));
        assert!(decisions.is_empty());
        assert!(
            verdict
                .reason
                .contains("at least 25.00% by min_requests 20"),
            "{}",
            verdict.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_green_fails_on_p99() {
        let source = Scripted::new(&[(0, 0, 0.0), (50, 0, 0.5)]);
        let (verdict, _, took) = run(Some(&source), healthy).await;
        assert!(!verdict.passed);
        assert_eq!(took, Duration::from_secs(10));
        assert!(verdict.reason.contains("p99 latency"), "{}", verdict.reason);
    }

    #[tokio::test(start_paused = true)]
    async fn too_little_traffic_fails_at_the_end() {
        let source = Scripted::new(&[(0, 0, 0.0), (5, 0, 0.001)]);
        let (verdict, _, took) = run(Some(&source), healthy).await;
        assert!(!verdict.passed);
        assert_eq!(took, Duration::from_secs(30));
        assert!(
            verdict.reason.contains("only 5 requests"),
            "{}",
            verdict.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unhealthy_or_restarted_green_fails() {
        let source = Scripted::new(&[(0, 0, 0.0), (100, 0, 0.001)]);
        let (verdict, _, _) = run(Some(&source), || GreenHealth {
            serving: 1,
            problems: vec!["users-1.2.0-1 fails its health check".into()],
            ..healthy()
        })
        .await;
        assert!(!verdict.passed);
        assert!(
            verdict.reason.contains("1 of 2 green replicas serving"),
            "{}",
            verdict.reason
        );
        // Without metrics, health alone decides.
        let (verdict, decisions, _) = run(None, healthy).await;
        assert!(verdict.passed);
        assert!(decisions[0].reason.contains("health only"));
    }
}
