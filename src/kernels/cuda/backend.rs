//! `CudaBackend`: the `Backend` ops on one GPU.
//!
//! Activations are f32 `[rows, cols]` device buffers that only grow. Linear weights stay in
//! their storage type: f32/f16/bf16 go through cuBLAS (activations cast to the weight's 16-bit
//! type, f32 accumulate and output); GGML blocks go through our GEMV when a call has at most
//! `GEMV_MAX_ROWS` rows, else are dequantized to f16 scratch for a cuBLAS GEMM. The KV cache
//! is f16 or bf16 (the model's dtype). The `Backend` ops return nothing, so a failed launch is
//! recorded and reported (as a panic naming it) at the next download: a GPU fault is not a
//! client's input, and silently wrong logits would be worse.

use std::sync::Mutex;

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::context::{kerr, ptr, CudaError, Gpu};
use super::graphs::DecodeGraphs;
use super::step::{CudaStep, StepArena, StepLimits};
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::HostTensor;
use crate::kernels::sampling::{SampledRow, SamplingBatch};
use crate::kernels::{AttentionShape, Backend, ForwardBatch, KernelError, KvCacheShape, Rope};

/// Rows up to which a quantized matmul runs as GEMV (must match `GEMV_MAX_ROWS` in gemv.cu).
pub const GEMV_MAX_ROWS: usize = 8;

/// Storage type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    F16,
    BF16,
}

impl KvDType {
    pub fn suffix(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }
}

/// Launches kernel `$name` with `$cfg` and the given argument references.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $gpu.func($name)?;
        let mut b = $gpu.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: argument types and order match the kernel's C signature (see kernels-cuda/);
        // every pointer is a live device buffer of the size the kernel is told.
        unsafe { b.launch($cfg) }
            .map(|_| ())
            .map_err($crate::kernels::cuda::context::kerr)
    }};
}
pub(crate) use launch;

pub(crate) fn grid1(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks for a grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    grid1(n.div_ceil(256).min(65_535), 256)
}

#[derive(Default)]
pub struct CudaTensor {
    pub(crate) buf: Option<CudaSlice<f32>>,
    pub rows: usize,
    pub cols: usize,
}

impl CudaTensor {
    pub(crate) fn ensure(
        &mut self,
        gpu: &Gpu,
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        let need = rows * cols;
        if self.buf.as_ref().is_none_or(|b| b.len() < need) {
            self.buf = Some(gpu.alloc::<f32>(need)?);
            gpu.note_realloc();
        }
        self.rows = rows;
        self.cols = cols;
        Ok(())
    }
    pub(crate) fn ptr(&self, gpu: &Gpu) -> Result<u64, KernelError> {
        self.buf
            .as_ref()
            .map(|b| ptr(b, &gpu.stream))
            .ok_or_else(|| KernelError::Invalid("an empty CUDA tensor was read".into()))
    }
}

pub(crate) struct LinearPart {
    pub dtype: WeightDType,
    pub rows: usize,
    /// Bytes from one row to the next on the device: GGML rows are padded to a multiple of 16
    /// (`gemv_plan::row_stride`) so that the GEMV can read every row with 16-byte loads.
    pub row_stride: usize,
    /// First output feature of this part.
    pub offset: usize,
    pub data: CudaSlice<u8>,
}

pub struct CudaLinear {
    pub(crate) parts: Vec<LinearPart>,
    pub rows: usize,
    pub cols: usize,
}

pub struct CudaVector {
    pub(crate) data: CudaSlice<f32>,
    pub len: usize,
}

pub struct CudaEmbedding {
    pub(crate) dtype: WeightDType,
    pub(crate) data: CudaSlice<u8>,
    pub rows: usize,
    pub cols: usize,
}

pub struct CudaKvCache {
    pub shape: KvCacheShape,
    pub(crate) k: Vec<CudaSlice<u16>>,
    pub(crate) v: Vec<CudaSlice<u16>>,
}

#[derive(Default)]
pub(crate) struct Scratch {
    /// Activations cast to f16/bf16 for cuBLAS.
    pub half: Option<CudaSlice<u16>>,
    /// A quantized weight dequantized to f16.
    pub weight: Option<CudaSlice<u16>>,
    /// Split-KV partial results.
    pub split: Option<CudaSlice<f32>>,
    /// The KV cache's reserved block and its first slot, `(block, slot)`: padded decode rows
    /// write there. Set by `kv_cache` (the last cache made).
    pub pad_slot: Option<(u32, u32)>,
}

pub(crate) fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<u64, KernelError> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = Some(gpu.alloc::<T>(len)?);
        gpu.note_realloc();
    }
    Ok(slot.as_ref().map(|b| ptr(b, &gpu.stream)).unwrap_or(0))
}

