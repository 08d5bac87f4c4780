//! `serve`'s models: the registry's flags, the models they name, and the loader that turns a
//! version's source (a path and `serve` flags) into a running engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use super::engine_args::EngineArgs;
use super::model_args::{Loaded, ModelArgs, WithLoaded};
use crate::kernels::cpu::CpuNumerics;
use crate::kernels::Backend;
use crate::model::config::ModelConfig as Architecture;
use crate::model::loader::{LoadFormat, ModelSpec};
use crate::registry::{
    self, Budget, MemoryCharge, ModelConfig, ModelLoader, ModelRegistry, ModelSource,
    RegistryError, RegistryOptions, ServedModel,
};

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// A TOML file naming models, their versions, sources and engine flags
    /// (docs/models.md); with `--model`, both sets are served.
    #[arg(long, value_name = "FILE")]
    pub models: Option<PathBuf>,
    /// Required as `Authorization: Bearer KEY` on `/admin/*`; without it the admin API is off.
    /// The user API key does not open it.
    #[arg(long, env = "SLUICE_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// Most models loaded at once; to load another, the least recently used idle one is
    /// unloaded (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub models_max: usize,
    /// A request for a model that is not loaded loads it (else a 404 that says so).
    #[arg(long)]
    pub autoload: bool,
    /// Bytes every loaded version may hold together, weights and KV caches (default: 90% of
    /// the memory available at start-up).
    #[arg(long)]
    pub memory_budget: Option<u64>,
    /// A version swapped out drains and unloads, instead of staying loaded for an instant
    /// rollback.
    #[arg(long)]
    pub unload_previous: bool,
    /// Where the live version of each model is saved, so it survives a restart.
    #[arg(long, value_name = "FILE")]
    pub registry_state: Option<PathBuf>,
    /// Seconds a new version has to answer its warm-up request before it counts as failed.
    #[arg(long, default_value_t = 60.0)]
    pub warm_up_timeout: f64,
}

impl Default for RegistryArgs {
    /// One model, no admin API, no state file (`sluice batch run`).
    fn default() -> Self {
        Self {
            models: None,
            admin_api_key: None,
            models_max: 0,
            autoload: false,
            memory_budget: None,
            unload_previous: false,
            registry_state: None,
            warm_up_timeout: 60.0,
        }
    }
}

/// The command line after the subcommand word `after` (`serve`, `run`): the flags every
/// version loads with are taken from it.
pub fn command_args(after: &str) -> Vec<String> {
    std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .skip_while(|a| a != after)
        .skip(1)
        .collect()
}

/// A version's flags: the server's own, then the version's `args` (a flag given in both
/// takes the version's value).
#[derive(Debug, Clone, Parser)]
#[command(no_binary_name = true, args_override_self = true)]
pub struct VersionFlags {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl VersionFlags {
    /// Of `serve`'s arguments, the ones a version takes (model and engine flags, with their
    /// values), without `--model`: a version names its own source.
    pub fn from_serve_args(serve_args: &[String]) -> Vec<String> {
        let command = <Self as clap::CommandFactory>::command();
        let mut out = Vec::new();
        let mut args = serve_args.iter();
        while let Some(a) = args.next() {
            let Some(flag) = a.strip_prefix("--") else {
                continue;
            };
            let (name, inline_value) = match flag.split_once('=') {
                Some((n, _)) => (n, true),
                None => (flag, false),
            };
            let Some(arg) = command.get_arguments().find(|x| x.get_long() == Some(name)) else {
                // A `serve` flag of its own; its value (if any) is skipped as a non-flag.
                continue;
            };
            let takes_value = arg.get_action().takes_values();
            let value = (takes_value && !inline_value)
                .then(|| args.next())
                .flatten();
            if name != "model" {
                out.push(a.clone());
                out.extend(value.cloned());
            }
        }
        out
    }

