//! TEMPORARY scalar stand-ins for the quantized matmul until `matmul` lands.

use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::HostTensor;
use half::f16;

#[derive(Default)]
pub struct MatmulScratch {
    row: Vec<f32>,
}
impl MatmulScratch {
    pub fn new() -> Self {
        Self::default()
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub fn dequantize_row(dtype: WeightDType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        WeightDType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WeightDType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        WeightDType::Q4_1 => {
            for (ob, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    ob[j] = d * (b[4 + j] & 15) as f32 + m;
                    ob[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
        WeightDType::Q8_0 => {
            for (ob, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    ob[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        other => unimplemented!("naive dequantize of {other}"),
    }
}

pub fn linear(
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    parts: &[&HostTensor],
    out: &mut [f32],
    _scratch: &mut MatmulScratch,
) {
    let k = x.len() / m;
    let n: usize = parts.iter().map(|p| p.rows).sum();
    let ptr = SyncPtr::new(out);
    let mut col0 = 0;
    for p in parts {
        pool.run(p.rows, |j| {
            let mut w = vec![0.0; k];
            dequantize_row(p.dtype, p.row(j), &mut w);
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let s: f32 = xr.iter().zip(&w).map(|(a, b)| a * b).sum();
                // SAFETY: each task writes its own column.
                unsafe { ptr.slice(r * n + col0 + j, 1)[0] = s };
            }
        });
        col0 += p.rows;
    }
}
