use crate::sync::stable_hash;

/// A consistent-hash ring: `vnodes` points per endpoint, placed by a hash of the endpoint
/// id, so that adding or removing one endpoint moves only the keys on its arcs.
#[derive(Debug)]
pub(super) struct Ring {
    /// (point, member index), sorted by point.
    points: Box<[(u64, u32)]>,
}

impl Ring {
    pub(super) fn new<'a>(ids: impl Iterator<Item = &'a str>, vnodes: u32) -> Self {
        let mut points: Vec<(u64, u32, &str)> = Vec::new();
        for (index, id) in ids.enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            for v in 0..vnodes {
                points.push((stable_hash(&[id.as_bytes(), &v.to_le_bytes()]), index, id));
            }
        }
        // Ties broken by id, so every process builds the same ring.
        points.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.cmp(b.2)));
        Ring {
            points: points.into_iter().map(|(h, i, _)| (h, i)).collect(),
        }
    }

    /// The first member at or after `hash` on the ring that `eligible` accepts.
    pub(super) fn find(&self, hash: u64, eligible: &[bool]) -> Option<usize> {
        let len = self.points.len();
        let start = self.points.partition_point(|p| p.0 < hash);
        (0..len)
            .map(|k| self.points[(start + k) % len].1 as usize)
            .find(|&i| eligible.get(i).copied().unwrap_or(false))
    }
}

/// Splits picks between endpoints in proportion to their weights, exactly over every
/// cycle of `total` picks and interleaved within it (pick `k` takes slot
/// `k × step mod total`, `step` coprime with `total`, so each slot is taken once a cycle).
#[derive(Debug)]
pub(super) struct WeightedCycle {
    cumulative: Box<[u64]>,
    total: u64,
    step: u64,
}

impl WeightedCycle {
    pub(super) fn new(weights: impl Iterator<Item = u64>) -> Option<Self> {
        let mut total = 0u64;
        let cumulative: Box<[u64]> = weights
            .map(|w| {
                total = total.saturating_add(w);
                total
            })
            .collect();
        if total == 0 {
            return None;
        }
        let mut step = ((total as f64) * 0.618_033_988_749_895).round().max(1.0) as u64;
        while gcd(step, total) != 1 {
            step += 1;
        }
        Some(WeightedCycle {
            cumulative,
            total,
            step,
        })
    }

    /// The position (in the weights given) of pick number `tick`.
    pub(super) fn pick(&self, tick: u64) -> usize {
        let slot =
            (u128::from(tick % self.total) * u128::from(self.step) % u128::from(self.total)) as u64;
        self.cumulative.partition_point(|&c| c <= slot)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn weighted_cycle_is_exact_per_cycle_and_interleaved() {
        let cycle = WeightedCycle::new([90u64, 10].into_iter()).unwrap();
        let picks: Vec<usize> = (0..100).map(|t| cycle.pick(t)).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 10);
        // Interleaved: no run of more than 10 picks of the heavy endpoint.
        let longest = picks
            .split(|&p| p == 1)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0);
        assert!(longest <= 12, "longest run {longest}");
    }

    #[test]
    fn zero_weights_have_no_cycle_and_zero_weight_is_never_picked() {
        assert!(WeightedCycle::new([0u64, 0].into_iter()).is_none());
        let cycle = WeightedCycle::new([3u64, 0, 1].into_iter()).unwrap();
        let picks: Vec<usize> = (0..400).map(|t| cycle.pick(t)).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 0);
        assert_eq!(picks.iter().filter(|&&p| p == 2).count(), 100);
    }

    #[test]
    fn ring_skips_ineligible_members() {
        let ring = Ring::new(["a", "b", "c"].into_iter(), 50);
        let all = [true, true, true];
        let only_c = [false, false, true];
        for key in 0..100u64 {
            let h = stable_hash(&[&key.to_le_bytes()]);
            assert!(ring.find(h, &all).is_some());
            assert_eq!(ring.find(h, &only_c), Some(2));
            assert_eq!(ring.find(h, &[false, false, false]), None);
        }
    }
}
