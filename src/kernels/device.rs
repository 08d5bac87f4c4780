//! Device selection: `auto` uses a GPU when one is usable and falls back to the CPU otherwise,
//! saying why; `cpu` and `cuda[:N]` force one.

use std::fmt;

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
