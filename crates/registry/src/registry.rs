//! [`ServiceRegistry`]: leases, active checks, the refresh loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use trellis_core::{NameKind, validate_name};
use trellis_health::ServiceHealthMonitor;
use trellis_store::{Store, StoreError, Table};

use crate::error::RegistryError;
use crate::instance::{Instance, InstanceRecord, InstanceStatus};
use crate::snapshot::{Discovery, RegistryWatch, ServiceEntry, Snapshot, now_ms};

/// All instances live in one partition, clustered by `service/id`: a refresh is one
/// partition scan, and listing services needs no cross-partition query (which Cassandra
/// would make expensive).
const PARTITION: &str = "instances";

/// Knobs of a [`ServiceRegistry`] — the seed's `registryTable`, `healthCheckInterval`, `ttl`
/// and a few more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// Table holding the instances. Defaults to `service_registry`.
    pub registry_table: String,
    /// How often instances registered through this process are checked and their leases
    /// renewed, unless the instance sets its own interval. Defaults to 30 s.
    pub health_check_interval: Duration,
    /// Lease length: an instance not renewed for this long disappears. Defaults to 60 s.
    pub ttl: Duration,
    /// How often the store is polled for changes made by other processes (a cheap read of
    /// the table's change marker; the instances are re-read only when it moved). Defaults to
    /// 100 ms.
    pub refresh_interval: Duration,
    /// Consecutive successful checks that turn an unhealthy instance healthy. Defaults to 2.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that turn a healthy instance unhealthy. Defaults to 3.
    pub unhealthy_threshold: u32,
    /// Time limit of one active HTTP check. Defaults to 2 s.
    pub check_timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            registry_table: "service_registry".into(),
            health_check_interval: Duration::from_secs(30),
            ttl: Duration::from_secs(60),
            refresh_interval: Duration::from_millis(100),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            check_timeout: Duration::from_secs(2),
        }
    }
}

impl RegistryOptions {
    /// Checks the options; the error names the option.
    pub fn validate(self) -> Result<Self, RegistryError> {
        let bad = |msg: String| Err(RegistryError::InvalidOptions(msg));
        trellis_store::validate_table_name(&self.registry_table)
            .map_err(|e| RegistryError::InvalidOptions(format!("registry_table: {e}")))?;
        if self.ttl < Duration::from_millis(100) {
            return bad(format!("ttl {:?} is too short; at least 100ms", self.ttl));
        }
        if self.health_check_interval < Duration::from_millis(10) {
            return bad(format!(
                "health_check_interval {:?} is too short; at least 10ms",
                self.health_check_interval
            ));
        }
        if self.refresh_interval < Duration::from_millis(1) || self.refresh_interval > self.ttl {
            return bad(format!(
                "refresh_interval {:?} must be between 1ms and the ttl",
                self.refresh_interval
            ));
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            return bad("healthy_threshold and unhealthy_threshold must be at least 1".into());
        }
        if self.check_timeout.is_zero() {
            return bad("check_timeout must be greater than zero".into());
        }
        Ok(self)
    }
}

/// Where the status of an instance registered through this process comes from.
enum StatusSource {
    /// The instance's `health_check` endpoint, polled over HTTP.
    Http(String),
    /// A health monitor in this process.
    Monitor(ServiceHealthMonitor),
    /// Heartbeats sent with [`ServiceRegistry::heartbeat`]: healthy while they arrive within
    /// the ttl (a TTL check, as in Consul).
    Heartbeats,
}

struct Owned {
    task: JoinHandle<()>,
    wake: Arc<Notify>,
    last_heartbeat_ms: Arc<AtomicU64>,
    /// Held by the lease loop across each write; `false` once the registration ended.
    /// Aborting the loop alone is not enough: a store write already handed to a blocking
    /// thread would still land, after the deregistration, and bring the row back.
    gate: Arc<tokio::sync::Mutex<bool>>,
}

impl Owned {
    /// Ends the lease loop so that no write of it can land afterwards.
    async fn stop(self) {
        // Waits for a write in flight (the loop holds the gate across it), then closes.
        *self.gate.lock().await = false;
        self.task.abort();
    }
}

