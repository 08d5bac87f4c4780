//! The row-wise ops and the matmul of `CudaBackend` against the CPU backend.

use std::sync::Arc;

use sluice::kernels::cpu::matmul::dequantize_row;
use sluice::kernels::cpu::matmul::quantize_weights::quantize_row;
use sluice::kernels::cuda::KvDType;
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::host::{HostTensor, WeightBytes};
use sluice::kernels::{Backend, BatchSeq, ForwardBatch, Rope};

use crate::{assert_close, cpu, cpu_tensor, gpu_or_skip, gpu_tensor, host_pair, rng, uniform};

pub const ALL_DTYPES: [WeightDType; 8] = [
    WeightDType::F32,
    WeightDType::F16,
    WeightDType::BF16,
    WeightDType::Q8_0,
    WeightDType::Q4_0,
    WeightDType::Q4_1,
    WeightDType::Q4K,
    WeightDType::Q6K,
];

/// A `[rows, cols]` weight of `dtype` from seeded values in `(-scale, scale)`.
pub fn weight(dtype: WeightDType, rows: usize, cols: usize, seed: u64, scale: f32) -> HostTensor {
    let values = uniform(&mut rng(seed), rows * cols, scale);
    let bytes: Vec<u8> = values
        .chunks_exact(cols)
        .flat_map(|r| quantize_row(dtype, r))
        .collect();
    HostTensor {
        dtype,
        rows,
        cols,
        bytes: WeightBytes::Owned(Arc::new(bytes)),
    }
}

/// The weight's values as the kernels must read them.
fn dequantized(t: &HostTensor) -> Vec<f32> {
    let mut out = vec![0.0; t.rows * t.cols];
    for (r, o) in out.chunks_exact_mut(t.cols).enumerate() {
        dequantize_row(t.dtype, t.row(r), o);
    }
    out
}

/// One sequence holding every token: enough of a batch for the ops that read only ids.
fn flat_batch(token_ids: Vec<u32>, logits_rows: Vec<u32>) -> ForwardBatch {
    let n = token_ids.len();
    ForwardBatch {
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n as u32).collect(),
        seqs: vec![BatchSeq {
            query_start: 0,
            query_len: n,
            context_len: n,
            block_table: (0..n.div_ceil(16) as u32).collect(),
            prompt_len: 0,
        }],
        token_ids,
        logits_rows,
        hidden_rows: Vec::new(),
    }
}

fn rope() -> Rope {
    Rope {
        inv_freqs: vec![1.0; 32],
        interleaved: false,
        theta_base: 10_000.0,
        freq_factors: None,
    }
}

#[test]
fn embed_every_table_type() {
    let g = gpu_or_skip!(KvDType::F16);
    let c = cpu();
    let (vocab, hidden) = (300, 512);
    let ids: Vec<u32> = vec![0, 299, 5, 5, 17, 150, 298, 1, 42];
    let batch = flat_batch(ids, vec![]);
    for (i, dtype) in crate::ops::ALL_DTYPES.into_iter().enumerate() {
        let table = weight(dtype, vocab, hidden, 10 + i as u64, 1.0);
        let (ge, ce) = (
            g.embedding(table.clone()).unwrap(),
            c.embedding(table).unwrap(),
        );
        let (gs, cs) = (
            g.prepare_step(&batch, &rope()),
            c.prepare_step(&batch, &rope()),
        );
        let (mut go, mut co) = (g.tensor(), c.tensor());
        g.embed(&ge, &gs, &mut go);
        c.embed(&ce, &cs, &mut co);
        let (got, want) = host_pair(&g, &go, &c, &co);
        // Both decode the same blocks to f32; only the order of a scale's products may differ.
        assert_close(&format!("embed {dtype}"), &got, &want, 1e-6, 1e-6);
    }
}

