//! The device side of the CUDA backend: context, one stream, cuBLAS, the loaded kernels, and
//! small helpers (allocation, uploads, raw device pointers, the sticky error).
//!
//! One stream carries every op of a step in order, so cudarc's per-buffer event tracking is
//! turned off (it would add two events per launch). Ops do not synchronize with the host;
//! only downloads (`to_host`, sampled ids) wait for the stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, SOURCES};
use crate::kernels::KernelError;

/// Everything that can fail when opening a GPU.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("the CUDA driver library (libcuda.so.1) is not loadable")]
    NoDriver,
    #[error("cuBLAS (libcublas) is not loadable; put its lib directory on LD_LIBRARY_PATH")]
    NoCublas,
    #[error(transparent)]
    Nvrtc(#[from] nvrtc::NvrtcError),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("compute capability {0}.{1} is below 8.0 (bf16 and the kernels need Ampere or newer)")]
    TooOld(i32, i32),
}

pub(crate) fn driver_err(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// The device, its stream and our kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    pub arch: String,
    pub name: String,
    pub num_sms: usize,
    /// The first failure of an op that cannot return one (the `Backend` ops return nothing);
    /// reported at the next download.
    error: Mutex<Option<String>>,
    /// Moves on whenever a buffer that ops address (activations, scratch, step arena) is
    /// (re)allocated: a captured graph is valid only at the epoch it was captured in.
    epoch: AtomicU64,
    /// cuBLAS's workspace, set once so that GEMMs never allocate (graph capture forbids it).
    _blas_workspace: CudaSlice<u8>,
}

/// cuBLAS workspace: 32 MiB, what NVIDIA recommends for Hopper (4 MiB elsewhere).
const BLAS_WORKSPACE: usize = 32 << 20;

/// How many devices the driver sees: `Err(NoDriver)` when the driver library does not load,
/// `Ok(0)` when it loads and finds no device; any other `Err` is a driver that is present but
/// failing.
pub fn probe() -> Result<usize, CudaError> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        // `cuInit` answers this on a machine with the driver installed and no device.
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(driver_err(e)),
    }
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        let count = probe()?;
        if ordinal >= count {
            return Err(CudaError::Driver(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        if !nvrtc::is_available() {
            return Err(nvrtc::NvrtcError::Missing.into());
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err)?;
        // SAFETY: every buffer is used on this context's one stream only (see module doc).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(driver_err)?;
        if major < 8 {
            return Err(CudaError::TooOld(major, minor));
        }
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().map_err(driver_err)?;
        let num_sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err)? as usize;
        let stream = ctx.new_stream().map_err(driver_err)?;
        let blas = CudaBlas::new(stream.clone()).map_err(driver_err)?;
        let blas_workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(driver_err)?;
        // SAFETY: the workspace is a live device buffer of BLAS_WORKSPACE bytes, owned by the
        // `Gpu` beside the handle (so it outlives every GEMM of the handle).
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr(&blas_workspace, &stream) as *mut _,
                BLAS_WORKSPACE,
            )
        }
        .result()
        .map_err(driver_err)?;
        let mut funcs = HashMap::new();
        let started = std::time::Instant::now();
        for src in SOURCES {
            let cubin = nvrtc::load_or_compile(src, &arch)?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(driver_err)?;
            for entry in entry_points(src.source) {
                let f = module.load_function(&entry).map_err(driver_err)?;
                funcs.insert(entry, f);
            }
        }
        tracing::info!(
            "cuda:{ordinal}: {name} ({arch}, {num_sms} SMs), {} kernels ready in {:.2?}",
            funcs.len(),
            started.elapsed()
        );
        Ok(Self {
            ctx,
            stream,
            blas,
            funcs,
            arch,
            name,
            num_sms,
            error: Mutex::new(None),
            epoch: AtomicU64::new(0),
            _blas_workspace: blas_workspace,
        })
    }

    pub fn func(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.funcs
            .get(name)
            .ok_or_else(|| KernelError::Unsupported(format!("no CUDA kernel {name}")))
    }

    /// Records the first failure of an op; later ones are only logged.
    pub fn record(&self, r: Result<(), KernelError>) {
        if let Err(e) = r {
            tracing::error!("CUDA op failed: {e}");
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }
    }

    /// Called after (re)allocating a buffer that ops address; retires captured graphs.
    pub fn note_realloc(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    pub fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| KernelError::OutOfMemory(format!("{len} elements: {e:?}")))
    }

    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, KernelError> {
        if data.is_empty() {
            // A one-element buffer keeps pointers valid for kernels that read nothing.
            // SAFETY: never read (length 0 is what the kernels are told).
            return unsafe { self.stream.alloc::<T>(1) }.map_err(kerr);
        }
        self.stream.clone_htod(data).map_err(kerr)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>, KernelError> {
        let mut out = vec![T::default(); len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&src.slice(..len), &mut out[..])
                .map_err(kerr)?;
        }
        self.stream.synchronize().map_err(kerr)?;
        Ok(out)
    }
}

pub(crate) fn kerr(e: impl std::fmt::Debug) -> KernelError {
    KernelError::Invalid(format!("CUDA: {e:?}"))
}

/// The raw device address of a buffer, for kernel arguments and cuBLAS.
pub fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    // Event tracking is off, so the guard returned with the pointer does nothing.
    s.device_ptr(stream).0
}

/// The `extern "C" __global__` names of a source, and those its `NAME(entry, ...)` macros
/// instantiate: a line `NAME(entry_name, ...)` at the start of a line.
pub fn entry_points(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in source.lines() {
        if let Some(i) = line.find("extern \"C\" __global__ void ") {
            let rest = &line[i + "extern \"C\" __global__ void ".len()..];
            let rest = match rest.strip_prefix("__launch_bounds__(") {
                Some(r) => r.split_once(')').map(|(_, r)| r.trim()).unwrap_or(""),
                None => rest,
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !line.contains("name(") {
                out.push(name);
            }
        } else if !line.starts_with(' ') && !line.starts_with('#') {
            if let Some((mac, args)) = line.split_once('(') {
                if !mac.is_empty() && mac.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                    let name = args.split([',', ')']).next().unwrap_or("").trim();
                    if !name.is_empty() {
                        out.push(name.to_string());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_of_every_source() {
        let names: Vec<String> = SOURCES
            .iter()
            .flat_map(|s| entry_points(s.source))
            .collect();
        for expected in [
            "rms_norm_f32",
            "add_rms_norm_f32",
            "silu_mul_f32",
            "cast_f32_to_bf16",
            "rope_store_bf16",
            "gemv_q4_k",
            "dequantize_q6_k_f16",
            "embed_q4_1",
            "paged_attention_decode_bf16_d128",
            "paged_attention_reduce_d64",
            "paged_attention_prefill_f16_d64",
            "sample_rows",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n == "name" || n.is_empty()),
            "{names:?}"
        );
    }
}
