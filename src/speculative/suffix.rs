//! Suffix drafts across requests (`method: "suffix"`): recent finished sequences (prompt and
//! output) are indexed by every `key_len`-token window, so a sequence whose last tokens
//! occurred in an earlier request (the same tool call, the same document, the same JSON
//! skeleton) drafts what followed there. Agent and extraction traffic repeats itself across
//! requests far more than within one.

use std::collections::{HashMap, VecDeque};

use super::ngram::common_suffix;

/// Tokens of one sequence that are indexed, at most (its last ones are dropped).
const MAX_INDEXED_TOKENS: usize = 8192;
/// Occurrences of a key checked per lookup, newest first.
const MAX_CANDIDATES: usize = 64;

/// The recent sequences and where each window of theirs ends.
#[derive(Debug)]
pub struct SuffixIndex {
    key_len: usize,
    max_docs: usize,
    /// Indexed sequences, oldest first; `docs[i]` has id `first_id + i`.
    docs: VecDeque<Vec<u32>>,
    first_id: u64,
    /// Hash of a window → `(doc id, index of the window's last token)`, oldest first.
    windows: HashMap<u64, Vec<(u64, u32)>>,
}

fn window_hash(w: &[u32]) -> u64 {
    // FNV-1a over the ids: collisions are harmless (a lookup compares the tokens).
    w.iter().fold(0xcbf2_9ce4_8422_2325, |h, &t| {
        (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SuffixIndex {
    /// Windows of `key_len` tokens (at least 1); the `max_docs` latest sequences kept.
    pub fn new(key_len: usize, max_docs: usize) -> Self {
        Self {
            key_len: key_len.max(1),
            max_docs,
            docs: VecDeque::new(),
            first_id: 0,
            windows: HashMap::new(),
        }
    }

    /// Indexes a finished sequence's tokens, forgetting the oldest beyond `max_docs`.
    pub fn add(&mut self, tokens: &[u32]) {
        if self.max_docs == 0 || tokens.len() <= self.key_len {
            return;
        }
        let doc = tokens[..tokens.len().min(MAX_INDEXED_TOKENS)].to_vec();
        let id = self.first_id + self.docs.len() as u64;
        // Windows followed by at least one token: there is something to propose after them.
        for end in self.key_len - 1..doc.len() - 1 {
            let key = window_hash(&doc[end + 1 - self.key_len..=end]);
            self.windows.entry(key).or_default().push((id, end as u32));
        }
        self.docs.push_back(doc);
        while self.docs.len() > self.max_docs {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        let Some(doc) = self.docs.pop_front() else {
            return;
        };
        let id = self.first_id;
        self.first_id += 1;
        for end in self.key_len - 1..doc.len() - 1 {
            let key = window_hash(&doc[end + 1 - self.key_len..=end]);
            if let Some(list) = self.windows.get_mut(&key) {
                // Oldest first: the forgotten doc's entries lead.
                let n = list.iter().take_while(|(d, _)| *d == id).count();
                list.drain(..n);
                if list.is_empty() {
                    self.windows.remove(&key);
                }
            }
        }
    }

    /// The longest match (`key_len..=max` tokens) of the end of `tokens` in the indexed
    /// sequences, newest first among equals, and up to `k` tokens that followed it.
    pub fn lookup(&self, tokens: &[u32], max: usize, k: usize) -> Option<(usize, &[u32])> {
        let n = tokens.len();
        if n < self.key_len || k == 0 {
            return None;
        }
        let key = &tokens[n - self.key_len..];
        let list = self.windows.get(&window_hash(key))?;
        let mut best: Option<(usize, &[u32], usize)> = None;
        for &(id, end) in list.iter().rev().take(MAX_CANDIDATES) {
            let doc = &self.docs[(id - self.first_id) as usize];
            let end = end as usize;
            let len = common_suffix(&doc[..=end], tokens, max);
            if len >= self.key_len && best.is_none_or(|(l, _, _)| len > l) {
                best = Some((len, doc, end));
                if len == max {
                    break;
                }
            }
        }
        best.map(|(len, doc, end)| (len, &doc[end + 1..(end + 1 + k).min(doc.len())]))
    }
}

#[cfg(test)]
mod tests {
    use super::SuffixIndex;

    #[test]
    fn drafts_what_followed_in_an_earlier_sequence() {
        let mut ix = SuffixIndex::new(2, 8);
        ix.add(&[1, 2, 3, 4, 5, 6]);
        ix.add(&[9, 2, 3, 7, 8]);
        // "2 3" ended in both; the newer one wins among equal lengths...
        assert_eq!(ix.lookup(&[0, 2, 3], 4, 2), Some((2, &[7, 8][..])));
        // ...the longer match over it.
        assert_eq!(ix.lookup(&[1, 2, 3], 4, 2), Some((3, &[4, 5][..])));
        assert_eq!(ix.lookup(&[5, 6], 4, 2), None, "nothing followed 5 6");
        assert_eq!(ix.lookup(&[4, 4], 4, 2), None);
    }

    #[test]
    fn forgets_the_oldest_beyond_its_size() {
        let mut ix = SuffixIndex::new(2, 2);
        ix.add(&[1, 2, 3]);
        ix.add(&[4, 5, 6]);
        ix.add(&[7, 8, 9]);
        assert_eq!(ix.docs.len(), 2);
        assert_eq!(ix.lookup(&[1, 2], 4, 1), None);
        assert_eq!(ix.lookup(&[4, 5], 4, 1), Some((2, &[6][..])));
        assert_eq!(ix.lookup(&[7, 8], 4, 1), Some((2, &[9][..])));
        assert_eq!(ix.windows.len(), 2, "the forgotten windows are gone");
    }
}
