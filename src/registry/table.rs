//! The routing table every request reads (through `arc-swap`, without a lock): for each
//! model, its serving versions and how traffic splits among them. Rebuilt whole by the
//! registry on every change; a request that already holds a version keeps it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::served::{Lease, ServedModel};

/// One model's routes.
pub struct Route {
    /// Every serving version, for `name@version`.
    pub by_version: HashMap<String, Arc<ServedModel>>,
    /// Versions taking unpinned traffic, and the order they take it in.
    targets: Vec<Arc<ServedModel>>,
    schedule: Vec<u16>,
    next: AtomicU64,
    /// Milliseconds since the Unix epoch of the last request routed here (least recently
    /// used first when `--models-max` needs room); shared with the registry's entry.
    pub last_used: Arc<AtomicU64>,
}

impl Route {
    /// `split` is `(version index in targets, weight)`; weights are small integers.
    pub fn new(
        by_version: HashMap<String, Arc<ServedModel>>,
        targets: Vec<(Arc<ServedModel>, u32)>,
        last_used: Arc<AtomicU64>,
    ) -> Self {
        let weights: Vec<u32> = targets.iter().map(|(_, w)| *w).collect();
        Self {
            by_version,
            schedule: smooth_schedule(&weights),
            targets: targets.into_iter().map(|(m, _)| m).collect(),
            next: AtomicU64::new(0),
            last_used,
        }
    }

    /// The next version for an unpinned request (`None` when the model has no live version).
    pub fn pick(&self) -> Option<Lease> {
        if self.schedule.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = self.schedule[(n % self.schedule.len() as u64) as usize];
        self.touch();
        self.targets.get(slot as usize).cloned().map(Lease::new)
    }

    pub fn pinned(&self, version: &str) -> Option<Lease> {
        let m = self.by_version.get(version)?.clone();
        self.touch();
        Some(Lease::new(m))
    }

    fn touch(&self) {
        self.last_used
            .store(crate::engine::handle::now_millis(), Ordering::Relaxed);
    }
}

/// Every model's routes, by name.
#[derive(Default)]
pub struct RoutingTable {
    pub models: HashMap<String, Arc<Route>>,
}

/// The order in which targets with `weights` take requests: one period of nginx's smooth
/// weighted round robin, so any window of the period's length splits exactly by weight and
/// the versions interleave (90/10 sends every tenth request to the canary, not a run of
/// ten). The weights are divided by their common divisor first, so the period is short.
pub fn smooth_schedule(weights: &[u32]) -> Vec<u16> {
    let g = weights.iter().fold(0, |a, &w| gcd(a, w));
    if g == 0 {
        return Vec::new();
    }
    let w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += wi;
        }
        let best = (0..w.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        current[best] -= total;
        out.push(best as u16);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::smooth_schedule;

    fn counts(s: &[u16], n: usize) -> Vec<usize> {
        (0..n)
            .map(|i| s.iter().filter(|&&x| x as usize == i).count())
            .collect()
    }

    #[test]
    fn splits_exactly_by_weight_and_interleaves() {
        let s = smooth_schedule(&[90, 10]);
        assert_eq!(s.len(), 10);
        assert_eq!(counts(&s, 2), vec![9, 1]);
        let s = smooth_schedule(&[5, 1, 1]);
        assert_eq!(counts(&s, 3), vec![5, 1, 1]);
        // Smooth: the heavy target never takes more than its share in a row.
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        let s = smooth_schedule(&[1, 1]);
        assert_eq!(s, vec![0, 1]);
    }

    #[test]
    fn zero_weights_take_nothing() {
        assert!(smooth_schedule(&[]).is_empty());
        assert!(smooth_schedule(&[0, 0]).is_empty());
        assert_eq!(smooth_schedule(&[0, 3]), vec![1]);
    }
}
