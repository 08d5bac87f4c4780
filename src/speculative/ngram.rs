//! Prompt-lookup drafts: the tokens that followed the latest earlier occurrence of the
//! sequence's last n-gram.

/// Up to `k` tokens proposed to follow `tokens` (a sequence's prompt and output), with the
/// length of the match they follow: find the longest suffix of `tokens`, of `min..=max`
/// tokens, that occurred earlier (the latest occurrence among equally long ones), and copy
/// what came after it. `None` when nothing matches.
///
/// One backward scan for the last token, extending each hit backwards, so a step costs a
/// pass over the sequence (thousands of compares) per drafting sequence.
pub(super) fn propose_ngram(
    tokens: &[u32],
    min: usize,
    max: usize,
    k: usize,
) -> Option<(usize, &[u32])> {
    let (len, end) = longest_match(tokens, min, max)?;
    Some((len, &tokens[end + 1..(end + 1 + k).min(tokens.len())]))
}

/// The longest suffix of `tokens` (`min..=max` long) that also ends earlier in `tokens`, as
/// `(length, index of that occurrence's last token)`; the latest among equally long ones.
fn longest_match(tokens: &[u32], min: usize, max: usize) -> Option<(usize, usize)> {
    let n = tokens.len();
    if n < 2 || min == 0 {
        return None;
    }
    let last = tokens[n - 1];
    let mut best: Option<(usize, usize)> = None;
    for end in (0..n - 1).rev() {
        if tokens[end] != last {
            continue;
        }
        let len = 1 + common_suffix(&tokens[..end], &tokens[..n - 1], max - 1);
        if len >= min && best.is_none_or(|(l, _)| len > l) {
            best = Some((len, end));
            if len == max {
                break;
            }
        }
    }
    best
}

/// How many tokens `a` and `b` share at their ends, at most `max`.
pub(super) fn common_suffix(a: &[u32], b: &[u32], max: usize) -> usize {
    (a.iter().rev())
        .zip(b.iter().rev())
        .take(max)
        .take_while(|(x, y)| x == y)
        .count()
}

#[cfg(test)]
mod tests {
    /// The draft alone (empty when nothing matches).
    fn propose_ngram(tokens: &[u32], min: usize, max: usize, k: usize) -> &[u32] {
        super::propose_ngram(tokens, min, max, k).map_or(&[], |(_, d)| d)
    }

    #[test]
    fn copies_what_followed_the_latest_longest_match() {
        // "a b c d" ... "x b c" -> the 2-gram "b c" matched at 1..=2: propose "d e".
        let t = [1, 2, 3, 4, 5, 9, 2, 3];
        assert_eq!(propose_ngram(&t, 2, 4, 2), &[4, 5]);
        // The longer match wins over a later, shorter one.
        let t = [7, 2, 3, 4, 8, 3, 5, 6, 7, 2, 3];
        assert_eq!(propose_ngram(&t, 2, 4, 3), &[4, 8, 3]);
        // Among equal lengths the latest wins.
        let t = [2, 3, 4, 0, 2, 3, 5, 0, 2, 3];
        assert_eq!(propose_ngram(&t, 2, 2, 1), &[5]);
    }

    #[test]
    fn proposes_nothing_below_min_and_stops_at_the_end() {
        let t = [1, 2, 3, 9, 3];
        assert!(propose_ngram(&t, 2, 4, 4).is_empty());
        assert_eq!(propose_ngram(&t, 1, 4, 4), &[9, 3]);
        // A match right before the suffix proposes up to the end only.
        let t = [5, 5, 5];
        assert_eq!(propose_ngram(&t, 2, 2, 4), &[5]);
        assert!(propose_ngram(&[], 1, 2, 4).is_empty());
        assert!(propose_ngram(&[3], 1, 2, 4).is_empty());
    }
}
