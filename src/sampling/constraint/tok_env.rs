//! llguidance's view of our tokenizer: a `TokTrie` over every id's bytes and the ids that end
//! generation, and `tokenize_bytes` through our own encoder (no second `tokenizers`).
//!
//! Control tokens enter the trie as toktrie's special spelling (`0xFF` then their text), so
//! no grammar text matches them; EOS and end-of-turn ids are the trie's EOS set, which a
//! matcher allows once its grammar is complete. Building the trie walks the whole vocabulary
//! (tens of milliseconds): one per loaded model, shared in an `Arc` (`TokEnv`).

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::ConstraintError;
use crate::tokenizer::Tokenizer;

pub(crate) struct SluiceTokEnv {
    tokenizer: Arc<Tokenizer>,
    trie: TokTrie,
}

impl SluiceTokEnv {
    /// The trie of `tokenizer`'s vocabulary. Fails for a model that names no EOS: a grammar
    /// could never end its sequence.
    pub fn build(tokenizer: Arc<Tokenizer>) -> Result<TokEnv, ConstraintError> {
        let vocab_size = tokenizer.vocab_size();
        let eos_ids: Vec<u32> = (tokenizer.eos_token_ids().iter())
            .copied()
            .filter(|&id| (id as usize) < vocab_size)
            .collect();
        let Some(&first_eos) = eos_ids.first() else {
            return Err(ConstraintError::Unsupported(
                "the model's tokenizer names no end-of-sequence token".into(),
            ));
        };
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match tokenizer.text_bytes(id) {
                Some(bytes) => bytes,
                None => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.id_to_token(id).unwrap_or("").as_bytes());
                    w
                }
            })
            .collect();
        let mut info = TokRxInfo::new(vocab_size as u32, first_eos);
        info.tok_bos = tokenizer.bos_token_id();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos_ids);
        Ok(Arc::new(Self { tokenizer, trie }))
    }
}

impl TokenizerEnv for SluiceTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Text through our encoder; bytes that are not UTF-8 (never a whole grammar literal)
    /// through the trie's greedy split.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}
