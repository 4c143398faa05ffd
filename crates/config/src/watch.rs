//! Watching configuration: every version, in order, from this process and from others.
//!
//! Why a wake-up counter and not a channel of versions: a channel would have to be either
//! unbounded or lossy, and it would only carry this process's writes. Instead a
//! [`ConfigWatch`] remembers the last version it delivered and, when woken, reads the
//! versions after it from the store — so a slow watcher catches up without gaps, writes
//! from every process are seen the same way, and memory stays bounded (one page of
//! versions per watch).
//!
//! Wake-ups come from two sources sharing one [`tokio::sync::watch`] counter per manager:
//! the manager's own writes bump it at once; a poller task per manager bumps it when the
//! table's [change marker](trellis_store::Table::change_marker) moves (every
//! refresh interval, and only while something watches). The poller holds a weak reference
//! and ends when the last clone of the manager and the last watch are dropped.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;
use trellis_core::NameError;

use crate::error::ConfigError;
use crate::manager::{Inner, WATCH_PAGE};
use crate::version::ConfigVersion;

/// A stream of the versions of one service in one environment, from
/// [`ConfigurationManager::watch`](crate::ConfigurationManager::watch) or
/// [`watch_in`](crate::ConfigurationManager::watch_in).
///
/// [`next`](Self::next) returns every version, in ascending order, with no gaps and no
/// repeats, however many were written between two calls and whichever process wrote them.
/// Keeps the manager's shared state alive while it exists.
pub struct ConfigWatch {
    inner: Arc<Inner>,
    target: Result<String, NameError>,
    /// The last version delivered (or the one to start after); `None` until known.
    position: Option<u64>,
    /// Versions read from the store and not yet delivered, in order (at most one page).
    pending: VecDeque<ConfigVersion>,
    changes: watch::Receiver<u64>,
}

impl fmt::Debug for ConfigWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigWatch")
            .field("target", &self.target)
            .field("position", &self.position)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl ConfigWatch {
    /// A watch of `target` (partition key and where to start, or the name error).
    pub(crate) fn new(inner: Arc<Inner>, target: Result<(String, Option<u64>), NameError>) -> Self {
        let changes = inner.changes.subscribe();
        let (target, position) = match target {
            Ok((partition, start)) => (Ok(partition), start),
            Err(e) => (Err(e), None),
        };
        ConfigWatch {
            inner,
            target,
            position,
            pending: VecDeque::new(),
            changes,
        }
    }

    /// The version delivered last, or the one this watch starts after; `None` while the
    /// current version is not known yet.
    pub fn position(&self) -> Option<u64> {
        self.position
    }

    /// Waits for the next version.
    ///
    /// Cancel-safe: when the future is dropped before it completes (in `select!` or under
    /// a timeout), no version is lost or skipped. Store errors are returned and the next
    /// call tries again from the same place; an invalid name is returned every time.
    pub async fn next(&mut self) -> Result<ConfigVersion, ConfigError> {
        let partition = match &self.target {
            Ok(partition) => partition.clone(),
            Err(e) => return Err(e.clone().into()),
        };
        loop {
            if let Some(version) = self.pending.pop_front() {
                self.position = Some(version.version);
                return Ok(version);
            }
            self.inner.ensure_poller();
            // Mark the counter seen before reading, so that a write landing after the
            // read wakes the wait below.
            self.changes.borrow_and_update();
            let after = match self.position {
                Some(after) => after,
                None => {
                    let head = self
                        .inner
                        .read_head(&partition)
                        .await?
                        .map_or(0, |(head, _)| head.version);
                    let start = self.inner.resolve_start(&partition, head);
                    self.position = Some(start);
                    start
                }
            };
            let versions = self
                .inner
                .versions_after(&partition, after, WATCH_PAGE)
                .await?;
            if !versions.is_empty() {
                self.pending.extend(versions);
                continue;
            }
            if self.changes.changed().await.is_err() {
                // Cannot happen while `inner` (which owns the sender) lives; poll anyway.
                tokio::time::sleep(self.inner.refresh_interval).await;
            }
        }
    }
}

/// Stops the task started by
/// [`ConfigurationManager::watch_with`](crate::ConfigurationManager::watch_with) when
/// dropped.
#[must_use = "dropping the handle stops the watch"]
pub struct WatchHandle {
    task: JoinHandle<()>,
}

impl fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchHandle")
            .field("finished", &self.task.is_finished())
            .finish()
    }
}

impl WatchHandle {
    /// Runs `callback` for every version `watch` delivers, on `watch`'s runtime.
    pub(crate) fn spawn<F>(mut watch: ConfigWatch, mut callback: F) -> Self
    where
        F: FnMut(ConfigVersion) + Send + 'static,
    {
        let retry = watch.inner.refresh_interval;
        let span = tracing::info_span!("config_watch", target = ?watch.target);
        let runtime = Handle::try_current()
            .ok()
            .or_else(|| watch.inner.runtime.clone());
        let task = async move {
            loop {
                match watch.next().await {
                    Ok(version) => callback(version),
                    Err(ConfigError::Name(e)) => {
                        tracing::error!(error = %e, "config watch stopped");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "config watch failed; retrying");
                        tokio::time::sleep(retry).await;
                    }
                }
            }
        }
        .instrument(span);
        let task = match runtime {
            Some(runtime) => runtime.spawn(task),
            // Documented on `watch_with`: same contract as `tokio::spawn`.
            None => tokio::spawn(task),
        };
        WatchHandle { task }
    }

    /// Stops the watch now (as dropping the handle does).
    pub fn stop(self) {
        self.task.abort();
    }

    /// True once the task has ended: stopped, or ended by an invalid service name.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the poller of `inner`'s table on `runtime`.
pub(crate) fn spawn_poller(runtime: &Handle, inner: &Arc<Inner>) -> JoinHandle<()> {
    let span = tracing::debug_span!("config_poller", table = inner.table.name());
    runtime.spawn(poll(Arc::downgrade(inner), inner.refresh_interval).instrument(span))
}

/// Every `period`, while watches exist, wakes them when the table's change marker moved
/// (or always, when the backend has no marker). Ends with the manager.
async fn poll(inner: Weak<Inner>, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_marker = None;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.changes.receiver_count() == 0 {
            continue;
        }
        let changed = match inner.table.change_marker().await {
            Ok(Some(marker)) => last_marker.replace(marker) != Some(marker),
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(error = %e, "config change poll failed");
                false
            }
        };
        if changed {
            inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}
