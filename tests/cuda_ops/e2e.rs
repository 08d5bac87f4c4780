//! The whole forward pass on the GPU against the CPU: seeded dummy weights at the default
//! model's shape (SmolLM2-135M: 30 layers, 9 query / 3 KV heads of 64, vocab 49,152, tied
//! embeddings), the 12 fixture prompts in one ragged batch, prefilled in two chunks (the second
//! over the cached first), then 32 greedy decode steps of all 12 sequences.
//!
//! Both follow the CPU's greedy token (teacher forcing), so one near-tie cannot fork the two
//! runs. Per step the logits must agree within `tol · max|logit|`, and the GPU's argmax must be
//! the CPU's or, at a near-tie, a token whose CPU logit is within twice that of the CPU's best.
//! Tolerances: f32 weights run f32 matmuls on both (both KV caches f16): 2e-3; bf16 weights see
//! activations rounded to bf16 on the GPU only (cuBLAS), compounding over 30 layers: 5e-2.

use sluice::kernels::cuda::{CudaBackend, KvDType};
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::{Backend, BatchSeq, ForwardBatch};
use sluice::model::config::{ModelConfig, RopeStyle};
use sluice::model::llama::Llama;
use sluice::model::weights::DummyWeights;

use crate::{cpu, gpu_or_skip};

const FIXTURES: &str = include_str!("../fixtures/greedy.jsonl");
const BLOCK_SIZE: usize = 16;
const STEPS: usize = 32;

pub fn smollm2_135m_config() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49_152,
        max_position_embeddings: 8192,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_style: RopeStyle::Interleaved,
        rope_scaling: None,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
        gemma2: None,
    }
}

fn prompts() -> Vec<Vec<u32>> {
    FIXTURES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("fixture line is JSON");
            v["prompt_ids"]
                .as_array()
                .expect("prompt_ids")
                .iter()
                .map(|x| x.as_u64().expect("an id") as u32)
                .collect()
        })
        .collect()
}

/// Sequences' tokens so far and blocks; builds each step's batch.
struct Batcher {
    tokens: Vec<Vec<u32>>,
    cached: Vec<usize>,
    blocks: Vec<Vec<u32>>,
}

impl Batcher {
    /// The next `take(seq)` uncached tokens of every sequence, logits of each last one.
    fn step(&mut self, take: impl Fn(usize, usize) -> usize) -> ForwardBatch {
        let mut b = ForwardBatch::default();
        for s in 0..self.tokens.len() {
            let (from, n) = (
                self.cached[s],
                take(s, self.tokens[s].len() - self.cached[s]),
            );
            let start = b.token_ids.len();
            for pos in from..from + n {
                b.token_ids.push(self.tokens[s][pos]);
                b.positions.push(pos as u32);
                let block = self.blocks[s][pos / BLOCK_SIZE];
                b.slot_mapping
                    .push(block * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32);
            }
            self.cached[s] += n;
            b.seqs.push(BatchSeq {
                query_start: start,
                query_len: n,
                context_len: self.cached[s],
                block_table: self.blocks[s][..self.cached[s].div_ceil(BLOCK_SIZE)].to_vec(),
                prompt_len: 0,
            });
            b.logits_rows.push((b.token_ids.len() - 1) as u32);
        }
        b
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn run(dtype: WeightDType, tol: f32) {
    let g: CudaBackend = gpu_or_skip!(KvDType::F16);
    let config = smollm2_135m_config();
    let weights = DummyWeights::new(config.clone(), dtype, 7).expect("dummy weights");
    let mut gm = Llama::load(config.clone(), &weights, g).expect("GPU model");
    let mut cm = Llama::load(config.clone(), &weights, cpu()).expect("CPU model");
    println!("{} vs {}", gm.backend().describe(), cm.backend().describe());
    let prompts = prompts();
    let mut next_block = 0u32;
    let blocks: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let n = (p.len() + STEPS + 1).div_ceil(BLOCK_SIZE) as u32;
            next_block += n;
            (next_block - n..next_block).collect()
        })
        .collect();
    let mut batcher = Batcher {
        cached: vec![0; prompts.len()],
        tokens: prompts,
        blocks,
    };
    let num_blocks = next_block as usize;
    let mut gkv = gm.kv_cache(num_blocks, BLOCK_SIZE).expect("GPU KV cache");
    let mut ckv = cm.kv_cache(num_blocks, BLOCK_SIZE).expect("CPU KV cache");
    let vocab = config.vocab_size;
    let (mut exact, mut near_ties, mut worst) = (0usize, 0usize, 0.0f32);
    // Chunk 1: the first half of each prompt (at least one token); chunk 2: the rest.
    let first = batcher.step(|_, left| left.div_ceil(2));
    gm.forward(&first, &mut gkv);
    cm.forward(&first, &mut ckv);
    for step in 0..=STEPS {
        let b = batcher.step(|_, left| left);
        let (gl, cl) = (gm.forward(&b, &mut gkv), cm.forward(&b, &mut ckv));
        assert_eq!(gl.len(), cl.len());
        for s in 0..b.seqs.len() {
            let (gr, cr) = (
                &gl[s * vocab..(s + 1) * vocab],
                &cl[s * vocab..(s + 1) * vocab],
            );
            let scale = cr.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            let diff = gr
                .iter()
                .zip(cr)
                .fold(0.0f32, |m, (&a, &b)| m.max((a - b).abs()));
            worst = worst.max(diff / scale);
            assert!(
                diff <= tol * scale,
                "{dtype} step {step} seq {s}: logits differ by {diff} (scale {scale}, tol {tol})"
            );
            let (ga, ca) = (argmax(gr), argmax(cr));
            if ga == ca {
                exact += 1;
            } else {
                assert!(
                    cr[ca] - cr[ga] <= 2.0 * tol * scale,
                    "{dtype} step {step} seq {s}: GPU picks {ga}, CPU {ca} by a wide margin ({} vs {})",
                    cr[ga],
                    cr[ca]
                );
                near_ties += 1;
            }
            batcher.tokens[s].push(ca as u32);
        }
    }
    println!(
        "{dtype}: {exact} greedy picks equal, {near_ties} near-ties, worst logit difference {worst:.2e} of max|logit|"
    );
}

#[test]
fn dummy_f32_default_shape_logits_and_greedy_agree() {
    run(WeightDType::F32, 2e-3);
}

#[test]
fn dummy_bf16_default_shape_logits_and_greedy_agree() {
    run(WeightDType::BF16, 5e-2);
}