    /// `base` (from `from_serve_args`), the version's source and its own args.
    pub fn for_version(base: &[String], source: &ModelSource) -> Result<Self, clap::Error> {
        let model = source
            .path
            .iter()
            .flat_map(|p| ["--model".to_string(), p.to_string_lossy().into_owned()]);
        Self::try_parse_from(
            base.iter()
                .cloned()
                .chain(model)
                .chain(source.args.iter().cloned()),
        )
    }
}

/// Builds the registry `serve` runs: the models of `--model` (the default model when there
/// are none and no `--models` file), then those of the file. `serve_args` are `serve`'s
/// command-line arguments, which every version loads with (before its own).
pub fn registry(
    base: VersionFlags,
    serve_args: &[String],
    args: &RegistryArgs,
    served_model_name: Option<String>,
) -> anyhow::Result<Arc<ModelRegistry>> {
    let mut models = Vec::new();
    let flags: Vec<String> = base.model.model.clone();
    if flags.is_empty() && args.models.is_none() {
        models.push(cli_model(&base, None, served_model_name.clone())?);
    }
    for flag in &flags {
        let (name, path) = registry::parse_model_flag(flag);
        let name = name.or_else(|| {
            (flags.len() == 1)
                .then(|| served_model_name.clone())
                .flatten()
        });
        models.push(cli_model(&base, Some(path), name)?);
    }
    if let Some(file) = &args.models {
        models.extend(registry::read_models_file(file)?);
    }
    let options = RegistryOptions {
        models_max: args.models_max,
        autoload: args.autoload,
        memory_budget: args
            .memory_budget
            .unwrap_or_else(|| super::engine_args::available_memory().unwrap_or(8 << 30) / 10 * 9),
        keep_previous: !args.unload_previous,
        state_file: args.registry_state.clone(),
        warm_up_timeout: Duration::from_secs_f64(args.warm_up_timeout.clamp(0.001, 1e6)),
    };
    let base = VersionFlags::from_serve_args(serve_args);
    VersionFlags::for_version(&base, &ModelSource::default())
        .context("the model and engine flags")?;
    let loader = Arc::new(CliLoader { base });
    Ok(Arc::new(ModelRegistry::new(loader, options, models)?))
}

/// A model from `--model [NAME=]PATH` (or the default model): one version, `1`.
fn cli_model(
    base: &VersionFlags,
    path: Option<PathBuf>,
    name: Option<String>,
) -> anyhow::Result<ModelConfig> {
    let name = match name {
        Some(n) => n,
        None => match &path {
            Some(p) => base.model.default_name(p),
            None => crate::assets::SERVED_NAME.to_string(),
        },
    };
    registry::check_name("model name", &name)?;
    let version = registry::FIRST_VERSION.to_string();
    Ok(ModelConfig {
        name,
        versions: [(
            version.clone(),
            ModelSource {
                path,
                args: Vec::new(),
            },
        )]
        .into(),
        live: version,
        traffic: Default::default(),
    })
}

/// Loads versions with the server's flags, then each version's own.
struct CliLoader {
    base: Vec<String>,
}

impl ModelLoader for CliLoader {
    fn load(
        &self,
        name: &str,
        version: &str,
        source: &ModelSource,
        budget: &Budget,
    ) -> Result<ServedModel, RegistryError> {
        let failed = |reason: String| RegistryError::LoadFailed {
            model: name.to_string(),
            version: version.to_string(),
            reason,
        };
        let flags = VersionFlags::for_version(&self.base, source)
            .map_err(|e| failed(format!("its flags: {}", e.render().to_string().trim())))?;
        let work = SpawnVersion {
            name,
            version,
            source,
            budget,
            engine: flags.engine,
            numerics: flags.model.cpu_numerics,
            dummy_bytes: (flags.model.load_format == LoadFormat::Dummy)
                .then(|| crate::kernels::dtype::WeightDType::from(flags.model.dummy_dtype))
                .map(|d| (d.block_bytes() / d.block_len().max(1)) as u64),
        };
        flags
            .model
            .load_and(work)
            .map_err(|e| match e.downcast::<RegistryError>() {
                Ok(e) => e,
                Err(e) => failed(format!("{e:#}")),
            })
    }
}

struct SpawnVersion<'a> {
    name: &'a str,
    version: &'a str,
    source: &'a ModelSource,
    budget: &'a Budget,
    engine: EngineArgs,
    numerics: CpuNumerics,
    /// Bytes per parameter of dummy weights (none: weights from files).
    dummy_bytes: Option<u64>,
}

