//! Which GEMV kernel a decode-sized quantized matmul launches, with what grid, and a host
//! emulation of `gemv16`'s work split (chunks of 32 items staged as 16-byte vectors, item
//! `lane` of each chunk per lane, `GEMV16_ROWS` rows per warp) that the tests hold against
//! the exact product: the index arithmetic of the kernel, checked where no GPU is.
//!
//! `gemv16` needs whole 16-byte vectors in every chunk, including a row's last one: that holds
//! when `k` is a multiple of 256 (items a multiple of 8, and 8 items of every type it takes are
//! a multiple of 16 bytes). Other shapes and Q6_K take the plain `gemv`.

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

/// A GEMV launch: kernel name prefix (`gemv16` or `gemv`), CTAs of 128 threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvLaunch {
    pub vec16: bool,
    pub num_ctas: usize,
}

pub fn gemv_launch(d: WeightDType, n: usize, k: usize) -> GemvLaunch {
    let vec16 = chunk_bytes(d).is_some() && k.is_multiple_of(256);
    GemvLaunch {
        vec16,
        num_ctas: if vec16 {
            n.div_ceil(GEMV16_WARPS * GEMV16_ROWS)
        } else {
            n.div_ceil(GEMV_WARPS)
        },
    }
}

/// `y[r, o] = Σ x[r, :] · W[o, :]` computed the way `gemv16` splits it: per warp and chunk,
/// the 16-byte vectors its lanes load (only whole ones inside the row), then item `lane`
/// decoded from the staged chunk. Panics (a test helper) on a shape `gemv16` does not take.
pub fn gemv16_emulate(
    d: WeightDType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let cb = chunk_bytes(d).expect("a gemv16 type");
    assert!(gemv_launch(d, n, k).vec16, "k = {k}");
    let row_bytes = d.row_bytes(k).expect("whole blocks");
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
mod tests {
    use super::*;
    use crate::kernels::cpu::matmul::dequantize_row;

    /// Random bytes with each block's scales made small finite f16s (the values do not
    /// matter to the split, only that they are finite).
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
        let bb = d.block_bytes();
        for b in bytes.chunks_exact_mut(bb) {
            // f16 scale(s) at the block's start (Q6_K is not a gemv16 type).
            let scales = if matches!(d, WeightDType::Q4_1 | WeightDType::Q4K) {
                2
            } else {
                1
            };
            for i in 0..scales {
                b[2 * i] = 0x00;
                b[2 * i + 1] = 0x2c; // 2^-4
            }
        }
        bytes
    }

    fn exact(d: WeightDType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f64> {
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
        for d in [
            WeightDType::Q8_0,
            WeightDType::Q4_0,
            WeightDType::Q4_1,
            WeightDType::Q4K,
        ] {
            // k: one partial chunk, whole chunks, whole chunks and a partial one; odd n.
            for (n, k) in [(3, 256), (8, 2048), (5, 4352)] {
                let w = random_weight(d, n, k, 7 + k as u64);
                for m in [1, 3, 8] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                        .collect();
                    let got = gemv16_emulate(d, &w, n, k, &x, m);
                    let want = exact(d, &w, n, k, &x, m);
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
    fn chunks_are_whole_vectors_of_whole_blocks() {
        for d in [
            WeightDType::Q8_0,
            WeightDType::Q4_0,
            WeightDType::Q4_1,
            WeightDType::Q4K,
        ] {
            let cb = chunk_bytes(d).unwrap();
            assert_eq!(cb % 16, 0, "{d}");
            assert_eq!(Some(cb), d.row_bytes(1024), "{d}");
            // 8 items (the granularity of k % 256 == 0) are whole vectors too.
            assert_eq!(d.row_bytes(256).unwrap() % 16, 0, "{d}");
        }
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
        assert!(!gemv_launch(WeightDType::Q6K, 4096, 4096).vec16);
        let odd = gemv_launch(WeightDType::Q8_0, 10, 96);
        assert_eq!(
            odd,
            GemvLaunch {
                vec16: false,
                num_ctas: 3
            }
        );
    }
}
