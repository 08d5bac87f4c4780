use super::*;
use crate::kernels::BatchSeq;

fn decode_batch(contexts: &[usize], block_size: usize) -> ForwardBatch {
    let mut b = ForwardBatch::default();
    for (i, &ctx) in contexts.iter().enumerate() {
        let blocks: Vec<u32> = (0..ctx.div_ceil(block_size) as u32)
            .map(|j| 100 * i as u32 + j)
            .collect();
        let last = *blocks.last().unwrap_or(&0) as usize;
        b.token_ids.push(7 + i as u32);
        b.positions.push(ctx as u32 - 1);
        b.slot_mapping
            .push((last * block_size + (ctx - 1) % block_size) as u32);
        b.seqs.push(BatchSeq {
            query_start: i,
            query_len: 1,
            context_len: ctx,
            block_table: blocks,
            prompt_len: 0,
        });
        b.logits_rows.push(i as u32);
    }
    b
}

#[test]
fn tiles_cover_every_query_once() {
    let t = tile_list(&[(0, 5), (2, 1), (3, 16)], 4);
    assert_eq!(t, vec![0, 0, 0, 4, 2, 0, 3, 0, 3, 4, 3, 8, 3, 12]);
}

#[test]
fn layout_regions_follow_each_other() {
    let l = StepLayout {
        tokens: 10,
        seqs: 3,
        bt_stride: 4,
    };
    assert_eq!(l.offset(Region::QueryLen), 3);
    assert_eq!(l.offset(Region::BlockTables), 9);
    assert_eq!(l.offset(Region::TokenIds), 21);
    assert_eq!(l.offset(Region::LogitsRows), 51);
    assert_eq!(l.len(), 61);
}

#[test]
fn layout_grows_to_powers_of_two_and_only_where_needed() {
    let l = StepLayout {
        tokens: 8,
        seqs: 4,
        bt_stride: 2,
    };
    let need = StepLayout {
        tokens: 5,
        seqs: 5,
        bt_stride: 9,
    };
    assert!(!l.fits(need));
    let g = l.grown(need);
    assert_eq!(
        g,
        StepLayout {
            tokens: 8,
            seqs: 8,
            bt_stride: 16
        }
    );
    assert!(g.fits(need));
}

#[test]
fn fill_writes_every_array_at_its_offset() {
    let b = decode_batch(&[5, 17], 16);
    let need = step_needs(&b, None);
    assert_eq!((need.tokens, need.seqs, need.bt_stride), (2, 2, 2));
    let l = StepLayout {
        tokens: 4,
        seqs: 3,
        bt_stride: 3,
    };
    let mut st = vec![u32::MAX; l.len()];
    let spans = fill(&l, &mut st, &b, None);
    let at = |r| l.offset(r);
    assert_eq!(st[at(Region::QueryStart)..][..2], [0, 1]);
    assert_eq!(st[at(Region::ContextLen)..][..2], [5, 17]);
    // Rows of the stride, zero past each table.
    assert_eq!(st[at(Region::BlockTables)..][..6], [0, 0, 0, 100, 101, 0]);
    assert_eq!(st[at(Region::TokenIds)..][..2], [7, 8]);
    assert_eq!(st[at(Region::Positions)..][..2], [4, 16]);
    assert_eq!(st[at(Region::Slots)..][..2], [4, 101 * 16]);
    assert_eq!(st[at(Region::LogitsRows)..][..2], [0, 1]);
    assert_eq!(
        spans[3],
        (at(Region::BlockTables), at(Region::BlockTables) + 6)
    );
    assert_eq!(
        spans[7],
        (at(Region::LogitsRows), at(Region::LogitsRows) + 2)
    );
}

#[test]
fn padded_rows_read_and_write_only_the_scratch_block() {
    let b = decode_batch(&[5, 40, 3], 16);
    let pad = Padding {
        size: 4,
        scratch_block: 50,
        scratch_slot: 800,
    };
    let l = StepLayout::from_limits(StepLimits {
        max_num_seqs: 8,
        max_num_batched_tokens: 8,
        max_blocks_per_seq: 4,
    });
    assert!(l.fits(step_needs(&b, Some(pad))));
    let mut st = vec![u32::MAX; l.len()];
    let spans = fill(&l, &mut st, &b, Some(pad));
    let at = |r| l.offset(r);
    assert_eq!(st[at(Region::QueryStart)..][..4], [0, 1, 2, 3]);
    assert_eq!(st[at(Region::QueryLen)..][..4], [1, 1, 1, 1]);
    assert_eq!(st[at(Region::ContextLen)..][..4], [5, 40, 3, 1]);
    assert_eq!(st[at(Region::BlockTables) + 3 * 4..][..4], [50, 0, 0, 0]);
    assert_eq!(st[at(Region::TokenIds) + 3], 0);
    assert_eq!(st[at(Region::Positions) + 3], 0);
    assert_eq!(st[at(Region::Slots) + 3], 800);
    assert_eq!(st[at(Region::LogitsRows)..][..4], [0, 1, 2, 3]);
    // Every used span covers the padded rows.
    assert!(spans.iter().all(|(s, e)| e - s >= 4));
}

#[test]
fn coalesce_merges_close_spans_only() {
    let spans = [(0, 2), (4, 6), (6, 6), (100, 110), (112, 120), (1000, 1001)];
    assert_eq!(coalesce(&spans, 2), vec![(0, 6), (100, 120), (1000, 1001)]);
    assert_eq!(
        coalesce(&spans, 0),
        vec![(0, 2), (4, 6), (100, 110), (112, 120), (1000, 1001)]
    );
    assert_eq!(coalesce(&spans, 10_000), vec![(0, 1001)]);
}

#[test]
fn a_decode_step_in_the_default_arena_is_at_most_two_copies() {
    let l = StepLayout::from_limits(StepLimits::default());
    let b = decode_batch(&[100; 7], 16);
    let mut st = vec![0; l.len()];
    let spans = fill(&l, &mut st, &b, None);
    // Per-sequence arrays and block tables in one, the token arrays in the same or another.
    let copies = coalesce(&spans, MAX_GAP);
    assert!(copies.len() <= 2, "{copies:?}");
    let copied: usize = copies.iter().map(|(s, e)| e - s).sum();
    // Gaps under MAX_GAP are copied rather than paying another copy: at most three of them.
    assert!(copied < 4 * MAX_GAP, "{copied}");
}
