//! Dequantization of GGML blocks to f32, and the portable (scalar) dot products that are both
//! the fallback kernel and the readable statement of what the SIMD kernels compute.
//!
//! Every dot here accumulates one f32 contribution per weight block, in block order, so its
//! result depends only on the two rows it reads (batch invariance).

use half::{bf16, f16};

use super::quantize::{Q8Acts, Q8KActs, Q8K_BLOCK};
use crate::kernels::dtype::{WeightDType, IQ4_NL_VALUES};

#[inline]
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantize one row of `dtype` (raw GGML bytes) into f32.
///
/// # Panics
/// When `bytes` does not hold exactly `out.len()` values of `dtype` (a caller's shape bug).
pub fn dequantize_row(dtype: WeightDType, bytes: &[u8], out: &mut [f32]) {
    let expected = dtype.row_bytes(out.len());
    assert_eq!(
        expected,
        Some(bytes.len()),
        "dequantize_row: {} bytes for {} values of {dtype}",
        bytes.len(),
        out.len()
    );
    let bl = dtype.block_len();
    let bb = dtype.block_bytes();
    for (blk, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        match dtype {
            WeightDType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            WeightDType::F16 => y[0] = f16_at(blk, 0),
            WeightDType::BF16 => y[0] = bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            WeightDType::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    y[j] = d * ((blk[2 + j] & 0xF) as f32 - 8.0);
                    y[j + 16] = d * ((blk[2 + j] >> 4) as f32 - 8.0);
                }
            }
            WeightDType::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..16 {
                    y[j] = d * (blk[4 + j] & 0xF) as f32 + m;
                    y[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                }
            }
            WeightDType::Q5_0 => {
                let d = f16_at(blk, 0);
                for (j, y) in y.iter_mut().enumerate() {
                    *y = d * (q5_quant(dtype, blk, j) as f32 - 16.0);
                }
            }
            WeightDType::Q5_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for (j, y) in y.iter_mut().enumerate() {
                    *y = d * q5_quant(dtype, blk, j) as f32 + m;
                }
            }
            WeightDType::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    y[j] = d * (blk[2 + j] as i8) as f32;
                }
            }
            WeightDType::IQ4NL => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    y[j] = d * IQ4_NL_VALUES[(blk[2 + j] & 0xF) as usize] as f32;
                    y[j + 16] = d * IQ4_NL_VALUES[(blk[2 + j] >> 4) as usize] as f32;
                }
            }
            WeightDType::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                for (i, sub) in y.chunks_exact_mut(32).enumerate() {
                    let (sc, m) = q4k_scale_min(&blk[4..16], i);
                    let q = &blk[16 + 32 * (i / 2)..][..32];
                    let shift = 4 * (i % 2);
                    for (v, &b) in sub.iter_mut().zip(q) {
                        *v = d * sc as f32 * ((b >> shift) & 0xF) as f32 - dmin * m as f32;
                    }
                }
            }
            WeightDType::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                for (i, sub) in y.chunks_exact_mut(32).enumerate() {
                    let (sc, m) = q4k_scale_min(&blk[4..16], i);
                    for (l, v) in sub.iter_mut().enumerate() {
                        *v = d * sc as f32 * q5k_quant(blk, i, l) as f32 - dmin * m as f32;
                    }
                }
            }
            WeightDType::Q3K => {
                let d = f16_at(blk, 108);
                for (i, v) in y.iter_mut().enumerate() {
                    let sc = q3k_scale(&blk[96..108], i / 16);
                    *v = d * sc as f32 * (q3k_quant(blk, i) - 4) as f32;
                }
            }
            WeightDType::Q6K => {
                let d = f16_at(blk, 208);
                for (i, v) in y.iter_mut().enumerate() {
                    *v = d * (blk[192 + i / 16] as i8) as f32 * q6k_quant(blk, i) as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `i` (0..8) of a Q4_K block (GGML's packing: the low
/// 6 bits of bytes 0..8 for sub-blocks 0..4, nibbles plus the spare top bits for 4..8).
#[inline]
pub(super) fn q4k_scale_min(s: &[u8], i: usize) -> (u8, u8) {
    if i < 4 {
        (s[i] & 63, s[i + 4] & 63)
    } else {
        (
            (s[i + 4] & 0xF) | ((s[i - 4] >> 6) << 4),
            (s[i + 4] >> 4) | ((s[i] >> 6) << 4),
        )
    }
}

/// The unsigned quant (0..31) of value `l` (0..32) of sub-block `i` (0..8) of a Q5_K block:
/// the low 4 bits as Q4_K's, the fifth from bit `i` of `qh[l]`.
#[inline]
pub(super) fn q5k_quant(blk: &[u8], i: usize, l: usize) -> u8 {
    let lo = (blk[48 + 32 * (i / 2) + l] >> (4 * (i % 2))) & 0xF;
    lo | ((blk[16 + l] >> i) & 1) << 4
}

/// The signed scale (−32..31) of sub-block `i` (0..16) of a Q3_K block, from its 12 scale
/// bytes: the low 4 bits are the nibbles of bytes 0..8 (low nibbles for 0..8), the high 2
/// bits the 2-bit fields of bytes 8..12.
#[inline]
pub(super) fn q3k_scale(s: &[u8], i: usize) -> i32 {
    let lo = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
    let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    (lo | hi << 4) as i32 - 32
}

/// The unsigned quant (0..7, `w ∝ q − 4`) of value `i` (0..256) of a Q3_K block: two halves
/// of 128; within a half, four runs of 32 take successive 2-bit fields of `qs[32·half..][..32]`
/// and successive bits of `hmask[0..32]`.
#[inline]
pub(super) fn q3k_quant(blk: &[u8], i: usize) -> i32 {
    let (half, run, l) = (i / 128, i % 128 / 32, i % 32);
    let lo = (blk[32 + 32 * half + l] >> (2 * run)) & 3;
    let hi = (blk[l] >> (4 * half + run)) & 1;
    (lo | hi << 2) as i32
}

/// The signed quant (−32..31) of value `i` (0..256) of a Q6_K block: values come in two
/// halves of 128; within a half, four runs of 32 take the low/high nibbles of `ql[0..32]`,
/// `ql[32..64]` and successive 2-bit fields of `qh[0..32]`.
#[inline]
pub(super) fn q6k_quant(blk: &[u8], i: usize) -> i32 {
    let (half, v) = (i / 128, i % 128);
    let (run, l) = (v / 32, v % 32);
    let ql = blk[64 * half + l + 32 * (run % 2)];
    let lo = if run < 2 { ql & 0xF } else { ql >> 4 };
    let hi = (blk[128 + 32 * half + l] >> (2 * run)) & 3;
    (lo | (hi << 4)) as i32 - 32
}

/// Value `j` (0..32) of a Q5_0 or Q5_1 block, unsigned (0..31): the low 4 bits from byte
/// `j % 16` of the quants (low nibble for `j < 16`), the fifth from bit `j` of `qh`.
pub(super) fn q5_quant(dtype: WeightDType, blk: &[u8], j: usize) -> u8 {
    let qh_at = if dtype == WeightDType::Q5_0 { 2 } else { 4 };
    let qh = u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]);
    let q = blk[qh_at + 4 + j % 16];
    let lo = if j < 16 { q & 0xF } else { q >> 4 };
    lo | (((qh >> j) & 1) as u8) << 4
}

/// A Q5 block's `(d, m)`, with `w = d·q + m` (Q5_0: `m = −16·d`).
pub(super) fn q5_scale_min(dtype: WeightDType, blk: &[u8]) -> (f32, f32) {
    let d = f16_at(blk, 0);
    match dtype {
        WeightDType::Q5_0 => (d, -16.0 * d),
        _ => (d, f16_at(blk, 2)),
    }
}

/// Portable dot of one weight row (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or IQ4_NL) with activation
/// row `r` of `acts`.
pub(super) fn dot_q8(dtype: WeightDType, w: &[u8], acts: &Q8Acts, r: usize) -> f32 {
    let (xq, xd, xs) = acts.row(r);
    let bb = dtype.block_bytes();
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let x = &xq[32 * b..32 * b + 32];
        match dtype {
            WeightDType::Q4_0 | WeightDType::Q4_1 => {
                let off = if dtype == WeightDType::Q4_0 { 2 } else { 4 };
                let mut isum = 0i32;
                for j in 0..16 {
                    let q = blk[off + j];
                    isum += (q & 0xF) as i32 * x[j] as i32 + (q >> 4) as i32 * x[j + 16] as i32;
                }
                let d = f16_at(blk, 0);
                let m = if dtype == WeightDType::Q4_0 {
                    -8.0 * d
                } else {
                    f16_at(blk, 2)
                };
                acc += isum as f32 * (d * xd[b]);
                acc += m * xs[b];
            }
            WeightDType::Q5_0 | WeightDType::Q5_1 => {
                let isum: i32 = (0..32)
                    .map(|j| q5_quant(dtype, blk, j) as i32 * x[j] as i32)
                    .sum();
                let (d, m) = q5_scale_min(dtype, blk);
                acc += isum as f32 * (d * xd[b]);
                acc += m * xs[b];
            }
            WeightDType::IQ4NL => {
                let level = |q: u8| IQ4_NL_VALUES[q as usize] as i32;
                let isum: i32 = (0..16)
                    .map(|j| {
                        level(blk[2 + j] & 0xF) * x[j] as i32
                            + level(blk[2 + j] >> 4) * x[j + 16] as i32
                    })
                    .sum();
                acc += isum as f32 * (f16_at(blk, 0) * xd[b]);
            }
            _ => {
                let mut isum = 0i32;
                for j in 0..32 {
                    isum += (blk[2 + j] as i8) as i32 * x[j] as i32;
                }
                acc += isum as f32 * (f16_at(blk, 0) * xd[b]);
            }
        }
    }
    acc
}

