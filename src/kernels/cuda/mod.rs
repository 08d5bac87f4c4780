//! The CUDA backend (built with `--features cuda`): our kernels from `kernels-cuda/`, compiled
//! by NVRTC at start-up for the card's architecture, and cuBLAS for float GEMMs.
//!
//! Everything here loads the CUDA libraries dynamically (cudarc `dynamic-loading`): the crate
//! builds with no CUDA toolkit, and a missing library is reported as an error by the checks in
//! `nvrtc::is_available` and `device.rs` before cudarc could panic on it.

pub mod backend;
pub mod context;
pub mod gemv_plan;
pub mod graphs;
mod host_io;
mod matmul;
pub mod nvml;
pub mod nvrtc;
mod ops;
pub mod params;
pub mod reference;
pub mod sampling;
pub mod step;

pub use backend::{CudaBackend, CudaOptions, CudaTensor, KvDType};
pub use context::{probe, CudaError};
pub use step::StepLimits;
