//! Whole decode steps through `Llama::forward`:
//!
//! * `decode135m`: the default model's shape (SmolLM2-135M), batch 1, context ~256: ms per
//!   token with CUDA graphs and eagerly, for bf16 weights and their Q4_0/Q8_0 twins (random
//!   blocks at the same shapes; hidden 576 is not a multiple of 256, so Q4_K cannot be).
//! * `profile`: one model at batches 1 and 64 (context 512, KV cache left zero: decode speed
//!   does not depend on its values): wall time per step with graphs and eagerly, and the GPU
//!   time between CUDA events recorded around the step (the gap between the two is host work
//!   the GPU waited for). Kernel times come from `ncu` (scripts/profile_gpu.sh).

use std::time::Instant;

use sluice::kernels::cuda::{CudaBackend, KvDType};
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::host::HostTensor;
use sluice::kernels::{BatchSeq, ForwardBatch};
use sluice::model::config::ModelConfig;
use sluice::model::llama::Llama;
use sluice::model::weights::{DummyWeights, WeightSource};
use sluice::model::ModelError;

const BLOCK: usize = 16;

/// Dummy weights whose linear layers are random blocks of `dtype` (norms and the embedding
/// stay the inner source's).
pub struct Requantized {
    pub inner: DummyWeights,
    pub config: ModelConfig,
    pub dtype: WeightDType,
}

impl Requantized {
    fn shape(&self, name: &str) -> Option<(usize, usize)> {
        let c = &self.config;
        let (hid, q, kv, inter) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let t = name.rsplit_once('.').map(|(a, _)| a)?;
        let leaf = t.rsplit('.').next()?;
        Some(match leaf {
            "attn_q" => (q, hid),
            "attn_k" | "attn_v" => (kv, hid),
            "attn_output" => (hid, q),
            "ffn_gate" | "ffn_up" => (inter, hid),
            "ffn_down" => (hid, inter),
            "output" if !c.tie_word_embeddings => (c.vocab_size, hid),
            _ => return None,
        })
    }
}

impl WeightSource for Requantized {
    fn get(&self, name: &str) -> Result<Option<HostTensor>, ModelError> {
        match self.shape(name).filter(|_| name.ends_with(".weight")) {
            Some((rows, cols)) => Ok(Some(crate::gemv::random_weight(
                self.dtype,
                rows,
                cols,
                name.len() as u64 * 7919,
            ))),
            None => self.inner.get(name),
        }
    }
    fn describe(&self) -> String {
        format!("{} as {}", self.inner.describe(), self.dtype)
    }
}

pub fn smollm2_135m_config() -> ModelConfig {
    let mut c = crate::llama3_8b_config();
    c.hidden_size = 576;
    c.intermediate_size = 1536;
    c.num_layers = 30;
    c.num_heads = 9;
    c.num_kv_heads = 3;
    c.head_dim = 64;
    c.vocab_size = 49_152;
    c.rope_theta = 100_000.0;
    c.rope_style = sluice::model::config::RopeStyle::Interleaved;
    c.rope_scaling = None;
    c.tie_word_embeddings = true;
    c
}

pub fn load(config: &ModelConfig, dtype: WeightDType, graphs: bool) -> Llama<CudaBackend> {
    let backend = CudaBackend::new(0, KvDType::BF16).expect("a GPU context");
    backend.set_cuda_graphs(graphs);
    let base = if dtype.is_quantized() {
        WeightDType::BF16
    } else {
        dtype
    };
    let inner = DummyWeights::new(config.clone(), base, 8).expect("dummy weights");
    let source = Requantized {
        inner,
        config: config.clone(),
        dtype,
    };
    if dtype.is_quantized() {
        Llama::load(config.clone(), &source, backend).expect("loading the model")
    } else {
        Llama::load(config.clone(), &source.inner, backend).expect("loading the model")
    }
}