#[test]
fn norms_silu_and_gather() {
    let g = gpu_or_skip!(KvDType::F16);
    let c = cpu();
    let mut r = rng(1);
    for (rows, cols) in [(1, 576), (7, 4096), (33, 128)] {
        let x = uniform(&mut r, rows * cols, 2.0);
        let d = uniform(&mut r, rows * cols, 2.0);
        let w = sluice::kernels::host::HostTensor::from_f32(1, cols, &uniform(&mut r, cols, 1.5));
        let (gw, cw) = (g.vector(&w).unwrap(), c.vector(&w).unwrap());
        let (gx, cx) = (gpu_tensor(&g, rows, cols, &x), cpu_tensor(rows, cols, &x));
        let (gd, cd) = (gpu_tensor(&g, rows, cols, &d), cpu_tensor(rows, cols, &d));
        let (mut go, mut co) = (g.tensor(), c.tensor());
        // f32 throughout; the sums of squares are reduced in different orders.
        g.rms_norm(&gx, &gw, 1e-5, &mut go);
        c.rms_norm(&cx, &cw, 1e-5, &mut co);
        let (got, want) = host_pair(&g, &go, &c, &co);
        assert_close(&format!("rms_norm {rows}x{cols}"), &got, &want, 1e-5, 1e-5);

        let (mut gres, mut cres) = (gx, cx);
        g.add_rms_norm(&mut gres, &gd, &gw, 1e-5, &mut go);
        c.add_rms_norm(&mut cres, &cd, &cw, 1e-5, &mut co);
        let (got, want) = host_pair(&g, &go, &c, &co);
        assert_close(
            &format!("add_rms_norm {rows}x{cols}"),
            &got,
            &want,
            1e-5,
            1e-5,
        );
        let (got, want) = host_pair(&g, &gres, &c, &cres);
        assert_close("add_rms_norm residual", &got, &want, 0.0, 0.0);

        // silu(gate) * up over [rows, 2 * (cols / 2)]; exp may differ by an ulp or two.
        let (gg, cg) = (gpu_tensor(&g, rows, cols, &d), cpu_tensor(rows, cols, &d));
        g.silu_mul(&gg, &mut go);
        c.silu_mul(&cg, &mut co);
        let (got, want) = host_pair(&g, &go, &c, &co);
        assert_close(&format!("silu_mul {rows}x{cols}"), &got, &want, 1e-6, 1e-5);

        let logits_rows: Vec<u32> = (0..rows as u32).rev().step_by(2).collect();
        let batch = flat_batch(vec![0; rows], logits_rows);
        let (gs, cs) = (
            g.prepare_step(&batch, &rope()),
            c.prepare_step(&batch, &rope()),
        );
        let (gx, cx) = (gpu_tensor(&g, rows, cols, &x), cpu_tensor(rows, cols, &x));
        g.gather_logits_rows(&gx, &gs, &mut go);
        c.gather_logits_rows(&cx, &cs, &mut co);
        let (got, want) = host_pair(&g, &go, &c, &co);
        assert_close("gather_logits_rows", &got, &want, 0.0, 0.0);
    }
}

/// The bound on a GPU matmul's error relative to `Σ|x||w|` of an output: f32 weights run in
/// f32 (cuBLAS, no TF32); f16/bf16 weights see activations rounded to their 16-bit type
/// (2⁻¹¹ / 2⁻⁸ relative); GGML blocks run in f32 by GEMV up to 8 rows, else as f16 (weights
/// dequantized to f16, activations cast) through cuBLAS.
fn gpu_tolerance(dtype: WeightDType, m: usize) -> f64 {
    match dtype {
        WeightDType::F32 => 1e-5,
        WeightDType::F16 => 1e-3,
        WeightDType::BF16 => 8e-3,
        _ if m <= 8 => 1e-5,
        _ => 2e-3,
    }
}

