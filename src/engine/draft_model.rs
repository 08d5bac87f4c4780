//! The draft model of speculative decoding (`"method": "draft_model"`): a smaller model that
//! shares the target's tokenizer proposes each speculating sequence's next tokens greedily,
//! and the target verifies them like any draft (`speculate.rs`), so the output is the
//! target's whatever the draft says.
//!
//! It runs on a sibling of the target's backend (on the CPU, the same thread pool) with its
//! KV in a block pool of its own, which nothing else reads: each sequence keeps the blocks
//! and the tokens whose K/V they hold. Before drafting, a sequence keeps the longest prefix of
//! those tokens that its committed tokens share (the accepted part of its last draft) and
//! feeds the rest, then feeds each draft token to get the next: `k` draft forward passes per
//! step, batched over the speculating sequences.

use std::collections::HashMap;
use std::path::Path;

use crate::kernels::{Backend, BatchSeq, ForwardBatch};
use crate::kv_cache::BlockPool;
use crate::model::llama::Llama;
use crate::model::loader::{self, ModelSpec};
use crate::model::ModelError;
use crate::scheduler::SeqId;
use crate::tokenizer::Tokenizer;

/// Tokens a step's draft passes may feed to catch sequences up (a new sequence's prompt,
/// the tokens accepted since its last draft). A longer catch-up is spread over steps, and
/// the sequence drafts once it is done, so one long prompt never stalls a step.
const CATCH_UP_PER_STEP: usize = 512;

/// One sequence's part of the draft's cache.
#[derive(Debug, Default)]
struct DraftSeq {
    blocks: Vec<u32>,
    /// The tokens whose K/V the blocks hold, in order.
    fed: Vec<u32>,
}

/// What a sequence asks of the draft model this step.
pub(crate) struct DraftWant {
    pub seq_id: SeqId,
    /// Its committed tokens (prompt and output).
    pub tokens: Vec<u32>,
    /// Draft tokens wanted (≥ 1).
    pub len: usize,
}

pub(crate) struct DraftModel<B: Backend> {
    model: Llama<B>,
    kv: B::KvCache,
    block_size: usize,
    /// The draft's own blocks (no prefix caching: a draft's K/V is never shared).
    pool: BlockPool,
    seqs: HashMap<SeqId, DraftSeq>,
}

impl<B: Backend> DraftModel<B> {
    /// Loads the draft at `path` on `backend`, refusing one whose tokenizer is not the
    /// target's (a draft token must mean what the target's would).
    pub fn load(
        path: &Path,
        backend: B,
        target_tokenizer: &Tokenizer,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let at = |e: &dyn std::fmt::Display| format!("draft model {}: {e}", path.display());
        let opened =
            loader::open(&ModelSpec::stored(path)).map_err(|e| ModelError::Invalid(at(&e)))?;
        let draft_tokenizer = match &opened.tokenizer_source {
            loader::TokenizerSource::Gguf(p) | loader::TokenizerSource::HfDir(p) => {
                Tokenizer::from_path(p).map_err(|e| ModelError::Invalid(at(&e)))?
            }
            loader::TokenizerSource::Missing => {
                return Err(ModelError::Invalid(format!(
                    "draft model {}: no tokenizer beside it to check against the target's",
                    path.display()
                )))
            }
        };
        if let Some(why) = tokenizer_mismatch(target_tokenizer, &draft_tokenizer) {
            return Err(ModelError::Invalid(format!(
                "draft model {}: its tokenizer is not the target's ({why})",
                path.display()
            )));
        }
        let model = Llama::load(opened.config, opened.weights.as_ref(), backend)?;
        if model.config.vocab_size < target_tokenizer.vocab_size() {
            return Err(ModelError::Invalid(format!(
                "draft model {}: {} logits, fewer than the tokenizer's {} tokens",
                path.display(),
                model.config.vocab_size,
                target_tokenizer.vocab_size()
            )));
        }
        Self::new(model, num_blocks, block_size)
    }

    fn new(model: Llama<B>, num_blocks: usize, block_size: usize) -> Result<Self, ModelError> {
        let kv = model.kv_cache(num_blocks, block_size)?;
        Ok(Self {
            model,
            kv,
            block_size,
            pool: BlockPool::new(num_blocks as u32),
            seqs: HashMap::new(),
        })
    }

