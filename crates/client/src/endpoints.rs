//! The instances a client may call: the registry snapshot fed into one load balancer, with
//! a circuit breaker per instance.
//!
//! Every call reads the registry snapshot (a memory read) and compares it with the set the
//! balancer holds — instance ids, addresses, statuses and weights, a few string
//! comparisons. Only when they differ is the balancer updated; instances that stay keep
//! their counters, ejections and breakers. Reading on every call rather than in a `watch`
//! task means a client needs no background task, cannot fall behind, and sees lease
//! expiries (which the snapshot applies at read time) at once.
//!
//! A client with a [`StaticEndpoint`] instead of a registry (a client going through a
//! service mesh) has one endpoint, set once: `sync` has nothing to do.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use trellis_registry::{Discovery, InstanceRecord, InstanceStatus, ServiceRegistry};
use trellis_resilience::balance::{Endpoint, LoadBalancer, Outcome, PickContext, Picked};
use trellis_resilience::breaker::{CircuitBreaker, CircuitBreakers, Permit};

use crate::error::ClientError;
use crate::fixed::StaticEndpoint;

/// Where a client's instances come from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// The registry snapshot, read on every call.
    Registry(ServiceRegistry),
    /// One fixed address.
    Static(StaticEndpoint),
}

/// The metadata key read as an instance's weight for the `weighted` strategy.
pub const WEIGHT_METADATA: &str = "weight";

/// What the balancer holds for each instance.
#[derive(Debug)]
pub(crate) struct Target {
    /// The instance id.
    pub(crate) id: Arc<str>,
    /// `http://host:port/`, parsed once: each request copies it and sets its path and
    /// query, which costs less than parsing a whole URL (no host parsing).
    pub(crate) base: Result<reqwest::Url, String>,
    /// `host:port`, for errors.
    pub(crate) address: Box<str>,
    /// Its breaker, when breakers are on.
    breaker: Option<Arc<CircuitBreaker>>,
}

/// What the balancer was last fed from one instance record.
#[derive(Debug, PartialEq, Eq)]
struct Known {
    id: String,
    host: String,
    port: u16,
    status: InstanceStatus,
    weight: Option<String>,
}

impl Known {
    fn of(record: &InstanceRecord) -> Self {
        Known {
            id: record.instance.id.clone(),
            host: record.instance.host.clone(),
            port: record.instance.port,
            status: record.status,
            weight: record.instance.metadata.get(WEIGHT_METADATA).cloned(),
        }
    }

    fn describes(&self, record: &InstanceRecord) -> bool {
        self.port == record.instance.port
            && self.status == record.status
            && self.id == record.instance.id
            && self.host == record.instance.host
            && self.weight.as_ref() == record.instance.metadata.get(WEIGHT_METADATA)
    }
}

/// The instances of one service, a balancer over them, and their breakers.
pub(crate) struct Endpoints {
    service: Arc<str>,
    /// `None` for a static endpoint, installed once at construction.
    registry: Option<ServiceRegistry>,
    balancer: LoadBalancer<Target>,
    breakers: Option<CircuitBreakers<String>>,
    known: ArcSwap<Vec<Known>>,
    update: Mutex<()>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("service", &self.service)
            .field("balancer", &self.balancer)
            .finish_non_exhaustive()
    }
}

/// An instance chosen for one attempt: the balancer's pick and the breaker's permit.
pub(crate) struct Chosen {
    picked: Picked<Target>,
    permit: Option<Permit>,
}

impl Chosen {
    pub(crate) fn target(&self) -> &Target {
        self.picked.value()
    }

    /// The instance answered: tell the balancer and the breaker.
    pub(crate) fn report(self, failed: bool) {
        if let Some(permit) = self.permit {
            permit.record(failed);
        }
        self.picked.report(if failed {
            Outcome::Failure
        } else {
            Outcome::Success
        });
    }

    /// Counts nothing: the attempt ended for a reason that is not the instance's (the
    /// caller's deadline).
    pub(crate) fn abandon(self) {}
}

impl Endpoints {
    pub(crate) fn new(
        service: Arc<str>,
        source: Source,
        balancer: LoadBalancer<Target>,
        breakers: Option<CircuitBreakers<String>>,
    ) -> Self {
        let (registry, fixed) = match source {
            Source::Registry(registry) => (Some(registry), None),
            Source::Static(endpoint) => (None, Some(endpoint)),
        };
        let endpoints = Endpoints {
            service,
            registry,
            balancer,
            breakers,
            known: ArcSwap::from_pointee(Vec::new()),
            update: Mutex::new(()),
        };
        if let Some(endpoint) = fixed {
            let address = endpoint.address();
            let id: Arc<str> = Arc::from(address.as_str());
            let breaker = endpoints
                .breakers
                .as_ref()
                .map(|b| b.get(&format!("{}/{}", endpoints.service, id)));
            endpoints.balancer.update(vec![Endpoint::new(
                id.clone(),
                Target {
                    id,
                    base: Ok(endpoint.url().clone()),
                    address: address.into(),
                    breaker,
                },
            )]);
        }
        endpoints
    }

