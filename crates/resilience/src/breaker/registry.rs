use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::sync::{Arc, RwLock};

use super::{BreakerConfig, BreakerSnapshot, CircuitBreaker};
use crate::ConfigError;
use crate::sync::{read, write};

/// Circuit breakers by key: one per upstream instance, per route, or per (route, instance).
///
/// Breakers are created on first use with the registry's default config, or up front with
/// [`CircuitBreakers::insert`] (a route's own `circuit_breaker` settings). Remove the
/// breakers of instances that left the registry with [`CircuitBreakers::retain`].
///
/// ```
/// use trellis_resilience::breaker::{BreakerConfig, BreakerState, CircuitBreakers};
/// let breakers = CircuitBreakers::<String>::new(BreakerConfig::default()).unwrap();
/// let b = breakers.get("user-service/10.0.0.7:3001");
/// assert_eq!(b.state(), BreakerState::Closed);
/// assert_eq!(breakers.snapshot().len(), 1);
/// ```
#[derive(Debug)]
pub struct CircuitBreakers<K> {
    default: BreakerConfig,
    map: RwLock<HashMap<K, Arc<CircuitBreaker>>>,
}

impl<K> CircuitBreakers<K>
where
    K: Hash + Eq + Clone + Display,
{
    /// An empty registry creating breakers with `default`.
    pub fn new(default: BreakerConfig) -> Result<Self, ConfigError> {
        Ok(CircuitBreakers {
            default: default.validate()?,
            map: RwLock::new(HashMap::new()),
        })
    }

    /// The breaker for `key`, created (named after the key) if there is none.
    pub fn get<Q>(&self, key: &Q) -> Arc<CircuitBreaker>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(b) = read(&self.map).get(key) {
            return b.clone();
        }
        let key = key.to_owned();
        write(&self.map)
            .entry(key)
            .or_insert_with_key(|key| {
                Arc::new(CircuitBreaker::from_valid(
                    key.to_string().into(),
                    self.default.clone(),
                ))
            })
            .clone()
    }

    /// Installs a breaker with its own config for `key`, replacing any previous one.
    pub fn insert(
        &self,
        key: K,
        config: BreakerConfig,
    ) -> Result<Arc<CircuitBreaker>, ConfigError> {
        let breaker = Arc::new(CircuitBreaker::new(key.to_string(), config)?);
        write(&self.map).insert(key, breaker.clone());
        Ok(breaker)
    }

    /// Removes the breaker for `key`.
    pub fn remove<Q>(&self, key: &Q) -> Option<Arc<CircuitBreaker>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        write(&self.map).remove(key)
    }

    /// Keeps only the breakers whose key passes `keep` (for instances still registered).
    pub fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        write(&self.map).retain(|k, _| keep(k));
    }

    /// Number of breakers.
    pub fn len(&self) -> usize {
        read(&self.map).len()
    }

    /// True when there are no breakers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every breaker's key and state, for admin endpoints.
    pub fn snapshot(&self) -> Vec<(K, BreakerSnapshot)> {
        let breakers: Vec<(K, Arc<CircuitBreaker>)> = read(&self.map)
            .iter()
            .map(|(k, b)| (k.clone(), b.clone()))
            .collect();
        breakers
            .into_iter()
            .map(|(k, b)| (k, b.snapshot()))
            .collect()
    }
}