/// How a `CudaBackend` runs: the KV cache type, decode graphs, and the step arena's initial
/// capacities (they also bound the graph ladder: `limits.max_num_seqs`).
#[derive(Debug, Clone, Copy)]
pub struct CudaOptions {
    pub kv_dtype: KvDType,
    /// Decode steps as captured CUDA graphs (off: `--enforce-eager`).
    pub cuda_graphs: bool,
    pub limits: StepLimits,
}

impl CudaOptions {
    pub fn new(kv_dtype: KvDType) -> Self {
        Self {
            kv_dtype,
            cuda_graphs: true,
            limits: StepLimits::default(),
        }
    }
}

pub struct CudaBackend {
    pub(crate) gpu: Gpu,
    pub(crate) kv_dtype: KvDType,
    pub(crate) scratch: Mutex<Scratch>,
    pub(crate) arena: Mutex<StepArena>,
    pub(crate) graphs: Mutex<DecodeGraphs>,
}

impl CudaBackend {
    /// Opens GPU `ordinal` and loads the kernels (compiled by NVRTC, or from the disk cache),
    /// with the default options (decode graphs on).
    pub fn new(ordinal: usize, kv_dtype: KvDType) -> Result<Self, CudaError> {
        Self::with_options(ordinal, CudaOptions::new(kv_dtype))
    }

