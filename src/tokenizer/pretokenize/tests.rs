//! The scanners against the regexes they replace, run by `tokenizers` (Oniguruma).

use proptest::prelude::*;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use super::*;
use crate::tokenizer::gguf::{GPT2, LLAMA3, QWEN2};

fn regexes(style: SplitStyle) -> Vec<&'static str> {
    match style {
        SplitStyle::Gpt2 => vec![GPT2],
        SplitStyle::DigitsThenGpt2 => vec![r"\p{N}", GPT2],
        SplitStyle::Llama3 => vec![LLAMA3],
        SplitStyle::Qwen2 => vec![QWEN2],
    }
}

fn reference(style: SplitStyle, text: &str) -> Vec<Range<usize>> {
    let splits = regexes(style)
        .into_iter()
        .map(|r| {
            let pattern = SplitPattern::Regex(r.to_string());
            let split = Split::new(pattern, SplitDelimiterBehavior::Isolated, false).unwrap();
            PreTokenizerWrapper::Split(split)
        })
        .collect();
    let mut pre = PreTokenizedString::from(text);
    Sequence::new(splits).pre_tokenize(&mut pre).unwrap();
    pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(_, (a, b), _)| a..b)
        .collect()
}

fn fast(style: SplitStyle, text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    split(style, text, &mut out);
    out
}

const STYLES: [SplitStyle; 4] = [
    SplitStyle::Gpt2,
    SplitStyle::DigitsThenGpt2,
    SplitStyle::Llama3,
    SplitStyle::Qwen2,
];

fn assert_same(text: &str) {
    for style in STYLES {
        let pieces = |ranges: Vec<Range<usize>>| -> Vec<&str> {
            ranges.into_iter().map(|r| &text[r]).collect()
        };
        assert_eq!(
            pieces(fast(style, text)),
            pieces(reference(style, text)),
            "{style:?} on {text:?}"
        );
    }
}

#[test]
fn known_texts_split_like_the_regexes() {
    for text in [
        "",
        "Hello, world!",
        "double  space  ",
        "tabs\tand\nnewlines\n\n",
        "  \n  x\r\n\r\ny",
        "'s 't 're 've 'm 'll 'd 'S 'RE '",
        "I'm, you're, they'LL!'s",
        "Numbers 1234567890 and 3.14159 ١٢٣",
        "def f(x):\n    return x ** 2\n",
        "naïve café résumé हिन्दी ǅ Ⅻ ½",
        "emoji 😀🚀👍🏽 ZWJ 👨\u{200d}👩\u{200d}👧",
        "\u{3000}x\u{a0}y\u{85}z\u{1c} w",
        "𝐀𝐁 ab\u{301}c",
    ] {
        assert_same(text);
    }
}

fn text_strategy() -> impl Strategy<Value = String> {
    let pool: Vec<char> = " \n\r\t\u{3000}\u{a0}\u{85}\u{1c}\u{200b}aZsStTrReEvVlLmMdD'1٣Ⅻ½!.-_éж中कि😀\u{301}\u{1d400}"
        .chars()
        .collect();
    let pick = proptest::sample::select(pool);
    let ch = prop_oneof![8 => pick, 1 => any::<char>()];
    proptest::collection::vec(ch, 0..40).prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_texts_split_like_the_regexes(text in text_strategy()) {
        assert_same(&text);
    }
}

/// Chars that Rust's Unicode tables and Oniguruma's classify differently (found by the
/// property test above): the split follows the regex.
#[test]
fn chars_newer_than_the_regex_tables_split_like_the_regexes() {
    assert_same("٣𑷦VV\u{b}lV\u{85}V\u{a0}-жéMd");
    assert_same("x\u{11de6}\u{11de7} 12\u{11de0}");
}
