//! Which GEMV kernel a decode-sized quantized matmul launches, with what grid, and a host
//! emulation of `gemv16`'s work split (chunks of 32 items staged as 16-byte vectors, item
//! `lane` of each chunk per lane, `GEMV16_ROWS` rows per warp) that the tests hold against
//! the exact product: the index arithmetic of the kernel, checked where no GPU is.
//!
//! `gemv16` reads rows with 16-byte loads, so quantized rows live on the device with a stride
//! padded to a multiple of 16 bytes (`row_stride`; e.g. a 576-wide Q4_0 row: 324 → 336 bytes,
//! +4%); a chunk's last vector may then include padding, which no lane decodes. Every kernel
//! that reads a linear weight takes the stride as its `row_bytes`. Q6_K takes the plain
//! `gemv`.

use crate::kernels::dtype::WeightDType;

/// Must match `GEMV16_WARPS` and `GEMV16_ROWS` in gemv.cu.
pub const GEMV16_WARPS: usize = 4;
pub const GEMV16_ROWS: usize = 2;
/// Warps per CTA of the plain `gemv` (`GEMV_WARPS`).
pub const GEMV_WARPS: usize = 4;

/// `Q::CHUNK_BYTES`: bytes of 32 items (1,024 values), for the types `gemv16` takes.
pub fn chunk_bytes(d: WeightDType) -> Option<usize> {
    match d {
        WeightDType::Q8_0 => Some(1088),
        WeightDType::Q4_0 => Some(576),
        WeightDType::Q4_1 => Some(640),
        WeightDType::Q4K => Some(576),
        _ => None,
    }
}

/// The device row stride of a weight whose rows are `row_bytes` long: quantized rows padded to
/// a multiple of 16 bytes, float rows as they are.
pub fn row_stride(d: WeightDType, row_bytes: usize) -> usize {
    if d.is_quantized() {
        row_bytes.next_multiple_of(16)
    } else {
        row_bytes
    }
}

/// `bytes` (rows of `row_bytes`) laid out with rows `stride` apart, zero-padded.
pub fn pad_rows(bytes: &[u8], row_bytes: usize, stride: usize) -> Vec<u8> {
    let rows = bytes.len() / row_bytes.max(1);
    let mut out = vec![0u8; rows * stride];
    for (src, dst) in bytes
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(stride))
    {
        dst[..row_bytes].copy_from_slice(src);
    }
    out
}

/// A GEMV launch: kernel name prefix (`gemv16` or `gemv`), CTAs of 128 threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvLaunch {
    pub vec16: bool,
    pub num_ctas: usize,
}

pub fn gemv_launch(d: WeightDType, n: usize, k: usize) -> GemvLaunch {
    let vec16 = chunk_bytes(d).is_some() && k.is_multiple_of(32);
    GemvLaunch {
        vec16,
        num_ctas: if vec16 {
            n.div_ceil(GEMV16_WARPS * GEMV16_ROWS)
        } else {
            n.div_ceil(GEMV_WARPS)
        },
    }
}

/// `y[r, o] = Σ x[r, :] · W[o, :]` computed the way `gemv16` splits it over `w` laid out with
/// rows `row_bytes` apart (the padded stride): per warp and chunk, the 16-byte vectors its
/// lanes load (only those inside the row's stride), then item `lane` decoded from the staged
/// chunk. Panics (a test helper) on a shape `gemv16` does not take.
pub fn gemv16_emulate(
    d: WeightDType,
    w: &[u8],
    row_bytes: usize,
    (n, k): (usize, usize),
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let cb = chunk_bytes(d).expect("a gemv16 type");
    assert!(gemv_launch(d, n, k).vec16, "k = {k}");
    assert_eq!(row_bytes % 16, 0, "a padded stride");
    let nv = (cb / 16).div_ceil(32);
    let items = k / 32;
    let chunks = items.div_ceil(32);
    let mut y = vec![0.0f32; m * n];
    let num_warps = n.div_ceil(GEMV16_ROWS);
    for warp in 0..num_warps {
        let row0 = warp * GEMV16_ROWS;
        let mut acc = vec![[0.0f32; 8]; GEMV16_ROWS * 32];
        for c in 0..chunks {
            let at = c * cb;
            let nvec = cb.min(row_bytes - at) / 16;
            for rr in 0..GEMV16_ROWS {
                let row = (row0 + rr).min(n - 1);
                // The stage: vectors `lane + 32 j` below `nvec`; the rest stays garbage (0xAB).
                let mut stage = vec![0xABu8; nv * 32 * 16];
                for v in 0..nv * 32 {
                    if v < nvec {
                        let src = row * row_bytes + at + 16 * v;
                        stage[16 * v..16 * v + 16].copy_from_slice(&w[src..src + 16]);
                    }
                }
                for lane in 0..32 {
                    let item = c * 32 + lane;
                    if item >= items {
                        continue;
                    }
                    let wv = decode_item(d, &stage, lane);
                    for r in 0..m {
                        let xr = &x[r * k + item * 32..r * k + item * 32 + 32];
                        let s: f32 = wv.iter().zip(xr).map(|(a, b)| a * b).sum();
                        acc[rr * 32 + lane][r] += s;
                    }
                }
            }
        }
        for rr in 0..GEMV16_ROWS {
            let out = row0 + rr;
            if out < n {
                for r in 0..m {
                    y[r * n + out] = (0..32).map(|l| acc[rr * 32 + l][r]).sum();
                }
            }
        }
    }
    y
}

/// Item `item` (32 values) of a staged chunk, decoded as `Q::dequant32(stage, item)` does.
fn decode_item(d: WeightDType, stage: &[u8], item: usize) -> [f32; 32] {
    let (block_len, block_bytes) = (d.block_len(), d.block_bytes());
    let values = item * 32;
    let block = values / block_len;
    let mut out = vec![0.0f32; block_len];
    crate::kernels::cpu::matmul::dequantize_row(
        d,
        &stage[block * block_bytes..(block + 1) * block_bytes],
        &mut out,
    );
    let from = values % block_len;
    let mut v = [0.0f32; 32];
    v.copy_from_slice(&out[from..from + 32]);
    v
}

#[cfg(test)]
#[path = "gemv_plan_tests.rs"]
mod tests;
