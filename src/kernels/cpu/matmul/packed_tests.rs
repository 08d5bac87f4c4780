//! The packed path ([`PackedLinear`], [`linear_packed_with`]) against the dequantize-then-f64
//! reference, mixed with raw parts, bit-exact batch invariance, and the real model's tensors.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::packed_acts::{self, PackedActs};
use super::tests::{paths, random_tensor, random_values, reference};
use super::*;

/// The weight types that the SIMD paths repack.
const PACKED_DTYPES: [WeightDType; 6] = [
    WeightDType::Q4_0,
    WeightDType::Q4_1,
    WeightDType::Q8_0,
    WeightDType::F32,
    WeightDType::F16,
    WeightDType::BF16,
];

fn run_packed(
    path: KernelPath,
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    w: &PackedLinear,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.rows()];
    let mut scratch = MatmulScratch::new();
    linear_packed_with(path, pool, x, m, w, &mut out, &mut scratch);
    out
}

fn check_packed(pool: &ThreadPool, x: &[f32], m: usize, parts: &[HostTensor], what: &str) {
    let refs: Vec<&HostTensor> = parts.iter().collect();
    let (want, tol) = reference(x, m, &refs);
    for path in paths() {
        let Ok(w) = PackedLinear::with_path(path, parts.to_vec()) else {
            panic!("{what}: parts rejected");
        };
        let got = run_packed(path, pool, x, m, &w);
        for (i, ((&g, &w), &t)) in got.iter().zip(&want).zip(&tol).enumerate() {
            assert!(
                (g as f64 - w).abs() <= t,
                "packed {what} {path:?} m={m}: element {i} (row {}, col {}) is {g}, want {w} ± {t}",
                i / (got.len() / m),
                i % (got.len() / m)
            );
        }
    }
}

#[test]
fn packed_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let pool = ThreadPool::new(2);
    for dtype in PACKED_DTYPES {
        // Float weights take any k.
        let odd_k = (dtype.block_len() == 1).then_some(37);
        for k in [32, 96, 576].into_iter().chain(odd_k) {
            for (m, n) in [(1, 37), (1, 16), (3, 64), (13, 50), (64, 19), (9, 200)] {
                let w = random_tensor(&mut rng, dtype, n, k);
                let x = random_values(&mut rng, m * k, 1.0);
                check_packed(&pool, &x, m, &[w], &format!("{dtype} k={k} n={n}"));
            }
        }
    }
}

#[test]
fn packed_multi_part_mixed_dtypes() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let pool = ThreadPool::new(3);
    let k = 512;
    let parts: Vec<HostTensor> = [
        (WeightDType::Q4_1, 40),
        (WeightDType::Q8_0, 24),
        (WeightDType::F16, 9),
        (WeightDType::Q4K, 33),
        (WeightDType::Q4_0, 70),
        (WeightDType::Q5_1, 19),
        (WeightDType::Q8_0, 16),
    ]
    .into_iter()
    .map(|(d, rows)| random_tensor(&mut rng, d, rows, k))
    .collect();
    for m in [1, 5, 17] {
        let x = random_values(&mut rng, m * k, 1.0);
        check_packed(&pool, &x, m, &parts, "mixed parts");
    }
}

#[test]
fn packed_batch_invariance_bit_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(3)];
    for dtype in PACKED_DTYPES {
        let k = 608;
        let parts = vec![
            random_tensor(&mut rng, dtype, 83, k),
            random_tensor(&mut rng, dtype, 45, k),
        ];
        let n = 83 + 45;
        let x = random_values(&mut rng, 64 * k, 1.0);
        for path in paths() {
            let Ok(w) = PackedLinear::with_path(path, parts.clone()) else {
                panic!("parts rejected");
            };
            let full = run_packed(path, &pools[1], &x, 64, &w);
            for (pi, pool) in pools.iter().enumerate() {
                for r in [0, 7, 63] {
                    let one = run_packed(path, pool, &x[r * k..(r + 1) * k], 1, &w);
                    assert!(
                        one.iter()
                            .zip(&full[r * n..(r + 1) * n])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "packed {dtype} {path:?}: row {r} alone (pool {pi}) differs from m=64"
                    );
                }
                for (r0, len) in [(5, 13), (1, 7), (40, 3)] {
                    let part = run_packed(path, pool, &x[r0 * k..(r0 + len) * k], len, &w);
                    assert!(
                        part.iter()
                            .zip(&full[r0 * n..(r0 + len) * n])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "packed {dtype} {path:?}: rows {r0}+{len} (pool {pi}) differ from m=64"
                    );
                }
            }
        }
    }
}

