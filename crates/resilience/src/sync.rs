//! Small internal helpers: poison-free locking, a sliding window of counters, a stable hash.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Locks `mutex`, ignoring poisoning: every critical section in this crate leaves its data
/// consistent at each step, so a panic elsewhere never leaves it half-written.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Number of slots of a [`SlidingWindow`].
const SLOTS: usize = 10;

/// Two counters per slot: everything, and the part of it that was marked (failures, retries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Events counted (requests, deposits).
    pub(crate) total: u64,
    /// Of those, the marked ones (failures, withdrawals).
    pub(crate) marked: u64,
}

/// Counts over the last `window`, in ten slots: an event leaves the sum between 0.9 and 1.0
/// windows after it happened. Time is tokio's, so tests control it with `pause()`.
#[derive(Debug)]
pub(crate) struct SlidingWindow {
    slot: Duration,
    slots: [Counts; SLOTS],
    head: usize,
    head_start: Instant,
}

impl SlidingWindow {
    pub(crate) fn new(window: Duration, now: Instant) -> Self {
        let slot = (window / SLOTS as u32).max(Duration::from_nanos(1));
        SlidingWindow {
            slot,
            slots: [Counts::default(); SLOTS],
            head: 0,
            head_start: now,
        }
    }

    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.head_start);
        if elapsed < self.slot {
            return;
        }
        let slot_ns = self.slot.as_nanos();
        let steps = elapsed.as_nanos() / slot_ns;
        for _ in 0..steps.min(SLOTS as u128) {
            self.head = (self.head + 1) % SLOTS;
            self.slots[self.head] = Counts::default();
        }
        let rest = (elapsed.as_nanos() % slot_ns) as u64;
        self.head_start = now - Duration::from_nanos(rest);
    }

    /// Adds to the current slot.
    pub(crate) fn add(&mut self, now: Instant, total: u64, marked: u64) {
        self.advance(now);
        let slot = &mut self.slots[self.head];
        slot.total = slot.total.saturating_add(total);
        slot.marked = slot.marked.saturating_add(marked);
    }

    /// The sums over the window.
    pub(crate) fn sum(&mut self, now: Instant) -> Counts {
        self.advance(now);
        self.slots.iter().fold(Counts::default(), |acc, c| Counts {
            total: acc.total.saturating_add(c.total),
            marked: acc.marked.saturating_add(c.marked),
        })
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self, now: Instant) {
        self.slots = [Counts::default(); SLOTS];
        self.head_start = now;
    }
}

/// A 64-bit hash that is the same in every process and every build (FNV-1a with the
/// murmur3 finalizer), so that gateways on several machines map a key to the same endpoint.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn window_forgets_after_one_window() {
        let start = Instant::now();
        let mut w = SlidingWindow::new(Duration::from_secs(10), start);
        w.add(start, 5, 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        w.add(Instant::now(), 1, 1);
        assert_eq!(
            w.sum(Instant::now()),
            Counts {
                total: 6,
                marked: 3
            }
        );
        // 10 s after the first add it is gone; the second is still there.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            w.sum(Instant::now()),
            Counts {
                total: 1,
                marked: 1
            }
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(w.sum(Instant::now()), Counts::default());
    }

    #[test]
    fn stable_hash_is_stable_and_separates_parts() {
        // Pinned value: changing the hash remaps every consistent-hash key in production.
        assert_eq!(stable_hash(&[b"user-42"]), 12_543_966_039_708_315_758);
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        assert_ne!(stable_hash(&[b"a"]), stable_hash(&[b"b"]));
    }
}

/// Read-locks `lock`, ignoring poisoning (see [`lock`]).
pub(crate) fn read<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `lock`, ignoring poisoning (see [`lock`]).
pub(crate) fn write<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Serde helpers for admin snapshots: times as milliseconds.
pub(crate) mod ms {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::Serializer;

    pub(crate) fn opt_duration<S: Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn opt_system_time<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

/// A hasher for keys that are already uniformly distributed 64-bit hashes: `write_u64`
/// passes the value through.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used for u64 keys; FNV-1a keeps it correct for anything else.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Builds [`PreHashed`] hashers.
pub(crate) type BuildPreHashed = std::hash::BuildHasherDefault<PreHashed>;
