use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::time::Instant;

use super::{Gcra, Quota, RateLimitInfo, RateLimited};
use crate::ConfigError;
use crate::sync::{BuildPreHashed, lock};

const SHARDS: usize = 16;

/// Keys remembered per class by default.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// A keyed GCRA rate limiter: one quota per key (JWT subject, API key, client IP…), with a
/// default quota and per-class overrides (a route, a plan: `"premium"`).
///
/// Cheap to clone (an `Arc`). Keys are strings, remembered as a 64-bit SipHash under a
/// random key chosen per limiter (16 bytes per key, no allocation): two keys share a quota
/// only if their hashes collide, with probability 2⁻⁶⁴ per pair — about one in 3·10⁹ with
/// 100 000 active keys — and an attacker cannot aim for it without the secret key.
///
/// **Bounded memory.** Each class remembers at most `max_keys` keys (100 000 by default).
/// A key idle long enough to have its full burst back is identical to a new key, so it is
/// dropped first, changing no decision. If the table is still full of active keys, the
/// least-limited half of them (those below the mean debt) are forgotten: the most abusive
/// keys stay tracked, and the others get a fresh burst. [`RateLimiter::sweep`] drops idle
/// keys on demand (from a timer).
///
/// ```
/// use std::time::Duration;
/// use trellis_resilience::ratelimit::{Quota, RateLimiter};
///
/// let limiter = RateLimiter::builder(Quota::parse("2", "1m").unwrap())
///     .class("premium", Quota::parse("1000", "1m").unwrap())
///     .build();
/// assert!(limiter.check(None, "client-a").is_ok());
/// assert!(limiter.check(None, "client-a").is_ok());
/// let limited = limiter.check(None, "client-a").unwrap_err();
/// // One request every 30 s after the burst of 2 (less the time this example took).
/// assert!(limited.retry_after() <= Duration::from_secs(30));
/// assert!(limited.retry_after() > Duration::from_secs(29));
/// assert!(limiter.check(None, "client-b").is_ok()); // another key
/// assert!(limiter.check(Some("premium"), "client-a").is_ok()); // another class
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    hasher: RandomState,
    default: Table,
    classes: HashMap<Box<str>, Table>,
}

#[derive(Debug)]
struct Table {
    gcra: Gcra,
    class: Option<Arc<str>>,
    shard_cap: usize,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug, Default)]
struct Shard {
    /// TAT by key hash.
    tats: HashMap<u64, u64, BuildPreHashed>,
    admitted: u64,
    limited: u64,
    evicted: u64,
}

/// Counters of one class, for admin endpoints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassStats {
    /// The class (`None` for the default quota).
    pub class: Option<String>,
    /// Its quota.
    pub quota: Quota,
    /// Keys remembered now.
    pub keys: usize,
    /// Requests admitted since start.
    pub admitted: u64,
    /// Requests refused since start.
    pub limited: u64,
    /// Active keys forgotten because the table was full.
    pub evicted: u64,
}

/// Builds a [`RateLimiter`].
#[derive(Debug)]
#[must_use]
pub struct RateLimiterBuilder {
    default: Quota,
    classes: Vec<(String, Quota)>,
    max_keys: usize,
}

impl RateLimiterBuilder {
    /// A quota for requests of class `name`, instead of the default one.
    pub fn class(mut self, name: impl Into<String>, quota: Quota) -> Self {
        self.classes.push((name.into(), quota));
        self
    }

    /// Keys remembered per class (at least 16). Defaults to [`DEFAULT_MAX_KEYS`].
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Checks the settings and builds the limiter.
    pub fn try_build(self) -> Result<RateLimiter, ConfigError> {
        if self.max_keys < SHARDS {
            return Err(ConfigError::out_of_range(
                "max_keys",
                "at least 16",
                self.max_keys,
            ));
        }
        Ok(self.assemble())
    }

    /// Builds the limiter; a `max_keys` below 16 is raised to 16.
    pub fn build(mut self) -> RateLimiter {
        self.max_keys = self.max_keys.max(SHARDS);
        self.assemble()
    }

    fn assemble(self) -> RateLimiter {
        let shard_cap = self.max_keys.div_ceil(SHARDS).max(1);
        let classes = self
            .classes
            .into_iter()
            .map(|(name, quota)| {
                let table = Table::new(quota, Some(name.as_str().into()), shard_cap);
                (name.into_boxed_str(), table)
            })
            .collect();
        RateLimiter {
            inner: Arc::new(Inner {
                start: Instant::now(),
                hasher: RandomState::new(),
                default: Table::new(self.default, None, shard_cap),
                classes,
            }),
        }
    }
}

