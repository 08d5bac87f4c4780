//! `sluice plan`: parse the model, device and workload flags, ask `plan/` for the plan and
//! print it (a table, or `--json`).

use std::path::PathBuf;

use crate::model::loader::{LoadFormat, ModelSpec};
use crate::plan::device::find_gpu;
use crate::plan::estimate::{Load, Target};
use crate::plan::report::{DeviceReport, ModelReport, PlanReport, VERSION};
use crate::plan::{Footprint, StepCost, Workload};

/// A GPU's CUDA context, cuBLAS workspace and allocator slack, set aside before the plan.
const GPU_RESERVE_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// A GGUF file, a Hugging Face directory, or a `config.json` (default: the default model,
    /// as `serve` resolves it).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Storage type of the weights when only a config gives the shape (default: its
    /// `torch_dtype`): f32, f16, bf16, fp8, int8, int4, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, q4_k, q6_k.
    #[arg(long)]
    pub weights_dtype: Option<String>,
    /// `cpu` (this machine, measured by a probe of a few seconds) or a GPU from the table:
    /// h100-sxm, h100-pcie, h200, a100-40gb, a100-80gb, l40s, l4, a10g, rtx-4090.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Bytes of memory for weights, activations and KV cache (default: the CPU's available
    /// memory, or the GPU's).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Requests in flight (closed loop).
    #[arg(long, conflicts_with = "request_rate")]
    pub concurrency: Option<usize>,
    /// Requests per second (open loop): the concurrency follows from Little's law.
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Token slots per KV-cache block (as `serve --block-size`).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// CPU threads of the probe (default: as `serve`: all cores, or `SLUICE_NUM_THREADS`).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed steps of each shape in the CPU probe (the median is kept).
    #[arg(long, default_value_t = 5)]
    pub probe_reps: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let report = report(&args)?;
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.table()
    };
    // A reader that stops early (`| head`) is not an error of the plan.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The plan for `args`, probing this CPU when the device is `cpu`.
