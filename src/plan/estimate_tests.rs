use super::*;
use crate::model::config::{ModelConfig, RopeStyle};
use crate::plan::device::find_gpu;
use crate::plan::probe::{MeasuredCost, ProbeSamples};

fn smollm2_q4() -> Footprint {
    Footprint {
        config: ModelConfig {
            architecture: "llama".into(),
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_style: RopeStyle::Interleaved,
            rope_scaling: None,
            tie_word_embeddings: true,
            attention_bias: false,
            sliding_window: None,
            gemma2: None,
        },
        source: "gguf",
        weights_dtype: "Q4_1".into(),
        weights_bytes: 98_000_000,
        num_params: 134_515_008,
    }
}

/// 10 ms a step and 2 ms a row (decode or prompt), 1 µs a context token.
fn cost() -> StepCost {
    let rows = |n: f64| [n, 0.010 + 0.002 * n];
    StepCost::Measured(MeasuredCost {
        row_points: [rows(1.0), rows(4.0), rows(16.0), rows(64.0)],
        per_context_token_s: 1e-6,
        threads: 2,
        samples: ProbeSamples {
            decode_1_short_s: 0.0,
            decode_4_short_s: 0.0,
            decode_n_short_s: 0.0,
            decode_n_long_s: 0.0,
            prefill_s: 0.0,
            rows: 16,
            short_ctx: 32,
            long_ctx: 544,
            prefill_tokens: 64,
        },
    })
}

fn target(memory_bytes: u64) -> Target {
    Target {
        cost: cost(),
        memory_bytes,
        reserve_bytes: 0,
        block_size: 16,
    }
}

fn closed(input_len: usize, output_len: usize, c: usize) -> Workload {
    Workload {
        input_len,
        output_len,
        load: Load::Concurrency(c),
    }
}

