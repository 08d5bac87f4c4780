//! Incremental detokenization: one [`IncrementalDetokenizer`] per sequence turns each new id
//! into the text it adds.
//!
//! Invariant: the concatenation of every `push` result and the final `flush` equals
//! `tokenizer.decode(all ids, skip_special_tokens)`, and no delta ends in the middle of a
//! UTF-8 character (bytes of a character split across tokens are held back until complete).
//!
//! Cost: O(1) per push in the sequence length.
//! * Byte-level vocabularies: the detokenizer keeps only the bytes of an unfinished character
//!   (at most 3). Each push appends the token's bytes and emits every complete character;
//!   invalid bytes become U+FFFD exactly where a whole-text lossy decode puts them, because
//!   UTF-8 decoding decides each character from its own bytes and the byte after it.
//! * Other vocabularies (SentencePiece-style HF decoders): the prefix/read-offset window of
//!   vLLM and TGI. `decode(window)` is compared with `decode(prefix part)`; the difference is
//!   emitted once it no longer ends in U+FFFD. The window keeps a few tokens of left context
//!   (so decoders that strip or merge at token boundaries see it) and is bounded: after
//!   `MAX_HELD_TOKENS` tokens without complete text it emits what it has.

use super::{Tokenizer, TokenizerError};

/// Tokens a window-mode detokenizer may hold back before it emits anyway.
const MAX_HELD_TOKENS: usize = 16;

/// Turns a sequence's ids into text deltas. Create one per sequence with
/// [`IncrementalDetokenizer::new`]; feed it with the same tokenizer every time.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    skip_special_tokens: bool,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Bytes of an incomplete UTF-8 character not yet emitted.
    Bytes { pending: Vec<u8> },
    /// `ids[..read]` has been emitted; `ids[..prefix]`... is context only (`prefix <= read`).
    Window {
        ids: Vec<u32>,
        prefix: usize,
        read: usize,
    },
}

impl IncrementalDetokenizer {
    pub fn new(tokenizer: &Tokenizer, skip_special_tokens: bool) -> Self {
        let state = match tokenizer.byte_table() {
            Some(_) => State::Bytes {
                pending: Vec::with_capacity(8),
            },
            None => State::Window {
                ids: Vec::with_capacity(8),
                prefix: 0,
                read: 0,
            },
        };
        Self {
            skip_special_tokens,
            state,
        }
    }

    /// The text `id` completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        let skip = self.skip_special_tokens;
        match &mut self.state {
            State::Bytes { pending } => {
                let table = tokenizer.byte_table().ok_or_else(mode_mismatch)?;
                if let Some(bytes) = tokenizer.token_bytes_of(table, id, skip)? {
                    pending.extend_from_slice(bytes);
                }
                Ok(take_complete_chars(pending))
            }
            State::Window { ids, prefix, read } => {
                tokenizer.check_id(id)?;
                ids.push(id);
                let prefix_text = tokenizer.decode(&ids[*prefix..*read], skip)?;
                let new_text = tokenizer.decode(&ids[*prefix..], skip)?;
                let held = ids.len() - *read;
                let complete = !new_text.ends_with('\u{FFFD}') || held >= MAX_HELD_TOKENS;
                if new_text.len() <= prefix_text.len() || !complete {
                    return Ok(String::new());
                }
                let delta = new_text
                    .get(prefix_text.len()..)
                    .unwrap_or_default()
                    .to_string();
                *prefix = *read;
                *read = ids.len();
                // Only the context window is ever read again: keep the window O(1).
                ids.drain(..*prefix);
                *read -= *prefix;
                *prefix = 0;
                Ok(delta)
            }
        }
    }

    /// The text still held back (an unfinished character reads as U+FFFD). Call once, when
    /// the sequence ends.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        match &mut self.state {
            State::Bytes { pending } => {
                let text = String::from_utf8_lossy(pending).into_owned();
                pending.clear();
                Ok(text)
            }
            State::Window { ids, prefix, read } => {
                if *read == ids.len() {
                    return Ok(String::new());
                }
                let prefix_text =
                    tokenizer.decode(&ids[*prefix..*read], self.skip_special_tokens)?;
                let new_text = tokenizer.decode(&ids[*prefix..], self.skip_special_tokens)?;
                *prefix = ids.len();
                *read = ids.len();
                Ok(new_text
                    .get(prefix_text.len()..)
                    .unwrap_or_default()
                    .to_string())
            }
        }
    }
}

fn mode_mismatch() -> TokenizerError {
    TokenizerError::Decode(
        "this detokenizer was created for a byte-level tokenizer and fed another".into(),
    )
}

/// Emits every complete character of `pending` (invalid bytes as U+FFFD) and keeps only the
/// start of an unfinished one.
fn take_complete_chars(pending: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&pending[start..]) {
            Ok(text) => {
                out.push_str(text);
                start = pending.len();
                break;
            }
            Err(err) => {
                let valid_end = start + err.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&pending[start..valid_end]));
                match err.error_len() {
                    // An unfinished character at the end: wait for its next bytes.
                    None => {
                        start = valid_end;
                        break;
                    }
                    Some(len) => {
                        out.push('\u{FFFD}');
                        start = valid_end + len;
                    }
                }
            }
        }
    }
    pending.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::take_complete_chars;

    fn feed(chunks: &[&[u8]]) -> String {
        let mut pending = Vec::new();
        let mut out = String::new();
        for chunk in chunks {
            pending.extend_from_slice(chunk);
            let delta = take_complete_chars(&mut pending);
            assert!(pending.len() <= 3, "holds at most an unfinished character");
            out.push_str(&delta);
        }
        out.push_str(&String::from_utf8_lossy(&pending));
        out
    }

    #[test]
    fn split_characters_are_held_until_complete() {
        let mut pending = b"a\xF0\x9F".to_vec();
        assert_eq!(take_complete_chars(&mut pending), "a");
        pending.extend_from_slice(b"\x98\x80b");
        assert_eq!(take_complete_chars(&mut pending), "😀b");
        assert!(pending.is_empty());
    }

    #[test]
    fn chunked_lossy_decoding_matches_whole_lossy_decoding() {
        let cases: &[&[&[u8]]] = &[
            &[b"\xF0\x9F", b"a"],
            &[b"\x80", b"\xE2\x82", b"\xAC", b"\xFF"],
            &[b"\xE2", b"\x82", b"x", b"\xF0\x9F\x98"],
            &[b"\xED\xA0", b"\x80"],
            &[b"\xC3", b"\xA9\xC3"],
        ];
        for chunks in cases {
            let whole: Vec<u8> = chunks.concat();
            assert_eq!(feed(chunks), String::from_utf8_lossy(&whole), "{chunks:?}");
        }
    }
}
