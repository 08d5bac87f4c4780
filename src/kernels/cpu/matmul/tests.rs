//! Every dtype × every supported code path against dequantize-then-f64 reference, odd batch
//! sizes, multi-part linears, batch invariance and the real model's tensors.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::quantize_weights::quantize_row;
use super::*;
use crate::kernels::host::WeightBytes;

const ALL_DTYPES: [WeightDType; 13] = [
    WeightDType::F32,
    WeightDType::F16,
    WeightDType::BF16,
    WeightDType::Q4_0,
    WeightDType::Q4_1,
    WeightDType::Q5_0,
    WeightDType::Q5_1,
    WeightDType::Q8_0,
    WeightDType::IQ4NL,
    WeightDType::Q3K,
    WeightDType::Q4K,
    WeightDType::Q5K,
    WeightDType::Q6K,
];

pub(super) fn paths() -> Vec<KernelPath> {
    let all = [KernelPath::Portable, KernelPath::Avx2, KernelPath::Avx512];
    let ok: Vec<_> = all.into_iter().filter(|p| p.is_supported()).collect();
    if ok.len() < all.len() {
        eprintln!("note: this CPU runs only {ok:?}");
    }
    ok
}

/// Values like a transformer's: mostly small, a few outliers.
pub(super) fn random_values(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0) * scale;
            if rng.random_range(0..64) == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

pub(super) fn random_tensor(
    rng: &mut ChaCha8Rng,
    dtype: WeightDType,
    rows: usize,
    cols: usize,
) -> HostTensor {
    let mut bytes = Vec::new();
    for _ in 0..rows {
        bytes.extend(quantize_row(dtype, &random_values(rng, cols, 0.1)));
    }
    HostTensor {
        dtype,
        rows,
        cols,
        bytes: WeightBytes::Owned(std::sync::Arc::new(bytes)),
    }
}

fn dequantize(w: &HostTensor) -> Vec<f32> {
    let mut out = vec![0.0; w.rows * w.cols];
    for (r, o) in out.chunks_exact_mut(w.cols).enumerate() {
        dequantize_row(w.dtype, w.row(r), o);
    }
    out
}

/// Reference output and per-element error bound. Quantizing activations to 8 bits with
/// round-to-nearest moves each value by at most half a step, `amax_block / 254`, so the dot
/// moves by at most Σ_blocks (amax/254)·Σ|w|; f32 accumulation adds a relative 1e-5 of Σ|w·x|.
pub(super) fn reference(x: &[f32], m: usize, parts: &[&HostTensor]) -> (Vec<f64>, Vec<f64>) {
    let k = parts[0].cols;
    let n: usize = parts.iter().map(|p| p.rows).sum();
    let (mut want, mut tol) = (vec![0.0; m * n], vec![0.0; m * n]);
    let mut col = 0;
    for p in parts {
        let w = dequantize(p);
        let qblock = match p.dtype {
            d if d.is_k_quant() => 256,
            d if d.takes_q8_blocks() => 32,
            _ => 0,
        };
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for j in 0..p.rows {
                let wr = &w[j * k..(j + 1) * k];
                let dot: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let abs: f64 = xr
                    .iter()
                    .zip(wr)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                let mut bound = 1e-5 * abs + 1e-6;
                if qblock > 0 {
                    for (xb, wb) in xr.chunks(qblock).zip(wr.chunks(qblock)) {
                        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                        bound += amax / 254.0 * wb.iter().map(|v| v.abs() as f64).sum::<f64>();
                    }
                }
                want[r * n + col + j] = dot;
                tol[r * n + col + j] = bound;
            }
        }
        col += p.rows;
    }
    (want, tol)
}

fn run(
    path: KernelPath,
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    parts: &[&HostTensor],
) -> Vec<f32> {
    let n: usize = parts.iter().map(|p| p.rows).sum();
    let mut out = vec![f32::NAN; m * n];
    let mut scratch = MatmulScratch::new();
    linear_with(path, pool, x, m, parts, &mut out, &mut scratch);
    out
}

fn check(
    path: KernelPath,
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    parts: &[&HostTensor],
    what: &str,
) {
    let got = run(path, pool, x, m, parts);
    let (want, tol) = reference(x, m, parts);
    for (i, ((&g, &w), &t)) in got.iter().zip(&want).zip(&tol).enumerate() {
        assert!(
            (g as f64 - w).abs() <= t,
            "{what} {path:?} m={m}: element {i} (row {}, col {}) is {g}, want {w} ± {t}",
            i / (got.len() / m),
            i % (got.len() / m)
        );
    }
}

