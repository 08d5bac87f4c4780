//! The row ops as llama.cpp's CPU build computes them (`--cpu-numerics ggml`; see
//! `kernels/cpu/mod.rs`), the ggml function each mirrors in brackets:
//! * **RMSNorm** (`ggml_compute_forward_rms_norm_f32`): squares summed in f64.
//! * **SiLU** (`ggml_v_silu`): ggml's vector `exp` approximation, then `x / (1 + e)`.
//! * **RoPE** (`ggml_rope_cache_init`): angles by repeated multiplication with
//!   `base^(-2/d)`, `cosf`/`sinf` of them.

use crate::kernels::cpu::ops::{simd_dispatch, v_expf};

#[inline(always)]
fn rms_norm_row_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut sum = 0.0f64;
    for &v in x {
        sum += (v * v) as f64;
    }
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = x * scale * w;
    }
}

simd_dispatch!(
    /// `out = x / rms(x) * w` as ggml computes it (squares summed in f64).
    pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) => rms_norm_row_body
);

#[inline(always)]
fn silu_mul_row_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + v_expf(0.0 - g)) * u;
    }
}

simd_dispatch!(
    /// `out = silu(gate) * up` as ggml's `ggml_vec_swiglu_f32` computes it.
    pub fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_row_body
);

/// RoPE cosines and sines of one position, `[head_dim / 2]` each, as `ggml_rope_cache_init`
/// makes them: the angle of pair `i` is `p · s^i` with `s = base^(-2/d)`, by repeated f32
/// multiplication, divided by the pair's frequency factor.
pub fn rope_angles(
    pos: u32,
    base: f32,
    dims: usize,
    factors: Option<&[f32]>,
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let theta_scale = base.powf(-2.0 / dims as f32);
    let mut theta = pos as f32;
    for i in 0..dims / 2 {
        let ff = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
        let t = theta / ff;
        cos.push(t.cos());
        sin.push(t.sin());
        theta *= theta_scale;
    }
}

#[inline(always)]
fn rope_head_body(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
        x[b] = x0.mul_add(sin[i], x1 * cos[i]);
    }
}

simd_dispatch!(
    /// Rotates one head as ggml's `rotate_pairs` compiles on x86 with FMA: `x0·cos − x1·sin`
    /// with the first product fused.
    pub fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) => rope_head_body
);
