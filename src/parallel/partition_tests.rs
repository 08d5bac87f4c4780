use super::*;

/// SmolLM2-135M's shape, Q4_1 (blocks of 32).
fn smollm2() -> ModelDims {
    ModelDims {
        num_layers: 30,
        hidden_size: 576,
        num_heads: 9,
        num_kv_heads: 3,
        intermediate_size: 1536,
        vocab_size: 49152,
        down_block_len: 32,
        o_block_len: 32,
        head_dim: 64,
        layer_params: 3_540_096,
        embed_params: 49152 * 576,
        lm_head_params: 49152 * 576,
    }
}

fn cfg(tp: usize, pp: usize) -> ParallelConfig {
    ParallelConfig {
        tp_size: tp,
        pp_size: pp,
        tp_mode: TpMode::Gather,
    }
}

#[test]
fn tp2_splits_smollm2_by_whole_gqa_groups_unevenly() {
    let s = plan(&smollm2(), cfg(2, 1)).unwrap();
    assert_eq!((s[0].q_heads.clone(), s[0].kv_heads.clone()), (0..6, 0..2));
    assert_eq!((s[1].q_heads.clone(), s[1].kv_heads.clone()), (6..9, 2..3));
    assert_eq!(
        (s[0].inter.clone(), s[1].inter.clone()),
        (0..768, 768..1536)
    );
    assert_eq!(
        (s[0].vocab.clone(), s[1].vocab.clone()),
        (0..24576, 24576..49152)
    );
    assert_eq!(
        (s[0].hidden.clone(), s[1].hidden.clone()),
        (0..288, 288..576)
    );
    assert!(s.iter().all(|r| r.layers == (0..30)));
}

#[test]
fn tp9_replicates_each_kv_head_on_three_ranks() {
    let s = plan(&smollm2(), cfg(9, 1)).unwrap();
    for (t, r) in s.iter().enumerate() {
        assert_eq!(r.q_heads, t..t + 1);
        assert_eq!(r.kv_heads, t / 3..t / 3 + 1);
    }
}

#[test]
fn bad_tp_sizes_name_the_valid_ones() {
    let err = plan(&smollm2(), cfg(4, 1)).unwrap_err().to_string();
    assert!(err.contains("valid sizes: 1, 2, 3, 9"), "{err}");
    // K-quant blocks of 256: three heads of 64 columns end at 192, inside a block.
    let mut d = smollm2();
    d.o_block_len = 256;
    let err = plan(&d, cfg(3, 1)).unwrap_err().to_string();
    assert!(err.contains("quantization block of 256"), "{err}");
}

#[test]
fn stages_balance_parameters_with_embedding_and_head_at_the_ends() {
    let s = plan(&smollm2(), cfg(1, 2)).unwrap();
    assert_eq!((s[0].layers.clone(), s[1].layers.clone()), (0..15, 15..30));
    // An untied model without a counted embedding: the head's stage takes fewer layers.
    let mut d = smollm2();
    d.embed_params = 0;
    let st = stage_layers(&d, 2).unwrap();
    assert_eq!(st, vec![0..19, 19..30]);
    let st = stage_layers(&d, 3).unwrap();
    assert_eq!(st.last().unwrap().end, 30);
    assert!(st.iter().all(|r| !r.is_empty()));
}

#[test]
fn tp_and_pp_compose_in_rank_order() {
    let s = plan(&smollm2(), cfg(2, 2)).unwrap();
    let ids: Vec<_> = s.iter().map(|r| (r.rank, r.stage, r.tp_rank)).collect();
    assert_eq!(ids, vec![(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]);
    assert!(s[1].is_first_stage() && s[3].is_last_stage());
}

#[test]
fn too_many_stages_or_zero_sizes_are_refused() {
    let err = plan(&smollm2(), cfg(1, 31)).unwrap_err().to_string();
    assert!(err.contains("valid sizes: 1 to 30"), "{err}");
    assert!(plan(&smollm2(), cfg(0, 1)).is_err());
}