#[test]
fn every_dtype_every_path_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let pool = ThreadPool::new(2);
    for dtype in ALL_DTYPES {
        let ks: &[usize] = if dtype.block_len() == 256 {
            &[256, 768]
        } else {
            &[32, 96, 576]
        };
        for &k in ks {
            for (m, n) in [(1, 37), (2, 21), (3, 64), (6, 35), (13, 50), (64, 19)] {
                let w = random_tensor(&mut rng, dtype, n, k);
                let x = random_values(&mut rng, m * k, 1.0);
                for path in paths() {
                    check(path, &pool, &x, m, &[&w], &format!("{dtype} k={k} n={n}"));
                }
            }
        }
    }
}

#[test]
fn multi_part_mixed_dtypes() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let pool = ThreadPool::new(3);
    let k = 512;
    let parts: Vec<HostTensor> = [
        (WeightDType::Q4_1, 40),
        (WeightDType::Q8_0, 24),
        (WeightDType::F16, 9),
        (WeightDType::Q4K, 33),
        (WeightDType::Q6K, 16),
        (WeightDType::Q5K, 17),
        (WeightDType::Q3K, 15),
        (WeightDType::Q4_0, 70),
        (WeightDType::Q5_0, 21),
        (WeightDType::BF16, 3),
        (WeightDType::Q5_1, 18),
        (WeightDType::IQ4NL, 23),
    ]
    .into_iter()
    .map(|(d, rows)| random_tensor(&mut rng, d, rows, k))
    .collect();
    let refs: Vec<&HostTensor> = parts.iter().collect();
    for m in [1, 5, 17] {
        let x = random_values(&mut rng, m * k, 1.0);
        for path in paths() {
            check(path, &pool, &x, m, &refs, "mixed parts");
        }
    }
}

#[test]
fn batch_invariance_bit_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(3)];
    for dtype in ALL_DTYPES {
        let k = if dtype.block_len() == 256 { 512 } else { 608 };
        let parts = [
            random_tensor(&mut rng, dtype, 83, k),
            random_tensor(&mut rng, dtype, 45, k),
        ];
        let refs = [&parts[0], &parts[1]];
        let n = 83 + 45;
        let x = random_values(&mut rng, 64 * k, 1.0);
        for path in paths() {
            let full = run(path, &pools[1], &x, 64, &refs);
            for (pi, pool) in pools.iter().enumerate() {
                for r in [0, 7, 63] {
                    let one = run(path, pool, &x[r * k..(r + 1) * k], 1, &refs);
                    assert!(
                        one.iter()
                            .zip(&full[r * n..(r + 1) * n])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype} {path:?}: row {r} alone (pool {pi}) differs from inside m=64"
                    );
                }
                let thirteen = run(path, pool, &x[5 * k..18 * k], 13, &refs);
                assert!(
                    thirteen
                        .iter()
                        .zip(&full[5 * n..18 * n])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype} {path:?}: rows 5..18 as m=13 (pool {pi}) differ from inside m=64"
                );
            }
        }
    }
}

#[test]
fn weight_quantizers_round_trip() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for dtype in ALL_DTYPES {
        let x = random_values(&mut rng, 512, 1.0);
        let bytes = quantize_row(dtype, &x);
        assert_eq!(Some(bytes.len()), dtype.row_bytes(512));
        let mut y = vec![0.0; 512];
        dequantize_row(dtype, &bytes, &mut y);
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        // 4-bit formats step by up to amax/7.5 (Q4_K's 6-bit scales and mins add a little).
        let max_err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            max_err <= amax / 6.0,
            "{dtype}: round trip error {max_err} (amax {amax})"
        );
    }
}

#[test]
fn real_model_tensors() {
    let path = crate::assets::default_model_path().expect("fetching the default model");
    let file = crate::gguf::GgufFile::open(&path).expect("opening the default model");
    let pool = ThreadPool::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (name, rows) in [
        ("blk.0.ffn_up.weight", 1536),
        ("blk.0.ffn_down.weight", 576),
        ("token_embd.weight", 300),
    ] {
        let Ok(t) = file.tensor(name) else {
            panic!("the model has no {name}");
        };
        let t = t.slice_rows(0, rows.min(t.rows));
        let x = random_values(&mut rng, 3 * t.cols, 1.0);
        for path in paths() {
            check(path, &pool, &x, 3, &[&t], name);
        }
    }
}
