//! Trace and span ids from a per-thread wyrand generator, and the root sampling decision.
//!
//! Why not the OS generator: ids need to be unique, not secret. wyrand (64-bit state, one
//! 128-bit multiply per number) seeded once per thread from the standard library's
//! randomly keyed hasher costs a few nanoseconds and never makes a system call.
//!
//! Why the decision is made here, before the SDK: spans started through
//! [`DistributedTracer`](crate::DistributedTracer) never reach the SDK's sampler (an
//! unsampled one is ids only, a sampled one is recorded by this crate, see
//! [`tracer`](crate::tracer)). The rule is the SDK's `TraceIdRatioBased` one, so spans that
//! the `tracing-opentelemetry` layer starts through the SDK directly are sampled alike.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::IdGenerator;

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // RandomState is keyed from the OS once per thread, then its keys are bumped; hash
    // the thread id and the time in too, so that every thread starts elsewhere.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    std::hash::Hash::hash(&std::thread::current().id(), &mut hasher);
    hasher.finish()
}

/// The next 64 random bits of this thread (wyrand).
fn next_u64() -> u64 {
    STATE.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s).wrapping_mul(u128::from(s ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A new non-zero trace id.
pub(crate) fn trace_id() -> TraceId {
    loop {
        let id = (u128::from(next_u64()) << 64) | u128::from(next_u64());
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

/// A new non-zero span id.
pub(crate) fn span_id() -> SpanId {
    loop {
        let id = next_u64();
        if id != 0 {
            return SpanId::from(id);
        }
    }
}

/// The root sampling rule of `TraceIdRatioBased(rate)`, precomputed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ratio {
    always: bool,
    bound: u64,
}

impl Ratio {
    pub(crate) fn new(rate: f64) -> Self {
        Ratio {
            always: rate >= 1.0,
            bound: (rate.max(0.0) * (1u64 << 63) as f64) as u64,
        }
    }

    /// Whether a root with `trace_id` is kept (the SDK's rule: the low 64 bits, shifted
    /// right once, below `rate × 2⁶³`).
    pub(crate) fn keeps(self, trace_id: TraceId) -> bool {
        if self.always {
            return true;
        }
        let bytes = trace_id.to_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..]);
        (u64::from_be_bytes(low) >> 1) < self.bound
    }
}

/// The SDK provider's id generator: ids from this module.
#[derive(Debug, Default)]
pub(crate) struct IdGen;

impl IdGenerator for IdGen {
    fn new_trace_id(&self) -> TraceId {
        trace_id()
    }

    fn new_span_id(&self) -> SpanId {
        span_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_non_zero_and_distinct() {
        let ids: std::collections::HashSet<u64> = (0..100_000)
            .map(|_| u64::from_be_bytes(span_id().to_bytes()))
            .collect();
        assert_eq!(ids.len(), 100_000);
        assert!(!ids.contains(&0));
        assert_ne!(trace_id(), trace_id());
    }

    #[test]
    fn threads_draw_different_ids() {
        let here = trace_id();
        let there = std::thread::spawn(trace_id).join().unwrap_or(here);
        assert_ne!(here, there);
    }

    #[test]
    fn the_ratio_matches_the_rate() {
        for (rate, low, high) in [(0.1, 9_400, 10_600), (0.5, 49_000, 51_000)] {
            let ratio = Ratio::new(rate);
            let kept = (0..100_000).filter(|_| ratio.keeps(trace_id())).count();
            assert!((low..=high).contains(&kept), "rate {rate}: kept {kept}");
        }
        assert!(Ratio::new(1.0).keeps(TraceId::from(u128::MAX)));
        assert!(!Ratio::new(0.0).keeps(TraceId::from(1u128)));
    }
}
