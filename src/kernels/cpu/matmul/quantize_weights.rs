//! Weight quantizers into GGML block layouts: for `--quantization` at load
//! (`model/quantize.rs`), tests, benches and test files.
//!
//! Round to nearest, as llama.cpp's reference quantizers (Q4_0 and Q8_0 as theirs); no search
//! for better scales as its K-quant and importance-matrix quantizers do. The kernels are held
//! against `dequantize_row` of these blocks, never against the input floats.

use half::{bf16, f16};

use super::reference::{q3k_scale, q4k_scale_min};
use crate::kernels::dtype::{WeightDType, IQ4_NL_VALUES};

/// Quantizes one row of `values` into `dtype`'s raw GGML bytes.
///
/// # Panics
/// When `values.len()` is not a whole number of `dtype` blocks.
pub fn quantize_row(dtype: WeightDType, values: &[f32]) -> Vec<u8> {
    let bl = dtype.block_len();
    assert!(
        values.len().is_multiple_of(bl),
        "{} values is not whole {dtype} blocks",
        values.len()
    );
    let mut out = Vec::with_capacity(values.len() / bl * dtype.block_bytes());
    for x in values.chunks_exact(bl) {
        match dtype {
            WeightDType::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
            WeightDType::F16 => out.extend_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
            WeightDType::BF16 => out.extend_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
            WeightDType::Q4_0 => q4_0(x, &mut out),
            WeightDType::Q4_1 => q4_1(x, &mut out),
            WeightDType::Q5_0 => q5(false, x, &mut out),
            WeightDType::Q5_1 => q5(true, x, &mut out),
            WeightDType::Q8_0 => q8_0(x, &mut out),
            WeightDType::IQ4NL => iq4_nl(x, &mut out),
            WeightDType::Q4K => q4_5_k(false, x, &mut out),
            WeightDType::Q5K => q4_5_k(true, x, &mut out),
            WeightDType::Q6K => q6_k(x, &mut out),
            WeightDType::Q3K => q3_k(x, &mut out),
        }
    }
    out
}

fn push_f16(out: &mut Vec<u8>, v: f32) -> f32 {
    let h = f16::from_f32(v);
    out.extend_from_slice(&h.to_le_bytes());
    h.to_f32()
}

fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// As llama.cpp's reference: the value of largest magnitude maps to −8, so all 16 levels
/// are used.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let max = x
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    push_f16(out, d);
    let id = inv(d);
    // v·id is in [−8, 8]: truncating v·id + 8.5 rounds half up, as llama.cpp's (int8) cast.
    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let id = inv(push_f16(out, (max - min) / 15.0));
    let min = push_f16(out, min);
    let q = |v: f32| ((v - min) * id).round().clamp(0.0, 15.0) as u8;
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

/// Q5_0 (`w = d·(q − 16)`, symmetric) or, with `min`, Q5_1 (`w = d·q + m`).
fn q5(min: bool, x: &[f32], out: &mut Vec<u8>) {
    let q: Vec<u8> = if min {
        let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
        let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let id = inv(push_f16(out, (hi - lo) / 31.0));
        let lo = push_f16(out, lo);
        x.iter()
            .map(|&v| ((v - lo) * id).round().clamp(0.0, 31.0) as u8)
            .collect()
    } else {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let id = inv(push_f16(out, amax / 15.0));
        x.iter()
            .map(|&v| ((v * id).round() + 16.0).clamp(0.0, 31.0) as u8)
            .collect()
    };
    let qh = (0..32).fold(0u32, |h, j| h | (u32::from(q[j] >> 4) << j));
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
}