impl Table {
    fn new(quota: Quota, class: Option<Arc<str>>, shard_cap: usize) -> Self {
        Table {
            gcra: Gcra::new(quota),
            class,
            shard_cap,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        // Bits 32..36: neither the low bits that pick a bucket inside the shard's map nor
        // the top bits it keeps as tags.
        &self.shards[((hash >> 32) % SHARDS as u64) as usize]
    }

    fn check(&self, hash: u64, now: u64) -> Result<RateLimitInfo, RateLimited> {
        let mut shard = lock(self.shard(hash));
        if let Some(tat) = shard.tats.get_mut(&hash) {
            let result = self.gcra.check(tat, now);
            shard.count(&result);
            return result.map_err(|e| e.with_class(self.class.clone()));
        }
        let mut tat = 0;
        let result = self.gcra.check(&mut tat, now);
        shard.count(&result);
        if result.is_ok() {
            if shard.tats.len() >= self.shard_cap {
                shard.make_room(now, self.shard_cap);
            }
            shard.tats.insert(hash, tat);
        }
        result.map_err(|e| e.with_class(self.class.clone()))
    }

    fn stats(&self) -> ClassStats {
        let mut stats = ClassStats {
            class: self.class.as_deref().map(str::to_owned),
            quota: self.gcra.quota(),
            keys: 0,
            admitted: 0,
            limited: 0,
            evicted: 0,
        };
        for shard in self.shards.iter() {
            let shard = lock(shard);
            stats.keys += shard.tats.len();
            stats.admitted += shard.admitted;
            stats.limited += shard.limited;
            stats.evicted += shard.evicted;
        }
        stats
    }
}

impl Shard {
    fn count(&mut self, result: &Result<RateLimitInfo, RateLimited>) {
        match result {
            Ok(_) => self.admitted += 1,
            Err(_) => self.limited += 1,
        }
    }

    /// Frees room in a full shard (see the type's docs on bounded memory).
    fn make_room(&mut self, now: u64, cap: usize) {
        // Idle keys first: forgetting them changes nothing.
        self.tats.retain(|_, tat| *tat > now);
        if self.tats.len() < cap {
            return;
        }
        // Still full of active keys: forget those below the mean debt, keeping the most
        // limited ones. At least one key goes (the smallest debt is at most the mean).
        let len = self.tats.len() as u128;
        let total: u128 = self
            .tats
            .values()
            .map(|tat| u128::from(tat.saturating_sub(now)))
            .sum();
        let mean = (total / len) as u64;
        let before = self.tats.len();
        self.tats.retain(|_, tat| tat.saturating_sub(now) > mean);
        self.evicted += (before - self.tats.len()) as u64;
    }
}

impl RateLimiter {
    /// A limiter with one quota for every key.
    pub fn new(quota: Quota) -> Self {
        Self::builder(quota).build()
    }

    /// A builder with `default` as the quota of keys without a class.
    pub fn builder(default: Quota) -> RateLimiterBuilder {
        RateLimiterBuilder {
            default,
            classes: Vec::new(),
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    fn now(&self) -> u64 {
        self.nanos(Instant::now())
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.inner.start)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }

    fn table(&self, class: Option<&str>) -> &Table {
        class
            .and_then(|c| self.inner.classes.get(c))
            .unwrap_or(&self.inner.default)
    }

    /// Counts one request of `key` against the quota of `class` (the default quota when
    /// `class` is `None` or unknown).
    pub fn check(&self, class: Option<&str>, key: &str) -> Result<RateLimitInfo, RateLimited> {
        self.check_at(class, key, Instant::now())
    }

    /// [`check`](Self::check) at a time the caller already read (one clock read per
    /// request for all its layers). Times before the limiter was built count as its start.
    pub fn check_at(
        &self,
        class: Option<&str>,
        key: &str,
        now: Instant,
    ) -> Result<RateLimitInfo, RateLimited> {
        let now = self.nanos(now);
        let hash = self.inner.hasher.hash_one(key);
        self.table(class).check(hash, now)
    }

    /// What `key` would be told now, without counting a request.
    pub fn peek(&self, class: Option<&str>, key: &str) -> RateLimitInfo {
        let now = self.now();
        let table = self.table(class);
        let hash = self.inner.hasher.hash_one(key);
        let tat = lock(table.shard(hash))
            .tats
            .get(&hash)
            .copied()
            .unwrap_or(0);
        table.gcra.peek(tat, now)
    }

    /// The quota of `class` (the default one when `class` is `None` or unknown).
    pub fn quota(&self, class: Option<&str>) -> Quota {
        self.table(class).gcra.quota()
    }

    /// Forgets keys that have their full burst back; returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.now();
        let mut removed = 0;
        for table in std::iter::once(&self.inner.default).chain(self.inner.classes.values()) {
            for shard in table.shards.iter() {
                let mut shard = lock(shard);
                let before = shard.tats.len();
                shard.tats.retain(|_, tat| *tat > now);
                removed += before - shard.tats.len();
            }
        }
        removed
    }

    /// Keys remembered over all classes.
    pub fn len(&self) -> usize {
        self.stats().iter().map(|s| s.keys).sum()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters per class (the default class first), for admin endpoints.
    pub fn stats(&self) -> Vec<ClassStats> {
        let mut classes: Vec<&Table> = self.inner.classes.values().collect();
        classes.sort_by(|a, b| a.class.cmp(&b.class));
        std::iter::once(&self.inner.default)
            .chain(classes)
            .map(Table::stats)
            .collect()
    }
}