    /// Blocks held by sequences (the rest are free).
    pub fn blocks_in_use(&self) -> usize {
        self.pool.num_blocks() - self.pool.num_free_blocks()
    }

    /// The sequence ended: its blocks go back to the pool.
    pub fn remove(&mut self, seq_id: SeqId) {
        if let Some(s) = self.seqs.remove(&seq_id) {
            // Tail first, as the pool expects.
            self.pool.free(s.blocks.into_iter().rev());
        }
    }

    /// Each want's draft, in order (empty where the sequence is still catching up or the
    /// draft's pool has no room for it), and how many draft passes ran.
    pub fn propose(&mut self, wants: &[DraftWant]) -> Result<(Vec<Vec<u32>>, usize), ModelError> {
        let mut drafts = vec![Vec::new(); wants.len()];
        // (want index, first position to feed, tokens to feed, whether it drafts this step).
        let mut first = Vec::new();
        let mut budget = CATCH_UP_PER_STEP;
        for (i, w) in wants.iter().enumerate() {
            if w.len == 0 || w.tokens.is_empty() || budget == 0 {
                continue;
            }
            let s = self.seqs.entry(w.seq_id).or_default();
            // The accepted part of the last draft stays; at least the last token is fed
            // again, for its logits.
            let keep = common_prefix(&s.fed, &w.tokens).min(w.tokens.len() - 1);
            s.fed.truncate(keep);
            let feed = (w.tokens.len() - keep).min(budget);
            budget -= feed;
            let drafts_now = keep + feed == w.tokens.len();
            let slots = keep + feed + if drafts_now { w.len - 1 } else { 0 };
            if !self.reserve(w.seq_id, slots) {
                self.remove(w.seq_id);
                continue;
            }
            first.push((i, keep, feed, drafts_now));
        }
        if first.is_empty() {
            return Ok((drafts, 0));
        }
        // Pass 0: the catch-up tokens, logits at each drafting sequence's last one.
        let mut batch = ForwardBatch::default();
        let mut drafting = Vec::new();
        for &(i, keep, feed, drafts_now) in &first {
            let w = &wants[i];
            let row = self.push_seq(&mut batch, w.seq_id, &w.tokens[keep..keep + feed], keep);
            if drafts_now {
                batch.logits_rows.push(row as u32);
                drafting.push(i);
            }
        }
        let mut passes = 1;
        let mut next = self.forward_argmax(&batch)?;
        // Passes 1..: each drafting sequence feeds its last draft token for the next one.
        loop {
            let mut batch = ForwardBatch::default();
            let mut still = Vec::new();
            for (&i, &t) in drafting.iter().zip(&next) {
                drafts[i].push(t);
                let w = &wants[i];
                if drafts[i].len() < w.len {
                    let pos = w.tokens.len() + drafts[i].len() - 1;
                    let row = self.push_seq(&mut batch, w.seq_id, &[t], pos);
                    batch.logits_rows.push(row as u32);
                    still.push(i);
                }
            }
            if still.is_empty() {
                return Ok((drafts, passes));
            }
            passes += 1;
            next = self.forward_argmax(&batch)?;
            drafting = still;
        }
    }

    /// Blocks for `slots` tokens of the sequence; false when the pool has too few.
    fn reserve(&mut self, seq_id: SeqId, slots: usize) -> bool {
        let s = self.seqs.entry(seq_id).or_default();
        let need = slots
            .div_ceil(self.block_size)
            .saturating_sub(s.blocks.len());
        match self.pool.allocate(need) {
            Some(ids) => {
                s.blocks.extend(ids);
                true
            }
            None => false,
        }
    }