/// The CPU backend's bound: it quantizes activations to 8 bits for GGML blocks (llama.cpp's
/// way), about 2⁻⁷ of each 32-block's largest value.
fn cpu_tolerance(dtype: WeightDType) -> f64 {
    if dtype.is_quantized() {
        1.5e-2
    } else {
        gpu_tolerance(dtype, 1)
    }
}

/// The CPU half runs without a GPU too (it holds the CPU backend to the exact product, which
/// checks these tolerances' CPU side); the GPU half when one is usable.
#[test]
fn matmul_every_weight_type_gemv_and_gemm_with_fused_parts_and_bias() {
    let g = crate::gpu(KvDType::F16);
    let c = cpu();
    let k = 512;
    for (i, dtype) in crate::ops::ALL_DTYPES.into_iter().enumerate() {
        // Two parts, as a fused QKV or gate/up; the second of another type (GGUF mixes them).
        let other = if dtype == WeightDType::Q6K {
            WeightDType::Q4K
        } else {
            WeightDType::Q6K
        };
        let parts = vec![
            weight(dtype, 96, k, 100 + i as u64, 0.1),
            weight(
                if dtype.is_quantized() { other } else { dtype },
                40,
                k,
                200 + i as u64,
                0.1,
            ),
        ];
        let n = 136;
        let w: Vec<f32> = parts.iter().flat_map(dequantized).collect();
        let bias = HostTensor::from_f32(1, n, &uniform(&mut rng(7), n, 1.0));
        let bias_values = bias.to_f32();
        let gl = g
            .as_ref()
            .map(|g| (g.linear(parts.clone()).unwrap(), g.vector(&bias).unwrap()));
        let (cl, cb) = (c.linear(parts).unwrap(), c.vector(&bias).unwrap());
        for m in [1, 3, 8, 9, 40] {
            // Both parts are quantized or neither, so one bound serves the whole output.
            let (tol_g, tol_c) = (gpu_tolerance(dtype, m), cpu_tolerance(dtype));
            let x = uniform(&mut rng(300 + m as u64), m * k, 1.0);
            let with_bias = m % 2 == 1;
            let cx = cpu_tensor(m, k, &x);
            let mut co = c.tensor();
            c.matmul(&cx, &cl, with_bias.then_some(&cb), &mut co);
            let cpu_got = c.to_host(&co);
            let got = match (&g, &gl) {
                (Some(g), Some((gl, gb))) => {
                    let gx = gpu_tensor(g, m, k, &x);
                    let mut go = g.tensor();
                    g.matmul(&gx, gl, with_bias.then_some(gb), &mut go);
                    assert_eq!((go.rows, go.cols), (m, n));
                    Some(g.to_host(&go))
                }
                _ => None,
            };
            for row in 0..m {
                for col in 0..n {
                    let (xr, wr) = (&x[row * k..(row + 1) * k], &w[col * k..(col + 1) * k]);
                    let exact: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        + if with_bias {
                            bias_values[col] as f64
                        } else {
                            0.0
                        };
                    let l1: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    let at = row * n + col;
                    let what = format!("matmul {dtype} m={m} [{row}, {col}]");
                    let ec = (cpu_got[at] as f64 - exact).abs();
                    assert!(
                        ec <= tol_c * l1 + 1e-6,
                        "{what}: CPU {} vs exact {exact} (tol {tol_c}·{l1})",
                        cpu_got[at]
                    );
                    if let Some(got) = &got {
                        let eg = (got[at] as f64 - exact).abs();
                        assert!(
                            eg <= tol_g * l1 + 1e-6,
                            "{what}: GPU {} vs exact {exact} (tol {tol_g}·{l1})",
                            got[at]
                        );
                        let egc = (got[at] - cpu_got[at]).abs() as f64;
                        assert!(
                            egc <= (tol_g + tol_c) * l1 + 1e-6,
                            "{what}: GPU {} vs CPU {}",
                            got[at],
                            cpu_got[at]
                        );
                    }
                }
            }
        }
    }
}
