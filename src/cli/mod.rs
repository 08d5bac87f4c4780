//! The `sluice` command line: subcommands and their arguments.

pub mod batch;
pub mod cpu_ranks;
pub mod engine_args;
pub mod generate;
pub mod model_args;
pub mod serve;
pub mod serve_models;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "An LLM serving engine")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr as text, or as one JSON object each (for log pipelines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a continuation of one prompt.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible API (HTTP, SSE, WebSocket).
    Serve(Box<serve::ServeArgs>),
    /// Benchmarks against any OpenAI-compatible server.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Batch files without a server (`batch run`, vLLM's `run-batch` format).
    #[command(subcommand)]
    Batch(batch::BatchCommand),
}

pub fn main(cli: Cli) -> ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // One object per line, the event's fields at the top level.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(cmd) => crate::bench::run(cmd),
        Command::Batch(cmd) => batch::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