pub fn report(args: &PlanArgs) -> anyhow::Result<PlanReport> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => crate::assets::default_model_path()?,
    };
    let fp = Footprint::read(&path, args.weights_dtype.as_deref())?;
    let (device, cost, reserve_bytes) = if args.device.eq_ignore_ascii_case("cpu") {
        let threads = args
            .threads
            .unwrap_or_else(crate::kernels::cpu::pool::default_num_threads);
        if threads == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        let (memory_bytes, memory_source) = match args.memory {
            Some(m) => (m, "--memory"),
            None => (
                super::engine_args::available_memory()
                    .ok_or_else(|| anyhow::anyhow!("cannot read MemAvailable: pass --memory"))?,
                "MemAvailable",
            ),
        };
        // A bare config has no weights to time: its shape with random weights stands in.
        let spec = ModelSpec {
            path: path.clone(),
            load_format: match fp.source {
                "config.json" => LoadFormat::Dummy,
                _ => LoadFormat::Auto,
            },
            dummy_dtype: crate::kernels::dtype::WeightDType::BF16,
            dummy_seed: 0,
            quantization: None,
        };
        let cost = crate::plan::probe::probe_cpu(&spec, threads, args.probe_reps)?;
        let device = DeviceReport {
            name: "cpu".into(),
            description: format!(
                "{}, {threads} threads, measured",
                crate::bench::sysinfo::machine_info()
                    .cpu_model
                    .unwrap_or_else(|| "this CPU".into())
            ),
            memory_bytes,
            memory_source: memory_source.into(),
        };
        (device, StepCost::Measured(cost), 0)
    } else {
        let gpu = find_gpu(&args.device)?;
        let device = DeviceReport {
            name: gpu.name.into(),
            description: gpu.description.into(),
            memory_bytes: args.memory.unwrap_or(gpu.memory_bytes),
            memory_source: if args.memory.is_some() {
                "--memory"
            } else {
                "datasheet"
            }
            .into(),
        };
        (device, StepCost::roofline(&fp, gpu), GPU_RESERVE_BYTES)
    };
    let load = match (args.concurrency, args.request_rate) {
        (_, Some(r)) => Load::RequestRate(r),
        (c, None) => Load::Concurrency(c.unwrap_or(1)),
    };
    let target = Target {
        cost,
        memory_bytes: device.memory_bytes,
        reserve_bytes,
        block_size: args.block_size,
    };
    let workload = Workload {
        input_len: args.input_len,
        output_len: args.output_len,
        load,
    };
    let plan = crate::plan::plan(&fp, &target, workload)?;
    Ok(PlanReport {
        version: VERSION,
        model: ModelReport::new(&path, &fp),
        device,
        cost,
        plan,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::engine_args::EngineArgs;
    use crate::kernels::dtype::KvCacheDtype;
    use crate::plan::estimate::Flags;

    const SMOLLM2: &str = r#"{"hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "max_position_embeddings": 8192}"#;

    #[derive(Parser)]
    struct Plan {
        #[command(flatten)]
        plan: super::PlanArgs,
    }

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        engine: EngineArgs,
    }

    /// SmolLM2's `config.json` in a directory of its own, removed when dropped.
    struct ConfigFile {
        path: std::path::PathBuf,
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn smollm2_config() -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("sluice-plan-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, SMOLLM2).unwrap();
        ConfigFile { path }
    }

    /// The blocks `sluice serve` builds from the recommended flags.
    fn serve_blocks(flags: &Flags, config: &crate::model::config::ModelConfig) -> usize {
        let mut argv = vec!["serve".to_string()];
        argv.extend(flags.to_args());
        let serve = Serve::try_parse_from(argv).unwrap();
        serve
            .engine
            .engine_config(config, KvCacheDtype::F16)
            .unwrap()
            .cache
            .num_blocks
    }

    #[test]
    fn the_json_has_the_documented_shape() {
        let file = smollm2_config();
        let config = file.path.clone();
        let argv = [
            "plan",
            "--model",
            config.to_str().unwrap(),
            "--device",
            "L4",
        ];
        let args = Plan::try_parse_from(argv.iter().chain(&["--request-rate", "3"])).unwrap();
        let report = super::report(&args.plan).unwrap();
        let v = serde_json::to_value(&report).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let documented = [
            "version",
            "model",
            "device",
            "cost",
            "input_len",
            "output_len",
            "context_len",
            "request_rate",
            "concurrency",
            "memory",
            "decode",
            "ttft",
            "e2e_ms",
            "flags",
            "warnings",
        ];
        let mut keys = keys;
        keys.sort_unstable();
        let mut documented = documented.to_vec();
        documented.sort_unstable();
        assert_eq!(keys, documented);
        assert_eq!(v["cost"]["kind"], "roofline");
        assert_eq!(v["device"]["memory_source"], "datasheet");
        assert_eq!(v["request_rate"], 3.0);
        assert!(report
            .table()
            .contains("recommended: sluice serve --kv-cache-memory"));
        // Both ways of loading at once is a usage error, not a silent choice.
        assert!(Plan::try_parse_from(argv.iter().chain(&[
            "--concurrency",
            "2",
            "--request-rate",
            "1"
        ]))
        .is_err());
    }

    /// `serve` caps its pool at what every sequence at full length can use, in whole blocks
    /// per sequence: 4 × ceil(1000 / 16) + 1, not ceil(4 × 1000 / 16) + 1.
    #[test]
    fn serve_caps_the_pool_in_whole_blocks_per_sequence() {
        let file = smollm2_config();
        let config = file.path.clone();
        let model = crate::model::config::ModelConfig::from_hf_config(&config).unwrap();
        let argv = ["serve", "--max-num-seqs", "4", "--max-model-len", "1000"];
        let serve =
            Serve::try_parse_from(argv.iter().chain(&["--kv-cache-memory", "1000000000"])).unwrap();
        assert_eq!(
            serve
                .engine
                .engine_config(&model, KvCacheDtype::F16)
                .unwrap()
                .cache
                .num_blocks,
            4 * 63 + 1
        );
    }

    #[test]
    fn the_recommended_flags_give_serve_the_blocks_the_plan_counts() {
        let file = smollm2_config();
        let config = file.path.clone();
        let fp = crate::plan::Footprint::read(&config, None).unwrap();
        // Lengths on and off block boundaries, concurrency inside and beyond what fits.
        for (input_len, output_len, c) in [(40, 50, 4), (16, 48, 16), (7, 9, 3), (100, 28, 40)] {
            let gpu = crate::plan::device::find_gpu("l4").unwrap();
            let target = crate::plan::estimate::Target {
                cost: crate::plan::StepCost::roofline(&fp, gpu),
                memory_bytes: fp.weights_bytes + 300_000_000,
                reserve_bytes: 0,
                block_size: 16,
            };
            let workload = crate::plan::Workload {
                input_len,
                output_len,
                load: crate::plan::estimate::Load::Concurrency(c),
            };
            let p = crate::plan::plan(&fp, &target, workload).unwrap();
            let blocks = serve_blocks(&p.flags, &fp.config);
            assert_eq!(
                blocks,
                p.flags.max_num_seqs * p.memory.blocks_per_seq,
                "{input_len}+{output_len}×{c}: {:?}",
                p.flags
            );
        }
    }
}
