//! The host reference of `sample_rows` lives in `kernels::sampling_reference` (it needs no
//! GPU); this path is kept for the GPU tests that name it.

pub use crate::kernels::sampling_reference::*;
