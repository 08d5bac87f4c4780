//! The CPU backend: activations as f32 rows, weights as they lie in the file (quantized
//! blocks, memory-mapped), the paged KV cache in f16, ops spread over a persistent pool.

use std::sync::{Arc, Mutex};

use super::attention::{self, CpuKvCache, CpuStep};
use super::matmul::ggml_dots::{self, GgmlActs};
use super::matmul::{self, MatmulScratch, PackedLinear};
use super::ops;
use super::pool::{SyncPtr, ThreadPool};
use super::rows;
use crate::kernels::dtype::KvCacheDtype;
use crate::kernels::host::HostTensor;
use crate::kernels::{AttentionShape, Backend, ForwardBatch, KernelError, KvCacheShape, Rope};

/// Rows per task of the row-wise ops.
const ROW_CHUNK: usize = 8;

/// `[rows, cols]` f32, row-major. The buffer only grows, so steps reuse their allocations.
#[derive(Debug, Default, Clone)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn resize(&mut self, rows: usize, cols: usize) {
        self.rows = rows;
        self.cols = cols;
        self.data.resize(rows * cols, 0.0);
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Which float operations the CPU ops perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CpuNumerics {
    /// sluice's own kernels: repacked weights, AMX where present, f32 attention.
    #[default]
    Fast,
    /// Bit-compatible with llama.cpp's CPU build; Q4_1 and Q8_0 weights.
    Ggml,
}

pub struct CpuLinear {
    weights: LinearWeights,
    rows: usize,
    cols: usize,
}

enum LinearWeights {
    /// Prepared for sluice's kernels (repacked where the path uses it).
    Packed(PackedLinear),
    /// As in the file, for the ggml-compatible dot products.
    Ggml(Vec<HostTensor>),
}

pub struct CpuBackend {
    /// Shared with its siblings, which run in turn with it.
    pool: Arc<ThreadPool>,
    scratch: Mutex<MatmulScratch>,
    numerics: CpuNumerics,
    /// What its KV caches store.
    kv_dtype: KvCacheDtype,
    ggml_acts: Mutex<GgmlActs>,
}

/// A gated activation's row op: `(gate, up, out)`.
type GatedRow = fn(&[f32], &[f32], &mut [f32]);

impl CpuBackend {
    pub fn new(num_threads: usize) -> Self {
        Self::with_numerics(num_threads, CpuNumerics::Fast)
    }

    pub fn with_numerics(num_threads: usize, numerics: CpuNumerics) -> Self {
        Self {
            pool: Arc::new(ThreadPool::new(num_threads)),
            scratch: Mutex::new(MatmulScratch::new()),
            numerics,
            kv_dtype: KvCacheDtype::F16,
            ggml_acts: Mutex::new(GgmlActs::default()),
        }
    }