/// A decode batch of `n` sequences at context `ctx`, each with its own blocks.
pub fn decode_batch(n: usize, ctx: usize, vocab: usize) -> ForwardBatch {
    let per_seq = ctx.div_ceil(BLOCK);
    ForwardBatch {
        token_ids: (0..n).map(|i| (i * 7919 % vocab) as u32).collect(),
        positions: vec![ctx as u32 - 1; n],
        slot_mapping: (0..n)
            .map(|i| ((i * per_seq + per_seq - 1) * BLOCK + (ctx - 1) % BLOCK) as u32)
            .collect(),
        seqs: (0..n)
            .map(|i| BatchSeq {
                query_start: i,
                query_len: 1,
                context_len: ctx,
                block_table: (i * per_seq..(i + 1) * per_seq).map(|b| b as u32).collect(),
                prompt_len: 0,
            })
            .collect(),
        logits_rows: (0..n as u32).collect(),
        hidden_rows: Vec::new(),
    }
}

/// Median wall seconds per step and median GPU seconds between events around it.
pub fn time_steps(
    model: &mut Llama<CudaBackend>,
    kv: &mut sluice::kernels::cuda::backend::CudaKvCache,
    n: usize,
    ctx: usize,
    steps: usize,
) -> (f64, f64) {
    let vocab = model.config.vocab_size;
    let batch = decode_batch(n, ctx, vocab);
    // Warm-up: the first steps size the buffers and capture the graph.
    for _ in 0..3 {
        model.forward(&batch, kv);
    }
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (mut wall, mut gpu) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let stream = model.backend().gpu().stream.clone();
        let e0 = stream.record_event(flags).expect("event");
        let t = Instant::now();
        let logits = model.forward(&batch, kv);
        wall.push(t.elapsed().as_secs_f64());
        let e1 = stream.record_event(flags).expect("event");
        e1.synchronize().expect("event sync");
        gpu.push(e0.elapsed_ms(&e1).expect("elapsed") as f64 / 1e3);
        assert_eq!(logits.len(), n * vocab);
    }
    (crate::median(wall), crate::median(gpu))
}

pub fn decode_135m() {
    let c = smollm2_135m_config();
    for dtype in [WeightDType::BF16, WeightDType::Q4_0, WeightDType::Q8_0] {
        for graphs in [true, false] {
            let mut m = load(&c, dtype, graphs);
            let mut kv = m.kv_cache(32, BLOCK).expect("KV cache");
            let (wall, gpu) = time_steps(&mut m, &mut kv, 1, 256, 100);
            println!(
                "decode135m {dtype:<5} batch 1, context 256, graphs {:<3}: {:.3} ms/token \
                 ({:.0} tokens/s); GPU span {:.3} ms",
                if graphs { "on" } else { "off" },
                wall * 1e3,
                1.0 / wall,
                gpu * 1e3
            );
        }
    }
}

/// Batches 1 and 64 at context 512 on an already loaded model, graphs on then off.
pub fn profile(model: &mut Llama<CudaBackend>, label: &str) {
    const CTX: usize = 512;
    let mut kv = model
        .kv_cache(64 * CTX.div_ceil(BLOCK), BLOCK)
        .expect("KV cache");
    let steps = std::env::var("SLUICE_PROFILE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let only: Option<usize> = std::env::var("SLUICE_PROFILE_BATCH")
        .ok()
        .and_then(|s| s.parse().ok());
    for graphs in [true, false] {
        model.backend().set_cuda_graphs(graphs);
        for n in [1, 64].into_iter().filter(|n| only.is_none_or(|o| o == *n)) {
            let (wall, gpu) = time_steps(model, &mut kv, n, CTX, steps);
            println!(
                "profile    {label} batch {n:>2}, context {CTX}, graphs {:<3}: wall {:.3} ms/step, \
                 GPU span {:.3} ms, host-only {:.3} ms ({:.0} tokens/s)",
                if graphs { "on" } else { "off" },
                wall * 1e3,
                gpu * 1e3,
                (wall - gpu).max(0.0) * 1e3,
                n as f64 / wall
            );
        }
    }
    model.backend().set_cuda_graphs(true);
}
