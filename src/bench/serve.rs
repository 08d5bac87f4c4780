//! `sluice bench serve`: arguments → workload → load → report.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::client::{Driver, HttpDriver};
use super::grpc::GrpcDriver;
use super::report::{self, BenchResult, Slo};
use super::runner::{run_load_until, LoadShape, RunPlan, StopAt};
use super::sysinfo;
use super::tokenizer::{default_tokenizer_path, load_tokenizer};
use super::workload::{self, BodyOptions, RandomSpec};
use super::ws::WsDriver;
use super::{BenchError, Endpoint, ServeArgs, Transport, WorkloadKind};

/// Requests sent when neither --num-requests nor --duration is given.
const DEFAULT_NUM_REQUESTS: usize = 100;
/// Distinct prompts generated for a --duration run without --num-prompts.
const DEFAULT_PROMPTS_FOR_DURATION: usize = 1000;
/// In-flight requests assumed for sizing pools when an open loop has no cap.
const UNCAPPED_IN_FLIGHT: usize = 256;

pub(super) fn serve(args: ServeArgs) -> Result<(), BenchError> {
    let plan = run_plan(&args)?;
    let in_flight = match plan.shape {
        LoadShape::Closed { concurrency } => concurrency,
        LoadShape::Open {
            max_concurrency, ..
        } => max_concurrency.unwrap_or(UNCAPPED_IN_FLIGHT),
    };
    let requests = Arc::new(build_workload(&args, &plan)?);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = args.client_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime
        .build()
        .map_err(|e| BenchError::Runtime(e.to_string()))?;
    let outcome = runtime.block_on(async {
        let driver = Arc::new(connect(&args, in_flight).await?);
        let progress = progress_bar(&args, &plan);
        let interrupt = interrupt_on_ctrl_c();
        Ok::<_, BenchError>(run_load_until(driver, requests, &plan, progress, interrupt).await)
    })?;
    let slo = Slo {
        ttft_ms: args.slo_ttft_ms,
        tpot_ms: args.slo_tpot_ms,
    };
    let summary = report::summarize(&outcome.records, outcome.wall_s, outcome.client_cpu, slo);
    let result = BenchResult {
        label: args.label.clone().unwrap_or_else(|| default_label(&args)),
        date: sysinfo::utc_now(),
        git_commit: sysinfo::git_commit(),
        sluice_version: env!("CARGO_PKG_VERSION").to_string(),
        machine: sysinfo::machine_info(),
        config: args.clone(),
        summary,
        interrupted: outcome.interrupted,
        error_samples: report::error_samples(&outcome.records),
        requests: outcome.records,
        origin_unix_ms: outcome.origin_unix_ms,
    };
    print!("{}", report::render(&result));
    if let Some(path) = &args.output {
        let file_error = |message: String| BenchError::File {
            path: path.clone(),
            message,
        };
        let json = serde_json::to_vec_pretty(&result).map_err(|e| file_error(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| file_error(e.to_string()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// First Ctrl-C: start nothing new, let requests in flight finish, report. Second: quit.
fn interrupt_on_ctrl_c() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: waiting for requests in flight (Ctrl-C again to quit)");
            let _ = tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    rx
}

fn run_plan(args: &ServeArgs) -> Result<RunPlan, BenchError> {
    let bad = |m: &str| Err(BenchError::Args(m.into()));
    if args.concurrency == Some(0) {
        return bad("--concurrency must be at least 1");
    }
    if !(args.burstiness > 0.0 && args.burstiness.is_finite()) {
        return bad("--burstiness must be a positive number");
    }
    let shape = match args.request_rate {
        Some(rate) if rate.is_nan() || rate <= 0.0 => {
            return bad("--request-rate must be positive (or inf)")
        }
        Some(rate) => LoadShape::Open {
            rate,
            burstiness: args.burstiness,
            max_concurrency: args.concurrency,
        },
        None => LoadShape::Closed {
            concurrency: args.concurrency.unwrap_or(1),
        },
    };
    let stop = match (args.num_requests, args.duration) {
        (Some(_), Some(_)) => return bad("give --num-requests or --duration, not both"),
        (_, Some(d)) if !(d > 0.0 && d.is_finite()) => return bad("--duration must be positive"),
        (_, Some(d)) => StopAt::Duration(Duration::from_secs_f64(d)),
        (Some(0), None) => return bad("--num-requests must be at least 1"),
        (n, None) => StopAt::Requests(n.unwrap_or(DEFAULT_NUM_REQUESTS)),
    };
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        return bad("--timeout must be positive");
    }
    Ok(RunPlan {
        shape,
        stop,
        warmup_requests: args.warmup_requests,
        seed: args.seed,
    })
}

fn build_workload(
    args: &ServeArgs,
    plan: &RunPlan,
) -> Result<Vec<workload::PreparedRequest>, BenchError> {
    let num_prompts = args.num_prompts.unwrap_or(match plan.stop {
        StopAt::Requests(n) => n,
        StopAt::Duration(_) => DEFAULT_PROMPTS_FOR_DURATION,
    });
    let requests = match args.workload {
        WorkloadKind::Jsonl => {
            let path = args
                .dataset
                .as_ref()
                .ok_or_else(|| BenchError::Args("--workload jsonl needs --dataset FILE".into()))?;
            workload::jsonl_requests(path, args.output_len, Some(num_prompts))?
        }
        kind => {
            let path = match &args.tokenizer {
                Some(p) => p.clone(),
                None => default_tokenizer_path()?,
            };
            let tok = load_tokenizer(&path)?;
            let spec = RandomSpec {
                input_len: args.input_len,
                output_len: args.output_len,
                range_ratio: args.range_ratio,
                prefix_len: if kind == WorkloadKind::Prefix {
                    args.prefix_len
                } else {
                    0
                },
                num_prompts,
                seed: args.seed,
            };
            workload::random_requests(tok.as_ref(), &spec)?
        }
    };
    let extra = match &args.extra_body {
        None => serde_json::Map::new(),
        Some(s) => match serde_json::from_str(s) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => {
                return Err(BenchError::Args(
                    "--extra-body must be a JSON object".into(),
                ))
            }
        },
    };
    let opts = BodyOptions {
        model: args.model.clone(),
        endpoint: args.endpoint,
        exact_output_len: !args.allow_eos,
        stream: !args.no_stream,
        extra,
    };
    workload::prepare(&requests, &opts)
}

/// `base_url` without a trailing `/` or `/v1`, so both spellings work.
fn server_root(base_url: &str) -> &str {
    let root = base_url.trim_end_matches('/');
    root.strip_suffix("/v1").unwrap_or(root)
}

async fn connect(args: &ServeArgs, in_flight: usize) -> Result<Driver, BenchError> {
    let root = server_root(&args.base_url);
    let timeout = Duration::from_secs_f64(args.timeout);
    match args.transport {
        Transport::Http => {
            let path = match args.endpoint {
                Endpoint::Chat => "/v1/chat/completions",
                Endpoint::Completions => "/v1/completions",
            };
            let url = format!("{root}{path}");
            HttpDriver::new(url, args.api_key.clone(), in_flight, timeout)
                .map(|d| Driver::Http(d.streaming(!args.no_stream)))
        }
        _ if args.no_stream => Err(BenchError::Args(
            "--no-stream is for --transport http (WebSocket and gRPC always stream)".into(),
        )),
        Transport::Ws => {
            let ws_root = if let Some(rest) = root.strip_prefix("https://") {
                format!("wss://{rest}")
            } else if let Some(rest) = root.strip_prefix("http://") {
                format!("ws://{rest}")
            } else {
                root.to_string()
            };
            let url = format!("{ws_root}{}", args.ws_path);
            let per_socket = args.ws_streams_per_socket.max(1);
            let sockets = in_flight.div_ceil(per_socket);
            let driver = WsDriver::connect(
                &url,
                args.api_key.as_deref(),
                sockets,
                args.endpoint,
                timeout,
            )
            .await?;
            Ok(Driver::Ws(driver))
        }
        Transport::Grpc => {
            if args.endpoint != Endpoint::Completions {
                return Err(BenchError::Args(
                    "--transport grpc sends text prompts: use --endpoint completions".into(),
                ));
            }
            let per_connection = args.ws_streams_per_socket.max(1);
            let connections = in_flight.div_ceil(per_connection);
            let driver =
                GrpcDriver::connect(root, args.api_key.as_deref(), connections, timeout).await?;
            Ok(Driver::Grpc(driver))
        }
    }
}

fn progress_bar(args: &ServeArgs, plan: &RunPlan) -> ProgressBar {
    if args.no_progress {
        return ProgressBar::hidden();
    }
    let (bar, template) = match plan.stop {
        StopAt::Requests(n) => (
            ProgressBar::new(n as u64),
            "{elapsed_precise} [{bar:40}] {pos}/{len} requests ({per_sec}, eta {eta})",
        ),
        StopAt::Duration(_) => (
            ProgressBar::new_spinner(),
            "{elapsed_precise} {spinner} {pos} requests ({per_sec})",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn default_label(args: &ServeArgs) -> String {
    let load = match (args.request_rate, args.concurrency) {
        (Some(rate), _) => format!("rate{rate}"),
        (None, n) => format!("c{}", n.unwrap_or(1)),
    };
    let workload = format!("{:?}", args.workload).to_lowercase();
    let transport = format!("{:?}", args.transport).to_lowercase();
    format!(
        "{workload}-{}x{}-{load}-{transport}",
        args.input_len, args.output_len
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_spellings() {
        assert_eq!(server_root("http://h:1/v1/"), "http://h:1");
        assert_eq!(server_root("http://h:1"), "http://h:1");
    }
}
