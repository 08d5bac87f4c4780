//! Sampling as a backend op, device-neutral: the rows of one step's sampling (`SamplingBatch`)
//! and what comes back per row (`SampledRow`). `Backend::sample` takes the logits where the
//! forward pass left them and returns only ids and the requested logprobs.
//!
//! A `SamplingBatch` holds one `SampleRow` per logits row, in the order of the logits rows,
//! plus the flat penalty and bias lists the rows index by `[begin, end)` ranges. Invariant: a
//! row's penalty list names each token once (`count` generated occurrences, `in_prompt`), so
//! a device may apply penalties in parallel; its bias list may repeat a token (applied in
//! order). The draw is counter-based (`seed`, `counter` = tokens generated so far), so a
//! sequence's draws do not depend on what shares its batch.

/// Alternatives per row a device reports at most (`MAX_TOP_LOGPROBS` in sampling.cu).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Threads of one `sample_rows` CTA (`SAMPLE_THREADS` in sampling.cu): the draw walks the
/// row in this many contiguous chunks, so the reference replays it.
pub const SAMPLE_THREADS: usize = 1024;
/// Below this temperature a row is greedy (on the host too: `sampling::SamplingParams`).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// A token the penalties look at: generated `count` times, and whether the prompt holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PenaltyToken {
    pub token_id: u32,
    pub count: u32,
    pub in_prompt: bool,
}

/// One row of a `SamplingBatch`, flat: one draw's parameters (`sampling::SamplingParams`
/// without its lists, built by `SamplingParams::device_row`) and its list ranges.
/// `#[repr(C)]`: it is also the CUDA kernel's argument layout (`SamplingRow` in
/// `sampling.cu`), uploaded as is.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRow {
    pub seed: u64,
    /// Tokens this sequence generated so far: the draw's index, so a seed replays.
    pub counter: u64,
    /// Below `GREEDY_TEMPERATURE`: greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 0: no cut.
    pub top_k: i32,
    /// At most `MAX_TOP_LOGPROBS`.
    pub num_top_logprobs: i32,
    /// `[begin, end)` in the batch's penalty lists.
    pub penalty_begin: u32,
    pub penalty_end: u32,
    /// `[begin, end)` in the batch's bias lists.
    pub bias_begin: u32,
    pub bias_end: u32,
}

/// A greedy row that changes nothing: no penalty, no cut, no logprobs.
impl Default for SampleRow {
    fn default() -> Self {
        Self {
            seed: 0,
            counter: 0,
            temperature: 0.0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            top_k: 0,
            num_top_logprobs: 0,
            penalty_begin: 0,
            penalty_end: 0,
            bias_begin: 0,
            bias_end: 0,
        }
    }
}

/// The rows of one sampling call, flat as a device reads them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingBatch {
    pub rows: Vec<SampleRow>,
    pub penalty_ids: Vec<u32>,
    /// `count | in_prompt << 31`.
    pub penalty_info: Vec<u32>,
    pub bias_ids: Vec<u32>,
    pub bias_values: Vec<f32>,
}

impl SamplingBatch {
    /// Appends a row: `row`'s parameters (its list ranges are set here, its top logprobs
    /// capped at `MAX_TOP_LOGPROBS`). `penalties` must name each token once (see the module
    /// doc); a count is capped at 2³¹ - 1. Suppressed tokens (EOS under `min_tokens`) go in
    /// `bias` as `-inf`.
    pub fn push(&mut self, row: SampleRow, penalties: &[PenaltyToken], bias: &[(u32, f32)]) {
        self.push_row(row, penalties.iter().copied(), bias.iter().copied());
    }

    /// `push` from iterators (no intermediate lists).
    pub fn push_row(
        &mut self,
        row: SampleRow,
        penalties: impl IntoIterator<Item = PenaltyToken>,
        bias: impl IntoIterator<Item = (u32, f32)>,
    ) {
        let penalty_begin = self.penalty_ids.len() as u32;
        for t in penalties {
            self.penalty_ids.push(t.token_id);
            self.penalty_info
                .push(t.count.min(0x7fff_ffff) | (u32::from(t.in_prompt) << 31));
        }
        let bias_begin = self.bias_ids.len() as u32;
        for (id, v) in bias {
            self.bias_ids.push(id);
            self.bias_values.push(v);
        }
        self.rows.push(SampleRow {
            num_top_logprobs: row.num_top_logprobs.clamp(0, MAX_TOP_LOGPROBS as i32),
            top_k: row.top_k.max(0),
            penalty_begin,
            penalty_end: self.penalty_ids.len() as u32,
            bias_begin,
            bias_end: self.bias_ids.len() as u32,
            ..row
        });
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.penalty_ids.clear();
        self.penalty_info.clear();
        self.bias_ids.clear();
        self.bias_values.clear();
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// What sampling one row produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledRow {
    pub token_id: u32,
    /// Log-probability of `token_id` under the raw logits (NaN when the row was).
    pub logprob: f32,
    /// The most probable tokens of the raw logits, best first, as `(id, logprob)`.
    pub top_logprobs: Vec<(u32, f32)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_index_their_own_lists() {
        let mut b = SamplingBatch::default();
        let pen = [PenaltyToken {
            token_id: 7,
            count: u32::MAX,
            in_prompt: true,
        }];
        b.push(SampleRow::default(), &pen, &[(1, 2.0), (1, -1.0)]);
        b.push(
            SampleRow {
                top_k: i32::MAX,
                num_top_logprobs: 100,
                ..SampleRow::default()
            },
            &[],
            &[(3, f32::NEG_INFINITY)],
        );
        assert_eq!(b.len(), 2);
        assert_eq!((b.rows[0].penalty_begin, b.rows[0].penalty_end), (0, 1));
        assert_eq!(b.penalty_info, [0x7fff_ffff | 1 << 31]);
        assert_eq!((b.rows[0].bias_begin, b.rows[0].bias_end), (0, 2));
        assert_eq!((b.rows[1].penalty_begin, b.rows[1].penalty_end), (1, 1));
        assert_eq!((b.rows[1].bias_begin, b.rows[1].bias_end), (2, 3));
        assert_eq!(b.rows[1].top_k, i32::MAX);
        assert_eq!(b.rows[1].num_top_logprobs, MAX_TOP_LOGPROBS as i32);
        b.clear();
        assert!(b.is_empty() && b.bias_ids.is_empty() && b.penalty_ids.is_empty());
    }
}
