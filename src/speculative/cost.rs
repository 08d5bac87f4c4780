//! What a step costs, measured: forward time ≈ `fixed + per_row · rows`, fitted by least
//! squares over recent steps (older ones weigh less). Whether verifying `k` more rows pays
//! depends on it: where reading the weights dominates (a CPU with matrix units at batch 1),
//! rows are nearly free; where each row's compute dominates (past the batch size where a step
//! turns compute-bound, or a CPU without them), a rejected draft token costs as much as a
//! decoded one. (`plan::StepCost` is the planner's offline probe of the same shape; this is a
//! running fit inside the engine, which must not depend on `plan`.)

/// Weight kept by the past at each new step.
const DECAY: f64 = 0.98;

/// The fit's weighted sums over `(rows, seconds)` points.
#[derive(Debug, Clone, Default)]
pub struct StepTimeFit {
    s0: f64,
    s1: f64,
    s2: f64,
    t0: f64,
    t1: f64,
}

impl StepTimeFit {
    /// Records a step that computed `rows` token rows in `seconds`.
    pub fn observe(&mut self, rows: usize, seconds: f64) {
        let x = rows as f64;
        self.s0 = DECAY * self.s0 + 1.0;
        self.s1 = DECAY * self.s1 + x;
        self.s2 = DECAY * self.s2 + x * x;
        self.t0 = DECAY * self.t0 + seconds;
        self.t1 = DECAY * self.t1 + x * seconds;
    }

    /// `(fixed, per_row)` seconds, once steps of different sizes have been seen; both
    /// non-negative.
    pub fn fit(&self) -> Option<(f64, f64)> {
        let det = self.s0 * self.s2 - self.s1 * self.s1;
        // Too little spread in the sizes seen (every step one row, say) to tell them apart.
        if self.s0 < 2.0 || det <= 1e-9 * self.s0 * self.s2 {
            return None;
        }
        let per_row = ((self.s0 * self.t1 - self.s1 * self.t0) / det).max(0.0);
        let fixed = ((self.t0 - per_row * self.s1) / self.s0).max(0.0);
        Some((fixed, per_row))
    }
}

/// The draft length in `0..=max_len` that maximizes a step's tokens per second, when
/// `decodes` sequences share it and each draft token is accepted with probability `alpha`
/// (independently, so `k` drafts yield `1 + alpha + ... + alpha^k` tokens in expectation):
/// `(decodes + E(k) - 1) / (fixed + per_row · (decodes + k) + draft_pass · k)`, where a draft
/// model's `k` passes (`draft_pass` seconds each; 0 for lookups) precede the step. Zero when
/// no draft pays.
pub fn best_draft_len(
    max_len: usize,
    alpha: f64,
    decodes: usize,
    cost: (f64, f64),
    draft_pass: f64,
) -> usize {
    let (fixed, per_row) = cost;
    let base_rows = decodes.max(1) as f64;
    let rate = |k: usize, tokens: f64| {
        let k = k as f64;
        (base_rows + tokens - 1.0) / (fixed + per_row * (base_rows + k) + draft_pass * k)
    };
    let mut best = (0, rate(0, 1.0));
    let (mut tokens, mut p) = (1.0, 1.0);
    for k in 1..=max_len {
        p *= alpha;
        tokens += p;
        let r = rate(k, tokens);
        if r > best.1 {
            best = (k, r);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_a_line_through_steps_of_different_sizes() {
        let mut c = StepTimeFit::default();
        assert!(c.fit().is_none());
        for _ in 0..10 {
            c.observe(1, 0.010);
        }
        assert!(c.fit().is_none(), "one size only");
        for rows in [2, 5, 16, 100] {
            c.observe(rows, 0.005 + 0.005 * rows as f64);
        }
        let (fixed, per_row) = c.fit().unwrap();
        assert!((fixed - 0.005).abs() < 1e-6, "{fixed}");
        assert!((per_row - 0.005).abs() < 1e-6, "{per_row}");
    }

    #[test]
    fn drafts_pay_where_rows_are_cheap_and_acceptance_high() {
        // Rows nearly free (weights read once per step): draft the most.
        assert_eq!(best_draft_len(4, 0.7, 1, (0.010, 0.0005), 0.0), 4);
        // Each row costs half a step: only a well-accepted draft pays, and a short one.
        assert_eq!(best_draft_len(4, 0.3, 1, (0.005, 0.005), 0.0), 0);
        assert!(best_draft_len(4, 0.9, 1, (0.005, 0.005), 0.0) >= 3);
        // Sixteen decodes on compute-bound rows: a draft never pays.
        assert_eq!(best_draft_len(4, 0.9, 16, (0.005, 0.004), 0.0), 0);
        // A draft model a tenth of the target's cost pays at high acceptance; one as slow
        // as the target does not.
        assert_eq!(best_draft_len(4, 0.8, 1, (0.010, 0.0005), 0.001), 4);
        assert_eq!(best_draft_len(4, 0.8, 1, (0.010, 0.0005), 0.0105), 0);
    }
}
