//! GPU gauges from NVML for `/metrics`: utilisation, memory used and power of one device.
//!
//! `GpuGauges::register` adds `sluice_gpu_utilization_ratio`, `sluice_gpu_memory_used_bytes`
//! and `sluice_gpu_power_watts` (label `gpu`) to a Prometheus registry; `update` samples NVML
//! (call it when `/metrics` is scraped, or every few seconds). A missing NVML library is an
//! error at `register`, never a panic.

use nvml_wrapper::Nvml;
use prometheus::{GaugeVec, Opts, Registry};

#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    #[error("NVML: {0}")]
    Nvml(#[from] nvml_wrapper::error::NvmlError),
    #[error("metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
}

pub struct GpuGauges {
    nvml: Nvml,
    index: u32,
    utilization: GaugeVec,
    memory_used: GaugeVec,
    power: GaugeVec,
}

impl GpuGauges {
    pub fn register(registry: &Registry, index: u32) -> Result<Self, NvmlError> {
        let nvml = Nvml::init()?;
        nvml.device_by_index(index)?;
        let gauge = |name: &str, help: &str| -> Result<GaugeVec, NvmlError> {
            let g = GaugeVec::new(Opts::new(name, help), &["gpu"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            utilization: gauge(
                "sluice_gpu_utilization_ratio",
                "GPU busy fraction over the last sample period",
            )?,
            memory_used: gauge(
                "sluice_gpu_memory_used_bytes",
                "GPU memory in use, all processes",
            )?,
            power: gauge("sluice_gpu_power_watts", "GPU power draw")?,
            nvml,
            index,
        })
    }

    /// Samples the device once.
    pub fn update(&self) -> Result<(), NvmlError> {
        let dev = self.nvml.device_by_index(self.index)?;
        let label = self.index.to_string();
        let util = dev.utilization_rates()?;
        self.utilization
            .with_label_values(&[&label])
            .set(util.gpu as f64 / 100.0);
        self.memory_used
            .with_label_values(&[&label])
            .set(dev.memory_info()?.used as f64);
        self.power
            .with_label_values(&[&label])
            .set(dev.power_usage()? as f64 / 1000.0);
        Ok(())
    }
}
