//! The fast encode path for byte-level BPE vocabularies whose pre-tokenizer has a
//! hand-written scanner ([`super::pretokenize`]): the `tokenizers` pipeline minus its regex
//! engine and offset bookkeeping, giving the same ids.
//!
//! Steps, as llama.cpp and `tokenizers` both do them: cut the text at added tokens
//! (leftmost-longest match, each becoming its id), split each run between them into pieces,
//! spell each piece in the byte-level alphabet, and run the BPE model on it (with its cache).

use std::ops::Range;

use tokenizers::{Model, ModelWrapper};

use super::bytes::byte_to_char;
use super::pretokenize::{split, SplitStyle};
use super::TokenizerError;

/// Finds added tokens (special and user-defined) in raw text.
pub(crate) struct AddedMatcher {
    /// Token texts and ids, longest first within each first byte.
    by_first_byte: Vec<Vec<(String, u32)>>,
}

impl AddedMatcher {
    pub fn new(tokens: impl IntoIterator<Item = (String, u32)>) -> Self {
        let mut by_first_byte: Vec<Vec<(String, u32)>> = vec![Vec::new(); 256];
        for (text, id) in tokens {
            if let Some(&first) = text.as_bytes().first() {
                by_first_byte[first as usize].push((text, id));
            }
        }
        for bucket in &mut by_first_byte {
            bucket.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
        }
        Self { by_first_byte }
    }

    /// The first added token in `text[from..]`, longest at that position: (bytes, id).
    pub fn find(&self, text: &str, from: usize) -> Option<(Range<usize>, u32)> {
        let bytes = text.as_bytes();
        for at in from..bytes.len() {
            for (token, id) in &self.by_first_byte[bytes[at] as usize] {
                if bytes[at..].starts_with(token.as_bytes()) {
                    return Some((at..at + token.len(), *id));
                }
            }
        }
        None
    }
}

pub(crate) struct FastEncoder {
    style: SplitStyle,
    added: AddedMatcher,
    byte_chars: [char; 256],
}

impl FastEncoder {
    pub fn new(style: SplitStyle, added: AddedMatcher) -> Self {
        Self {
            style,
            added,
            byte_chars: byte_to_char(),
        }
    }

    pub fn encode(
        &self,
        model: &ModelWrapper,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut pieces = Vec::new();
        let mut word = String::new();
        let mut pos = 0;
        loop {
            let found = self.added.find(text, pos);
            let end = found.as_ref().map_or(text.len(), |(range, _)| range.start);
            let run = &text[pos..end];
            pieces.clear();
            split(self.style, run, &mut pieces);
            for piece in &pieces {
                word.clear();
                word.extend(
                    run[piece.clone()]
                        .bytes()
                        .map(|b| self.byte_chars[b as usize]),
                );
                let tokens = model
                    .tokenize(&word)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                out.extend(tokens.iter().map(|t| t.id));
            }
            match found {
                Some((range, id)) => {
                    out.push(id);
                    pos = range.end;
                }
                None => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AddedMatcher;

    #[test]
    fn added_tokens_match_leftmost_then_longest() {
        let matcher = AddedMatcher::new([
            ("<a>".to_string(), 1),
            ("<a><b>".to_string(), 2),
            ("b>".to_string(), 3),
        ]);
        assert_eq!(matcher.find("x<a><b>", 0), Some((1..7, 2)));
        assert_eq!(matcher.find("x<a><b", 0), Some((1..4, 1)));
        assert_eq!(matcher.find("x<a><b", 2), None);
        assert_eq!(matcher.find("éb>", 0), Some((2..4, 3)));
        assert_eq!(matcher.find("", 0), None);
    }
}