    /// This backend with KV caches of `dtype`.
    pub fn with_kv_cache_dtype(self, dtype: KvCacheDtype) -> Self {
        Self {
            kv_dtype: dtype,
            ..self
        }
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// `out = act(gate) * up` row by row, for `gate_up = [gate | up]`.
    fn gated(&self, gate_up: &CpuTensor, out: &mut CpuTensor, act_mul: GatedRow) {
        let inter = gate_up.cols / 2;
        out.resize(gate_up.rows, inter);
        let ptr = SyncPtr::new(&mut out.data);
        self.for_rows(gate_up.rows, |r| {
            let row = gate_up.row(r);
            // SAFETY: one row per task.
            let o = unsafe { ptr.slice(r * inter, inter) };
            act_mul(&row[..inter], &row[inter..], o);
        });
    }

    /// Runs `f(row)` for each row of `rows`, in parallel chunks.
    fn for_rows(&self, rows: usize, f: impl Fn(usize) + Sync) {
        self.pool.run(rows.div_ceil(ROW_CHUNK), |c| {
            (c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows)).for_each(&f)
        });
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type Embedding = HostTensor;
    type KvCache = CpuKvCache;
    type Step = CpuStep;

    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, {:?}, {:?} numerics)",
            self.pool.num_threads(),
            ops::simd_level(),
            self.numerics
        )
    }

    fn linear(&self, parts: Vec<HostTensor>) -> Result<CpuLinear, KernelError> {
        if self.numerics == CpuNumerics::Fast {
            let packed = PackedLinear::new(parts)?;
            return Ok(CpuLinear {
                rows: packed.rows(),
                cols: packed.cols(),
                weights: LinearWeights::Packed(packed),
            });
        }
        let Some(first) = parts.first() else {
            return Err(KernelError::Invalid(
                "a linear layer without weights".into(),
            ));
        };
        let cols = first.cols;
        if let Some(p) = parts
            .iter()
            .find(|p| !ggml_dots::supports(p.dtype) || p.cols != cols)
        {
            return Err(KernelError::Invalid(format!(
                "ggml-compatible numerics need Q4_1 or Q8_0 weights of equal width, not {:?} \
                 [{} x {}]; use the default numerics for this model",
                p.dtype, p.rows, p.cols
            )));
        }
        Ok(CpuLinear {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            weights: LinearWeights::Ggml(parts),
        })
    }

    fn vector(&self, t: &HostTensor) -> Result<Vec<f32>, KernelError> {
        Ok(t.to_f32())
    }

    fn embedding(&self, table: HostTensor) -> Result<HostTensor, KernelError> {
        if table.rows == 0 {
            return Err(KernelError::Invalid("empty embedding table".into()));
        }
        Ok(table)
    }

    fn kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache, KernelError> {
        if self.numerics == CpuNumerics::Ggml && self.kv_dtype != KvCacheDtype::F16 {
            return Err(KernelError::Unsupported(format!(
                "--cpu-numerics ggml attends over an f16 cache as llama.cpp's default does, \
                 not --kv-cache-dtype {}",
                self.kv_dtype
            )));
        }
        CpuKvCache::with_dtype(shape, self.kv_dtype)
    }

    fn kv_cache_dtype(&self) -> KvCacheDtype {
        self.kv_dtype
    }

    /// sluice's kernels skip the keys before the window; ggml's (`--cpu-numerics ggml`) attend
    /// as llama.cpp does for the Llama-architecture files it reads, over the whole context.
    fn attends_sliding_windows(&self) -> bool {
        self.numerics == CpuNumerics::Fast
    }

    fn runs_gemma2(&self) -> bool {
        self.numerics == CpuNumerics::Fast
    }

    fn tensor(&self) -> CpuTensor {
        CpuTensor::default()
    }

    fn sibling(&self) -> Result<Self, KernelError> {
        Ok(Self {
            pool: Arc::clone(&self.pool),
            scratch: Mutex::new(MatmulScratch::new()),
            numerics: self.numerics,
            kv_dtype: self.kv_dtype,
            ggml_acts: Mutex::new(GgmlActs::default()),
        })
    }

    fn prepare_step(&self, batch: &ForwardBatch, rope: &Rope) -> CpuStep {
        CpuStep::new(batch, rope, self.numerics)
    }

    fn embed(&self, part: &HostTensor, step: &CpuStep, out: &mut CpuTensor) {
        let ids = &step.batch.token_ids;
        let cols = part.cols;
        out.resize(ids.len(), cols);
        let ptr = SyncPtr::new(&mut out.data);
        self.for_rows(ids.len(), |t| {
            let id = (ids[t] as usize).min(part.rows - 1);
            // SAFETY: one row per task.
            let o = unsafe { ptr.slice(t * cols, cols) };
            matmul::dequantize_row(part.dtype, part.row(id), o);
        });
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32, out: &mut CpuTensor) {
        out.resize(x.rows, x.cols);
        let cols = x.cols;
        let ptr = SyncPtr::new(&mut out.data);
        self.for_rows(x.rows, |r| {
            // SAFETY: one row per task.
            let o = unsafe { ptr.slice(r * cols, cols) };
            match self.numerics {
                CpuNumerics::Fast => rows::rms_norm_row(x.row(r), w, eps, o),
                CpuNumerics::Ggml => rows::ggml::rms_norm_row(x.row(r), w, eps, o),
            }
        });
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        delta: &CpuTensor,
        w: &Vec<f32>,
        eps: f32,
        out: &mut CpuTensor,
    ) {
        out.resize(residual.rows, residual.cols);
        let cols = residual.cols;
        let (rp, op) = (
            SyncPtr::new(&mut residual.data),
            SyncPtr::new(&mut out.data),
        );
        self.for_rows(delta.rows, |r| {
            // SAFETY: one row per task.
            let (res, o) = unsafe { (rp.slice(r * cols, cols), op.slice(r * cols, cols)) };
            match self.numerics {
                CpuNumerics::Fast => rows::add_rms_norm_row(res, delta.row(r), w, eps, o),
                CpuNumerics::Ggml => {
                    for (r, d) in res.iter_mut().zip(delta.row(r)) {
                        *r += d;
                    }
                    rows::ggml::rms_norm_row(res, w, eps, o);
                }
            }
        });
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuLinear, bias: Option<&Vec<f32>>, out: &mut CpuTensor) {
        debug_assert_eq!(x.cols, w.cols);
        out.resize(x.rows, w.rows);
        let (x_data, m) = (&x.data[..x.rows * x.cols], x.rows);
        match &w.weights {
            LinearWeights::Packed(packed) => {
                let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                matmul::linear_packed(&self.pool, x_data, m, packed, &mut out.data, &mut scratch);
            }
            LinearWeights::Ggml(parts) => {
                let mut acts = self.ggml_acts.lock().unwrap_or_else(|e| e.into_inner());
                ggml_dots::linear(&self.pool, x_data, m, parts, &mut out.data, &mut acts);
            }
        }
        if let Some(b) = bias {
            for row in out.data.chunks_exact_mut(w.rows) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
    }

    fn attention(
        &self,
        qkv: &mut CpuTensor,
        shape: AttentionShape,
        layer: usize,
        kv: &mut CpuKvCache,
        step: &CpuStep,
        out: &mut CpuTensor,
    ) {
        attention::rope_and_store(&self.pool, qkv, shape, layer, kv, step);
        attention::attend(&self.pool, qkv, shape, layer, kv, step, out);
    }

    fn gelu_tanh_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor) {
        self.gated(gate_up, out, rows::gelu_tanh_mul_row);
    }

    fn scale(&self, x: &mut CpuTensor, by: f32) {
        x.data.iter_mut().for_each(|v| *v *= by);
    }

    fn softcap(&self, x: &mut CpuTensor, cap: f32) {
        let cols = x.cols;
        let ptr = SyncPtr::new(&mut x.data);
        self.for_rows(x.rows, |r| {
            // SAFETY: one row per task.
            rows::softcap_row(unsafe { ptr.slice(r * cols, cols) }, cap);
        });
    }

    fn silu_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor) {
        match self.numerics {
            CpuNumerics::Fast => self.gated(gate_up, out, rows::silu_mul_row),
            CpuNumerics::Ggml => self.gated(gate_up, out, rows::ggml::silu_mul_row),
        }
    }

    fn gather_logits_rows(&self, x: &CpuTensor, step: &CpuStep, out: &mut CpuTensor) {
        let rows = &step.batch.logits_rows;
        out.resize(rows.len(), x.cols);
        for (i, &r) in rows.iter().enumerate() {
            out.data[i * x.cols..(i + 1) * x.cols].copy_from_slice(x.row(r as usize));
        }
    }

    fn copy_blocks(&self, kv: &mut CpuKvCache, copies: &[(u32, u32)]) {
        kv.copy_blocks(copies);
    }

    fn to_host(&self, x: &CpuTensor) -> Vec<f32> {
        x.data[..x.rows * x.cols].to_vec()
    }

    fn host_parallel(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        // The engine's last parallel work of a step: then it streams tokens alone, and the
        // API's threads need the cores more than spinning workers do.
        self.pool.run_then_rest(tasks, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_numerics_refuse_other_weight_types_clearly() {
        let backend = CpuBackend::with_numerics(1, CpuNumerics::Ggml);
        let err = match backend.linear(vec![HostTensor::from_f32(2, 32, &[0.5; 64])]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("F32 weights accepted by the ggml numerics"),
        };
        assert!(err.contains("Q4_1 or Q8_0") && err.contains("F32"), "{err}");
    }
}
