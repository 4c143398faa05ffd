//! Load balancers over a changing set of endpoints, with passive outlier ejection.
//!
//! A [`LoadBalancer`] holds the endpoints of one service (fed from the registry snapshot
//! with [`LoadBalancer::update`]) and picks one per request with its [`Strategy`]:
//!
//! | strategy | picks | use |
//! |---|---|---|
//! | `round_robin` | each endpoint in turn | the seed's default; even load |
//! | `random` | uniformly at random | no shared counter |
//! | `least_request` | the less loaded of two random endpoints (power of two choices) | uneven request costs |
//! | `weighted` | in proportion to weights, exactly per cycle | blue-green and canary splits |
//! | `consistent_hash` | by a hash of a header or cookie, on a ring with virtual nodes | session affinity, caches |
//!
//! Endpoints that are unhealthy (per the registry), have weight 0, or were ejected as
//! outliers are skipped. [`pick`](LoadBalancer::pick) returns a [`Picked`] guard that
//! counts the request in flight until it is dropped; [`Picked::report`] tells the
//! balancer how it went, which drives [`OutlierDetection`].
//!
//! Picking is lock-free: the endpoint set and the list of eligible endpoints are an
//! immutable snapshot swapped atomically when endpoints change or an ejection starts or
//! ends.
//!
//! ```
//! use trellis_resilience::balance::{Endpoint, LoadBalancer, Outcome, PickContext, Strategy};
//!
//! let lb = LoadBalancer::new(Strategy::RoundRobin);
//! lb.update([
//!     Endpoint::new("user-service-1", "127.0.0.1:3001"),
//!     Endpoint::new("user-service-2", "127.0.0.1:3002"),
//!     Endpoint::new("user-service-3", "127.0.0.1:3003").with_health(false),
//! ]);
//! let first = lb.pick(&PickContext::new()).unwrap();
//! let second = lb.pick(&PickContext::new()).unwrap();
//! assert_ne!(first.id(), second.id());
//! assert_eq!(*second.value(), "127.0.0.1:3002");
//! first.report(Outcome::Success);
//! ```

mod outlier;
mod ring;

pub use self::outlier::OutlierDetection;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::time::Instant;

use self::outlier::Stats;
use self::ring::{Ring, WeightedCycle};
use crate::ConfigError;
use crate::sync::{lock, ms, stable_hash};

/// Virtual nodes per endpoint on a consistent-hash ring, by default.
pub const DEFAULT_VIRTUAL_NODES: u32 = 160;

/// How a [`LoadBalancer`] picks an endpoint. Parsed from the config names
/// (`"round_robin"`, `"random"`, `"least_request"`, `"weighted"`, `"consistent_hash"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each eligible endpoint in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Power of two choices: the endpoint with fewer requests in flight of two drawn at
    /// random.
    LeastRequest,
    /// In proportion to [`Endpoint::with_weight`], exactly over each cycle of
    /// `sum(weights)` picks, interleaved.
    Weighted,
    /// By the hash of [`PickContext::with_hash_key`] on a ring; requests without a key are
    /// spread at random.
    ConsistentHash,
}

const STRATEGY_NAMES: &str = "one of round_robin, random, least_request, weighted, consistent_hash";

impl FromStr for Strategy {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "round_robin" => Strategy::RoundRobin,
            "random" => Strategy::Random,
            "least_request" => Strategy::LeastRequest,
            "weighted" => Strategy::Weighted,
            "consistent_hash" => Strategy::ConsistentHash,
            other => {
                return Err(ConfigError::out_of_range(
                    "load_balancer",
                    STRATEGY_NAMES,
                    format!("{other:?}"),
                ));
            }
        })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::LeastRequest => "least_request",
            Strategy::Weighted => "weighted",
            Strategy::ConsistentHash => "consistent_hash",
        })
    }
}

/// One endpoint of a service: an id (the registry's instance id), a value the caller
/// needs to reach it (an address), a weight and a health flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint<T> {
    id: Arc<str>,
    value: T,
    weight: u32,
    healthy: bool,
}

impl<T> Endpoint<T> {
    /// A healthy endpoint of weight 1.
    pub fn new(id: impl Into<Arc<str>>, value: T) -> Self {
        Endpoint {
            id: id.into(),
            value,
            weight: 1,
            healthy: true,
        }
    }

    /// Sets the weight for [`Strategy::Weighted`]; 0 drains the endpoint under every
    /// strategy. Defaults to 1.
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Marks the endpoint healthy or not (unhealthy ones are skipped). Defaults to healthy.
    #[must_use]
    pub fn with_health(mut self, healthy: bool) -> Self {
        self.healthy = healthy;
        self
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id, shared (for a value that outlives the pick, such as a span tag).
    pub fn shared_id(&self) -> &Arc<str> {
        &self.id
    }

    /// The caller's value (an address).
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether the registry says it is healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }
}

