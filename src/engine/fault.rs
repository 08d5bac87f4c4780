//! Test-only fault injection (feature `fault-injection`, which only the crate's own tests
//! enable): a request whose prompt text contains a marker gets a fault at a chosen point,
//! so tests can check that the fault ends that request alone.
//!
//! Marker: `sluice-fault:<kind>` or `sluice-fault:<kind>@<n>`, where `n` (default 2) is the
//! number of tokens the sequence generates before the fault fires. Kinds:
//!
//! | kind | where | what |
//! | --- | --- | --- |
//! | `nan` | runner | the sequence's logit row becomes NaN |
//! | `inf` | runner | one logit of the row becomes +inf |
//! | `token` | runner | the sampler "returns" an id outside the vocabulary |
//! | `panic` | runner | a panic while sampling the row (fails the whole step) |
//! | `detok` | output stage | the detokenizer fails |
//! | `stop` | output stage | the stop-string stage fails |
//! | `template` | API | the chat template fails (a 400, as `raise_exception` does) |
//! | `template-panic` | API | the template renderer panics (a 500) |
//!
//! Invariant: with the feature off none of this is compiled, and with it on a request without
//! a marker takes exactly the path it takes without the feature.

use crate::tokenizer::Tokenizer;

const MARKER: &str = "sluice-fault:";
const DEFAULT_AFTER: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    NanLogits,
    InfLogits,
    BadToken,
    Panic,
    Detokenize,
    StopString,
    Template,
    TemplatePanic,
}

impl Fault {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "nan" => Self::NanLogits,
            "inf" => Self::InfLogits,
            "token" => Self::BadToken,
            "panic" => Self::Panic,
            "detok" => Self::Detokenize,
            "stop" => Self::StopString,
            "template" => Self::Template,
            "template-panic" => Self::TemplatePanic,
            _ => return None,
        })
    }

    /// Faults the runner applies to a sampled row.
    pub fn is_runner(self) -> bool {
        matches!(
            self,
            Self::NanLogits | Self::InfLogits | Self::BadToken | Self::Panic
        )
    }
}

/// A fault and the number of tokens generated before it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmedFault {
    pub fault: Fault,
    pub after_tokens: usize,
}

/// The first marker in `text`, if any.
pub fn parse(text: &str) -> Option<ArmedFault> {
    let at = text.find(MARKER)?;
    let rest = &text[at + MARKER.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '@'))
        .unwrap_or(rest.len());
    let spec = &rest[..end];
    let (name, after) = match spec.split_once('@') {
        Some((name, n)) => (name, n.parse().ok()?),
        None => (spec, DEFAULT_AFTER),
    };
    Some(ArmedFault {
        fault: Fault::from_name(name)?,
        after_tokens: after,
    })
}

/// The marker in a prompt given as token ids.
pub fn find_in_prompt(tokenizer: &Tokenizer, prompt_token_ids: &[u32]) -> Option<ArmedFault> {
    let text = tokenizer.decode(prompt_token_ids, false).ok()?;
    parse(&text)
}

/// Applies a runner fault to a sampled sequence's logit row (`Panic` panics here).
pub fn corrupt_row(fault: Fault, row: &mut [f32]) {
    match fault {
        Fault::NanLogits => row.fill(f32::NAN),
        Fault::InfLogits => {
            if let Some(x) = row.first_mut() {
                *x = f32::INFINITY;
            }
        }
        Fault::Panic => panic!("injected fault: panic while sampling"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers() {
        assert_eq!(
            parse("hello sluice-fault:nan@5, world"),
            Some(ArmedFault {
                fault: Fault::NanLogits,
                after_tokens: 5
            })
        );
        assert_eq!(
            parse("sluice-fault:template-panic"),
            Some(ArmedFault {
                fault: Fault::TemplatePanic,
                after_tokens: DEFAULT_AFTER
            })
        );
        assert_eq!(parse("sluice-fault:nope"), None);
        assert_eq!(parse("sluice-fault:nan@x"), None);
        assert_eq!(parse("no marker"), None);
    }
}