/// Portable dot of one K-quant weight row with activation row `r` of `acts`: integer sums per
/// super-block, one f32 contribution per super-block. Quants are taken unsigned (`u`, with
/// `w = d·sc·(u − bias)` or `d·sc·u − dmin·m`); the bias and min terms use the activations'
/// sums of 16, as the SIMD kernels do.
pub(super) fn dot_q8k(dtype: WeightDType, w: &[u8], acts: &Q8KActs, r: usize) -> f32 {
    let (xq, xd, xbs) = acts.row(r);
    let bb = dtype.block_bytes();
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let x = &xq[Q8K_BLOCK * b..Q8K_BLOCK * (b + 1)];
        let bsums = &xbs[16 * b..16 * b + 16];
        match dtype {
            WeightDType::Q4K | WeightDType::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (mut sumi, mut summ) = (0i32, 0i32);
                for i in 0..8 {
                    let (sc, m) = q4k_scale_min(&blk[4..16], i);
                    let mut isum = 0i32;
                    for l in 0..32 {
                        let u = if dtype == WeightDType::Q4K {
                            (blk[16 + 32 * (i / 2) + l] >> (4 * (i % 2))) & 0xF
                        } else {
                            q5k_quant(blk, i, l)
                        };
                        isum += u as i32 * x[32 * i + l] as i32;
                    }
                    sumi += sc as i32 * isum;
                    summ += m as i32 * (bsums[2 * i] + bsums[2 * i + 1]);
                }
                acc += (d * xd[b]) * sumi as f32 - (dmin * xd[b]) * summ as f32;
            }
            _ => {
                // Q6_K (u = q + 32, bias 32) or Q3_K (u = q + 4, bias 4).
                let (d, bias) = if dtype == WeightDType::Q6K {
                    (f16_at(blk, 208), 32)
                } else {
                    (f16_at(blk, 108), 4)
                };
                let (mut sumi, mut sumb) = (0i32, 0i32);
                for i in 0..16 {
                    let sc = if dtype == WeightDType::Q6K {
                        (blk[192 + i] as i8) as i32
                    } else {
                        q3k_scale(&blk[96..108], i)
                    };
                    let mut isum = 0i32;
                    for j in 0..16 {
                        let v = 16 * i + j;
                        let u = if dtype == WeightDType::Q6K {
                            q6k_quant(blk, v) + 32
                        } else {
                            q3k_quant(blk, v)
                        };
                        isum += u * x[v] as i32;
                    }
                    sumi += sc * isum;
                    sumb += sc * bsums[i];
                }
                acc += (d * xd[b]) * (sumi - bias * sumb) as f32;
            }
        }
    }
    acc
}

/// Number of f32 lanes the portable float dot keeps; its fixed reduction tree makes the
/// result independent of which tile computed it.
const FLANES: usize = 8;

/// Portable dot of a float weight row (F32, F16, BF16) with an f32 activation row.
pub(super) fn dot_float(dtype: WeightDType, w: &[u8], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; FLANES];
    let bb = dtype.block_bytes();
    for (i, (blk, &xv)) in w.chunks_exact(bb).zip(x).enumerate() {
        let wv = match dtype {
            WeightDType::F32 => f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            WeightDType::F16 => f16_at(blk, 0),
            _ => bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
        };
        lanes[i % FLANES] += wv * xv;
    }
    let [a, b, c, d, e, f, g, h] = lanes;
    ((a + e) + (c + g)) + ((b + f) + (d + h))
}