/// What a pick may depend on besides the balancer's own state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PickContext<'a> {
    hash_key: Option<&'a [u8]>,
}

impl<'a> PickContext<'a> {
    /// No hash key.
    pub fn new() -> Self {
        PickContext { hash_key: None }
    }

    /// The bytes [`Strategy::ConsistentHash`] hashes (a header or cookie value; see
    /// [`http::HashOn`](crate::http::HashOn)).
    #[must_use]
    pub fn with_hash_key(mut self, key: &'a [u8]) -> Self {
        self.hash_key = Some(key);
        self
    }
}

/// How a request to an endpoint went, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The endpoint answered (2xx–4xx).
    Success,
    /// The endpoint failed: a 5xx, a connect error, a reset, a timeout.
    Failure,
}

/// An endpoint's state, for admin endpoints (times serialize as milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointStatus {
    /// Endpoint id.
    pub id: String,
    /// Healthy per the registry.
    pub healthy: bool,
    /// Weight.
    pub weight: u32,
    /// Whether picks may choose it now (healthy, weight above 0, not ejected).
    pub eligible: bool,
    /// Requests picked and not yet finished.
    pub in_flight: usize,
    /// Requests picked since the endpoint was first seen.
    pub requests: u64,
    /// Failures reported since the endpoint was first seen.
    pub failures: u64,
    /// Failures in a row, up to now.
    pub consecutive_failures: u32,
    /// Time left of the current ejection (milliseconds in JSON).
    #[serde(serialize_with = "ms::opt_duration")]
    pub ejected_for: Option<Duration>,
    /// Times ejected since the endpoint was first seen.
    pub times_ejected: u64,
}

#[derive(Debug)]
struct Member<T> {
    endpoint: Endpoint<T>,
    stats: Arc<Stats>,
}

/// An immutable snapshot: the endpoints and which of them may be picked.
#[derive(Debug)]
struct View<T> {
    members: Arc<[Member<T>]>,
    ring: Option<Arc<Ring>>,
    /// Indexes of eligible members, in member order.
    eligible: Box<[u32]>,
    /// Eligibility by member index (for the ring walk).
    mask: Box<[bool]>,
    weighted: Option<WeightedCycle>,
    /// The earliest end of a running ejection: the view must be rebuilt then.
    next_change: Option<Instant>,
}

#[derive(Debug)]
struct Shared<T> {
    strategy: Strategy,
    outlier: Option<OutlierDetection>,
    virtual_nodes: u32,
    view: ArcSwap<View<T>>,
    cursor: AtomicUsize,
    /// Serializes updates and ejections (never taken by picks, except when an ejection
    /// ends).
    writer: Mutex<()>,
}

/// Builds a [`LoadBalancer`].
#[derive(Debug, Clone)]
#[must_use]
pub struct LoadBalancerBuilder<T> {
    strategy: Strategy,
    outlier: Option<OutlierDetection>,
    virtual_nodes: u32,
    _marker: PhantomData<fn() -> T>,
}

impl<T> LoadBalancerBuilder<T> {
    /// Outlier detection settings. Defaults to [`OutlierDetection::default`].
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = Some(outlier);
        self
    }

    /// Never eject endpoints.
    pub fn without_outlier_detection(mut self) -> Self {
        self.outlier = None;
        self
    }

    /// Points per endpoint on the consistent-hash ring (1 to 10 000).
    /// Defaults to [`DEFAULT_VIRTUAL_NODES`].
    pub fn virtual_nodes(mut self, n: u32) -> Self {
        self.virtual_nodes = n;
        self
    }

    /// Checks the settings and builds an empty balancer.
    pub fn build(self) -> Result<LoadBalancer<T>, ConfigError> {
        let outlier = self.outlier.map(OutlierDetection::validate).transpose()?;
        if !(1..=10_000).contains(&self.virtual_nodes) {
            return Err(ConfigError::out_of_range(
                "virtual_nodes",
                "between 1 and 10000",
                self.virtual_nodes,
            ));
        }
        Ok(LoadBalancer::assemble(
            self.strategy,
            outlier,
            self.virtual_nodes,
        ))
    }
}

/// Picks endpoints of one service; cheap to clone (an `Arc`).
pub struct LoadBalancer<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for LoadBalancer<T> {
    fn clone(&self) -> Self {
        LoadBalancer {
            shared: self.shared.clone(),
        }
    }
}

impl<T> fmt::Debug for LoadBalancer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancer")
            .field("strategy", &self.shared.strategy)
            .field("endpoints", &self.shared.view.load().members.len())
            .finish_non_exhaustive()
    }
}

