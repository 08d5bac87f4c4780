//! `sluice bench`: a load generator for any OpenAI-compatible server.
//!
//! `sluice bench serve` builds a workload (`workload`), drives it against a server over SSE or
//! WebSocket (`client`, `ws`) under a load shape (`runner`), and summarises the per-request
//! timings (`report`). `sluice bench compare` prints result files side by side (`compare`);
//! `sluice bench mock-server` is a paced fake server for measuring the client (`mock`).
//!
//! Invariants: the bench measures, it never retries — every request sent ends up as exactly one
//! `RequestRecord`, success or a typed error, and failures are counted in the report, not
//! dropped. Warm-up requests are sent before the clock starts and are never counted.

pub mod client;
pub mod compare;
pub mod grpc;
pub mod mock;
pub mod report;
pub mod runner;
pub mod soak;
pub mod sse;
pub mod sysinfo;
pub mod tokenizer;
pub mod workload;
pub mod ws;

mod serve;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Errors of the bench tool itself (bad arguments, unreadable files, an unreachable server at
/// start-up). Failures of individual requests are data, not errors: see `client::ErrorKind`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid argument: {0}")]
    Args(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("dataset {path} line {line}: {message}")]
    Dataset {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{0}")]
    Runtime(String),
}

/// `sluice bench ...` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Drive an OpenAI-compatible server with load and report latency and throughput.
    Serve(Box<ServeArgs>),
    /// Print two or more result files (`--output` of `serve`) side by side, with ratios
    /// against the first.
    Compare(CompareArgs),
    /// Serve fake completions at a fixed pace, to measure the bench client's own overhead.
    MockServer(mock::MockArgs),
    /// Mixed load (streams, disconnects, bursts, bad requests) for a while, then assert no
    /// 5xx, no leaked KV block and flat RSS (exit status 1 when any fails).
    Soak(soak::SoakArgs),
}

/// Which OpenAI route the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `/v1/chat/completions` (prompts are sent as one user message)
    Chat,
    /// `/v1/completions` (prompts are sent as raw text, so input lengths are exact)
    Completions,
}

/// How requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// HTTP with SSE streaming, one keep-alive connection per in-flight request
    Http,
    /// sluice's WebSocket endpoint, several requests multiplexed on each socket
    Ws,
    /// gRPC (`inference.GRPCInferenceService/ModelStreamInfer`, one call per request), the
    /// calls multiplexed as HTTP/2 streams on each connection
    Grpc,
}

/// Where prompts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// random real tokens, lengths around --input-len/--output-len
    Random,
    /// a shared prefix of --prefix-len tokens, then a random part of --input-len tokens
    Prefix,
    /// a JSONL file (--dataset) of {"prompt" | "messages", "max_tokens"} lines
    Jsonl,
}

/// Arguments of `sluice bench serve`; serialised whole into the result file (except the key).
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct ServeArgs {
    /// Server base URL (with or without a trailing /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model name sent in each request.
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// Bearer token; never written to the result file.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    #[arg(long, value_enum, default_value_t = Transport::Http)]
    pub transport: Transport,
    /// WebSocket path on the server (with --transport ws).
    #[arg(long, default_value = "/v1/ws")]
    pub ws_path: String,
    /// In-flight requests per WebSocket or gRPC connection; connections =
    /// ceil(concurrency / this).
    #[arg(long, default_value_t = 16)]
    pub ws_streams_per_socket: usize,

    /// Closed loop: this many requests in flight at all times. With --request-rate, a cap on
    /// in-flight requests instead.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Open loop: mean arrivals per second (Poisson when --burstiness is 1).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Shape of the gamma inter-arrival distribution: <1 burstier, >1 more regular.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Requests to send (default 100 unless --duration is given).
    #[arg(long)]
    pub num_requests: Option<usize>,
    /// Stop issuing requests after this many seconds; in-flight ones finish and count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests sent (and discarded) before measuring starts.
    #[arg(long, default_value_t = 2)]
    pub warmup_requests: usize,
    /// Per-request time limit in seconds (a slower request counts as a timeout error).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,

    #[arg(long, value_enum, default_value_t = WorkloadKind::Random)]
    pub workload: WorkloadKind,
    /// Mean prompt length in tokens (random, prefix).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Mean output length in tokens (and the default max_tokens of jsonl lines without one).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Lengths are drawn uniformly from [len·(1−r), len·(1+r)].
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    /// Shared prefix length in tokens (prefix workload).
    #[arg(long, default_value_t = 256)]
    pub prefix_len: usize,
    /// JSONL file for --workload jsonl.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Distinct prompts to generate (default: the number of requests, at most 1000 with
    /// --duration); requests cycle through them.
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// The served model's tokenizer: a GGUF file, a tokenizer.json, or a directory holding one.
    /// Default: the default model file.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Let the server stop at EOS (by default requests send ignore_eos and min_tokens so the
    /// output length is exact).
    #[arg(long)]
    pub allow_eos: bool,
    /// Ask for whole responses instead of streams (HTTP only). TTFT is then the whole
    /// response's latency; this is the traffic a router may retry on another replica.
    #[arg(long)]
    #[serde(default)]
    pub no_stream: bool,
    /// JSON object merged into every request body, e.g. '{"temperature":0}'.
    #[arg(long)]
    pub extra_body: Option<String>,

    /// Goodput: a request is good when its TTFT is at most this (ms)...
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// ...and its TPOT at most this (ms).
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Write every figure, the configuration and every request's timings here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// A name for this run in the result file and in `compare`.
    #[arg(long)]
    pub label: Option<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Tokio worker threads of the client (default: one per core).
    #[arg(long)]
    pub client_threads: Option<usize>,
}

/// Arguments of `sluice bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Result files written by `sluice bench serve --output`; ratios are against the first.
    #[arg(required = true, num_args = 2..)]
    pub files: Vec<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Serve(args) => serve::serve(*args)?,
        BenchCommand::Compare(args) => {
            let table = compare::compare_files(&args.files)?;
            print!("{table}");
        }
        BenchCommand::MockServer(args) => mock::mock_server(args)?,
        BenchCommand::Soak(args) => {
            let report = soak::soak(args)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.failures.is_empty() {
                anyhow::bail!("soak failed: {}", report.failures.join("; "));
            }
        }
    }
    Ok(())
}
