//! The flags that shape the engine: batch limits, KV-cache size, prefix caching.

use anyhow::Context;

use crate::engine::fault::FaultInjection;
use crate::engine::{EngineConfig, EngineOptions, PoolingType, StepOverlap};
use crate::kernels::device::Device;
use crate::kernels::dtype::KvCacheDtype;
use crate::kv_cache::CacheConfig;
use crate::model::config::ModelConfig;
use crate::scheduler::SchedulerConfig;
use crate::speculative::SpeculativeConfig;

/// `--speculative-config`'s parser (its errors name the key or value at fault).
pub fn parse_speculative_config(json: &str) -> Result<SpeculativeConfig, String> {
    SpeculativeConfig::parse(json).map_err(|e| e.to_string())
}

/// `--speculative-config` with `--speculative-model` folded in: the model alone drafts with
/// `draft_model`'s defaults; with a config, that config's method must be `draft_model` and
/// name no other model.
pub fn speculative_with_model(
    config: Option<&SpeculativeConfig>,
    model: Option<&std::path::Path>,
) -> anyhow::Result<Option<SpeculativeConfig>> {
    use crate::speculative::SpeculativeMethod;
    // A `draft_model` config without a model is the engine's to refuse.
    let Some(model) = model else {
        return Ok(config.cloned());
    };
    let Some(config) = config else {
        let json = serde_json::json!({"method": "draft_model", "model": model});
        return Ok(Some(SpeculativeConfig::parse(&json.to_string())?));
    };
    match (config.method, &config.model) {
        (SpeculativeMethod::DraftModel, None) => {}
        (SpeculativeMethod::DraftModel, Some(_)) => {
            anyhow::bail!(
                "--speculative-model and --speculative-config's \"model\" both name a draft"
            )
        }
        (other, _) => anyhow::bail!(
            "--speculative-model drafts with method draft_model, and --speculative-config \
             asks for {}",
            format!("{other:?}").to_lowercase()
        ),
    }
    let mut config = config.clone();
    config.model = Some(model.to_path_buf());
    Ok(Some(config))
}

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one step (decode tokens and prefill chunks together).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Token slots per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Bytes of KV cache (default: `--kv-cache-fraction` of free memory).
    #[arg(long)]
    pub kv_cache_memory: Option<u64>,
    /// Fraction of the machine's available memory given to the KV cache when
    /// `--kv-cache-memory` is not set.
    #[arg(long, default_value_t = 0.25)]
    pub kv_cache_fraction: f64,
    /// Do not reuse KV blocks across requests with a common prefix.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Do not split long prompts into chunks.
    #[arg(long)]
    pub no_chunked_prefill: bool,
    /// Longest prompt + generation in tokens (default: the model's context length).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most requests waiting to start; more are refused with 429 (0: no limit).
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Plan the next step while the device runs one: `auto` (on for a GPU), `on`, `off`, or
    /// `worker-thread` (the forward pass on a thread of its own: the CPU's test mode).
    #[arg(long, value_enum, default_value_t = OverlapArg::Auto)]
    pub step_overlap: OverlapArg,
    /// Speculative decoding, as JSON in the spirit of vLLM's: `{"method": "ngram",
    /// "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4,
    /// "disable_by_batch_size": 0, "min_acceptance": 0.35}` (all but `method` optional;
    /// method `suffix` drafts from recent finished requests too, and `draft_model` runs the
    /// smaller model at `"model": PATH`).
    /// The output is the same with it on or off (`docs/speculative.md`).
    #[arg(long, value_parser = parse_speculative_config)]
    pub speculative_config: Option<SpeculativeConfig>,
    /// A draft model for speculative decoding (a GGUF file or Hugging Face directory whose
    /// tokenizer is the target's): `--speculative-config '{"method": "draft_model",
    /// "model": PATH}'` in one flag.
    #[arg(long)]
    pub speculative_model: Option<std::path::PathBuf>,
    /// How `/v1/embeddings` pools the model's final hidden states: `last` (the last input
    /// token's, as embedding models built on decoders are trained) or `mean` (over every
    /// input token).
    #[arg(long, default_value = "last")]
    pub pooling_type: PoolingType,
    /// Test-only: honour `sluice-fault:` markers in prompts, which fail chosen requests on
    /// purpose (sluice's reliability tests). Never on a server clients can reach; refused by a
    /// binary built without the `fault-injection` feature.
    #[arg(long)]
    pub enable_fault_injection: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverlapArg {
    Auto,
    On,
    Off,
    WorkerThread,
}