struct Inner {
    table: Table,
    options: RegistryOptions,
    owner: String,
    snapshot: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    refresh: Notify,
    /// Serializes snapshot rebuilds; holds the decoded rows of the last read.
    reload_lock: tokio::sync::Mutex<DecodeCache>,
    next_expiry_ms: AtomicU64,
    owned: Mutex<HashMap<(String, String), Owned>>,
    http: reqwest::Client,
    refresher: Mutex<Option<JoinHandle<()>>>,
}

/// The service registry — the seed's `ServiceRegistry`.
///
/// - [`register`](Self::register) writes an instance with a lease and keeps renewing it in
///   the background while this process runs; its status comes from its HTTP health check,
///   a [`ServiceHealthMonitor`], or heartbeats.
/// - [`discover`](Self::discover) is a memory read of a local snapshot, kept fresh by a
///   background loop that notices other processes' writes within `refresh_interval`; when the
///   store is unreachable the snapshot keeps answering, marked stale.
/// - [`watch`](Self::watch) yields a service's instances whenever they change.
/// - [`shutdown`](Self::shutdown) deregisters everything registered through this process.
///
/// Cheap to clone; clones share one snapshot.
#[derive(Clone)]
pub struct ServiceRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServiceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceRegistry")
            .field("table", &self.inner.table.name())
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

/// A handle on one instance registered through this process.
#[derive(Debug, Clone)]
pub struct Registration {
    registry: ServiceRegistry,
    service: String,
    id: String,
}

impl Registration {
    /// Service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records a heartbeat (see [`ServiceRegistry::heartbeat`]).
    pub fn heartbeat(&self) -> Result<(), RegistryError> {
        self.registry.heartbeat(&self.service, &self.id)
    }

    /// Removes the instance now (graceful shutdown).
    pub async fn deregister(self) -> Result<bool, RegistryError> {
        self.registry.deregister(&self.service, &self.id).await
    }
}

