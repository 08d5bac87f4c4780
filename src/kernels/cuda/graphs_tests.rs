use super::*;

fn decode_batch(n: usize) -> ForwardBatch {
    ForwardBatch {
        token_ids: vec![1; n],
        positions: vec![9; n],
        slot_mapping: (0..n as u32).map(|i| 16 * i + 9).collect(),
        seqs: (0..n)
            .map(|i| BatchSeq {
                query_start: i,
                query_len: 1,
                context_len: 10,
                block_table: vec![i as u32],
                prompt_len: 0,
            })
            .collect(),
        logits_rows: (0..n as u32).collect(),
        hidden_rows: Vec::new(),
    }
}

#[test]
fn the_ladder_doubles_then_steps_by_16_then_32() {
    assert_eq!(capture_sizes(1), vec![1]);
    assert_eq!(capture_sizes(6), vec![1, 2, 4, 6]);
    assert_eq!(capture_sizes(64), vec![1, 2, 4, 8, 16, 32, 48, 64]);
    let s = capture_sizes(512);
    assert_eq!(s[..7], [1, 2, 4, 8, 16, 32, 48]);
    assert!(s.contains(&256) && s.contains(&288) && !s.contains(&272));
    assert_eq!(*s.last().unwrap(), 512);
    assert!(s.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*capture_sizes(100).last().unwrap(), 100);
    assert!(capture_sizes(0).is_empty());
}

#[test]
fn pure_decode_pads_to_the_next_captured_size() {
    let sizes = capture_sizes(64);
    let scratch = Some((30, 480));
    for (n, want) in [
        (1, 1),
        (3, 4),
        (5, 8),
        (9, 16),
        (17, 32),
        (33, 48),
        (64, 64),
    ] {
        let p = decode_padding(&decode_batch(n), &sizes, scratch).expect("padded");
        assert_eq!(p.size, want, "{n} sequences");
        assert_eq!((p.scratch_block, p.scratch_slot), (30, 480));
    }
    // Above the ladder, or before a KV cache gave a scratch block: eager.
    assert_eq!(decode_padding(&decode_batch(65), &sizes, scratch), None);
    assert_eq!(decode_padding(&decode_batch(3), &sizes, None), None);
}

#[test]
fn prefill_mixed_and_partial_logits_steps_run_eagerly() {
    let sizes = capture_sizes(64);
    let scratch = Some((30, 480));
    let mut mixed = decode_batch(3);
    mixed.seqs[1].query_len = 2;
    mixed.token_ids.push(5);
    assert_eq!(decode_padding(&mixed, &sizes, scratch), None);
    let mut partial = decode_batch(3);
    partial.logits_rows.pop();
    assert_eq!(decode_padding(&partial, &sizes, scratch), None);
    assert_eq!(
        decode_padding(&ForwardBatch::default(), &sizes, scratch),
        None
    );
}

#[test]
fn capture_follows_a_warm_run_and_replay_needs_the_same_key() {
    let mut g = DecodeGraphs::new(true, 16);
    let key = GraphKey {
        epoch: 3,
        kv: 0x1000,
        logits: 0x2000,
    };
    assert_eq!(g.decide(4, key), Mode::Eager);
    g.warmed(4, 3);
    assert_eq!(g.decide(4, key), Mode::Capture);
    // A buffer moved since the warm run: warm again first.
    assert_eq!(g.decide(4, GraphKey { epoch: 4, ..key }), Mode::Eager);
    g.keys.insert(4, key);
    assert_eq!(g.decide(4, key), Mode::Replay);
    assert_eq!(g.decide(4, GraphKey { epoch: 4, ..key }), Mode::Eager);
    assert_eq!(g.decide(4, GraphKey { kv: 0x3000, ..key }), Mode::Capture);
    assert_eq!(g.decide(4, GraphKey { logits: 0, ..key }), Mode::Eager);
    assert_eq!(g.decide(8, key), Mode::Eager);
    g.enabled = false;
    assert_eq!(g.decide(4, key), Mode::Eager);
    g.clear();
    g.enabled = true;
    assert_eq!(g.decide(4, key), Mode::Eager);
}