/// AMX tiles and the VNNI kernel give the same bits for every packed kind, for whole and
/// partial row tiles and a partial last column group.
#[test]
fn amx_matches_vnni_bit_exact() {
    if !super::packed_amx::available() {
        eprintln!("skipped: this CPU (or kernel) has no AMX-INT8");
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let pool = ThreadPool::new(2);
    for dtype in [WeightDType::Q4_0, WeightDType::Q4_1, WeightDType::Q8_0] {
        let (k, n) = (320, 75);
        let w = PackedLinear::with_path(
            KernelPath::Avx512,
            vec![random_tensor(&mut rng, dtype, n, k)],
        )
        .expect("valid parts");
        for m in [15, 16, 17, 32, 40, 64, 70] {
            let x = random_values(&mut rng, m * k, 1.0);
            let run = |no_amx: bool| {
                let mut out = vec![f32::NAN; m * n];
                let mut scratch = MatmulScratch {
                    no_amx,
                    ..MatmulScratch::default()
                };
                linear_packed_with(KernelPath::Avx512, &pool, &x, m, &w, &mut out, &mut scratch);
                out
            };
            let (amx, vnni) = (run(false), run(true));
            assert!(
                amx.iter()
                    .zip(&vnni)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype} m={m}: AMX and VNNI outputs differ"
            );
        }
    }
}

/// The packed kernels' arithmetic, one lane at a time in scalar code: the exact integer sum
/// of each block, then `fma(f32(isum), d_w·d_x, acc)` and for Q4_1 `fma(m_w, s_x, acc)`.
fn packed_scalar(w: &packed::PackedWeights, a: &PackedActs, m: usize) -> Vec<f32> {
    use packed::{PackedKind, GROUP};
    let (nb, kind) = (w.nb, w.kind);
    let (qb, sb) = (kind.quant_bytes(), kind.scale_bytes());
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut out = vec![0.0f32; m * w.rows];
    for j in 0..w.rows {
        let (grp, c) = (w.groups.group(j / GROUP), j % GROUP);
        for r in 0..m {
            let mut acc = 0.0f32;
            for b in 0..nb {
                let (q, x) = (&grp[b * qb..], &a.qs[r * a.k + 32 * b..]);
                let at = |i: usize, t: usize| q[64 * i + 4 * c + t];
                let mut is: i32 = 0;
                for i in 0..qb / 64 {
                    for t in 0..4 {
                        is += match kind {
                            PackedKind::Q8_0 => {
                                i32::from((at(i, t) ^ 0x80) as i8) * i32::from(x[4 * i + t])
                            }
                            _ => {
                                i32::from(at(i, t) & 15) * i32::from(x[8 * i + t])
                                    + i32::from(at(i, t) >> 4) * i32::from(x[8 * i + 4 + t])
                            }
                        };
                    }
                }
                let ab = r * nb + b;
                if kind == PackedKind::Q4_0 {
                    is -= 8 * a.bsum[ab];
                }
                let s = &grp[nb * qb + b * sb..];
                acc = (is as f32).mul_add(f16_at(s, 2 * c) * a.d[ab], acc);
                if kind == PackedKind::Q4_1 {
                    acc = f16_at(s, 2 * GROUP + 2 * c).mul_add(a.s[ab], acc);
                }
            }
            out[r * w.rows + j] = acc;
        }
    }
    out
}

/// Every SIMD path's packed kernel gives the scalar definition's bits (so AVX2 and AVX-512
/// agree with each other), for row tiles of every height and partial last groups and halves.
#[test]
fn packed_kernels_match_scalar_definition_bit_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let pool = ThreadPool::new(2);
    for dtype in [WeightDType::Q4_0, WeightDType::Q4_1, WeightDType::Q8_0] {
        for (k, n) in [(64, 5), (96, 16), (320, 75), (576, 43)] {
            let parts = vec![random_tensor(&mut rng, dtype, n, k)];
            for m in [1, 2, 3, 4, 7, 9] {
                let x = random_values(&mut rng, m * k, 1.0);
                let mut acts = PackedActs::default();
                acts.quantize(&pool, &x, m, k);
                let mut want = None;
                for path in paths().into_iter().filter(|p| *p != KernelPath::Portable) {
                    let w = PackedLinear::with_path(path, parts.clone()).expect("valid parts");
                    let Some(packed::Repacked::Blocks(pw)) = w.parts[0].packed.as_ref() else {
                        panic!("a packed copy");
                    };
                    let want = want.get_or_insert_with(|| packed_scalar(pw, &acts, m));
                    let got = run_packed(path, &pool, &x, m, &w);
                    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{dtype} {path:?} k={k} n={n} m={m}: element {i} is {g}, the scalar definition {w}"
                        );
                    }
                }
            }
        }
    }
}