impl WithLoaded for SpawnVersion<'_> {
    type Output = ServedModel;
    fn run<B: Backend>(self, loaded: Loaded<B>) -> anyhow::Result<ServedModel> {
        let kv_dtype = Backend::kv_cache_dtype(loaded.model.ranks[0].backend());
        let mut config = self.engine.engine_config(&loaded.model.config, kv_dtype)?;
        if self.numerics == CpuNumerics::Ggml && config.cache.enable_prefix_caching {
            // llama.cpp attends from a prompt token with one of two kernels, chosen by its
            // prompt's length; a prefix cached by another prompt may have taken the other.
            config.cache.enable_prefix_caching = false;
            tracing::info!("--cpu-numerics ggml: prefix caching off (see docs/ARCHITECTURE.md)");
        }
        let arch = &loaded.model.config;
        let kv_bytes = |arch: &Architecture| {
            (config.cache.num_blocks * config.cache.block_size * arch.kv_bytes_per_token(kv_dtype))
                as u64
        };
        let mut charge = MemoryCharge {
            weights_bytes: weights_bytes(self.source.path.as_deref(), self.dummy_bytes, arch),
            kv_cache_bytes: kv_bytes(arch),
        };
        // A draft model's weights and its KV pool (as many blocks as the target's) count too.
        if let Some(path) = config.speculative.as_ref().and_then(|s| s.model.as_deref()) {
            let draft = crate::model::loader::open(&ModelSpec::stored(path))
                .with_context(|| format!("draft model {}", path.display()))?;
            charge.weights_bytes += weights_bytes(Some(path), None, &draft.config);
            charge.kv_cache_bytes += kv_bytes(&draft.config);
        }
        self.budget.check(self.name, self.version, charge)?;
        let options = self.engine.engine_options(loaded.device)?;
        let tokenizer = loaded.tokenizer;
        let engine = crate::engine::spawn_with(loaded.model, tokenizer.clone(), config, options)
            .context("starting the engine")?;
        // A GPU's utilisation, memory and power, sampled when `/metrics` is scraped.
        let gauges = crate::kernels::device_gauges(loaded.device, &engine.metrics.registry);
        let served = ServedModel::new(
            self.name.to_string(),
            self.version.to_string(),
            engine,
            tokenizer,
            self.source.clone(),
            charge,
        );
        Ok(served.with_gauge_sampler(
            gauges.map(|g| -> registry::GaugeSampler { Arc::new(move || g.update()) }),
        ))
    }
}

/// What the weights hold in memory: their files' size (GGUF, safetensors), or for dummy
/// weights (`dummy_bytes` per parameter) their parameters.
fn weights_bytes(path: Option<&Path>, dummy_bytes: Option<u64>, arch: &Architecture) -> u64 {
    let on_disk = |p: &Path| -> Option<u64> {
        let meta = std::fs::metadata(p).ok()?;
        if meta.is_file() {
            return Some(meta.len());
        }
        let files = std::fs::read_dir(p).ok()?;
        Some(
            files
                .filter_map(Result::ok)
                .filter(|f| f.path().extension().is_some_and(|e| e == "safetensors"))
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum(),
        )
    };
    let (h, i) = (arch.hidden_size as u64, arch.intermediate_size as u64);
    let kv = (arch.num_kv_heads * arch.head_dim) as u64;
    let q = (arch.num_heads * arch.head_dim) as u64;
    let embeddings = arch.vocab_size as u64 * h * if arch.tie_word_embeddings { 1 } else { 2 };
    let params = embeddings + arch.num_layers as u64 * (h * (2 * q + 2 * kv) + 3 * h * i);
    match (dummy_bytes, path.and_then(on_disk)) {
        (None, Some(b)) if b > 0 => b,
        (d, _) => params * d.unwrap_or(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_version_loads_with_the_servers_flags_then_its_own() {
        let serve = strings(&[
            "--port",
            "0",
            "--max-num-seqs",
            "3",
            "--model",
            "a=x.gguf",
            "--threads=1",
            "--no-prefix-cache",
            "--admin-api-key",
            "k",
        ]);
        let base = VersionFlags::from_serve_args(&serve);
        assert_eq!(
            base,
            strings(&["--max-num-seqs", "3", "--threads=1", "--no-prefix-cache"])
        );
        let source = ModelSource {
            path: Some("/m/v2.gguf".into()),
            args: strings(&["--max-num-seqs", "8", "--kv-cache-memory", "1000"]),
        };
        let flags = VersionFlags::for_version(&base, &source).unwrap();
        assert_eq!(flags.engine.max_num_seqs, 8);
        assert_eq!(flags.engine.kv_cache_memory, Some(1000));
        assert_eq!(flags.model.threads, Some(1));
        assert!(flags.engine.no_prefix_cache);
        assert_eq!(flags.model.model, ["/m/v2.gguf"]);
        let bad = ModelSource {
            path: None,
            args: strings(&["--no-such-flag"]),
        };
        assert!(VersionFlags::for_version(&base, &bad).is_err());
    }
}
