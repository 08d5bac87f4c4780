use super::*;
use crate::kernels::cpu::matmul::dequantize_row;

const GEMV16_TYPES: [WeightDType; 4] = [
    WeightDType::Q8_0,
    WeightDType::Q4_0,
    WeightDType::Q4_1,
    WeightDType::Q4K,
];

/// Random bytes with each block's f16 scales set to 2⁻⁴ (finite values; the split is what is
/// tested).
fn random_weight(d: WeightDType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut bytes: Vec<u8> = (0..n * d.row_bytes(k).unwrap())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let scales = if matches!(d, WeightDType::Q4_1 | WeightDType::Q4K) {
        2
    } else {
        1
    };
    for b in bytes.chunks_exact_mut(d.block_bytes()) {
        for i in 0..scales {
            b[2 * i] = 0x00;
            b[2 * i + 1] = 0x2c;
        }
    }
    bytes
}

fn exact(d: WeightDType, w: &[u8], (n, k): (usize, usize), x: &[f32], m: usize) -> Vec<f64> {
    let rb = d.row_bytes(k).unwrap();
    let mut row = vec![0.0f32; k];
    let mut y = vec![0.0f64; m * n];
    for o in 0..n {
        dequantize_row(d, &w[o * rb..(o + 1) * rb], &mut row);
        for r in 0..m {
            y[r * n + o] = row
                .iter()
                .zip(&x[r * k..(r + 1) * k])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
        }
    }
    y
}

#[test]
fn gemv16_split_covers_every_weight_once() {
    for d in GEMV16_TYPES {
        // k: one partial chunk, whole chunks, whole chunks and a partial one, and rows that
        // are not 16-byte multiples before padding (576: SmolLM2's hidden size; 768 for
        // Q4_K's 256-value blocks); odd n.
        let odd = if d == WeightDType::Q4K { 768 } else { 576 };
        for (n, k) in [(3, 256), (8, 2048), (5, 4352), (7, odd)] {
            let w = random_weight(d, n, k, 7 + k as u64);
            let rb = d.row_bytes(k).unwrap();
            let stride = row_stride(d, rb);
            let padded = pad_rows(&w, rb, stride);
            for m in [1, 3, 8] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let got = gemv16_emulate(d, &padded, stride, (n, k), &x, m);
                let want = exact(d, &w, (n, k), &x, m);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{d} n {n} k {k} m {m}: output {i} is {g}, want {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn chunks_are_whole_vectors_of_whole_blocks_and_rows_are_padded() {
    for d in GEMV16_TYPES {
        let cb = chunk_bytes(d).unwrap();
        assert_eq!(cb % 16, 0, "{d}");
        assert_eq!(Some(cb), d.row_bytes(1024), "{d}");
    }
    assert_eq!(row_stride(WeightDType::Q4_0, 324), 336);
    assert_eq!(row_stride(WeightDType::Q8_0, 4352), 4352);
    assert_eq!(row_stride(WeightDType::BF16, 1154), 1154);
    let padded = pad_rows(&[1, 2, 3, 4, 5, 6], 3, 16);
    assert_eq!(padded.len(), 32);
    assert_eq!(padded[..4], [1, 2, 3, 0]);
    assert_eq!(padded[16..20], [4, 5, 6, 0]);
}

#[test]
fn launches_pick_the_kernel_and_grid() {
    let l = gemv_launch(WeightDType::Q4_0, 4096, 4096);
    assert_eq!(
        l,
        GemvLaunch {
            vec16: true,
            num_ctas: 512
        }
    );
    assert_eq!(gemv_launch(WeightDType::Q4K, 14336, 4096).num_ctas, 1792);
    assert_eq!(gemv_launch(WeightDType::Q8_0, 10, 576).num_ctas, 2);
    let q6 = gemv_launch(WeightDType::Q6K, 10, 256);
    assert_eq!(
        q6,
        GemvLaunch {
            vec16: false,
            num_ctas: 3
        }
    );
}