    pub(crate) fn balancer(&self) -> &LoadBalancer<Target> {
        &self.balancer
    }

    pub(crate) fn breakers(&self) -> Option<&CircuitBreakers<String>> {
        self.breakers.as_ref()
    }

    /// Brings the balancer up to date with the registry snapshot.
    pub(crate) fn sync(&self) {
        let Some(registry) = &self.registry else {
            return;
        };
        let found = registry.discover(&self.service);
        if self.matches(&found) {
            return;
        }
        let _update = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        // Read again under the lock, so an older snapshot never overwrites a newer one.
        let found = registry.discover(&self.service);
        if self.matches(&found) {
            return;
        }
        let mut known = Vec::new();
        let mut endpoints = Vec::new();
        for record in found.iter() {
            known.push(Known::of(record));
            endpoints.push(self.endpoint(record));
        }
        tracing::debug!(
            service = %self.service,
            instances = endpoints.len(),
            "service client endpoints updated from the registry"
        );
        self.balancer.update(endpoints);
        if let Some(breakers) = &self.breakers {
            breakers.retain(|key| {
                known.iter().any(|k| {
                    key.strip_prefix(&*self.service)
                        .and_then(|r| r.strip_prefix('/'))
                        == Some(&k.id)
                })
            });
        }
        self.known.store(Arc::new(known));
    }

    fn matches(&self, found: &Discovery) -> bool {
        let known = self.known.load();
        let mut records = found.iter();
        for k in known.iter() {
            match records.next() {
                Some(record) if k.describes(record) => {}
                _ => return false,
            }
        }
        records.next().is_none()
    }

    fn endpoint(&self, record: &InstanceRecord) -> Endpoint<Target> {
        let host = &record.instance.host;
        let address = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", record.instance.port)
        } else {
            format!("{host}:{}", record.instance.port)
        };
        let id: Arc<str> = Arc::from(record.instance.id.as_str());
        let breaker = self
            .breakers
            .as_ref()
            .map(|b| b.get(&format!("{}/{}", self.service, id)));
        let weight = record
            .instance
            .metadata
            .get(WEIGHT_METADATA)
            .and_then(|w| w.trim().parse::<u32>().ok())
            .unwrap_or(1);
        Endpoint::new(
            id.clone(),
            Target {
                id,
                base: reqwest::Url::parse(&format!("http://{address}/"))
                    .map_err(|e| format!("instance address {address:?}: {e}")),
                address: address.into(),
                breaker,
            },
        )
        .with_weight(weight)
        .with_health(record.status != InstanceStatus::Unhealthy)
    }

    /// Chooses an instance for one attempt: the balancer's pick whose breaker lets the
    /// request through. Instances with an open breaker are passed over; when every pick is
    /// refused the call fails with [`ClientError::CircuitOpen`] without touching the network.
    pub(crate) fn choose(&self, hash_key: Option<&[u8]>) -> Result<Chosen, ClientError> {
        self.sync();
        let ctx = match hash_key {
            Some(key) => PickContext::new().with_hash_key(key),
            None => PickContext::new(),
        };
        // Twice the endpoint count: enough for round robin to visit every eligible instance,
        // and for random picks to find a closed breaker among a few open ones.
        let tries = self.balancer.len().saturating_mul(2).max(1);
        let mut refused: Option<(Arc<str>, Duration)> = None;
        for _ in 0..tries {
            let Some(picked) = self.balancer.pick(&ctx) else {
                break;
            };
            let Some(breaker) = &picked.value().breaker else {
                return Ok(Chosen {
                    picked,
                    permit: None,
                });
            };
            match breaker.try_acquire() {
                Ok(permit) => {
                    return Ok(Chosen {
                        picked,
                        permit: Some(permit),
                    });
                }
                Err(open) => {
                    if refused.as_ref().is_none_or(|(_, r)| open.retry_in() < *r) {
                        refused = Some((picked.value().id.clone(), open.retry_in()));
                    }
                }
            }
        }
        Err(match refused {
            Some((instance, retry_in)) => ClientError::CircuitOpen {
                service: self.service.to_string(),
                instance: instance.to_string(),
                retry_in,
            },
            None => ClientError::NoHealthyInstance {
                service: self.service.to_string(),
            },
        })
    }
}
