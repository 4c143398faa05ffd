//! The local snapshot: what `discover` reads from memory, and what `watch` yields.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::instance::{InstanceRecord, InstanceStatus};

/// The instances of one service, as of one refresh.
#[derive(Debug, Default)]
pub(crate) struct ServiceEntry {
    /// Sorted by instance id.
    pub(crate) instances: Vec<Arc<InstanceRecord>>,
    /// Bumped when the content (not just leases) changes.
    pub(crate) generation: u64,
}

/// Services by name: looked up on every `discover` (every proxied request), with a fast
/// hasher (the names are the registry's own, not a client's).
pub(crate) type Services = HashMap<String, Arc<ServiceEntry>, foldhash::fast::RandomState>;

/// Every service, as of one refresh.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) services: Services,
    /// The last refresh failed: the store is unreachable and this is the last known state.
    pub(crate) stale: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The answer of [`ServiceRegistry::discover`](crate::ServiceRegistry::discover): the live
/// instances of one service, read from the local snapshot.
///
/// Instances whose lease ran out since the last refresh are already left out. When
/// [`is_stale`](Discovery::is_stale) is true the store could not be reached at the last
/// refresh: these are the last known instances, leases not applied.
#[derive(Debug, Clone)]
pub struct Discovery {
    entry: Option<Arc<ServiceEntry>>,
    stale: bool,
    now_ms: u64,
}

impl Discovery {
    pub(crate) fn new(entry: Option<Arc<ServiceEntry>>, stale: bool) -> Self {
        Discovery {
            entry,
            stale,
            now_ms: now_ms(),
        }
    }

    /// True when the store was unreachable at the last refresh.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// A number that changes whenever this service's membership, statuses or metadata
    /// change (lease renewals alone do not move it): callers that derive state from the
    /// instances (a load balancer's endpoint set) rebuild it only when it moved.
    pub fn generation(&self) -> u64 {
        self.entry.as_ref().map_or(0, |e| e.generation)
    }

    /// Every live instance, ordered by id.
    pub fn iter(&self) -> impl Iterator<Item = &InstanceRecord> + '_ {
        let stale = self.stale;
        let now = self.now_ms;
        self.entry
            .iter()
            .flat_map(|e| e.instances.iter().map(|r| &**r))
            .filter(move |r| stale || r.expires_at_ms == 0 || r.expires_at_ms > now)
    }

    /// Live instances whose status is healthy.
    pub fn healthy(&self) -> impl Iterator<Item = &InstanceRecord> + '_ {
        self.iter().filter(|r| r.status == InstanceStatus::Healthy)
    }

    /// Live instances running `version`.
    pub fn with_version<'a>(
        &'a self,
        version: &'a str,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.iter().filter(move |r| r.instance.version == version)
    }

    /// Live instances whose metadata has `key` = `value`.
    pub fn with_metadata<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.iter()
            .filter(move |r| r.instance.metadata.get(key).is_some_and(|v| v == value))
    }

    /// Number of live instances.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// True when no instance is live.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// The live instances, cloned.
    pub fn to_vec(&self) -> Vec<InstanceRecord> {
        self.iter().cloned().collect()
    }

    fn key(&self) -> (u64, bool) {
        (self.entry.as_ref().map_or(0, |e| e.generation), self.stale)
    }
}

/// Yields a service's instances each time they change — the answer of
/// [`ServiceRegistry::watch`](crate::ServiceRegistry::watch).
///
/// The first call to [`changed`](RegistryWatch::changed) returns the current state at once;
/// later calls wait for a change of membership, status or metadata (lease renewals alone do
/// not count), or of the stale flag.
#[derive(Debug)]
pub struct RegistryWatch {
    pub(crate) service: String,
    pub(crate) rx: watch::Receiver<Arc<Snapshot>>,
    pub(crate) last: Option<(u64, bool)>,
}

impl RegistryWatch {
    /// Waits for the next change; `None` when the registry was shut down.
    pub async fn changed(&mut self) -> Option<Discovery> {
        loop {
            let discovery = {
                let snapshot = self.rx.borrow_and_update();
                Discovery::new(
                    snapshot.services.get(&self.service).cloned(),
                    snapshot.stale,
                )
            };
            if self.last != Some(discovery.key()) {
                self.last = Some(discovery.key());
                return Some(discovery);
            }
            self.rx.changed().await.ok()?;
        }
    }
}