impl<T> LoadBalancer<T> {
    /// An empty balancer with default outlier detection.
    pub fn new(strategy: Strategy) -> Self {
        Self::assemble(
            strategy,
            Some(OutlierDetection::default()),
            DEFAULT_VIRTUAL_NODES,
        )
    }

    fn assemble(strategy: Strategy, outlier: Option<OutlierDetection>, virtual_nodes: u32) -> Self {
        let view = View {
            members: Arc::from(Vec::new()),
            ring: None,
            eligible: Box::new([]),
            mask: Box::new([]),
            weighted: None,
            next_change: None,
        };
        LoadBalancer {
            shared: Arc::new(Shared {
                strategy,
                outlier,
                virtual_nodes,
                view: ArcSwap::from_pointee(view),
                cursor: AtomicUsize::new(0),
                writer: Mutex::new(()),
            }),
        }
    }

    /// A builder for `strategy`.
    pub fn builder(strategy: Strategy) -> LoadBalancerBuilder<T> {
        LoadBalancerBuilder {
            strategy,
            outlier: Some(OutlierDetection::default()),
            virtual_nodes: DEFAULT_VIRTUAL_NODES,
            _marker: PhantomData,
        }
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.shared.strategy
    }

    /// Replaces the endpoint set (the first of duplicate ids wins). Endpoints that stay
    /// keep their counters and ejection state.
    pub fn update(&self, endpoints: impl IntoIterator<Item = Endpoint<T>>) {
        let shared = &*self.shared;
        let _writer = lock(&shared.writer);
        let old = shared.view.load_full();
        let previous: HashMap<&str, &Arc<Stats>> = old
            .members
            .iter()
            .map(|m| (m.endpoint.id(), &m.stats))
            .collect();
        let mut seen = HashSet::new();
        let members: Vec<Member<T>> = endpoints
            .into_iter()
            .filter(|e| seen.insert(e.id.clone()))
            .map(|endpoint| Member {
                stats: previous
                    .get(endpoint.id())
                    .map_or_else(Arc::default, |s| Arc::clone(s)),
                endpoint,
            })
            .collect();
        let ring = (shared.strategy == Strategy::ConsistentHash).then(|| {
            Arc::new(Ring::new(
                members.iter().map(|m| m.endpoint.id()),
                shared.virtual_nodes,
            ))
        });
        shared.publish(Arc::from(members), ring, Instant::now());
    }

    /// Picks an endpoint, or `None` when none is eligible (no healthy instance).
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Picked<T>> {
        let shared = &*self.shared;
        let mut view = shared.view.load();
        if view.next_change.is_some_and(|t| Instant::now() >= t) {
            shared.refresh();
            view = shared.view.load();
        }
        let eligible = &view.eligible;
        let n = eligible.len();
        if n == 0 {
            return None;
        }
        let index = match shared.strategy {
            Strategy::RoundRobin => {
                eligible[shared.cursor.fetch_add(1, Ordering::Relaxed) % n] as usize
            }
            Strategy::Random => eligible[fastrand::usize(..n)] as usize,
            Strategy::LeastRequest => {
                if n == 1 {
                    eligible[0] as usize
                } else {
                    let a = fastrand::usize(..n);
                    let mut b = fastrand::usize(..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (eligible[a] as usize, eligible[b] as usize);
                    let load = |i: usize| view.members[i].stats.in_flight.load(Ordering::Relaxed);
                    if load(b) < load(a) { b } else { a }
                }
            }
            Strategy::Weighted => {
                let tick = shared.cursor.fetch_add(1, Ordering::Relaxed) as u64;
                let position = view.weighted.as_ref().map_or(0, |w| w.pick(tick));
                eligible.get(position).copied().unwrap_or(eligible[0]) as usize
            }
            Strategy::ConsistentHash => match (ctx.hash_key, &view.ring) {
                (Some(key), Some(ring)) => ring.find(stable_hash(&[key]), &view.mask)?,
                _ => eligible[fastrand::usize(..n)] as usize,
            },
        };
        let stats = &view.members[index].stats;
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            balancer: self.shared.clone(),
            members: view.members.clone(),
            index,
        })
    }

    /// Number of endpoints (eligible or not).
    pub fn len(&self) -> usize {
        self.shared.view.load().members.len()
    }

    /// True when there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of endpoints picks may choose now.
    pub fn eligible(&self) -> usize {
        let now = Instant::now();
        let view = self.shared.view.load();
        view.members.iter().filter(|m| is_eligible(m, now)).count()
    }

    /// Every endpoint's state, in the order of the last update.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        let view = self.shared.view.load();
        view.members
            .iter()
            .map(|m| {
                let ejected_until = m.stats.ejected_until(now);
                let times_ejected = lock(&m.stats.ejection).total;
                EndpointStatus {
                    id: m.endpoint.id().to_owned(),
                    healthy: m.endpoint.healthy,
                    weight: m.endpoint.weight,
                    eligible: is_eligible(m, now),
                    in_flight: m.stats.in_flight.load(Ordering::Relaxed),
                    requests: m.stats.requests.load(Ordering::Relaxed),
                    failures: m.stats.failures.load(Ordering::Relaxed),
                    consecutive_failures: m.stats.consecutive_failures.load(Ordering::Relaxed),
                    ejected_for: ejected_until.map(|u| u.saturating_duration_since(now)),
                    times_ejected,
                }
            })
            .collect()
    }
}

