//! Hand-written pre-tokenizer splits for the common regex families, as llama.cpp has for its
//! hot paths: the Oniguruma regex `tokenizers` runs costs about 2/3 of an encode, and these
//! scanners give the same pieces in a single pass over the chars.
//!
//! Each function returns pieces that cover the text exactly, in order, the way a sequence of
//! `Split(regex, Isolated)` does: matched spans and the unmatched text between them. The
//! regexes they implement:
//! * [`SplitStyle::Gpt2`]: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
//! * [`SplitStyle::DigitsThenGpt2`]: `\p{N}` isolated first, then GPT-2 in each remaining
//!   run (SmolLM, StarCoder).
//! * [`SplitStyle::Llama3`] / [`SplitStyle::Qwen2`]: case-insensitive contractions,
//!   `[^\r\n\p{L}\p{N}]?\p{L}+`, `\p{N}{1,3}` (Qwen2: `\p{N}`),
//!   ` ?[^\s\p{L}\p{N}]+[\r\n]*`, `\s*[\r\n]+`, `\s+(?!\S)`, `\s+`.
//!
//! Classes: `\s` is `char::is_whitespace` (Unicode `White_Space`, what Oniguruma uses);
//! `\p{L}` and `\p{N}` of non-ASCII chars are decided by Oniguruma itself (std has no
//! general-category test, and its `is_numeric` follows a newer Unicode than Oniguruma's) and
//! memoised per BMP char. The tests hold these scanners to the regexes on random text.

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::LazyLock;

use tokenizers::utils::SysRegex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SplitStyle {
    Gpt2,
    DigitsThenGpt2,
    Llama3,
    Qwen2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

// Letters and numbers are what the reference regexes (Oniguruma, through `tokenizers`) say
// they are: Rust's own Unicode tables are newer (e.g. digits added in Unicode 17 that
// Oniguruma's `\p{N}` does not know), and a split must follow the regex, not the newest table.
static LETTER_RE: LazyLock<Option<SysRegex>> = LazyLock::new(|| SysRegex::new(r"\p{L}").ok());
static NUMBER_RE: LazyLock<Option<SysRegex>> = LazyLock::new(|| SysRegex::new(r"\p{N}").ok());
/// Per BMP char: 0 unknown, else its `Class` + 1.
static BMP_CLASS: [AtomicU8; 0x10000] = [const { AtomicU8::new(0) }; 0x10000];

const CLASSES: [Class; 4] = [Class::Letter, Class::Number, Class::Space, Class::Other];

fn matches(re: &LazyLock<Option<SysRegex>>, c: char) -> bool {
    let mut buf = [0u8; 4];
    let s = c.encode_utf8(&mut buf);
    re.as_ref()
        .is_some_and(|re| re.find_iter(s).next().is_some())
}

fn class_slow(c: char) -> Class {
    if matches(&NUMBER_RE, c) {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else if matches(&LETTER_RE, c) {
        Class::Letter
    } else {
        Class::Other
    }
}

fn class(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r' => Class::Space,
            _ => Class::Other,
        };
    }
    let Some(memo) = BMP_CLASS.get(c as usize) else {
        return class_slow(c);
    };
    match memo.load(Ordering::Relaxed) {
        0 => {
            let class = class_slow(c);
            let code = CLASSES.iter().position(|&k| k == class).unwrap_or(3);
            memo.store(code as u8 + 1, Ordering::Relaxed);
            class
        }
        code => CLASSES[(code as usize - 1).min(3)],
    }
}

/// The chars of a text with their classes; `offsets[i]` is char `i`'s byte offset and
/// `offsets[len]` the text's length.
struct Scan {
    chars: Vec<char>,
    classes: Vec<Class>,
    offsets: Vec<usize>,
}

impl Scan {
    fn new(text: &str) -> Self {
        let n = text.len();
        let mut scan = Self {
            chars: Vec::with_capacity(n),
            classes: Vec::with_capacity(n),
            offsets: Vec::with_capacity(n + 1),
        };
        for (at, c) in text.char_indices() {
            scan.chars.push(c);
            scan.classes.push(class(c));
            scan.offsets.push(at);
        }
        scan.offsets.push(n);
        scan
    }

    /// The end of the run of `class` starting at `i`, within `end`, at most `max` chars.
    fn run(&self, i: usize, end: usize, class: Class, max: usize) -> usize {
        let mut j = i;
        while j < end && j - i < max && self.classes[j] == class {
            j += 1;
        }
        j
    }

