//! Test-only fault injection: a request whose prompt text contains a marker gets a fault at a
//! chosen point, so tests can check that the fault ends that request alone.
//!
//! Two locks keep it from clients. The markers are honoured only by an engine handed a
//! [`FaultInjection`] value, which `serve --enable-fault-injection` (the tests' flag) makes;
//! without it no prompt is even searched for a marker. And only a binary built with the
//! `fault-injection` feature (on by default, so that `cargo build` and `cargo test` build the
//! same binary) can make one: built without it, the flag is refused.
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
//! | `stall` | runner | sampling the row sleeps `STALL` once (a wedged step, for `/health`) |
//! | `detok` | output stage | the detokenizer fails |
//! | `stop` | output stage | the stop-string stage fails |
//! | `template` | API | the chat template fails (a 400, as `raise_exception` does) |
//! | `template-panic` | API | the template renderer panics (a 500) |
//! | `handler-panic` | API | the chat handler itself panics (the catch-panic layer's 500) |
//!
//! Invariant: without a `FaultInjection` value, and with one for a request without a marker,
//! every request takes exactly the path it takes in a binary built without the feature.

use crate::sampling::Corruption;
use crate::tokenizer::Tokenizer;

const MARKER: &str = "sluice-fault:";

/// The switch that lets markers fire, handed to the engine (`EngineOptions`) and from there to
/// the API (`EngineInfo`). Only [`FaultInjection::enable`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultInjection {
    _private: (),
}

/// Asked for fault injection from a binary built without it.
#[derive(Debug, thiserror::Error)]
#[error(
    "fault injection is not built into this binary (the `fault-injection` feature is off); \
     it exists only for sluice's own tests"
)]
pub struct FaultInjectionUnavailable;

impl FaultInjection {
    /// The switch, in a binary built with the `fault-injection` feature.
    pub fn enable() -> Result<Self, FaultInjectionUnavailable> {
        if cfg!(feature = "fault-injection") {
            Ok(Self { _private: () })
        } else {
            Err(FaultInjectionUnavailable)
        }
    }

    /// Panics when `text` carries the `handler-panic` marker: a bug in a request handler,
    /// which the API's catch-panic layer must turn into a 500.
    pub fn in_handler(self, text: &str) {
        if parse(text).is_some_and(|f| f.fault == Fault::HandlerPanic) {
            panic!("injected fault: a request handler panicked");
        }
    }

    /// The marker in a prompt given as token ids.
    pub fn find_in_prompt(self, tokenizer: &Tokenizer, prompt: &[u32]) -> Option<ArmedFault> {
        let text = tokenizer.decode(prompt, false).ok()?;
        parse(&text)
    }
}
const DEFAULT_AFTER: usize = 2;
/// How long a `stall` holds its step.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    NanLogits,
    InfLogits,
    BadToken,
    Panic,
    Stall,
    Detokenize,
    StopString,
    Template,
    TemplatePanic,
    HandlerPanic,
}

impl Fault {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "nan" => Self::NanLogits,
            "inf" => Self::InfLogits,
            "token" => Self::BadToken,
            "panic" => Self::Panic,
            "stall" => Self::Stall,
            "detok" => Self::Detokenize,
            "stop" => Self::StopString,
            "template" => Self::Template,
            "template-panic" => Self::TemplatePanic,
            "handler-panic" => Self::HandlerPanic,
            _ => return None,
        })
    }

    /// Faults the runner applies to a sampled row.
    pub fn is_runner(self) -> bool {
        self.corruption().is_some()
    }
}

/// A fault and the number of tokens generated before it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmedFault {
    pub fault: Fault,
    pub after_tokens: usize,
}

impl ArmedFault {
    /// The error an output-stage fault produces once the sequence has generated
    /// `num_generated` tokens (this one included).
    pub fn output_error(self, num_generated: usize) -> Option<String> {
        if num_generated <= self.after_tokens {
            return None;
        }
        match self.fault {
            Fault::Detokenize => Some("detokenization failed: injected fault".into()),
            Fault::StopString => Some("stop-string matching failed: injected fault".into()),
            _ => None,
        }
    }
}

/// The first marker in `text`, if any. Callers hold a `FaultInjection`.
pub(crate) fn parse(text: &str) -> Option<ArmedFault> {
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

impl Fault {
    /// What a runner fault does to the sequence's draw (`None` for faults elsewhere).
    pub fn corruption(self) -> Option<Corruption> {
        Some(match self {
            Fault::NanLogits => Corruption::NanLogits,
            Fault::InfLogits => Corruption::InfLogit,
            Fault::BadToken => Corruption::TokenOutsideVocabulary,
            Fault::Panic => Corruption::Panic,
            Fault::Stall => Corruption::Stall(STALL),
            _ => return None,
        })
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

    #[test]
    fn only_a_binary_built_with_the_feature_can_enable_it() {
        assert_eq!(
            FaultInjection::enable().is_ok(),
            cfg!(feature = "fault-injection")
        );
    }
}