/// The SIMD activation quantizers write the scalar definition's bytes and scales.
#[test]
fn packed_activations_match_scalar_definition() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let k = 32 * 40;
    let mut x = random_values(&mut rng, k, 3.0);
    x[32..64].fill(0.0);
    x[70] = 1e6;
    let nb = k / 32;
    type QuantizeRow<'a> = &'a dyn Fn(&mut [i8], &mut [f32], &mut [f32], &mut [i32]);
    let quantize = |f: QuantizeRow| {
        let (mut q, mut d, mut s, mut bs) = (vec![0; k], vec![0.0; nb], vec![0.0; nb], vec![0; nb]);
        f(&mut q, &mut d, &mut s, &mut bs);
        (
            q,
            d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            bs,
        )
    };
    let want = quantize(&|q, d, s, bs| packed_acts::portable_quantize_row(&x, q, d, s, bs));
    if KernelPath::Avx2.is_supported() {
        // SAFETY: AVX2 is supported (checked).
        let got =
            quantize(&|q, d, s, bs| unsafe { packed_acts::avx2::quantize_row(&x, q, d, s, bs) });
        assert!(
            got == want,
            "AVX2 activation quantization differs from the scalar definition"
        );
    }
    let mut acts = PackedActs::default();
    acts.quantize(&ThreadPool::new(1), &x, 1, k);
    assert!(
        acts.qs[..k] == want.0[..] && acts.bsum[..nb] == want.3[..],
        "the selected quantizer differs"
    );
}

#[test]
fn packed_rejects_bad_parts() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let a = random_tensor(&mut rng, WeightDType::Q4_1, 16, 64);
    let b = random_tensor(&mut rng, WeightDType::Q4_1, 16, 96);
    assert!(PackedLinear::new(vec![a.clone(), b]).is_err());
    assert!(PackedLinear::new(vec![]).is_err());
    let mut short = a.clone();
    short.rows = 17;
    assert!(PackedLinear::new(vec![short]).is_err());
    let Ok(w) = PackedLinear::new(vec![a]) else {
        panic!("a valid part was rejected");
    };
    assert_eq!((w.rows(), w.cols()), (16, 64));
}

#[test]
fn packed_real_model_tensors() {
    let path = crate::assets::default_model_path().expect("fetching the default model");
    let file = crate::gguf::GgufFile::open(&path).expect("opening the default model");
    let pool = ThreadPool::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (name, rows) in [
        ("blk.0.ffn_up.weight", 1536),
        ("blk.0.ffn_down.weight", 576),
        ("token_embd.weight", 300),
    ] {
        let Ok(t) = file.tensor(name) else {
            panic!("the model has no {name}");
        };
        let t = t.slice_rows(0, rows.min(t.rows));
        for m in [1, 11] {
            let x = random_values(&mut rng, m * t.cols, 1.0);
            check_packed(&pool, &x, m, std::slice::from_ref(&t), name);
        }
    }
}

/// Timing probe (not a test): `cargo test --release --lib timing_probe -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_probe() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let pool = ThreadPool::with_default_threads();
    let path = KernelPath::detect();
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for (dtype, k, n, copies) in [
        (WeightDType::Q4_1, 576, 576, 1),
        (WeightDType::Q4_1, 576, 3072, 30),
        (WeightDType::Q4_1, 1536, 576, 30),
        (WeightDType::Q8_0, 576, 49152, 1),
    ] {
        let ws: Vec<HostTensor> = (0..copies)
            .map(|_| random_tensor(&mut rng, dtype, n, k))
            .collect();
        let wp: Vec<PackedLinear> = ws
            .iter()
            .map(|w| PackedLinear::with_path(path, vec![w.clone()]).unwrap())
            .collect();
        for m in [1usize, 64] {
            let x = random_values(&mut rng, m * k, 1.0);
            let mut out = vec![0.0; m * n];
            let mut scratch = MatmulScratch::new();
            let (mut best_new, mut best_old) = (f64::MAX, f64::MAX);
            let reps = if m == 1 { reps } else { reps / 10 + 1 };
            for i in 0..reps {
                let w = &ws[i % copies];
                let t = std::time::Instant::now();
                linear_packed_with(path, &pool, &x, m, &wp[i % copies], &mut out, &mut scratch);
                best_new = best_new.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                linear_with(path, &pool, &x, m, &[w], &mut out, &mut scratch);
                best_old = best_old.min(t.elapsed().as_secs_f64());
            }
            let bytes = ws[0].bytes.len() as f64;
            let macs = (m * n * k) as f64;
            eprintln!(
                "{dtype} {k}->{n} m={m}: packed {:.1} us ({:.1} GB/s, {:.1} GMAC/s), old {:.1} us, ratio {:.2}",
                best_new * 1e6,
                bytes / best_new / 1e9,
                macs / best_new / 1e9,
                best_old * 1e6,
                best_old / best_new
            );
        }
    }
}

