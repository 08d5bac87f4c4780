//! The served model's tokenizer, for generating prompts of exact token lengths: the tokenizer
//! room's `Tokenizer`, from a GGUF file, a `tokenizer.json` (or a directory holding one).

use std::path::{Path, PathBuf};

use super::workload::PromptTokenizer;
use super::BenchError;
use crate::tokenizer::Tokenizer;

/// The default model file, which carries its tokenizer (fetched on first use).
pub fn default_tokenizer_path() -> Result<PathBuf, BenchError> {
    crate::assets::default_model_path().map_err(|e| BenchError::Tokenizer(e.to_string()))
}

/// A GGUF file, a `tokenizer.json`, or a directory holding a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Box<dyn PromptTokenizer>, BenchError> {
    let tok = Tokenizer::from_path(path).map_err(|e| BenchError::Tokenizer(e.to_string()))?;
    Ok(Box::new(tok))
}

impl PromptTokenizer for Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, BenchError> {
        Tokenizer::encode(self, text, false).map_err(|e| BenchError::Tokenizer(e.to_string()))
    }

    fn decode(&self, ids: &[u32]) -> Result<String, BenchError> {
        Tokenizer::decode(self, ids, true).map_err(|e| BenchError::Tokenizer(e.to_string()))
    }

    fn vocab_size(&self) -> usize {
        Tokenizer::vocab_size(self)
    }
}
