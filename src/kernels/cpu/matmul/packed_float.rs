//! Float weights (F32, F16, BF16) repacked once at load for the FMA kernel
//! ([`super::packed_float_avx2`]), kept in their stored type.
//!
//! A part's weight rows (output columns) are cut into groups of [`GROUP`] = 16, a last short
//! group padded with zero columns that are never stored. A group is the 16 columns' values
//! at input index 0, then at index 1, …, `k − 1` (`16 · size` bytes per index), so one load
//! gives 16 columns' weights for one activation value broadcast to every lane: no horizontal
//! sum, and a tile of rows shares each load.
//!
//! Within an index the 16 values are in column order, except BF16, whose middle two
//! quarters swap (columns 4–7 after 8–11): the kernel widens BF16 to f32 by interleaving
//! with zeros, which works per 128-bit half, and this order makes its two results columns
//! 0–7 and 8–15.
//!
//! **Batch invariance:** every output element is one f32 chain, `acc = fma(w[i], x[i], acc)`
//! for `i` in `0..k` from `acc = 0`, whatever the tile, chunk or thread that computes it.

use super::packed::{Groups, GROUP};
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::HostTensor;

/// One part's float weights in the packed layout (see the module docs).
pub(super) struct PackedFloats {
    pub(super) dtype: WeightDType,
    /// Output columns (weight rows), without padding.
    pub(super) rows: usize,
    /// Input features.
    pub(super) k: usize,
    pub(super) groups: Groups,
}

impl PackedFloats {
    /// Repacks `t`, or `None` when it is not a float tensor.
    pub(super) fn new(t: &HostTensor) -> Option<Self> {
        let size = match t.dtype {
            WeightDType::F32 => 4,
            WeightDType::F16 | WeightDType::BF16 => 2,
            _ => return None,
        };
        let step = GROUP * size;
        let groups = Groups::new(t.rows, t.cols * step, |g, dst| {
            for c in 0..GROUP.min(t.rows - g * GROUP) {
                let slot = match t.dtype {
                    WeightDType::BF16 => bf16_slot(c),
                    _ => c,
                };
                let row = t.row(g * GROUP + c);
                for (i, value) in row.chunks_exact(size).enumerate() {
                    let at = i * step + slot * size;
                    dst[at..at + size].copy_from_slice(value);
                }
            }
        });
        Some(Self {
            dtype: t.dtype,
            rows: t.rows,
            k: t.cols,
            groups,
        })
    }
}

/// Where column `c` of a group sits among a BF16 index's 16 values (module docs).
fn bf16_slot(c: usize) -> usize {
    match c {
        4..=7 => c + 4,
        8..=11 => c - 4,
        _ => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_slots_are_a_permutation_that_widening_undoes() {
        let mut seen = [false; GROUP];
        for c in 0..GROUP {
            seen[bf16_slot(c)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        // Interleaving with zeros takes words 0–3 and 8–11 into the low result, 4–7 and
        // 12–15 into the high one: columns 0–7, then 8–15.
        let low: Vec<usize> = (0..4).chain(8..12).collect();
        let high: Vec<usize> = (4..8).chain(12..16).collect();
        for c in 0..8 {
            assert_eq!(bf16_slot(c), low[c]);
            assert_eq!(bf16_slot(c + 8), high[c]);
        }
    }

    #[test]
    fn layout_puts_each_columns_values_in_its_lane() {
        let (rows, k) = (19, 5);
        let values: Vec<f32> = (0..rows * k).map(|v| v as f32).collect();
        let t = HostTensor::from_f32(rows, k, &values);
        let Some(p) = PackedFloats::new(&t) else {
            panic!("f32 is packed");
        };
        assert_eq!((p.groups.num_groups, p.groups.group_bytes % 64), (2, 0));
        let at = |g: usize, i: usize, c: usize| {
            let b = &p.groups.group(g)[(i * GROUP + c) * 4..][..4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        assert_eq!(at(0, 3, 5), (5 * k + 3) as f32);
        assert_eq!(at(1, 4, 2), (18 * k + 4) as f32);
        assert_eq!(at(1, 4, 3), 0.0, "padding columns are zero");
    }
}