/// Timing probe (not a test): best-of-N AMX vs VNNI on one thread,
/// `cargo test --release --lib amx_probe -- --ignored --nocapture`.
#[test]
#[ignore]
fn amx_probe() {
    let mut rng = ChaCha8Rng::seed_from_u64(98);
    let pool = ThreadPool::new(1);
    for (dtype, k, n) in [
        (WeightDType::Q4_1, 576, 1536),
        (WeightDType::Q4_1, 1536, 576),
        (WeightDType::Q8_0, 576, 4096),
    ] {
        let w = PackedLinear::with_path(
            KernelPath::Avx512,
            vec![random_tensor(&mut rng, dtype, n, k)],
        )
        .unwrap();
        for m in [16usize, 32, 64, 512] {
            let x = random_values(&mut rng, m * k, 1.0);
            let mut out = vec![0.0; m * n];
            let mut best = [f64::MAX; 2];
            for i in 0..(2000 / m + 5) {
                let no_amx = i % 2 == 1;
                let mut scratch = MatmulScratch {
                    no_amx,
                    ..MatmulScratch::default()
                };
                linear_packed_with(KernelPath::Avx512, &pool, &x, m, &w, &mut out, &mut scratch);
                let t = std::time::Instant::now();
                linear_packed_with(KernelPath::Avx512, &pool, &x, m, &w, &mut out, &mut scratch);
                let e = t.elapsed().as_secs_f64();
                best[no_amx as usize] = best[no_amx as usize].min(e);
            }
            let gmac = |t: f64| (m * n * k) as f64 / t / 1e9;
            eprintln!(
                "{dtype} {k}->{n} m={m}: amx {:.1} us ({:.0} GMAC/s), vnni {:.1} us ({:.0} GMAC/s), speed-up {:.2}",
                best[0] * 1e6,
                gmac(best[0]),
                best[1] * 1e6,
                gmac(best[1]),
                best[1] / best[0]
            );
        }
    }
}

/// Packed products whose weights stream from memory, as in a decode step (a rotation of
/// copies larger than the caches), on 2 threads: median time per product and weight bytes
/// per second at m = 1 and m = 16. `cargo test --release --lib stream_probe -- --ignored
/// --nocapture`; `PROBE_THREADS`, `PROBE_MB` (the rotation's size; 0: one copy, in cache) and
/// `PROBE_ROUNDS` change the set-up. On this shared machine, compare only figures from one
/// run: absolute times drift by 1.5× between runs.
#[test]
#[ignore]
fn stream_probe() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let pool = ThreadPool::new(env("PROBE_THREADS", 2));
    for (dtype, k, n) in [
        (WeightDType::Q4_1, 576, 1536),
        (WeightDType::Q4_1, 1536, 576),
        (WeightDType::Q8_0, 576, 49152),
    ] {
        let one = random_tensor(&mut rng, dtype, n, k);
        let bytes = one.bytes.len();
        let copies = env("PROBE_MB", 384).max(1) * (1 << 20) / bytes + 1;
        let ws: Vec<PackedLinear> = (0..copies)
            .map(|_| PackedLinear::with_path(KernelPath::Avx512, vec![one.clone()]).unwrap())
            .collect();
        for m in [1usize, 16] {
            let x = random_values(&mut rng, m * k, 1.0);
            let mut out = vec![0.0; m * n];
            let mut scratch = MatmulScratch::new();
            let mut times = Vec::new();
            for round in 0..env("PROBE_ROUNDS", 3) {
                for w in &ws {
                    let t = std::time::Instant::now();
                    linear_packed_with(KernelPath::Avx512, &pool, &x, m, w, &mut out, &mut scratch);
                    if round > 0 {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
            }
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            eprintln!(
                "{dtype} {k}->{n} m={m}: {:.1} us, {:.1} GB/s of weights",
                med * 1e6,
                bytes as f64 / med / 1e9
            );
        }
    }
}
