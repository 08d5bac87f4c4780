//! Kernel argument structs, laid out exactly as their C twins in `kernels-cuda/` (`#[repr(C)]`,
//! device pointers as `u64`).

use cudarc::driver::DeviceRepr;

/// `DecodeParams` of `attention_decode.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeParams {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub query_start: u64,
    pub query_len: u64,
    pub context_len: u64,
    pub block_tables: u64,
    pub out: u64,
    pub tmp_out: u64,
    pub tmp_max: u64,
    pub tmp_sum: u64,
    pub scale: f32,
    pub q_stride: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub heads_per_cta: i32,
    pub block_size: i32,
    pub bt_stride: i32,
    pub partition_size: i32,
    pub num_splits: i32,
}

/// `PrefillParams` of `attention_prefill.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefillParams {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub query_start: u64,
    pub query_len: u64,
    pub context_len: u64,
    pub block_tables: u64,
    pub tiles: u64,
    pub out: u64,
    pub scale: f32,
    pub q_stride: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub heads_per_cta: i32,
    pub tokens_per_tile: i32,
    pub block_size: i32,
    pub bt_stride: i32,
}

/// `SamplingParams` of `sampling.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SamplingParams {
    pub logits: u64,
    pub work: u64,
    pub rows: u64,
    pub penalty_ids: u64,
    pub penalty_info: u64,
    pub bias_ids: u64,
    pub bias_values: u64,
    pub out_ids: u64,
    pub out_logprobs: u64,
    pub out_top_ids: u64,
    pub out_top_logprobs: u64,
    pub vocab: i32,
}

// SAFETY: plain `#[repr(C)]` values of integers and floats, matching the C structs.
unsafe impl DeviceRepr for DecodeParams {}
unsafe impl DeviceRepr for PrefillParams {}
unsafe impl DeviceRepr for crate::kernels::sampling::SampleRow {}
unsafe impl DeviceRepr for SamplingParams {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_c_layouts() {
        // Pointers, then f32 and i32 fields; C pads the tail to 8 bytes as Rust does.
        assert_eq!(std::mem::size_of::<DecodeParams>(), 11 * 8 + 4 + 8 * 4 + 4);
        assert_eq!(std::mem::size_of::<PrefillParams>(), 9 * 8 + 4 + 7 * 4);
        assert_eq!(
            std::mem::size_of::<crate::kernels::sampling::SampleRow>(),
            16 + 6 * 4 + 2 * 4 + 4 * 4
        );
        assert_eq!(std::mem::size_of::<SamplingParams>(), 11 * 8 + 8);
    }
}
