//! Device selection: `auto` uses a GPU when one is usable and falls back to the CPU otherwise,
//! saying why; `cpu` and `cuda[:N]` force one. `with_backend` then builds the device's backend
//! and hands it to code written once, generic over `B: Backend`, so the `cuda` feature gate
//! stays here and callers (the CLI, the engine) need none.

use std::fmt;

use super::backend::Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?} (expected auto, cpu, cuda or cuda:N)")]
    Unknown(String),
    #[error("--device {requested}: {why}")]
    Unavailable { requested: String, why: String },
}

/// Why no GPU can be used here, or `None` when one can. Checks that the driver, cuBLAS and
/// NVRTC libraries load before anything could make cudarc panic on a missing one.
#[cfg(not(feature = "cuda"))]
fn cuda_unavailable_reason() -> Option<String> {
    Some("this sluice was built without the `cuda` feature".to_string())
}

#[cfg(feature = "cuda")]
fn cuda_unavailable_reason() -> Option<String> {
    use crate::kernels::cuda;
    match cuda::probe() {
        Err(e) => return Some(e.to_string()),
        Ok(0) => return Some("the CUDA driver sees no GPU".to_string()),
        Ok(_) => {}
    }
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Some(cuda::CudaError::NoCublas.to_string());
    }
    if !cuda::nvrtc::is_available() {
        return Some(cuda::nvrtc::NvrtcError::Missing.to_string());
    }
    None
}

pub fn select(requested: &str) -> Result<Device, DeviceError> {
    match requested {
        "cpu" => Ok(Device::Cpu),
        "auto" => match cuda_unavailable_reason() {
            None => {
                tracing::info!("--device auto: using cuda:0");
                Ok(Device::Cuda(0))
            }
            Some(why) => {
                tracing::info!("--device auto: using the CPU ({why})");
                Ok(Device::Cpu)
            }
        },
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index = match s.strip_prefix("cuda:") {
                Some(i) => i
                    .parse()
                    .map_err(|_| DeviceError::Unknown(requested.to_string()))?,
                None => 0,
            };
            match cuda_unavailable_reason() {
                None => Ok(Device::Cuda(index)),
                Some(why) => Err(DeviceError::Unavailable {
                    requested: requested.to_string(),
                    why,
                }),
            }
        }
        _ => Err(DeviceError::Unknown(requested.to_string())),
    }
}

/// Work to run on whichever backend a device selects, written once for every backend (for
/// example: load the model, spawn the engine, serve).
pub trait WithBackend {
    type Output;
    fn run<B: Backend>(self, backend: B) -> Self::Output;
}

/// Storage type of a GPU's KV cache (the CPU's is always f16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuKvDType {
    F16,
    BF16,
}

/// How to build a device's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendOptions {
    /// Threads of the CPU backend's pool.
    pub cpu_threads: usize,
    /// F16 for f16 and GGUF models, BF16 for bf16 ones.
    pub gpu_kv_dtype: GpuKvDType,
    /// Decode steps as captured CUDA graphs (off: `--enforce-eager`).
    pub cuda_graphs: bool,
}

/// Builds `device`'s backend and runs `work` on it.
pub fn with_backend<W: WithBackend>(
    device: Device,
    opts: BackendOptions,
    work: W,
) -> Result<W::Output, DeviceError> {
    match device {
        Device::Cpu => Ok(work.run(super::cpu::CpuBackend::new(opts.cpu_threads))),
        Device::Cuda(i) => run_cuda(i, opts, work),
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<W: WithBackend>(
    index: usize,
    _opts: BackendOptions,
    _work: W,
) -> Result<W::Output, DeviceError> {
    Err(DeviceError::Unavailable {
        requested: Device::Cuda(index).to_string(),
        why: cuda_unavailable_reason().unwrap_or_default(),
    })
}

#[cfg(feature = "cuda")]
fn run_cuda<W: WithBackend>(
    index: usize,
    opts: BackendOptions,
    work: W,
) -> Result<W::Output, DeviceError> {
    use crate::kernels::cuda::{CudaBackend, CudaOptions, KvDType};
    let kv = match opts.gpu_kv_dtype {
        GpuKvDType::F16 => KvDType::F16,
        GpuKvDType::BF16 => KvDType::BF16,
    };
    let options = CudaOptions {
        cuda_graphs: opts.cuda_graphs,
        ..CudaOptions::new(kv)
    };
    let backend =
        CudaBackend::with_options(index, options).map_err(|e| DeviceError::Unavailable {
            requested: Device::Cuda(index).to_string(),
            why: e.to_string(),
        })?;
    tracing::info!("cuda:{index}: {}", backend.describe());
    Ok(work.run(backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Describe;
    impl WithBackend for Describe {
        type Output = String;
        fn run<B: Backend>(self, backend: B) -> String {
            backend.describe()
        }
    }

    const OPTS: BackendOptions = BackendOptions {
        cpu_threads: 1,
        gpu_kv_dtype: GpuKvDType::BF16,
        cuda_graphs: true,
    };

    #[test]
    fn the_cpu_runs_generic_work_and_a_missing_gpu_is_an_error() {
        let cpu = with_backend(Device::Cpu, OPTS, Describe).expect("the CPU is always there");
        assert!(cpu.starts_with("cpu"), "{cpu}");
        if cuda_unavailable_reason().is_some() {
            let err = with_backend(Device::Cuda(0), OPTS, Describe).expect_err("no GPU here");
            assert!(err.to_string().starts_with("--device cuda:0: "), "{err}");
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!(select("cpu").ok(), Some(Device::Cpu));
        assert!(matches!(select("tpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(select("cuda:x"), Err(DeviceError::Unknown(_))));
    }
}