#[test]
fn what_fits_counts_whole_blocks() {
    let fp = smollm2_q4();
    // 40 + 50 = 90 tokens: 6 blocks of 16 (96 slots), 368,640 bytes a block.
    let probe = plan(&fp, &target(1 << 40), closed(40, 50, 4)).unwrap();
    let m = &probe.memory;
    assert_eq!(
        (m.kv_bytes_per_token, m.bytes_per_block, m.blocks_per_seq),
        (23_040, 368_640, 6)
    );
    // Budget for exactly 62 blocks beyond weights and activations: 10 sequences (60 blocks).
    let memory = fp.weights_bytes + m.activation_bytes + 62 * 368_640 + 368_639;
    let p = plan(&fp, &target(memory), closed(40, 50, 4)).unwrap();
    assert_eq!(p.memory.num_blocks, 62);
    assert_eq!(p.memory.max_concurrency, 10);
    assert_eq!(p.flags.max_num_seqs, 4);
    assert_eq!(p.flags.kv_cache_memory, 4 * 6 * 368_640);
    assert_eq!(p.flags.max_model_len, 96);
    assert_eq!(p.flags.max_num_batched_tokens, 256);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn more_streams_than_fit_get_seats_in_turn() {
    let fp = smollm2_q4();
    let m = plan(&fp, &target(1 << 40), closed(40, 50, 12))
        .unwrap()
        .memory;
    let memory = fp.weights_bytes + m.activation_bytes + 30 * 368_640;
    let p = plan(&fp, &target(memory), closed(40, 50, 12)).unwrap();
    assert_eq!(p.memory.max_concurrency, 5);
    assert_eq!((p.flags.max_num_seqs, p.decode.batch), (5, 5));
    assert_eq!(p.warnings.len(), 1);
    // Three waves of 5 (the last partial): the mean request waits one request's time.
    let request_ms = p.ttft.burst_ms + 49.0 * p.decode.step_ms;
    assert!(
        (p.ttft.seat_wait_ms - request_ms).abs() < 1e-6,
        "{:?}",
        p.ttft
    );
    assert!((p.e2e_ms - 2.0 * request_ms).abs() < 1e-6);
}

#[test]
fn decode_and_ttft_follow_the_step_cost() {
    let p = plan(&smollm2_q4(), &target(1 << 40), closed(40, 51, 4)).unwrap();
    // Mean decode context 40 + 50/2 = 65: 10 + 2·4 + 0.001·4·65 ms.
    assert_eq!(p.decode.mean_context, 65.0);
    assert!(
        (p.decode.step_ms - 18.26).abs() < 1e-9,
        "{}",
        p.decode.step_ms
    );
    assert!((p.decode.batch_tok_s - 4.0 / 0.01826).abs() < 1e-6);
    assert!((p.decode.batch1_tok_s - 1.0 / 0.012065).abs() < 1e-6);
    // All four prompts fit one 256-token step: 10 + 2·160 + 0.001·4·(40·41/2) ms.
    assert_eq!(p.ttft.prompts_per_step, 4);
    assert!(
        (p.ttft.burst_ms - 333.28).abs() < 1e-9,
        "{}",
        p.ttft.burst_ms
    );
    // Alone: half a step, then 3 decodes beside the prompt (43 rows).
    let isolated = 9.13 + 10.0 + 86.0 + 0.001 * (3.0 * 65.0 + 820.0);
    assert!(
        (p.ttft.isolated_ms - isolated).abs() < 1e-9,
        "{}",
        p.ttft.isolated_ms
    );
}

#[test]
fn a_rate_becomes_a_concurrency_by_littles_law() {
    let fp = smollm2_q4();
    let rate = 2.0;
    let p = plan(
        &fp,
        &target(1 << 40),
        Workload {
            input_len: 40,
            output_len: 50,
            load: Load::RequestRate(rate),
        },
    )
    .unwrap();
    assert_eq!(p.request_rate, Some(rate));
    assert_eq!(
        p.concurrency,
        (rate * p.e2e_ms / 1e3).ceil() as usize,
        "{p:?}"
    );
    assert!(p.warnings.is_empty());
    // Far beyond what the memory holds: capped, and said.
    let m = p.memory;
    let small = fp.weights_bytes + m.activation_bytes + 12 * 368_640;
    let over = Workload {
        input_len: 40,
        output_len: 50,
        load: Load::RequestRate(1000.0),
    };
    let q = plan(&fp, &target(small), over).unwrap();
    assert_eq!(q.concurrency, 2);
    assert!(q.warnings[0].contains("without bound"), "{:?}", q.warnings);
}

#[test]
fn the_roofline_bounds_decode_by_bandwidth_at_batch_one() {
    // An 8B-parameter model in BF16 on an H100 SXM: about 16 GB a step at 3.35 TB/s.
    let mut fp = smollm2_q4();
    fp.config.tie_word_embeddings = false;
    fp.num_params = 8_000_000_000;
    fp.weights_bytes = 16_000_000_000;
    let gpu = find_gpu("h100-sxm").unwrap();
    let t = Target {
        cost: StepCost::roofline(&fp, gpu),
        memory_bytes: gpu.memory_bytes,
        reserve_bytes: 1 << 30,
        block_size: 16,
    };
    let p = plan(&fp, &t, closed(512, 128, 64)).unwrap();
    let streamed = fp.streamed_weight_bytes() as f64;
    assert!((p.decode.batch1_tok_s - 3.35e12 / (streamed + 23_040.0 * 575.5)).abs() < 0.01);
    assert!(p.decode.batch1_tok_s > 200.0 && p.decode.batch1_tok_s < 215.0);
    // 64 sequences stream the weights once: nearly 64 times the rate.
    assert!(p.decode.batch_tok_s > 50.0 * p.decode.batch1_tok_s);
}

#[test]
fn impossible_workloads_are_refused_with_the_reason() {
    let fp = smollm2_q4();
    let e = plan(&fp, &target(1 << 40), closed(8000, 500, 1)).unwrap_err();
    assert!(e.to_string().contains("model's context of 8192"), "{e}");
    let e = plan(&fp, &target(100_000_000), closed(40, 50, 1)).unwrap_err();
    assert!(e.to_string().contains("not one sequence"), "{e}");
    assert!(plan(&fp, &target(1 << 40), closed(0, 50, 1)).is_err());
    assert!(plan(&fp, &target(1 << 40), closed(40, 50, 0)).is_err());
}
