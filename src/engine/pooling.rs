//! Embeddings from a decoder model (vLLM's embedding mode for decoder LLMs): a request with
//! `pooling` computes its prompt like any other, in the same steps and chunks, and instead of
//! generating it gets one vector pooled from the model's final-norm hidden states: the last
//! prompt token's (`Last`, what embedding models built on decoders such as e5-mistral or
//! gte-Qwen are trained for) or the mean over every prompt token (`Mean`), L2-normalised
//! unless the request says otherwise.
//!
//! The runner asks each step for the hidden rows a pooled sequence still needs
//! ([`PoolState::wanted`]) and adds them in position order. Prompt positions are computed
//! once each unless the sequence is preempted, when they are computed again and skipped
//! here (batch invariance makes the recomputed rows equal). A mean needs every position, so a
//! mean-pooled sequence never starts from prefix-cache hits (`NewSequence::prefix_cache`).

use std::ops::Range;

/// Which hidden states an embedding is pooled from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolingType {
    /// The last prompt token's.
    #[default]
    Last,
    /// The mean over every prompt token's.
    Mean,
}

impl std::str::FromStr for PoolingType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "last" => Ok(Self::Last),
            "mean" => Ok(Self::Mean),
            _ => Err(format!("unknown pooling type `{s}` (last, mean)")),
        }
    }
}

/// How a request's embedding is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub kind: PoolingType,
    /// Scale the vector to unit L2 norm.
    pub normalize: bool,
}

/// One sequence's embedding in the making.
#[derive(Debug, Clone)]
pub(crate) struct PoolState {
    pooling: Pooling,
    prompt_len: usize,
    /// Positions `0..next` are in `sum` (mean); `next == prompt_len` once the last row is
    /// in (both kinds).
    next: usize,
    sum: Vec<f64>,
}

impl PoolState {
    pub fn new(pooling: Pooling, prompt_len: usize) -> Self {
        Self {
            pooling,
            prompt_len,
            next: 0,
            sum: Vec::new(),
        }
    }

    /// The positions, of a step computing `start..end`, whose hidden rows are still needed.
    pub fn wanted(&self, start: usize, end: usize) -> Range<usize> {
        let end = end.min(self.prompt_len);
        let start = match self.pooling.kind {
            PoolingType::Last => start.max(self.prompt_len.saturating_sub(1)),
            PoolingType::Mean => start.max(self.next),
        };
        start..end.max(start)
    }

    /// Takes the hidden rows of `positions` (what [`Self::wanted`] returned), `[len, hidden]`.
    /// Rows that do not continue the positions already taken are ignored: the embedding is
    /// then never finished, and [`Self::finish`] says so.
    pub fn add(&mut self, positions: Range<usize>, rows: &[f32], hidden: usize) {
        let contiguous = match self.pooling.kind {
            PoolingType::Last => positions.end == self.prompt_len,
            PoolingType::Mean => positions.start == self.next,
        };
        if positions.is_empty() || !contiguous {
            return;
        }
        if self.sum.is_empty() {
            self.sum = vec![0.0; hidden];
        }
        match self.pooling.kind {
            PoolingType::Last => {
                let last = &rows[rows.len() - hidden..];
                self.sum
                    .iter_mut()
                    .zip(last)
                    .for_each(|(s, &x)| *s = x as f64);
            }
            PoolingType::Mean => {
                for row in rows.chunks_exact(hidden) {
                    self.sum
                        .iter_mut()
                        .zip(row)
                        .for_each(|(s, &x)| *s += x as f64);
                }
            }
        }
        self.next = positions.end;
    }

    /// Whether every row the embedding needs is in.
    pub fn is_complete(&self) -> bool {
        self.next == self.prompt_len && !self.sum.is_empty()
    }

    /// The embedding, or why there is none (a position was never seen).
    pub fn finish(&self) -> Result<Vec<f32>, String> {
        if !self.is_complete() {
            return Err(format!(
                "pooling saw prompt positions 0..{} of {}",
                self.next, self.prompt_len
            ));
        }
        let scale = match self.pooling.kind {
            PoolingType::Last => 1.0,
            PoolingType::Mean => 1.0 / self.prompt_len as f64,
        };
        let mut v: Vec<f64> = self.sum.iter().map(|s| s * scale).collect();
        if self.pooling.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            // As torch's F.normalize: a zero vector stays zero.
            let inv = 1.0 / norm.max(1e-12);
            v.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(v.into_iter().map(|x| x as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooling(kind: PoolingType, normalize: bool) -> Pooling {
        Pooling { kind, normalize }
    }

    /// Hidden rows of 2 values, row `p` = (p, 1).
    fn rows(r: Range<usize>) -> Vec<f32> {
        r.flat_map(|p| [p as f32, 1.0]).collect()
    }

    #[test]
    fn mean_over_chunks_skips_recomputed_positions() {
        let mut s = PoolState::new(pooling(PoolingType::Mean, false), 5);
        assert_eq!(s.wanted(0, 3), 0..3);
        s.add(0..3, &rows(0..3), 2);
        assert!(!s.is_complete());
        // Preempted and computed again from 0: only 3.. is new.
        assert_eq!(s.wanted(0, 4), 3..4);
        s.add(3..4, &rows(3..4), 2);
        assert_eq!(s.wanted(4, 5), 4..5);
        s.add(4..5, &rows(4..5), 2);
        assert_eq!(s.finish().unwrap(), vec![2.0, 1.0]);
        // Decode positions past the prompt are never wanted.
        assert!(s.wanted(5, 6).is_empty());
    }

    #[test]
    fn last_takes_only_the_last_prompt_row() {
        let mut s = PoolState::new(pooling(PoolingType::Last, true), 4);
        assert!(s.wanted(0, 2).is_empty());
        assert_eq!(s.wanted(2, 4), 3..4);
        s.add(3..4, &rows(3..4), 2);
        let v = s.finish().unwrap();
        let n = 10f64.sqrt();
        assert_eq!(v, vec![(3.0 / n) as f32, (1.0 / n) as f32]);
    }

    #[test]
    fn a_gap_is_reported_not_pooled() {
        let mut s = PoolState::new(pooling(PoolingType::Mean, true), 4);
        s.add(2..4, &rows(2..4), 2);
        assert!(!s.is_complete());
        assert!(s.finish().unwrap_err().contains("0..0 of 4"));
    }

    #[test]
    fn zero_vector_normalises_to_zero() {
        let mut s = PoolState::new(pooling(PoolingType::Last, true), 1);
        s.add(0..1, &[0.0, 0.0], 2);
        assert_eq!(s.finish().unwrap(), vec![0.0, 0.0]);
        assert_eq!("MEAN".parse::<PoolingType>(), Ok(PoolingType::Mean));
        assert!("cls".parse::<PoolingType>().is_err());
    }
}