    pub fn with_options(ordinal: usize, options: CudaOptions) -> Result<Self, CudaError> {
        let gpu = Gpu::open(ordinal)?;
        let arena = StepArena::new(&gpu, options.limits)
            .map_err(|e| CudaError::Driver(format!("step buffers: {e}")))?;
        Ok(Self {
            gpu,
            kv_dtype: options.kv_dtype,
            scratch: Mutex::new(Scratch::default()),
            arena: Mutex::new(arena),
            graphs: Mutex::new(DecodeGraphs::new(
                options.cuda_graphs,
                options.limits.max_num_seqs,
            )),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Waits for the stream and reports the first failed op since the last check.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.gpu.stream.synchronize().map_err(kerr)?;
        match self.gpu.take_error() {
            Some(e) => Err(KernelError::Invalid(e)),
            None => Ok(()),
        }
    }

    fn upload_bytes(&self, t: &HostTensor) -> Result<CudaSlice<u8>, KernelError> {
        self.gpu.upload(&t.bytes[..])
    }
}

/// The kernel-name suffix of a GGML block type.
pub(crate) fn quant_suffix(d: WeightDType) -> Result<&'static str, KernelError> {
    Ok(match d {
        WeightDType::Q8_0 => "q8_0",
        WeightDType::Q4_0 => "q4_0",
        WeightDType::Q4_1 => "q4_1",
        WeightDType::Q4K => "q4_k",
        WeightDType::Q6K => "q6_k",
        WeightDType::F32 => "f32",
        WeightDType::F16 => "f16",
        WeightDType::BF16 => "bf16",
        WeightDType::Q5_0
        | WeightDType::Q5_1
        | WeightDType::IQ4NL
        | WeightDType::Q3K
        | WeightDType::Q5K => {
            return Err(KernelError::Unsupported(format!(
                "the CUDA backend has no {d} kernels yet (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, F32, \
                 F16, BF16)"
            )))
        }
    })
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Linear = CudaLinear;
    type Vector = CudaVector;
    type Embedding = CudaEmbedding;
    type KvCache = CudaKvCache;
    type Step = CudaStep;

    fn describe(&self) -> String {
        format!(
            "cuda ({}, {}, {} SMs, kv {})",
            self.gpu.name,
            self.gpu.arch,
            self.gpu.num_sms,
            self.kv_dtype.suffix()
        )
    }

    fn linear(&self, parts: Vec<HostTensor>) -> Result<CudaLinear, KernelError> {
        let cols = parts.first().map(|p| p.cols).unwrap_or(0);
        let mut out = Vec::with_capacity(parts.len());
        let mut offset = 0;
        for p in &parts {
            if p.cols != cols || p.dtype.row_bytes(cols).is_none() {
                return Err(KernelError::Invalid(format!(
                    "linear part {}x{} {} does not fit {cols} input features",
                    p.rows, p.cols, p.dtype
                )));
            }
            if p.dtype.is_quantized() && !cols.is_multiple_of(32) {
                return Err(KernelError::Unsupported(format!(
                    "{} with {cols} inputs",
                    p.dtype
                )));
            }
            let row_bytes = p.row_bytes();
            let row_stride = super::gemv_plan::row_stride(p.dtype, row_bytes);
            let data = if row_stride == row_bytes {
                self.upload_bytes(p)?
            } else {
                self.gpu.upload(&super::gemv_plan::pad_rows(
                    &p.bytes[..],
                    row_bytes,
                    row_stride,
                ))?
            };
            out.push(LinearPart {
                dtype: p.dtype,
                rows: p.rows,
                row_stride,
                offset,
                data,
            });
            offset += p.rows;
        }
        Ok(CudaLinear {
            parts: out,
            rows: offset,
            cols,
        })
    }

    fn vector(&self, t: &HostTensor) -> Result<CudaVector, KernelError> {
        let v = t.to_f32();
        Ok(CudaVector {
            len: v.len(),
            data: self.gpu.upload(&v)?,
        })
    }

    fn embedding(&self, table: HostTensor) -> Result<CudaEmbedding, KernelError> {
        if table.rows == 0 || !table.cols.is_multiple_of(32) {
            return Err(KernelError::Invalid(format!(
                "embedding table {}x{}: needs rows and a multiple of 32 columns",
                table.rows, table.cols
            )));
        }
        Ok(CudaEmbedding {
            dtype: table.dtype,
            data: self.upload_bytes(&table)?,
            rows: table.rows,
            cols: table.cols,
        })
    }

    fn kv_cache(&self, shape: KvCacheShape) -> Result<CudaKvCache, KernelError> {
        if !matches!(shape.head_dim, 64 | 128) {
            return Err(KernelError::Unsupported(format!(
                "head dim {} (the CUDA attention kernels take 64 or 128)",
                shape.head_dim
            )));
        }
        // One block more than asked for: the scratch block padded decode rows write to.
        let per_layer =
            (shape.num_blocks + 1) * shape.num_kv_heads * shape.block_size * shape.head_dim;
        let mut k = Vec::with_capacity(shape.num_layers);
        let mut v = Vec::with_capacity(shape.num_layers);
        for _ in 0..shape.num_layers {
            k.push(self.gpu.alloc::<u16>(per_layer)?);
            v.push(self.gpu.alloc::<u16>(per_layer)?);
        }
        let block = shape.num_blocks as u32;
        self.scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pad_slot = Some((block, block * shape.block_size as u32));
        Ok(CudaKvCache { shape, k, v })
    }

    fn tensor(&self) -> CudaTensor {
        CudaTensor::default()
    }

    fn prepare_step(&self, batch: &ForwardBatch, rope: &Rope) -> CudaStep {
        let pad = self.padding_for(batch);
        let mut arena = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        CudaStep::new(&self.gpu, &mut arena, batch, rope, pad)
    }

    fn begin_step_ops(&self, step: &CudaStep, kv: &CudaKvCache, logits: &mut CudaTensor) -> bool {
        match self.begin_ops_impl(step, kv, logits) {
            Ok(replayed) => replayed,
            Err(e) => {
                // A failed replay or capture start: the step runs eagerly instead.
                tracing::warn!("CUDA graph: {e}; running the step eagerly");
                false
            }
        }
    }

    fn end_step_ops(&self, step: &CudaStep, logits: &mut CudaTensor) {
        self.gpu.record(self.end_ops_impl(step, logits));
    }

    fn embed(&self, table: &CudaEmbedding, step: &CudaStep, out: &mut CudaTensor) {
        self.gpu.record(self.embed_impl(table, step, out));
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaVector, eps: f32, out: &mut CudaTensor) {
        self.gpu.record(self.rms_norm_impl(x, w, eps, out));
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        delta: &CudaTensor,
        w: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) {
        self.gpu
            .record(self.add_rms_norm_impl(residual, delta, w, eps, out));
    }

    fn matmul(
        &self,
        x: &CudaTensor,
        w: &CudaLinear,
        bias: Option<&CudaVector>,
        out: &mut CudaTensor,
    ) {
        self.gpu.record(self.matmul_impl(x, w, bias, out));
    }

    fn attention(
        &self,
        qkv: &mut CudaTensor,
        shape: AttentionShape,
        layer: usize,
        kv: &mut CudaKvCache,
        step: &CudaStep,
        out: &mut CudaTensor,
    ) {
        self.gpu
            .record(self.attention_impl(qkv, shape, layer, kv, step, out));
    }

    fn silu_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor) {
        self.gpu.record(self.silu_mul_impl(gate_up, out));
    }

    fn gather_logits_rows(&self, x: &CudaTensor, step: &CudaStep, out: &mut CudaTensor) {
        self.gpu.record(self.gather_impl(x, step, out));
    }

    fn copy_blocks(&self, kv: &mut CudaKvCache, copies: &[(u32, u32)]) {
        self.gpu.record(self.copy_blocks_impl(kv, copies));
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn sample(
        &self,
        logits: &CudaTensor,
        rows: &SamplingBatch,
    ) -> Result<Vec<SampledRow>, KernelError> {
        self.sample_rows(logits, rows)
    }

    fn to_host(&self, x: &CudaTensor) -> Vec<f32> {
        let got = match &x.buf {
            Some(b) => self.gpu.download(b, x.rows * x.cols),
            None => Ok(Vec::new()),
        };
        if let Some(e) = self.gpu.take_error() {
            panic!("a CUDA op of this step failed: {e}");
        }
        match got {
            Ok(v) => v,
            Err(e) => panic!("downloading from the GPU failed: {e}"),
        }
    }
}