    /// Length of a contraction (`'s`, `'re`, ...) at `i`, or 0.
    fn contraction(&self, i: usize, end: usize, any_case: bool) -> usize {
        if self.chars[i] != '\'' || i + 1 >= end {
            return 0;
        }
        let fold = |c: char| if any_case { c.to_ascii_lowercase() } else { c };
        let c1 = fold(self.chars[i + 1]);
        if matches!(c1, 's' | 't' | 'm' | 'd') {
            return 2;
        }
        if i + 2 < end {
            let c2 = fold(self.chars[i + 2]);
            if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                return 3;
            }
        }
        0
    }

    /// Where a whitespace run starting at `i` ends as `\s+(?!\S)` would take it, falling back
    /// to the whole run when it is a single char before a non-space (the text between
    /// matches, or `\s+`).
    fn trailing_space(&self, i: usize, end: usize) -> usize {
        let k = self.run(i, end, Class::Space, usize::MAX);
        if k == end || k - i == 1 {
            k
        } else {
            k - 1
        }
    }

    fn gpt2(&self, start: usize, end: usize, out: &mut Vec<Range<usize>>) {
        let mut i = start;
        while i < end {
            let contraction = self.contraction(i, end, false);
            let next = if contraction > 0 {
                i + contraction
            } else {
                // ` ?X+` takes one plain space in front of a non-space run.
                let j =
                    if self.chars[i] == ' ' && i + 1 < end && self.classes[i + 1] != Class::Space {
                        i + 1
                    } else {
                        i
                    };
                match self.classes[j] {
                    Class::Space => self.trailing_space(i, end),
                    class => self.run(j, end, class, usize::MAX),
                }
            };
            out.push(self.offsets[i]..self.offsets[next]);
            i = next;
        }
    }

    fn llama3(&self, start: usize, end: usize, max_digits: usize, out: &mut Vec<Range<usize>>) {
        let is_newline = |c: char| c == '\r' || c == '\n';
        let mut i = start;
        while i < end {
            let c = self.chars[i];
            let class = self.classes[i];
            let contraction = self.contraction(i, end, true);
            let next = if contraction > 0 {
                i + contraction
            } else if class == Class::Letter {
                self.run(i, end, Class::Letter, usize::MAX)
            } else if class != Class::Number
                && !is_newline(c)
                && i + 1 < end
                && self.classes[i + 1] == Class::Letter
            {
                // `[^\r\n\p{L}\p{N}]?\p{L}+`
                self.run(i + 1, end, Class::Letter, usize::MAX)
            } else if class == Class::Number {
                self.run(i, end, Class::Number, max_digits)
            } else if class == Class::Other
                || (c == ' ' && i + 1 < end && self.classes[i + 1] == Class::Other)
            {
                // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
                let j = if class == Class::Other { i } else { i + 1 };
                let mut k = self.run(j, end, Class::Other, usize::MAX);
                while k < end && is_newline(self.chars[k]) {
                    k += 1;
                }
                k
            } else {
                // Whitespace: `\s*[\r\n]+` up to the run's last newline, else `\s+(?!\S)`/`\s+`.
                let k = self.run(i, end, Class::Space, usize::MAX);
                match (i..k).rev().find(|&p| is_newline(self.chars[p])) {
                    Some(p) => p + 1,
                    None => self.trailing_space(i, end),
                }
            };
            out.push(self.offsets[i]..self.offsets[next]);
            i = next;
        }
    }
}

/// Appends to `out` the byte ranges of the pieces of `text`.
pub(crate) fn split(style: SplitStyle, text: &str, out: &mut Vec<Range<usize>>) {
    let scan = Scan::new(text);
    let n = scan.chars.len();
    match style {
        SplitStyle::Gpt2 => scan.gpt2(0, n, out),
        SplitStyle::Llama3 => scan.llama3(0, n, 3, out),
        SplitStyle::Qwen2 => scan.llama3(0, n, 1, out),
        SplitStyle::DigitsThenGpt2 => {
            let mut i = 0;
            while i < n {
                if scan.classes[i] == Class::Number {
                    out.push(scan.offsets[i]..scan.offsets[i + 1]);
                    i += 1;
                } else {
                    let mut j = i;
                    while j < n && scan.classes[j] != Class::Number {
                        j += 1;
                    }
                    scan.gpt2(i, j, out);
                    i = j;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
