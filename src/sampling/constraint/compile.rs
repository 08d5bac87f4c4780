//! What a request constrains its output to, compiled into a `Constraint`.
//!
//! Blocking and possibly slow (a large schema takes milliseconds to seconds): the API calls
//! `ConstraintCompiler::compile` on the blocking pool under `COMPILE_TIMEOUT`, and
//! llguidance's `ParserLimits` (its defaults: grammar size, lexer states, fuel per mask) bound
//! the work itself, so a pathological schema is refused rather than stalling anything.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::tok_env::SluiceTokEnv;
use super::{Constraint, ConstraintError};
use crate::tokenizer::Tokenizer;

/// Longest a compile may take before the request is refused.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the output must match (OpenAI's `response_format`, vLLM's `structured_outputs`).
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (`json_object`).
    JsonObject,
    /// A JSON document valid against this schema.
    JsonSchema(Value),
    /// Text matching this regex, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar as llguidance reads it (or its JSON grammar list).
    Grammar(String),
}

impl ConstraintSpec {
    /// The llguidance grammar of this spec. JSON is written compactly with one space after
    /// `,` and `:` (no free whitespace: a small model would otherwise fill its budget with
    /// newlines), unless the schema sets its own `x-guidance` options.
    pub fn to_grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        Ok(match self {
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(with_json_style(json!({"type": "object"})))
            }
            Self::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_json_style(schema.clone()))
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err(ConstraintError::Invalid(
                        "choice must list at least one string".into(),
                    ));
                }
                // Lark string literals take JSON's escapes.
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Self::Grammar(g) => TopLevelGrammar::from_lark_or_grammar_list(g)
                .map_err(|e| ConstraintError::Invalid(e.to_string()))?,
        })
    }
}

fn with_json_style(schema: Value) -> Value {
    // `true` (any JSON) as the object form, so that it takes the style too.
    let mut schema = match schema {
        Value::Bool(true) => json!({}),
        s => s,
    };
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// Compiles constraints for one model: the token trie and llguidance's parser factory,
/// built at the first compile (tens to hundreds of milliseconds) and shared after.
pub struct ConstraintCompiler {
    tokenizer: Arc<Tokenizer>,
    factory: OnceLock<Result<ParserFactory, ConstraintError>>,
}

impl ConstraintCompiler {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, ConstraintError> {
        let built = self.factory.get_or_init(|| {
            let env = SluiceTokEnv::build(self.tokenizer.clone())?;
            let mut factory = ParserFactory::new_simple(&env)
                .map_err(|e| ConstraintError::Unsupported(format!("this tokenizer ({e})")))?;
            factory.quiet();
            Ok(factory)
        });
        built.as_ref().map_err(Clone::clone)
    }

    /// Compiles `spec` (blocking; call it off the async runtime and the engine thread).
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        self.compile_grammar(spec.to_grammar()?)
    }

    /// Compiles an llguidance grammar built elsewhere (a tool-call grammar, say).
    pub fn compile_grammar(&self, grammar: TopLevelGrammar) -> Result<Constraint, ConstraintError> {
        let factory = self.factory()?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Invalid(first_line(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        // Some problems (a language with no string in it) show only at the first mask; it is
        // computed here, off the engine thread, and cached for the first step.
        let first = matcher.compute_mask();
        if let Some(why) = matcher.get_error() {
            return Err(ConstraintError::Invalid(first_line(&why)));
        }
        if first.is_ok_and(|m| m.is_zero()) {
            return Err(ConstraintError::Invalid(
                "the grammar allows no output".into(),
            ));
        }
        let trie = factory.tok_env().tok_trie();
        Ok(Constraint {
            matcher,
            eos_token_id: trie.eos_token(),
            vocab_size: trie.vocab_size(),
        })
    }
}

/// llguidance's verbose errors append the grammar and parser state: the first line names
/// the problem.
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}