fn is_eligible<T>(m: &Member<T>, now: Instant) -> bool {
    m.endpoint.healthy && m.endpoint.weight > 0 && m.stats.ejected_until(now).is_none()
}

impl<T> Shared<T> {
    /// Rebuilds the view after an ejection ended.
    fn refresh(&self) {
        let _writer = lock(&self.writer);
        let view = self.view.load_full();
        let now = Instant::now();
        if view.next_change.is_some_and(|t| now >= t) {
            self.publish(view.members.clone(), view.ring.clone(), now);
        }
    }

    /// Computes eligibility and swaps in a new view. Call with `writer` held.
    fn publish(&self, members: Arc<[Member<T>]>, ring: Option<Arc<Ring>>, now: Instant) {
        let mut eligible = Vec::with_capacity(members.len());
        let mut mask = Vec::with_capacity(members.len());
        let mut next_change: Option<Instant> = None;
        for (i, m) in members.iter().enumerate() {
            let ejected_until = m.stats.expire(now);
            if let Some(until) = ejected_until {
                next_change = Some(next_change.map_or(until, |t| t.min(until)));
            }
            let ok = m.endpoint.healthy && m.endpoint.weight > 0 && ejected_until.is_none();
            mask.push(ok);
            if ok {
                eligible.push(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
        let weighted = (self.strategy == Strategy::Weighted)
            .then(|| {
                WeightedCycle::new(
                    eligible
                        .iter()
                        .map(|&i| u64::from(members[i as usize].endpoint.weight)),
                )
            })
            .flatten();
        self.view.store(Arc::new(View {
            members,
            ring,
            eligible: eligible.into(),
            mask: mask.into(),
            weighted,
            next_change,
        }));
    }

    /// Counts a failure of `stats`' endpoint and ejects it if it is an outlier.
    fn failed(&self, id: &str, stats: &Arc<Stats>) {
        stats.failures.fetch_add(1, Ordering::Relaxed);
        let failures = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(outlier) = &self.outlier else {
            return;
        };
        if failures < outlier.threshold() {
            return;
        }
        let _writer = lock(&self.writer);
        let view = self.view.load_full();
        let now = Instant::now();
        if !view.members.iter().any(|m| Arc::ptr_eq(&m.stats, stats)) {
            return; // no longer a member
        }
        if stats.ejected_until(now).is_some() {
            return;
        }
        let ejected = view
            .members
            .iter()
            .filter(|m| m.stats.ejected_until(now).is_some())
            .count();
        if ejected >= outlier.max_ejected(view.members.len()) {
            tracing::debug!(
                endpoint = id,
                ejected,
                "outlier not ejected: at max_ejected_percent"
            );
            return;
        }
        let period = stats.eject(outlier, now);
        stats.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(endpoint = id, failures, ?period, "outlier ejected");
        self.publish(view.members.clone(), view.ring.clone(), now);
    }
}

/// A picked endpoint. The request counts as in flight (for `least_request`) until this is
/// dropped; report how it went with [`Picked::report`].
pub struct Picked<T> {
    balancer: Arc<Shared<T>>,
    members: Arc<[Member<T>]>,
    index: usize,
}

impl<T: fmt::Debug> fmt::Debug for Picked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Picked").field(self.endpoint()).finish()
    }
}

impl<T> Picked<T> {
    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint<T> {
        &self.members[self.index].endpoint
    }

    /// The endpoint's id.
    pub fn id(&self) -> &str {
        self.endpoint().id()
    }

    /// The endpoint's value (its address).
    pub fn value(&self) -> &T {
        self.endpoint().value()
    }

    /// Reports the outcome (and ends the request's in-flight count).
    pub fn report(self, outcome: Outcome) {
        let member = &self.members[self.index];
        match outcome {
            Outcome::Success => {
                if member.stats.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    member
                        .stats
                        .consecutive_failures
                        .store(0, Ordering::Relaxed);
                }
            }
            Outcome::Failure => self.balancer.failed(member.endpoint.id(), &member.stats),
        }
    }
}

impl<T> Drop for Picked<T> {
    fn drop(&mut self) {
        self.members[self.index]
            .stats
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}