impl ServiceRegistry {
    /// Starts a registry on `store`: reads the current instances once (failing if the store
    /// cannot be read), then keeps the snapshot fresh in the background.
    pub async fn start(store: &Store, options: RegistryOptions) -> Result<Self, RegistryError> {
        let options = options.validate()?;
        let table = store.table(&options.registry_table)?;
        let http = reqwest::Client::builder()
            .timeout(options.check_timeout)
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| RegistryError::InvalidOptions(format!("HTTP client: {e}")))?;
        let initial = Arc::new(Snapshot::default());
        let (tx, _) = watch::channel(initial.clone());
        let inner = Arc::new(Inner {
            table,
            options,
            owner: owner_name(),
            snapshot: ArcSwap::new(initial),
            tx,
            refresh: Notify::new(),
            reload_lock: tokio::sync::Mutex::new(HashMap::new()),
            next_expiry_ms: AtomicU64::new(u64::MAX),
            owned: Mutex::new(HashMap::new()),
            http,
            refresher: Mutex::new(None),
        });
        let mut marker = inner.table.change_marker().await?;
        inner.reload().await?;
        let weak = Arc::downgrade(&inner);
        let interval = inner.options.refresh_interval;
        let task = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let sleep = tokio::time::sleep(interval);
                tokio::select! {
                    () = sleep => {}
                    () = inner.refresh.notified() => {}
                }
                marker = inner.tick(marker).await;
            }
        });
        *lock(&inner.refresher) = Some(task);
        Ok(ServiceRegistry { inner })
    }

    /// The options in force.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.options
    }

    /// `host:pid` of this process, written as the owner of its registrations.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Registers `instance` of `service` and keeps its lease while this process runs. Its
    /// status comes from its `health_check` if it has one, otherwise from heartbeats.
    ///
    /// Checks and lease renewals run every `min(interval, ttl / 2)`, so a lease never lapses
    /// between renewals whatever the two settings.
    pub async fn register(
        &self,
        service: &str,
        instance: Instance,
    ) -> Result<Registration, RegistryError> {
        let source = match instance.health_url() {
            Some(url) => StatusSource::Http(url),
            None => StatusSource::Heartbeats,
        };
        self.register_with_source(service, instance, source).await
    }

    /// Registers `instance` whose status is the result of `monitor` (healthy or degraded →
    /// healthy, unhealthy → unhealthy) — the seed's health monitor feeding the registry.
    pub async fn register_with_monitor(
        &self,
        service: &str,
        instance: Instance,
        monitor: ServiceHealthMonitor,
    ) -> Result<Registration, RegistryError> {
        self.register_with_source(service, instance, StatusSource::Monitor(monitor))
            .await
    }

    async fn register_with_source(
        &self,
        service: &str,
        instance: Instance,
        source: StatusSource,
    ) -> Result<Registration, RegistryError> {
        validate_name(NameKind::Service, service)?;
        instance.validate()?;
        let ttl = instance.ttl.map_or(self.inner.options.ttl, |t| t.get());
        let interval = instance
            .health_check
            .as_ref()
            .and_then(|c| c.interval)
            .map_or(self.inner.options.health_check_interval, |i| i.get());
        // A previous registration of the same instance stops before the new record is
        // written, so that its last lease write cannot overwrite the new metadata.
        let previous = lock(&self.inner.owned).remove(&(service.to_owned(), instance.id.clone()));
        if let Some(previous) = previous {
            previous.stop().await;
        }
        let now = now_ms();
        let record = InstanceRecord {
            service: service.to_owned(),
            instance: instance.clone(),
            status: InstanceStatus::Unknown,
            registered_at_ms: now,
            updated_at_ms: now,
            owner: self.inner.owner.clone(),
            expires_at_ms: 0,
        };
        let written = self.inner.write(&record, ttl).await?;
        let key = (service.to_owned(), instance.id.clone());
        let wake = Arc::new(Notify::new());
        let last_heartbeat_ms = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Mutex::new(true));
        let task = tokio::spawn(lease_loop(
            Arc::downgrade(&self.inner),
            record,
            source,
            ttl,
            interval.min(ttl / 2),
            wake.clone(),
            last_heartbeat_ms.clone(),
            gate.clone(),
        ));
        let previous = lock(&self.inner.owned).insert(
            key,
            Owned {
                task,
                wake,
                last_heartbeat_ms,
                gate,
            },
        );
        if let Some(previous) = previous {
            // A concurrent register of the same instance raced this one: last one wins.
            previous.stop().await;
        }
        self.inner.patch(service, &instance.id, Some(written)).await;
        Ok(Registration {
            registry: self.clone(),
            service: service.to_owned(),
            id: instance.id,
        })
    }

    /// Records a heartbeat from an instance registered through this process: its lease is
    /// renewed at once and, when its status comes from heartbeats, it is healthy until no
    /// heartbeat arrives for a whole ttl.
    pub fn heartbeat(&self, service: &str, id: &str) -> Result<(), RegistryError> {
        validate_name(NameKind::Service, service)?;
        validate_name(NameKind::Instance, id)?;
        let owned = lock(&self.inner.owned);
        let Some(entry) = owned.get(&(service.to_owned(), id.to_owned())) else {
            return Err(RegistryError::NotRegistered {
                service: service.to_owned(),
                id: id.to_owned(),
            });
        };
        entry.last_heartbeat_ms.store(now_ms(), Ordering::Relaxed);
        entry.wake.notify_one();
        Ok(())
    }

    /// Removes an instance (registered through any process); returns whether it existed.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<bool, RegistryError> {
        validate_name(NameKind::Service, service)?;
        validate_name(NameKind::Instance, id)?;
        let owned = lock(&self.inner.owned).remove(&(service.to_owned(), id.to_owned()));
        if let Some(owned) = owned {
            owned.stop().await;
        }
        let existed = self
            .inner
            .table
            .delete(PARTITION, &clustering(service, id))
            .await?;
        self.inner.patch(service, id, None).await;
        Ok(existed)
    }

    /// The live instances of `service` from the local snapshot: a memory read.
    pub fn discover(&self, service: &str) -> Discovery {
        let snapshot = self.inner.snapshot.load();
        Discovery::new(snapshot.services.get(service).cloned(), snapshot.stale)
    }

    /// Every service with its number of live instances, by name.
    pub fn services(&self) -> Vec<(String, usize)> {
        let snapshot = self.inner.snapshot.load_full();
        let mut names: Vec<(String, usize)> = snapshot
            .services
            .keys()
            .map(|name| (name.clone(), self.discover(name).len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        names.sort();
        names
    }

    /// True when the store could not be reached at the last refresh.
    pub fn is_stale(&self) -> bool {
        self.inner.snapshot.load().stale
    }

    /// Ids (service, instance) registered through this process.
    pub fn owned(&self) -> Vec<(String, String)> {
        let mut ids: Vec<_> = lock(&self.inner.owned).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Watches one service: the first [`RegistryWatch::changed`] returns the current state.
    pub fn watch(&self, service: &str) -> RegistryWatch {
        RegistryWatch {
            service: service.to_owned(),
            rx: self.inner.tx.subscribe(),
            last: None,
        }
    }

    /// Re-reads the store now instead of waiting for the next refresh.
    pub async fn refresh(&self) -> Result<(), RegistryError> {
        self.inner.reload().await.map_err(RegistryError::from)
    }

    /// Deregisters every instance registered through this process and stops the background
    /// loops. Returns the first store error, after trying every instance.
    pub async fn shutdown(&self) -> Result<(), RegistryError> {
        let owned: Vec<((String, String), Owned)> = lock(&self.inner.owned).drain().collect();
        let mut first_error = None;
        for ((service, id), entry) in owned {
            entry.stop().await;
            if let Err(e) = self
                .inner
                .table
                .delete(PARTITION, &clustering(&service, &id))
                .await
            {
                tracing::warn!(%service, %id, error = %e, "deregistration failed");
                first_error.get_or_insert(e);
            }
        }
        if let Some(task) = lock(&self.inner.refresher).take() {
            task.abort();
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for owned in self
            .owned
            .get_mut()
            .map(|o| o.values())
            .into_iter()
            .flatten()
        {
            owned.task.abort();
        }
    }
}

fn clustering(service: &str, id: &str) -> String {
    format!("{service}/{id}")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn owner_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

impl Inner {
    /// Writes `record` with a lease of `ttl`; returns the row version and the record as
    /// the snapshot holds it (with its lease end).
    async fn write(
        &self,
        record: &InstanceRecord,
        ttl: Duration,
    ) -> Result<(u64, InstanceRecord), RegistryError> {
        let value = serde_json::to_vec(record)?;
        let version = self
            .table
            .put(
                PARTITION,
                &clustering(&record.service, &record.instance.id),
                value,
                Some(ttl),
            )
            .await?;
        let mut stored = record.clone();
        stored.expires_at_ms = now_ms().saturating_add(ttl.as_millis() as u64);
        Ok((version, stored))
    }

    /// One step of the refresh loop: re-read when the table changed, a lease ran out, or
    /// the last read failed.
    async fn tick(&self, marker: Option<u64>) -> Option<u64> {
        match self.table.change_marker().await {
            Ok(now_marker) => {
                let stale = self.snapshot.load().stale;
                let expired = now_ms() >= self.next_expiry_ms.load(Ordering::Relaxed);
                let due = now_marker != marker || now_marker.is_none() || stale || expired;
                if due && let Err(e) = self.reload().await {
                    self.mark_stale(&e);
                    return marker;
                }
                now_marker
            }
            Err(e) => {
                self.mark_stale(&e);
                marker
            }
        }
    }

    fn mark_stale(&self, error: &StoreError) {
        let current = self.snapshot.load_full();
        if current.stale {
            return;
        }
        tracing::warn!(error = %error, "registry store unreachable; serving the last snapshot, marked stale");
        self.publish(Arc::new(Snapshot {
            services: current.services.clone(),
            stale: true,
        }));
    }

    fn publish(&self, snapshot: Arc<Snapshot>) {
        self.snapshot.store(snapshot.clone());
        self.tx.send_replace(snapshot);
    }

    /// Reads every instance and publishes a new snapshot. Rows whose version did not change
    /// since the last read are not decoded again.
    async fn reload(&self) -> Result<(), StoreError> {
        let mut cache = self.reload_lock.lock().await;
        let rows = self.table.scan_all(PARTITION, None).await?;
        let old = self.snapshot.load_full();
        let mut next_cache: DecodeCache = HashMap::with_capacity(rows.len());
        // Rows come in clustering order, `service/id`: each service's rows are contiguous and
        // sorted by id.
        let mut grouped: Vec<(String, Vec<Arc<InstanceRecord>>)> = Vec::new();
        let mut next_expiry = u64::MAX;
        for row in rows {
            let record = match cache.remove(&row.clustering) {
                Some((version, record)) if version == row.version => record,
                _ => match decode(&row) {
                    Some(record) => Arc::new(record),
                    None => continue,
                },
            };
            if record.expires_at_ms != 0 {
                next_expiry = next_expiry.min(record.expires_at_ms);
            }
            match grouped.last_mut() {
                Some((service, list)) if *service == record.service => list.push(record.clone()),
                _ => grouped.push((record.service.clone(), vec![record.clone()])),
            }
            next_cache.insert(row.clustering, (row.version, record));
        }
        *cache = next_cache;
        let mut services =
            crate::snapshot::Services::with_capacity_and_hasher(grouped.len(), Default::default());
        for (name, instances) in grouped {
            let generation = next_generation(old.services.get(&name), &instances);
            services.insert(
                name,
                Arc::new(ServiceEntry {
                    instances,
                    generation,
                }),
            );
        }
        // Services that vanished keep an empty entry with a new generation, so watchers see
        // the removal.
        for (name, entry) in &old.services {
            if !services.contains_key(name) && !entry.instances.is_empty() {
                services.insert(
                    name.clone(),
                    Arc::new(ServiceEntry {
                        instances: Vec::new(),
                        generation: entry.generation + 1,
                    }),
                );
            }
        }
        self.next_expiry_ms.store(next_expiry, Ordering::Relaxed);
        self.publish(Arc::new(Snapshot {
            services,
            stale: false,
        }));
        Ok(())
    }

    /// Puts this process's own write into the snapshot at once, without re-reading the
    /// store: `record` replaces (or, when `None`, removes) instance `id` of `service`.
    async fn patch(&self, service: &str, id: &str, record: Option<(u64, InstanceRecord)>) {
        let mut cache = self.reload_lock.lock().await;
        let current = self.snapshot.load_full();
        let mut instances: Vec<Arc<InstanceRecord>> = current
            .services
            .get(service)
            .map(|e| e.instances.clone())
            .unwrap_or_default();
        instances.retain(|r| r.instance.id != id);
        let key = clustering(service, id);
        match record {
            Some((version, record)) => {
                if record.expires_at_ms != 0 {
                    self.next_expiry_ms
                        .fetch_min(record.expires_at_ms, Ordering::Relaxed);
                }
                let record = Arc::new(record);
                let at = instances.partition_point(|r| r.instance.id.as_str() < id);
                instances.insert(at, record.clone());
                cache.insert(key, (version, record));
            }
            None => {
                cache.remove(&key);
            }
        }
        let generation = next_generation(current.services.get(service), &instances);
        let mut services = current.services.clone();
        services.insert(
            service.to_owned(),
            Arc::new(ServiceEntry {
                instances,
                generation,
            }),
        );
        self.publish(Arc::new(Snapshot {
            services,
            stale: current.stale,
        }));
    }
}

/// Decoded registry rows by clustering key, with the row version they were decoded at.
type DecodeCache = HashMap<String, (u64, Arc<InstanceRecord>)>;

fn decode(row: &trellis_store::Row) -> Option<InstanceRecord> {
    let mut record: InstanceRecord = match serde_json::from_slice(&row.value) {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(key = %row.clustering, error = %e, "skipping an undecodable registry row");
            return None;
        }
    };
    record.expires_at_ms = row
        .expires_at
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    Some(record)
}

/// The generation of a service's new instance list: unchanged content keeps it.
fn next_generation(previous: Option<&Arc<ServiceEntry>>, instances: &[Arc<InstanceRecord>]) -> u64 {
    match previous {
        Some(p)
            if p.instances.len() == instances.len()
                && p.instances
                    .iter()
                    .zip(instances)
                    .all(|(a, b)| Arc::ptr_eq(a, b) || a.same_content(b)) =>
        {
            p.generation
        }
        Some(p) => p.generation + 1,
        None => 1,
    }
}

/// Consecutive-result thresholds of an active check.
struct Tracker {
    status: InstanceStatus,
    successes: u32,
    failures: u32,
}

impl Tracker {
    /// From `unknown` the first result decides; afterwards a change needs the threshold.
    fn observe(&mut self, ok: bool, options: &RegistryOptions) -> InstanceStatus {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.status != InstanceStatus::Healthy
                && (self.status == InstanceStatus::Unknown
                    || self.successes >= options.healthy_threshold)
            {
                self.status = InstanceStatus::Healthy;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.status != InstanceStatus::Unhealthy
                && (self.status == InstanceStatus::Unknown
                    || self.failures >= options.unhealthy_threshold)
            {
                self.status = InstanceStatus::Unhealthy;
            }
        }
        self.status
    }
}

async fn http_check(client: &reqwest::Client, url: &str) -> bool {
    match client.get(url).send().await {
        Ok(response) => response.status().is_success(),
        Err(e) => {
            tracing::debug!(%url, error = %e, "health check failed");
            false
        }
    }
}

/// Checks the instance and renews its lease every `period` until aborted.
#[allow(clippy::too_many_arguments)] // one call site; the handles are shared with `Owned`
async fn lease_loop(
    inner: Weak<Inner>,
    mut record: InstanceRecord,
    source: StatusSource,
    ttl: Duration,
    period: Duration,
    wake: Arc<Notify>,
    last_heartbeat_ms: Arc<AtomicU64>,
    gate: Arc<tokio::sync::Mutex<bool>>,
) {
    let mut tracker = Tracker {
        status: InstanceStatus::Unknown,
        successes: 0,
        failures: 0,
    };
    // `register` has just written the record: the first pass writes only if it learns
    // something new.
    let mut just_registered = true;
    loop {
        let Some(registry) = inner.upgrade() else {
            return;
        };
        let status = match &source {
            StatusSource::Http(url) => {
                let ok = http_check(&registry.http, url).await;
                tracker.observe(ok, &registry.options)
            }
            StatusSource::Monitor(monitor) => {
                if monitor.check().await.status.is_serving() {
                    InstanceStatus::Healthy
                } else {
                    InstanceStatus::Unhealthy
                }
            }
            StatusSource::Heartbeats => match last_heartbeat_ms.load(Ordering::Relaxed) {
                0 => InstanceStatus::Unknown,
                at if now_ms().saturating_sub(at) <= ttl.as_millis() as u64 => {
                    InstanceStatus::Healthy
                }
                _ => InstanceStatus::Unhealthy,
            },
        };
        let changed = status != record.status;
        let skip = just_registered && !changed;
        just_registered = false;
        record.status = status;
        record.updated_at_ms = now_ms();
        let open = gate.lock().await;
        if !*open {
            return;
        }
        let result = if skip {
            None
        } else {
            Some(registry.write(&record, ttl).await)
        };
        match result {
            None => {}
            Some(Ok(written)) if changed => {
                tracing::info!(service = %record.service, id = %record.instance.id, status = status.as_str(), "instance status changed");
                registry
                    .patch(&record.service, &record.instance.id, Some(written))
                    .await;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(service = %record.service, id = %record.instance.id, error = %e, "lease renewal failed; retrying")
            }
        }
        // Held until the snapshot is patched too, so a deregistration cannot be undone.
        drop(open);
        drop(registry);
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let options = RegistryOptions::default();
        let mut t = Tracker {
            status: InstanceStatus::Unknown,
            successes: 0,
            failures: 0,
        };
        assert_eq!(
            t.observe(true, &options),
            InstanceStatus::Healthy,
            "first result decides"
        );
        assert_eq!(t.observe(false, &options), InstanceStatus::Healthy);
        assert_eq!(t.observe(false, &options), InstanceStatus::Healthy);
        assert_eq!(
            t.observe(false, &options),
            InstanceStatus::Unhealthy,
            "after 3 failures"
        );
        assert_eq!(t.observe(true, &options), InstanceStatus::Unhealthy);
        assert_eq!(t.observe(false, &options), InstanceStatus::Unhealthy);
        assert_eq!(t.observe(true, &options), InstanceStatus::Unhealthy);
        assert_eq!(
            t.observe(true, &options),
            InstanceStatus::Healthy,
            "after 2 successes"
        );
    }

    #[test]
    fn options_are_validated() {
        assert!(RegistryOptions::default().validate().is_ok());
        let err = RegistryOptions {
            ttl: Duration::from_millis(5),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("ttl"), "{err}");
        let err = RegistryOptions {
            registry_table: "Bad-Name".into(),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("registry_table"), "{err}");
    }
}
