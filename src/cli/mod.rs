//! The `sluice` command line: subcommands and their arguments.

pub mod batch;
pub mod cpu_ranks;
pub mod engine_args;
pub mod generate;
pub mod model_args;
pub mod plan;
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
    /// Capacity planning: what a model needs and delivers on a device for a workload.
    Plan(plan::PlanArgs),
}

pub fn main(cli: Cli) -> ExitCode {
    let traces_endpoint = match &cli.command {
        Command::Serve(args) => args.otlp_traces_endpoint.clone(),
        _ => None,
    };
    // Held to the end of `main`: dropping it flushes the last spans.
    let _traces = match init_logs(cli.log_format, traces_endpoint.as_deref()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(cmd) => crate::bench::run(cmd),
        Command::Batch(cmd) => batch::run(cmd),
        Command::Plan(args) => plan::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs on stderr (`RUST_LOG`, default `info`), and request spans to an OTLP collector when
/// `traces_endpoint` is given.
fn init_logs(
    format: LogFormat,
    traces_endpoint: Option<&str>,
) -> Result<Option<crate::telemetry::TracesGuard>, crate::telemetry::TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, Registry};
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Request spans are for the exporter; log lines would only repeat them.
    if let Ok(off) = format!("{}=off", crate::telemetry::TARGET).parse() {
        filter = filter.add_directive(off);
    }
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        // One object per line, the event's fields at the top level.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(filter)
            .boxed(),
    };
    let (guard, traces) = match traces_endpoint {
        Some(endpoint) => {
            let (guard, layer) = crate::telemetry::init_traces(endpoint)?;
            (Some(guard), Some(layer))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    Ok(guard)
}
