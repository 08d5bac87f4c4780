//! The backend ops the model is written against, and the backends that supply them.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod host;
pub mod sampling;
pub mod sampling_reference;

pub use backend::{AttentionShape, Backend, BatchSeq, ForwardBatch, KvCacheShape, Rope};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Unsupported(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Invalid(String),
}

/// Gauges a device reports on `/metrics` (a GPU's utilisation, memory and power), sampled
/// when scraped.
pub trait DeviceGauges: Send + Sync {
    /// Samples the device once; a failed sample leaves the previous values.
    fn update(&self);
}

#[cfg(feature = "cuda")]
impl DeviceGauges for cuda::nvml::GpuGauges {
    fn update(&self) {
        if let Err(e) = cuda::nvml::GpuGauges::update(self) {
            tracing::debug!("GPU gauges: {e}");
        }
    }
}

/// Registers `device`'s gauges on `registry`: NVML's for a GPU (a missing NVML is logged and
/// gives none), none for the CPU.
pub fn device_gauges(
    device: device::Device,
    registry: &prometheus::Registry,
) -> Option<std::sync::Arc<dyn DeviceGauges>> {
    match device {
        device::Device::Cpu => None,
        device::Device::Cuda(i) => gpu_gauges(i, registry),
    }
}

#[cfg(feature = "cuda")]
fn gpu_gauges(
    index: usize,
    registry: &prometheus::Registry,
) -> Option<std::sync::Arc<dyn DeviceGauges>> {
    match cuda::nvml::GpuGauges::register(registry, index as u32) {
        Ok(g) => Some(std::sync::Arc::new(g)),
        Err(e) => {
            tracing::warn!("cuda:{index}: no GPU gauges on /metrics ({e})");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_gauges(
    _index: usize,
    _registry: &prometheus::Registry,
) -> Option<std::sync::Arc<dyn DeviceGauges>> {
    None
}
