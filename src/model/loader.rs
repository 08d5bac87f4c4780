//! Opening a model: detecting its format (GGUF file, Hugging Face directory, or dummy weights
//! for a config) and producing its config and weight source.

use std::path::{Path, PathBuf};

use super::config::ModelConfig;
use super::quantize::{Quantization, QuantizeAtLoad};
use super::safetensors_dir::SafetensorsDir;
use super::weights::{DummyWeights, WeightSource};
use super::ModelError;
use crate::gguf::GgufFile;
use crate::kernels::dtype::WeightDType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoadFormat {
    /// GGUF for a file, Hugging Face safetensors for a directory.
    #[default]
    Auto,
    Gguf,
    Safetensors,
    /// Random weights at the shape of the given `config.json` (or directory holding one).
    Dummy,
}

/// What the user asked to load.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub path: PathBuf,
    pub load_format: LoadFormat,
    /// Storage type of dummy weights.
    pub dummy_dtype: WeightDType,
    pub dummy_seed: u64,
    /// Quantize float weights to this block type as they load (`--quantization`).
    pub quantization: Option<Quantization>,
}

impl ModelSpec {
    /// The model at `path` as stored (GGUF or safetensors by what it is; no quantization).
    pub fn stored(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            load_format: LoadFormat::Auto,
            dummy_dtype: WeightDType::F32,
            dummy_seed: 0,
            quantization: None,
        }
    }
}

/// An opened model: its config, its weights, and where its tokenizer lives.
pub struct OpenedModel {
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer_source: TokenizerSource,
    /// A name for logs and `/v1/models`: the file or directory name, without `.gguf`.
    pub name: String,
}

#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// The GGUF file's own metadata.
    Gguf(PathBuf),
    /// A Hugging Face directory with `tokenizer.json`.
    HfDir(PathBuf),
    /// None next to the weights (a bare dummy `config.json`).
    Missing,
}

pub fn open(spec: &ModelSpec) -> Result<OpenedModel, ModelError> {
    let mut opened = open_as_stored(spec)?;
    if let Some(q) = spec.quantization {
        opened.weights = Box::new(QuantizeAtLoad::new(opened.weights, q));
    }
    Ok(opened)
}

fn open_as_stored(spec: &ModelSpec) -> Result<OpenedModel, ModelError> {
    let path = &spec.path;
    let meta =
        std::fs::metadata(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().trim_end_matches(".gguf").to_string(),
    );
    let format = match spec.load_format {
        LoadFormat::Auto if meta.is_dir() => LoadFormat::Safetensors,
        LoadFormat::Auto => LoadFormat::Gguf,
        f => f,
    };
    match format {
        LoadFormat::Gguf => {
            let f = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&f)?;
            Ok(OpenedModel {
                config,
                weights: Box::new(f),
                tokenizer_source: TokenizerSource::Gguf(path.clone()),
                name,
            })
        }
        LoadFormat::Safetensors => {
            let config = ModelConfig::from_hf_config(&path.join("config.json"))?;
            let weights = SafetensorsDir::open(path, &config)?;
            Ok(OpenedModel {
                config,
                weights: Box::new(weights),
                tokenizer_source: TokenizerSource::HfDir(path.clone()),
                name,
            })
        }
        LoadFormat::Dummy => {
            let (config_path, dir) = if meta.is_dir() {
                (path.join("config.json"), Some(path.as_path()))
            } else {
                (path.clone(), path.parent())
            };
            let config = ModelConfig::from_hf_config(&config_path)?;
            let tokenizer_source = match dir {
                Some(d) if d.join("tokenizer.json").is_file() => {
                    TokenizerSource::HfDir(d.to_path_buf())
                }
                _ => TokenizerSource::Missing,
            };
            let weights = DummyWeights::new(config.clone(), spec.dummy_dtype, spec.dummy_seed)?;
            Ok(OpenedModel {
                config,
                weights: Box::new(weights),
                tokenizer_source,
                name: format!("dummy-{name}"),
            })
        }
        LoadFormat::Auto => unreachable!("resolved above"),
    }
}
