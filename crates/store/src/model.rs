//! Typed models on top of a [`Table`]: the seed's `User.create`, `User.findOne`,
//! `UserProfile.update`.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, StoreError};
use crate::request::{CasOutcome, Row};
use crate::store::{Store, Table};

/// The key of one model row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Partition key.
    pub partition: String,
    /// Clustering key (empty for one row per partition).
    pub clustering: String,
}

impl Key {
    /// A key with only a partition (one row per partition).
    pub fn partition(partition: impl Into<String>) -> Self {
        Key {
            partition: partition.into(),
            clustering: String::new(),
        }
    }

    /// A key with a partition and a clustering part.
    pub fn new(partition: impl Into<String>, clustering: impl Into<String>) -> Self {
        Key {
            partition: partition.into(),
            clustering: clustering.into(),
        }
    }
}

/// A type stored as JSON in its own table.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use trellis_store::{Key, Model};
///
/// #[derive(Serialize, Deserialize)]
/// struct User { id: String, email: String }
///
/// impl Model for User {
///     const TABLE: &'static str = "users";
///     fn key(&self) -> Key { Key::partition(&self.id) }
/// }
/// ```
pub trait Model: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Table the model lives in.
    const TABLE: &'static str;
    /// Where this value is stored.
    fn key(&self) -> Key;
}

/// A model value with the row version it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Row version, for optimistic concurrency.
    pub version: u64,
}

/// Create, find, update and delete values of one [`Model`] type.
#[derive(Debug, Clone)]
pub struct Models<T> {
    table: Table,
    _type: PhantomData<fn() -> T>,
}

/// How many times [`Models::update`] re-reads and retries after a concurrent write.
const UPDATE_ATTEMPTS: usize = 64;

impl<T: Model> Models<T> {
    /// The models of type `T` in `store`.
    pub fn new(store: &Store) -> Result<Self> {
        Ok(Models {
            table: store.table(T::TABLE)?,
            _type: PhantomData,
        })
    }

    /// The underlying table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Stores a new value; fails with [`StoreError::Conflict`] when its key is taken.
    pub async fn create(&self, value: &T) -> Result<Versioned<T>>
    where
        T: Clone,
    {
        let key = value.key();
        let bytes = self.encode(&key, value)?;
        match self
            .table
            .insert_if_absent(&key.partition, &key.clustering, bytes, None)
            .await?
        {
            CasOutcome::Applied { version } => Ok(Versioned {
                value: value.clone(),
                version,
            }),
            CasOutcome::Rejected { .. } => Err(self.conflict(&key, "a row with this key exists")),
        }
    }

    /// Stores `value` whatever was there before.
    pub async fn save(&self, value: &T) -> Result<u64> {
        let key = value.key();
        let bytes = self.encode(&key, value)?;
        self.table
            .put(&key.partition, &key.clustering, bytes, None)
            .await
    }

    /// Reads the value stored under `key`.
    pub async fn find_one(&self, key: &Key) -> Result<Option<Versioned<T>>> {
        match self.table.get(&key.partition, &key.clustering).await? {
            Some(row) => self.decode(&row).map(Some),
            None => Ok(None),
        }
    }

    /// Every value of one partition, in clustering-key order.
    pub async fn find_all(&self, partition: &str) -> Result<Vec<Versioned<T>>> {
        let rows = self.table.scan_all(partition, None).await?;
        rows.iter().map(|row| self.decode(row)).collect()
    }

    /// Changes the value under `key` with `change`, retrying on concurrent writes
    /// (optimistic concurrency on the row version). Returns `None` when there is no value.
    /// `change` may run more than once.
    pub async fn update(
        &self,
        key: &Key,
        mut change: impl FnMut(&mut T),
    ) -> Result<Option<Versioned<T>>> {
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(Versioned { mut value, version }) = self.find_one(key).await? else {
                return Ok(None);
            };
            change(&mut value);
            let bytes = self.encode(key, &value)?;
            if let CasOutcome::Applied { version } = self
                .table
                .update_if_version(&key.partition, &key.clustering, version, bytes, None)
                .await?
            {
                return Ok(Some(Versioned { value, version }));
            }
        }
        Err(self.conflict(
            key,
            &format!("still changing after {UPDATE_ATTEMPTS} attempts"),
        ))
    }

    /// Merges a JSON patch (RFC 7386: objects merge, `null` removes) into the stored value —
    /// the seed's `UserProfile.update({ userId }, { email })`. The result must still
    /// deserialize into `T`, or nothing is written.
    pub async fn patch(
        &self,
        key: &Key,
        patch: &serde_json::Value,
    ) -> Result<Option<Versioned<T>>> {
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(row) = self.table.get(&key.partition, &key.clustering).await? else {
                return Ok(None);
            };
            let mut doc: serde_json::Value =
                serde_json::from_slice(&row.value).map_err(|e| self.codec(key, e))?;
            crate::json::merge_patch(&mut doc, patch);
            let value: T = serde_json::from_value(doc).map_err(|e| self.codec(key, e))?;
            let bytes = self.encode(key, &value)?;
            if let CasOutcome::Applied { version } = self
                .table
                .update_if_version(&key.partition, &key.clustering, row.version, bytes, None)
                .await?
            {
                return Ok(Some(Versioned { value, version }));
            }
        }
        Err(self.conflict(
            key,
            &format!("still changing after {UPDATE_ATTEMPTS} attempts"),
        ))
    }

    /// Deletes the value under `key`; returns whether there was one.
    pub async fn delete(&self, key: &Key) -> Result<bool> {
        self.table.delete(&key.partition, &key.clustering).await
    }

    fn encode(&self, key: &Key, value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(value).map_err(|e| self.codec(key, e))
    }

    fn decode(&self, row: &Row) -> Result<Versioned<T>> {
        let value = serde_json::from_slice(&row.value).map_err(|source| StoreError::Codec {
            table: T::TABLE.to_owned(),
            partition: row.partition.clone(),
            clustering: row.clustering.clone(),
            source,
        })?;
        Ok(Versioned {
            value,
            version: row.version,
        })
    }

    fn codec(&self, key: &Key, source: serde_json::Error) -> StoreError {
        StoreError::Codec {
            table: T::TABLE.to_owned(),
            partition: key.partition.clone(),
            clustering: key.clustering.clone(),
            source,
        }
    }

    fn conflict(&self, key: &Key, reason: &str) -> StoreError {
        StoreError::Conflict {
            table: T::TABLE.to_owned(),
            partition: key.partition.clone(),
            clustering: key.clustering.clone(),
            reason: reason.to_owned(),
        }
    }
}