impl EngineArgs {
    /// The engine's options on `device`.
    pub fn engine_options(&self, device: Device) -> anyhow::Result<EngineOptions> {
        let overlap = match (self.step_overlap, device) {
            (OverlapArg::Auto, Device::Cuda(_)) | (OverlapArg::On, _) => StepOverlap::On,
            (OverlapArg::Auto, Device::Cpu) | (OverlapArg::Off, _) => StepOverlap::Off,
            (OverlapArg::WorkerThread, _) => StepOverlap::OnWorkerThread,
        };
        let faults = if self.enable_fault_injection {
            let f = FaultInjection::enable().context("--enable-fault-injection")?;
            tracing::warn!("fault injection is on: prompts with `sluice-fault:` markers fail");
            Some(f)
        } else {
            None
        };
        Ok(EngineOptions { overlap, faults })
    }
}

/// Bytes of memory available to new allocations (Linux `MemAvailable`), if known.
pub(super) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl EngineArgs {
    /// The engine's configuration for `model` with a KV cache of `kv_dtype` (what the
    /// backend's caches store, which sizes its blocks).
    pub fn engine_config(
        &self,
        model: &ModelConfig,
        kv_dtype: KvCacheDtype,
    ) -> anyhow::Result<EngineConfig> {
        let max_model_len = self.max_model_len.unwrap_or(model.max_position_embeddings);
        if max_model_len == 0 || max_model_len > model.max_position_embeddings {
            anyhow::bail!(
                "--max-model-len {max_model_len} must be between 1 and the model's context of {}",
                model.max_position_embeddings
            );
        }
        if self.block_size == 0 || !self.block_size.is_power_of_two() || self.block_size > 256 {
            anyhow::bail!("--block-size must be a power of two up to 256");
        }
        let budget = match self.kv_cache_memory {
            Some(b) => b,
            None => {
                let avail = available_memory().unwrap_or(4 << 30);
                (avail as f64 * self.kv_cache_fraction.clamp(0.0, 0.95)) as u64
            }
        };
        let bytes_per_block = (model.kv_bytes_per_token(kv_dtype) * self.block_size) as u64;
        // Never more blocks than all sequences at full length can use: whole blocks each (a
        // length off a block boundary still takes its last block).
        let useful = (self.max_num_seqs * max_model_len.div_ceil(self.block_size)) as u64 + 1;
        let num_blocks = (budget / bytes_per_block).min(useful) as usize;
        if num_blocks * self.block_size < max_model_len.min(2048) {
            anyhow::bail!(
                "a KV cache of {budget} bytes holds {num_blocks} blocks of {} tokens: too small \
                 (raise --kv-cache-memory or lower --max-model-len)",
                self.block_size
            );
        }
        tracing::info!(
            "KV cache: {num_blocks} blocks of {} tokens, {kv_dtype} ({:.1} MiB)",
            self.block_size,
            (num_blocks as u64 * bytes_per_block) as f64 / (1 << 20) as f64
        );
        Ok(EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                enable_chunked_prefill: !self.no_chunked_prefill,
                ..SchedulerConfig::default()
            },
            cache: CacheConfig {
                block_size: self.block_size,
                num_blocks,
                enable_prefix_caching: !self.no_prefix_cache,
                // The engine's, from its model.
                sliding_window: None,
            },
            max_model_len,
            max_waiting: self.max_waiting,
            speculative: speculative_with_model(
                self.speculative_config.as_ref(),
                self.speculative_model.as_deref(),
            )?,
            pooling: self.pooling_type,
        })
    }
}