/// The largest magnitude on the table's widest level, each value to its nearest level (no
/// search for a better scale, which llama.cpp's quantizer makes).
fn iq4_nl(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = push_f16(out, amax / 127.0);
    let id = inv(d);
    let q = |v: f32| {
        let t = v * id;
        (0..16u8)
            .min_by(|&a, &b| {
                let da = (IQ4_NL_VALUES[a as usize] as f32 - t).abs();
                let db = (IQ4_NL_VALUES[b as usize] as f32 - t).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(0)
    };
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let id = inv(push_f16(out, amax / 127.0));
    out.extend(
        x.iter()
            .map(|&v| (v * id).round().clamp(-128.0, 127.0) as i8 as u8),
    );
}

/// Q4_K or, with `fifth`, Q5_K.
fn q4_5_k(fifth: bool, x: &[f32], out: &mut Vec<u8>) {
    let top = if fifth { 31.0 } else { 15.0 };
    // Per sub-block of 32: w = scale·q − min with min ≥ 0, then scales and mins to 6 bits.
    let mut scale = [0.0f32; 8];
    let mut minv = [0.0f32; 8];
    for (i, sub) in x.chunks_exact(32).enumerate() {
        let lo = sub.iter().fold(0.0f32, |a, &v| a.min(v));
        let hi = sub.iter().fold(lo, |a, &v| a.max(v));
        scale[i] = (hi - lo) / top;
        minv[i] = -lo;
    }
    let d = push_f16(out, scale.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let dmin = push_f16(out, minv.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let sc: [u8; 8] = std::array::from_fn(|i| (scale[i] * inv(d)).round().clamp(0.0, 63.0) as u8);
    let mn: [u8; 8] = std::array::from_fn(|i| (minv[i] * inv(dmin)).round().clamp(0.0, 63.0) as u8);
    let mut packed = [0u8; 12];
    for i in 0..4 {
        packed[i] = sc[i] | ((sc[i + 4] >> 4) << 6);
        packed[i + 4] = mn[i] | ((mn[i + 4] >> 4) << 6);
        packed[i + 8] = (sc[i + 4] & 0xF) | ((mn[i + 4] & 0xF) << 4);
    }
    debug_assert!((0..8).all(|i| q4k_scale_min(&packed, i) == (sc[i], mn[i])));
    out.extend_from_slice(&packed);
    let (mut qh, mut qs) = ([0u8; 32], [0u8; 128]);
    for (i, sub) in x.chunks_exact(32).enumerate() {
        let (step, off) = (d * sc[i] as f32, dmin * mn[i] as f32);
        for (l, &v) in sub.iter().enumerate() {
            let q = ((v + off) * inv(step)).round().clamp(0.0, top) as u8;
            qs[32 * (i / 2) + l] |= (q & 0xF) << (4 * (i % 2));
            qh[l] |= (q >> 4) << i;
        }
    }
    if fifth {
        out.extend_from_slice(&qh);
    }
    out.extend_from_slice(&qs);
}

/// Q3_K: per sub-block of 16, as Q4_0 does per block, the value of largest magnitude maps
/// to −4 (the scale takes its sign); the 16 scales to signed 6 bits.
fn q3_k(x: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|i| {
        let max = x[16 * i..16 * i + 16]
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        max / -4.0
    });
    let d = f16::from_f32(scale.iter().fold(0.0f32, |a, &v| a.max(v.abs())) / 31.0).to_f32();
    let sc: [i8; 16] =
        std::array::from_fn(|i| (scale[i] * inv(d)).round().clamp(-32.0, 31.0) as i8);
    let mut blk = [0u8; 110];
    for (i, &v) in x.iter().enumerate() {
        let q = ((v * inv(d * sc[i / 16] as f32)).round().clamp(-4.0, 3.0) as i32 + 4) as u8;
        let (half, run, l) = (i / 128, i % 128 / 32, i % 32);
        blk[32 + 32 * half + l] |= (q & 3) << (2 * run);
        blk[l] |= (q >> 2) << (4 * half + run);
    }
    for (i, &s) in sc.iter().enumerate() {
        let s = (s + 32) as u8;
        if i < 8 {
            blk[96 + i] |= s & 0xF;
        } else {
            blk[96 + i - 8] |= (s & 0xF) << 4;
        }
        blk[96 + 8 + i % 4] |= (s >> 4) << (2 * (i / 4));
    }
    debug_assert!((0..16).all(|i| q3k_scale(&blk[96..108], i) == sc[i] as i32));
    blk[108..110].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&blk);
}

fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|i| {
        x[16 * i..16 * i + 16]
            .iter()
            .fold(0.0f32, |a, v| a.max(v.abs()))
            / 31.0
    });
    let d = f16::from_f32(scale.iter().fold(0.0f32, |a, &v| a.max(v)) / 127.0).to_f32();
    let sc: [i8; 16] =
        std::array::from_fn(|i| (scale[i] * inv(d)).round().clamp(-127.0, 127.0) as i8);
    let mut blk = [0u8; 210];
    for (i, &v) in x.iter().enumerate() {
        let q = ((v * inv(d * sc[i / 16] as f32)).round().clamp(-32.0, 31.0) as i32 + 32) as u8;
        let (half, v) = (i / 128, i % 128);
        let (run, l) = (v / 32, v % 32);
        let nib = if run < 2 { q & 0xF } else { (q & 0xF) << 4 };
        blk[64 * half + l + 32 * (run % 2)] |= nib;
        blk[128 + 32 * half + l] |= (q >> 4) << (2 * run);
    }
    for (b, &s) in blk[192..208].iter_mut().zip(&sc) {
        *b = s as u8;
    }
    blk[208..210].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&blk);
}
