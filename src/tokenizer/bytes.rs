//! The GPT-2 byte-level alphabet and a flat per-id byte table.
//!
//! Byte-level BPE vocabularies spell every byte as one printable char: bytes that are already
//! printable (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves, the other 68 map in order to
//! U+0100, U+0101, ... (so a space is `Ġ`, U+0120). A token's bytes are its chars read back
//! through that table; a token with a char outside it (an added token written as raw text,
//! such as a user-defined `hello world`) is its raw UTF-8, the rule `tokenizers`' `ByteLevel`
//! decoder follows, so that `decode` here and there agree.

/// The char that stands for each byte.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            byte as u32
        } else {
            next_extra += 1;
            255 + next_extra
        };
        // Codes are below 0x200, far from the surrogate range: always a valid char.
        table[byte as usize] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// The byte each alphabet char stands for: indexed by code point, `None` outside the alphabet.
fn char_to_byte() -> Vec<Option<u8>> {
    let mut table = vec![None; 0x200];
    for (byte, c) in byte_to_char().iter().enumerate() {
        table[*c as usize] = Some(byte as u8);
    }
    table
}

/// The bytes of every id, stored flat: `data[offsets[id]..offsets[id + 1]]`.
pub(crate) struct TokenBytes {
    offsets: Vec<u32>,
    data: Vec<u8>,
}

impl TokenBytes {
    /// Reads each token through the byte-level alphabet.
    pub fn byte_level(tokens: &[String]) -> Self {
        let table = char_to_byte();
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        let mut data = Vec::with_capacity(tokens.iter().map(String::len).sum());
        offsets.push(0);
        for token in tokens {
            let mapped: Option<Vec<u8>> = token
                .chars()
                .map(|c| table.get(c as usize).copied().flatten())
                .collect();
            match mapped {
                Some(bytes) => data.extend_from_slice(&bytes),
                None => data.extend_from_slice(token.as_bytes()),
            }
            offsets.push(data.len() as u32);
        }
        Self { offsets, data }
    }

    /// The bytes of `id`; the caller has checked `id < number of tokens`.
    pub fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&start), Some(&end)) => &self.data[start as usize..end as usize],
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_a_bijection_with_the_known_anchors() {
        let table = byte_to_char();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[0xAD], 'Ń');
        let mut seen: Vec<char> = table.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn tokens_read_back_to_bytes_and_raw_text_stays_raw() {
        let tokens = vec![
            "Ġhello".to_string(),
            "<|im_end|>".to_string(),
            "raw text".to_string(),
            "ðŁĺ".to_string(),
        ];
        let table = TokenBytes::byte_level(&tokens);
        assert_eq!(table.get(0), b" hello");
        assert_eq!(table.get(1), b"<|im_end|>");
        assert_eq!(table.get(2), b"raw text");
        assert_eq!(table.get(3), &[0xF0, 0x9F, 0x98]);
        assert_eq!(table.get(4), b"");
    }
}
