//! avx2 kernels (placeholder: the portable kernels until the SIMD ones land).

use super::quantize::Q8Acts;
use super::Chunk;

pub(super) fn q8_chunk(c: &Chunk, acts: &Q8Acts) {
    super::portable_q8_chunk(c, acts)
}

pub(super) fn float_chunk(c: &Chunk, x: &[f32], k: usize) {
    super::portable_float_chunk(c, x, k)
}
