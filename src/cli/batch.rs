//! `sluice batch run --input in.jsonl --output out.jsonl`: a batch file (OpenAI's and vLLM's
//! `run-batch` format) processed without a server. Each line runs through `api::run::run`,
//! the function `POST /v1/chat/completions` and `/v1/completions` run; the output has one
//! record per input line, in input order (answers and errors alike, as vLLM writes it), and
//! is written with fsync and an atomic rename. A progress bar and a summary go to stderr.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::Value;

use super::engine_args::EngineArgs;
use super::model_args::ModelArgs;
use super::serve_models::{self, RegistryArgs, VersionFlags};
use crate::api::{self, AppState, ServerConfig};
use crate::jobs::{files::write_atomic, lines, JOB_PRIORITY};

#[derive(Debug, clap::Subcommand)]
pub enum BatchCommand {
    /// Run a batch file offline and write its results.
    Run(BatchRunArgs),
}

#[derive(Debug, clap::Args)]
pub struct BatchRunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The input JSONL: `{"custom_id", "method", "url", "body"}` per line.
    #[arg(long, short = 'i')]
    pub input: std::path::PathBuf,
    /// Where the results go (one record per input line).
    #[arg(long, short = 'o')]
    pub output: std::path::PathBuf,
    /// Lines in the engine at once.
    #[arg(long, default_value_t = 64)]
    pub max_concurrency: usize,
    /// The model name lines may use in `model` (default as for `serve`).
    #[arg(long)]
    pub served_model_name: Option<String>,
}

pub fn run(cmd: BatchCommand) -> anyhow::Result<()> {
    match cmd {
        BatchCommand::Run(args) => {
            if args.max_concurrency == 0 {
                anyhow::bail!("--max-concurrency must be at least 1");
            }
            let input = std::fs::read(&args.input)
                .with_context(|| format!("reading {}", args.input.display()))?;
            // Fail on an unwritable output now, not after the whole batch.
            let dir = args
                .output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
            offline(args, &input)
        }
    }
}

/// Runs the lines on a one-model registry, as `serve` would serve that model.
fn offline(args: BatchRunArgs, input: &[u8]) -> anyhow::Result<()> {
    let base = VersionFlags {
        model: args.model.clone(),
        engine: args.engine.clone(),
    };
    let argv = serve_models::command_args("run");
    let models = serve_models::registry(
        base,
        &argv,
        &RegistryArgs::default(),
        args.served_model_name.clone(),
    )?;
    let state = AppState::new(models.clone(), ServerConfig::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(async {
        let plan = models.plan_start()?;
        models.start(plan).await.context("loading the model")?;
        run_lines(&state, input, &args).await
    });
    models.shutdown(Instant::now() + Duration::from_secs(1));
    runtime.shutdown_timeout(Duration::from_millis(100));
    eprintln!("{}", summary?);
    Ok(())
}

/// What one offline run did.
#[derive(Debug, Default)]
struct Summary {
    lines: usize,
    succeeded: usize,
    failed: usize,
    completion_tokens: u64,
    elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "batch: {} lines, {} succeeded, {} failed, {} completion tokens in {:.1} s ({:.1} tokens/s)",
            self.lines,
            self.succeeded,
            self.failed,
            self.completion_tokens,
            secs,
            self.completion_tokens as f64 / secs.max(1e-9)
        )
    }
}

async fn run_lines(state: &AppState, input: &[u8], args: &BatchRunArgs) -> anyhow::Result<Summary> {
    let start = Instant::now();
    let parsed = lines::parse_file(input, None);
    let bar = Arc::new(indicatif::ProgressBar::new(parsed.len() as u64));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} lines, {elapsed} elapsed, eta {eta}",
    ) {
        bar.set_style(style);
    }
    let records: Vec<(bool, Value)> = futures::stream::iter(parsed)
        .map(|(_, line)| {
            let bar = bar.clone();
            async move {
                let out = match line {
                    Err(e) => (false, e.record()),
                    Ok(l) => match api::run::run(state, l.endpoint, l.body, JOB_PRIORITY).await {
                        Ok(v) => (true, lines::success_record(&l.custom_id, v)),
                        Err(e) => {
                            let f = api::run::failure(&e);
                            (false, lines::failure_record(&l.custom_id, f.status, f.body))
                        }
                    },
                };
                bar.inc(1);
                out
            }
        })
        .buffered(args.max_concurrency)
        .collect()
        .await;
    bar.finish_and_clear();
    let mut summary = Summary {
        lines: records.len(),
        ..Summary::default()
    };
    let mut bytes = Vec::new();
    for (ok, record) in records {
        if ok {
            summary.succeeded += 1;
            summary.completion_tokens += record["response"]["body"]["usage"]["completion_tokens"]
                .as_u64()
                .unwrap_or(0);
        } else {
            summary.failed += 1;
        }
        bytes.extend_from_slice(record.to_string().as_bytes());
        bytes.push(b'\n');
    }
    let path = std::path::absolute(&args.output)
        .with_context(|| format!("resolving {}", args.output.display()))?;
    write_atomic(&path, &bytes)?;
    summary.elapsed = start.elapsed();
    Ok(summary)
}
