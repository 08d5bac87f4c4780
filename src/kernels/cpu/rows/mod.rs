//! Row-wise ops of the CPU backend: RMSNorm (with fused residual add), SiLU·mul, RoPE, and
//! Gemma 2's GELU·mul and soft cap. Here in
//! sluice's own numerics; [`ggml`] holds each as llama.cpp's CPU build computes it.
//!
//! Each output row is computed by one fixed sequence of float operations whatever the batch,
//! so a sequence's results never depend on what else is in the batch (batch invariance).
//! The bodies are `#[inline(always)]` and instantiated once per instruction set by
//! `simd_dispatch!`, so LLVM vectorizes them for the machine's widest available set.

pub mod ggml;

use super::ops::{dot, exp, simd_dispatch, tanh};

#[inline(always)]
fn rms_norm_row_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot(x, x);
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = x * scale * w;
    }
}

simd_dispatch!(
    /// `out = x / rms(x) * w` for one row.
    pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) => rms_norm_row_body
);

#[inline(always)]
fn add_rms_norm_row_body(
    residual: &mut [f32],
    delta: &[f32],
    w: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    for (r, d) in residual.iter_mut().zip(delta) {
        *r += d;
    }
    rms_norm_row_body(residual, w, eps, out);
}

simd_dispatch!(
    /// `residual += delta; out = rms_norm(residual) * w` for one row.
    pub fn add_rms_norm_row(residual: &mut [f32], delta: &[f32], w: &[f32], eps: f32, out: &mut [f32]) => add_rms_norm_row_body
);

#[inline(always)]
fn silu_mul_row_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

simd_dispatch!(
    /// `out = silu(gate) * up` for one row.
    pub fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_row_body
);

#[inline(always)]
fn gelu_tanh_mul_row_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    // 0.5·x·(1 + tanh(u)) = x / (1 + e^(−2u)) with u = √(2/π)·(x + 0.044715·x³).
    const TWO_SQRT_2_OVER_PI: f32 = 1.595_769_2;
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let z = TWO_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g);
        *o = g / (1.0 + exp(-z)) * u;
    }
}

simd_dispatch!(
    /// `out = gelu_tanh(gate) * up` for one row (PyTorch's `gelu(approximate="tanh")`).
    pub fn gelu_tanh_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) => gelu_tanh_mul_row_body
);

#[inline(always)]
fn softcap_row_body(x: &mut [f32], cap: f32) {
    for v in x {
        *v = cap * tanh(*v / cap);
    }
}

simd_dispatch!(
    /// `x = cap · tanh(x / cap)` for one row.
    pub fn softcap_row(x: &mut [f32], cap: f32) => softcap_row_body
);

/// RoPE cosines and sines of one position, `[head_dim / 2]` each: those of `pos · f` for each
/// pair's inverse frequency `f`.
pub fn rope_angles(pos: u32, inv_freqs: &[f32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    for &f in inv_freqs {
        let (s, c) = (pos as f32 * f).sin_cos();
        cos.push(c);
        sin.push(s);
    }
}

/// Rotates one head's vector by the angles whose cosines and sines are given per pair.
#[inline(always)]
pub fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    if interleaved {
        for i in 0..half {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * cos[i] - b * sin[i];
            x[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    } else {
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = a * sin[i] + b * cos[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_weights() {
        let x = [3.0f32, 4.0];
        let mut out = [0.0; 2];
        rms_norm_row(&x, &[1.0, 1.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 4.0 / rms).abs() < 1e-6);
    }

    /// PyTorch's `gelu(approximate="tanh")` and `cap·tanh(x/cap)`, in f64.
    #[test]
    fn gelu_tanh_and_softcap_match_f64() {
        let x: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.03).collect();
        let up: Vec<f32> = x.iter().map(|v| 1.0 - v / 20.0).collect();
        let mut out = vec![0.0; x.len()];
        gelu_tanh_mul_row(&x, &up, &mut out);
        let mut capped = x.clone();
        softcap_row(&mut capped, 5.0);
        for (i, &v) in x.iter().enumerate() {
            let w = v as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (w + 0.044715 * w * w * w);
            let gelu = 0.5 * w * (1.0 + u.tanh()) * up[i] as f64;
            assert!(
                (out[i] as f64 - gelu).abs() <= 1e-6 * (1.0 + gelu.abs()),
                "gelu({v})"
            );
            let cap = 5.0 * (w / 5.0).tanh();
            assert!((capped[i] as f64 - cap).abs() <= 1e-6, "softcap({v})");
        }
    }

    #[test]
    fn rope_styles_agree_up_to_permutation() {
        let cos = [0.5f32, 0.8];
        let sin = [0.866f32, 0.6];
        let mut inter = [1.0f32, 2.0, 3.0, 4.0]; // pairs (1,2) (3,4)
        let mut halves = [1.0f32, 3.0, 2.0, 4.0]; // pairs (1,2) (3,4) as (x0,x2) (x1,x3)
        rope_head(&mut inter, &cos, &sin, true);
        rope_head(&mut halves, &cos, &sin, false);
        assert_eq!(
            [inter[0], inter[1], inter[2], inter[3]],
            [halves[0], halves[2], halves[1], halves[3]]
        );
    }
}
