//! `DeviceSampling`: the CPU backend made to sample "on the device" with the host reference
//! of the GPU's sampler (`kernels::sampling_reference`), so the engine's device-sampling
//! path (runner rows, `RankGroup::collect_sampled`, ids only back) runs without a GPU.

use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::host::HostTensor;
use sluice::kernels::sampling::{SampledRow, SamplingBatch};
use sluice::kernels::{
    sampling_reference, AttentionShape, Backend, ForwardBatch, KernelError, KvCacheShape, Rope,
};

/// Test hook: a row whose logit bias names this id (outside any vocabulary, so the sampler
/// skips it) has its raw logits turned NaN before sampling, as a broken forward pass would
/// leave them.
pub const POISON_NAN: u32 = u32::MAX;
/// Likewise, one raw logit of the row becomes +inf.
pub const POISON_INF: u32 = u32::MAX - 1;

pub struct DeviceSampling(pub CpuBackend);

type Cpu = CpuBackend;

impl Backend for DeviceSampling {
    type Tensor = <Cpu as Backend>::Tensor;
    type Linear = <Cpu as Backend>::Linear;
    type Vector = <Cpu as Backend>::Vector;
    type Embedding = <Cpu as Backend>::Embedding;
    type KvCache = <Cpu as Backend>::KvCache;
    type Step = <Cpu as Backend>::Step;

    fn describe(&self) -> String {
        format!("{} sampling with the device reference", self.0.describe())
    }
    fn linear(&self, parts: Vec<HostTensor>) -> Result<Self::Linear, KernelError> {
        self.0.linear(parts)
    }
    fn vector(&self, t: &HostTensor) -> Result<Self::Vector, KernelError> {
        self.0.vector(t)
    }
    fn embedding(&self, table: HostTensor) -> Result<Self::Embedding, KernelError> {
        self.0.embedding(table)
    }
    fn kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache, KernelError> {
        self.0.kv_cache(shape)
    }
    fn tensor(&self) -> Self::Tensor {
        self.0.tensor()
    }
    fn prepare_step(&self, batch: &ForwardBatch, rope: &Rope) -> Self::Step {
        self.0.prepare_step(batch, rope)
    }
    fn embed(&self, table: &Self::Embedding, step: &Self::Step, out: &mut Self::Tensor) {
        self.0.embed(table, step, out)
    }
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Vector, eps: f32, out: &mut Self::Tensor) {
        self.0.rms_norm(x, w, eps, out)
    }
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        delta: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Tensor,
    ) {
        self.0.add_rms_norm(residual, delta, w, eps, out)
    }
    fn matmul(
        &self,
        x: &Self::Tensor,
        w: &Self::Linear,
        bias: Option<&Self::Vector>,
        out: &mut Self::Tensor,
    ) {
        self.0.matmul(x, w, bias, out)
    }
    fn attention(
        &self,
        qkv: &mut Self::Tensor,
        shape: AttentionShape,
        layer: usize,
        kv: &mut Self::KvCache,
        step: &Self::Step,
        out: &mut Self::Tensor,
    ) {
        self.0.attention(qkv, shape, layer, kv, step, out)
    }
    fn silu_mul(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor) {
        self.0.silu_mul(gate_up, out)
    }
    fn gather_logits_rows(&self, x: &Self::Tensor, step: &Self::Step, out: &mut Self::Tensor) {
        self.0.gather_logits_rows(x, step, out)
    }
    fn copy_blocks(&self, kv: &mut Self::KvCache, copies: &[(u32, u32)]) {
        self.0.copy_blocks(kv, copies)
    }
    fn to_host(&self, x: &Self::Tensor) -> Vec<f32> {
        self.0.to_host(x)
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    fn sample(
        &self,
        logits: &Self::Tensor,
        rows: &SamplingBatch,
    ) -> Result<Vec<SampledRow>, KernelError> {
        let host = self.0.to_host(logits);
        if rows.is_empty() || host.len() % rows.len() != 0 {
            return Err(KernelError::Invalid(format!(
                "{} logits for {} rows",
                host.len(),
                rows.len()
            )));
        }
        let vocab = host.len() / rows.len();
        let mut host = host;
        for (r, row) in rows.rows.iter().enumerate() {
            let bias = &rows.bias_ids[row.bias_begin as usize..row.bias_end as usize];
            let logits = &mut host[r * vocab..(r + 1) * vocab];
            if bias.contains(&POISON_NAN) {
                logits.fill(f32::NAN);
            }
            if bias.contains(&POISON_INF) {
                logits[0] = f32::INFINITY;
            }
        }
        Ok(sampling_reference::sample_rows(&host, vocab, rows))
    }
}
