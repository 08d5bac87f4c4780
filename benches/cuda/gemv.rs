//! `gemv`: the quantized decode GEMV (and cuBLAS on bf16 for comparison) at Llama-3-8B's
//! linear shapes, batch 1 and 8: µs per call and GB/s of weight bytes read, beside the copy
//! bandwidth of the same run.

use sluice::kernels::cuda::CudaBackend;
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::host::{HostTensor, WeightBytes};
use sluice::kernels::Backend;
use std::sync::Arc;

/// Llama-3-8B's decode GEMV shapes `(out, in)`: Q/O (and the hidden-sized projections),
/// gate or up, down.
pub const SHAPES: [(usize, usize); 3] = [(4096, 4096), (14336, 4096), (4096, 14336)];

/// Random weight bytes of `dtype`, each block's f16 scales set to 2⁻⁴ (finite values; the
/// speed does not depend on them).
pub fn random_weight(dtype: WeightDType, rows: usize, cols: usize, seed: u64) -> HostTensor {
    let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
    let mut bytes = if dtype == WeightDType::BF16 {
        let bits = crate::random_bf16(rows * cols, seed);
        bits.iter()
            .flat_map(|b| b.to_le_bytes())
            .collect::<Vec<u8>>()
    } else {
        let mut s = seed | 1;
        (0..rows * row_bytes)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    };
    let scales = match dtype {
        WeightDType::Q8_0 | WeightDType::Q4_0 => 1,
        WeightDType::Q4_1 | WeightDType::Q4K => 2,
        _ => 0,
    };
    if scales > 0 {
        for b in bytes.chunks_exact_mut(dtype.block_bytes()) {
            for i in 0..scales {
                b[2 * i] = 0;
                b[2 * i + 1] = 0x2c;
            }
        }
    }
    HostTensor {
        dtype,
        rows,
        cols,
        bytes: WeightBytes::Owned(Arc::new(bytes)),
    }
}

pub fn run(g: &CudaBackend, copy_bw: f64) {
    for (n, k) in SHAPES {
        for dtype in [
            WeightDType::Q4_0,
            WeightDType::Q4_1,
            WeightDType::Q4K,
            WeightDType::Q8_0,
            WeightDType::BF16,
        ] {
            let w = g
                .linear(vec![random_weight(dtype, n, k, 5)])
                .expect("uploading the weight");
            let weight_bytes = (n * dtype.row_bytes(k).unwrap_or(0)) as f64;
            for m in [1, 8] {
                let xs: Vec<f32> = (0..m * k)
                    .map(|i| ((i % 61) as f32 - 30.0) / 30.0)
                    .collect();
                let x = g.upload_tensor(m, k, &xs).expect("activations");
                let mut out = g.tensor();
                let t = crate::time_calls(
                    15,
                    50,
                    || g.matmul(&x, &w, None, &mut out),
                    || crate::sync(g),
                );
                println!(
                    "gemv       {dtype:<5} {n:>5}x{k:<5} batch {m}: {:>7.1} us, {:>6.0} GB/s of \
                     weights = {:>3.0}% of copy bandwidth ({:.0} GB/s)",
                    t * 1e6,
                    weight_bytes / t / 1e9,
                    100.0 * weight_bytes / t / copy_bw,
                    copy_bw / 1e9
                );
            }
        }
    }
}
