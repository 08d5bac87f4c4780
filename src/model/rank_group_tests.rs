//! Rank groups of a tiny random model against the same model on one rank.

use super::*;
use crate::kernels::cpu::CpuBackend;
use crate::kernels::dtype::WeightDType;
use crate::kernels::BatchSeq;
use crate::model::config::{ModelConfig, RopeStyle};
use crate::model::shard::load_ranks;
use crate::model::weights::DummyWeights;
use crate::parallel::{ParallelConfig, TpMode};

/// A tiny random Llama (also the draft model tests').
pub(crate) fn tiny() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 50,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_style: RopeStyle::Interleaved,
        rope_scaling: None,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
        gemma2: None,
    }
}

fn start(tp: usize, pp: usize, dtype: WeightDType) -> RankGroup<CpuBackend> {
    start_mode(tp, pp, dtype, TpMode::Gather)
}

fn start_mode(tp: usize, pp: usize, dtype: WeightDType, mode: TpMode) -> RankGroup<CpuBackend> {
    let w = DummyWeights::new(tiny(), dtype, 3).unwrap();
    let cfg = ParallelConfig {
        tp_size: tp,
        pp_size: pp,
        tp_mode: mode,
    };
    // One thread per rank, over shared memory.
    let comms = crate::parallel::shm::group(tp, pp)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn crate::parallel::Communicator<CpuBackend>>)
        .collect();
    let ranks = load_ranks(&tiny(), &w, cfg, |_| CpuBackend::new(1), comms).unwrap();
    RankGroup::start(ranks, 8, 4).unwrap()
}

/// A prefill of 6 tokens, then a decode token: the logits of both steps.
fn two_steps(g: &mut RankGroup<CpuBackend>) -> Vec<f32> {
    let seq = |start: usize, n: usize| BatchSeq {
        query_start: 0,
        query_len: n,
        context_len: start + n,
        block_table: vec![0, 1],
        prompt_len: 0,
    };
    let prefill = ForwardBatch {
        token_ids: vec![1, 7, 30, 49, 2, 26],
        positions: (0..6).collect(),
        slot_mapping: (0..6).collect(),
        seqs: vec![seq(0, 6)],
        logits_rows: vec![2, 5],
        hidden_rows: Vec::new(),
    };
    let decode = ForwardBatch {
        token_ids: vec![40],
        positions: vec![6],
        slot_mapping: vec![6],
        seqs: vec![seq(6, 1)],
        logits_rows: vec![0],
        hidden_rows: Vec::new(),
    };
    let mut out = g.run(&prefill, &[]).unwrap();
    out.extend(g.run(&decode, &[]).unwrap());
    out
}

#[test]
fn tensor_and_pipeline_ranks_match_one_rank() {
    for dtype in [WeightDType::F32, WeightDType::BF16] {
        let reference = two_steps(&mut start(1, 1, dtype));
        assert_eq!(reference.len(), 3 * 50);
        for (tp, pp) in [(2, 1), (1, 2), (2, 2), (1, 3), (4, 1)] {
            let got = two_steps(&mut start(tp, pp, dtype));
            assert_eq!(got, reference, "{dtype} TP={tp} PP={pp} is exact");
            // Float weights quantize no activations: the all-reduce mode stays at rounding.
            let got = two_steps(&mut start_mode(tp, pp, dtype, TpMode::AllReduce));
            let diff = reference
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 1e-4,
                "{dtype} TP={tp} PP={pp} all-reduce: max |Δ| {diff}"
            );
        }
    }
}

#[test]
fn a_failed_rank_breaks_the_group_instead_of_hanging() {
    let mut g = start(2, 1, WeightDType::F32);
    // Dropping a worker's step channel ends its thread: the lead's next collective fails.
    g.workers[0].tx = None;
    if let Some(h) = g.workers[0].handle.take() {
        h.join().unwrap();
    }
    let batch = ForwardBatch {
        token_ids: vec![1],
        positions: vec![0],
        slot_mapping: vec![0],
        seqs: vec![BatchSeq {
            query_start: 0,
            query_len: 1,
            context_len: 1,
            block_table: vec![0],
            prompt_len: 0,
        }],
        logits_rows: vec![0],
        hidden_rows: Vec::new(),
    };
    assert!(g.run(&batch, &[]).is_err());
    let again = g.run(&batch, &[]).unwrap_err().to_string();
    assert!(again.contains("failed in an earlier step"), "{again}");
}