    /// Adds the sequence's `tokens` at positions `start..` to `batch` and records them as
    /// fed; returns the last one's row.
    fn push_seq(
        &mut self,
        batch: &mut ForwardBatch,
        seq_id: SeqId,
        tokens: &[u32],
        start: usize,
    ) -> usize {
        let s = self
            .seqs
            .get_mut(&seq_id)
            .expect("reserved before it is fed");
        let bs = self.block_size;
        let query_start = batch.token_ids.len();
        for (pos, &t) in (start..).zip(tokens) {
            batch.token_ids.push(t);
            batch.positions.push(pos as u32);
            batch
                .slot_mapping
                .push(s.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
        }
        s.fed.extend_from_slice(tokens);
        batch.seqs.push(BatchSeq {
            query_start,
            query_len: tokens.len(),
            context_len: start + tokens.len(),
            block_table: s.blocks.clone(),
            prompt_len: 0,
        });
        batch.token_ids.len() - 1
    }

    /// The forward pass's most likely token at each logits row (the lowest id among equals).
    fn forward_argmax(&mut self, batch: &ForwardBatch) -> Result<Vec<u32>, ModelError> {
        let out = self.model.forward_rank(batch, &mut self.kv)?;
        let vocab = self.model.config.vocab_size;
        Ok(out
            .logits
            .chunks_exact(vocab)
            .map(crate::sampling::argmax)
            .collect())
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Why two tokenizers differ, if they do: their sizes, or the first id whose token differs.
fn tokenizer_mismatch(target: &Tokenizer, draft: &Tokenizer) -> Option<String> {
    if target.vocab_size() != draft.vocab_size() {
        return Some(format!(
            "{} tokens against the target's {}",
            draft.vocab_size(),
            target.vocab_size()
        ));
    }
    (0..target.vocab_size() as u32)
        .find(|&id| target.id_to_token(id) != draft.id_to_token(id))
        .map(|id| format!("token {id} differs"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::CpuBackend;
    use crate::kernels::dtype::WeightDType;
    use crate::model::config::ModelConfig;
    use crate::model::weights::DummyWeights;

    fn tiny_draft(num_blocks: usize) -> DraftModel<CpuBackend> {
        let config = ModelConfig {
            num_layers: 2,
            max_position_embeddings: 2048,
            ..crate::model::rank_group::tests::tiny()
        };
        let w = DummyWeights::new(config.clone(), WeightDType::F32, 5).unwrap();
        let model = Llama::load(config, &w, CpuBackend::new(1)).unwrap();
        DraftModel::new(model, num_blocks, 4).unwrap()
    }

    fn want(seq_id: SeqId, tokens: &[u32], len: usize) -> DraftWant {
        let tokens = tokens.to_vec();
        DraftWant {
            seq_id,
            tokens,
            len,
        }
    }

    /// After a partly rejected draft, and batched with another sequence, a sequence's draft
    /// is the one a fresh draft model proposes for its tokens.
    #[test]
    fn a_draft_after_rejection_is_a_fresh_models() {
        let prompt: Vec<u32> = (1..12).collect();
        let mut d = tiny_draft(64);
        let (first, passes) = d.propose(&[want(7, &prompt, 4)]).unwrap();
        assert_eq!((first[0].len(), passes), (4, 4));
        // The target took the first draft token, then drew another than the second.
        let mut tokens = prompt.clone();
        tokens.extend([first[0][0], (first[0][1] + 1) % 50]);
        let other: Vec<u32> = (20..30).collect();
        let (again, _) = d
            .propose(&[want(9, &other, 2), want(7, &tokens, 3)])
            .unwrap();
        let (fresh, _) = tiny_draft(64).propose(&[want(7, &tokens, 3)]).unwrap();
        assert_eq!(again[1], fresh[0]);
        assert_eq!(again[0].len(), 2);
        d.remove(7);
        d.remove(9);
        assert_eq!(d.blocks_in_use(), 0);
    }

    /// A prompt longer than a step's catch-up budget drafts once it is caught up; a pool too
    /// small for a sequence gives no draft and keeps no block.
    #[test]
    fn long_catch_up_spreads_over_steps_and_a_full_pool_drafts_nothing() {
        let prompt: Vec<u32> = (0..CATCH_UP_PER_STEP as u32 + 100)
            .map(|i| i % 50)
            .collect();
        let mut d = tiny_draft(256);
        let (first, _) = d.propose(&[want(1, &prompt, 2)]).unwrap();
        assert!(first[0].is_empty());
        let (second, passes) = d.propose(&[want(1, &prompt, 2)]).unwrap();
        assert_eq!((second[0].len(), passes), (2, 2));
        let (fresh, _) = tiny_draft(256)
            .propose(&[want(1, &prompt[..40], 2)])
            .unwrap();
        assert_eq!(fresh[0].len(), 2);
        let mut small = tiny_draft(3);
        let (none, passes) = small.propose(&[want(1, &prompt[..40], 2)]).unwrap();
        assert!(none[0].is_empty() && passes == 0);
        assert_eq!(small.blocks_in_use(), 0);
    }

    #[test]
    fn common_prefix_stops_at_the_first_difference() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
