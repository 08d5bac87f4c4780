//! `sluice serve`: load the models (`serve_models.rs`), start their engines, serve the
//! OpenAI-compatible API until SIGINT or SIGTERM.
//!
//! Start-up binds the socket first, so probes answer while the models load (`/health/live`
//! 200, `/health/ready` 503), then prints exactly one line on stdout,
//! `sluice listening on http://ADDR:PORT`, once every model serves (tests and scripts wait
//! for it). Shutdown: stop
//! accepting, refuse new requests with 503, let in-flight ones finish until
//! `--shutdown-timeout` (then the engine ends them with an error and streams end with an
//! error event), exit 0 within the timeout plus `SHUTDOWN_GRACE`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::engine_args::EngineArgs;
use super::model_args::ModelArgs;
use super::serve_models::{self, RegistryArgs, VersionFlags};
use crate::api::{self, AppState, ServerConfig};

/// Extra time, past the shutdown timeout, for the last events to reach their clients.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the printed address tells which).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Also serve on this port (gRPC is always served on `--port` too, as HTTP/2 beside
    /// HTTP/1.1; this port serves the same API, for clients or meshes that want gRPC apart).
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// The model name clients use, for a single `--model` given without a name (default:
    /// `smollm2` for the default model, else the file's or directory's name without `.gguf`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` (except on /health and /metrics).
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A TOML file of API keys, each named and with optional `requests_per_minute` and
    /// `tokens_per_minute` (OpenAI's 429 and `x-ratelimit-*` headers; docs/operations.md).
    /// Accepted beside `--api-key`.
    #[arg(long)]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, default_value_t = 30.0)]
    pub header_read_timeout: f64,
    /// Most connections open at once per listening port; one more is answered 503 with
    /// `Retry-After: 1` and closed (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,
    /// Seconds a client has to send a whole request body (408 past it).
    #[arg(long, default_value_t = 30.0)]
    pub body_read_timeout: f64,
    /// `/health` answers 503 when the engine has neither completed a step nor woken idle for
    /// this many seconds (a wedged step).
    #[arg(long, default_value_t = 60.0)]
    pub health_max_silence: f64,
    /// The names `/metrics` shows: vLLM's (what the inference gateway and vLLM dashboards
    /// read), sluice's, or both.
    #[arg(long, value_enum, default_value_t = api::metrics::MetricNames::Both)]
    pub metrics_names: api::metrics::MetricNames,
    /// Export a trace of every request over OTLP/gRPC to this collector
    /// (`http://host:4317`); the caller's W3C `traceparent` is honoured (docs/operations.md).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_traces_endpoint: Option<String>,
    #[command(flatten)]
    pub jobs: JobsArgs,
}

/// The Files, Batch and async APIs (`docs/batch.md`).
#[derive(Debug, Clone, clap::Args)]
pub struct JobsArgs {
    /// Where files, batches and async jobs are kept (SQLite and JSONL files); without it those
    /// endpoints answer 404. Checked for writing at start-up.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Batch and async requests in the engine at once (they run at the lowest priority).
    #[arg(long, default_value_t = 8)]
    pub max_batch_concurrency: usize,
    /// Batch lines in the engine at once while online requests are there too (0 pauses
    /// batches while online requests are served).
    #[arg(long, default_value_t = 1)]
    pub max_batch_concurrency_busy: usize,
    /// Largest uploaded file in bytes; larger ones get 413.
    #[arg(long, default_value_t = 200 << 20)]
    pub max_file_bytes: usize,
    /// Hosts (`host` or `host:port`, comma-separated) an async job's `webhook_url` may name.
    #[arg(long, value_delimiter = ',')]
    pub webhook_allowed_hosts: Vec<String>,
}

impl JobsArgs {
    /// Opens the data directory, when given: an unwritable one is an error now.
    pub fn open(&self) -> anyhow::Result<Option<std::sync::Arc<crate::jobs::JobService>>> {
        let Some(dir) = &self.data_dir else {
            return Ok(None);
        };
        if self.max_batch_concurrency == 0 {
            anyhow::bail!("--max-batch-concurrency must be at least 1");
        }
        let config = crate::jobs::JobsConfig {
            data_dir: dir.clone(),
            max_concurrent: self.max_batch_concurrency,
            busy_concurrent: self.max_batch_concurrency_busy,
            max_file_bytes: self.max_file_bytes,
            webhook_allowed_hosts: self.webhook_allowed_hosts.clone(),
        };
        crate::jobs::JobService::open(config)
            .map(Some)
            .with_context(|| format!("--data-dir {}", dir.display()))
    }
}

fn seconds(flag: &str, v: f64, min: f64) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v >= min && v < 1e9) {
        anyhow::bail!("--{flag} must be a number of seconds, at least {min}");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let timeout = seconds("shutdown-timeout", args.shutdown_timeout, 0.0)?;
    let health_max_silence = seconds("health-max-silence", args.health_max_silence, 0.001)?;
    seconds("warm-up-timeout", args.registry.warm_up_timeout, 0.001)?;
    if args.engine.enable_fault_injection {
        crate::engine::fault::FaultInjection::enable().context("--enable-fault-injection")?;
    }
    // Before the model loads: an unwritable data directory or a bad keys file fails at once.
    let jobs = args.jobs.open()?;
    let keys = api::keys::ApiKeys::load(args.api_key.as_deref(), args.api_keys_file.as_deref())?;
    let timeouts = api::server::HttpTimeouts {
        header_read: seconds("header-read-timeout", args.header_read_timeout, 0.001)?,
        body_read: seconds("body-read-timeout", args.body_read_timeout, 0.001)?,
        max_connections: args.max_connections,
    };
    let base = VersionFlags {
        model: args.model.clone(),
        engine: args.engine.clone(),
    };
    // What followed `serve` on the command line: every version loads with its model and
    // engine flags.
    let argv = serve_models::command_args("serve");
    let models =
        serve_models::registry(base, &argv, &args.registry, args.served_model_name.clone())?;
    let state = AppState::new(
        models.clone(),
        ServerConfig {
            keys: std::sync::Arc::new(keys),
            admin_api_key: args
                .registry
                .admin_api_key
                .clone()
                .filter(|k| !k.is_empty()),
            max_body_bytes: args.max_body_bytes,
            timeouts,
            health_max_silence,
            metric_names: args.metrics_names,
        },
    )
    .with_jobs(jobs.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-api")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(
        state,
        &args.host,
        (args.port, args.grpc_port),
        timeout,
        jobs,
    ));
    // Tasks still open (a WebSocket whose client does not read) are dropped, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

async fn serve(
    state: AppState,
    host: &str,
    (port, grpc_port): (u16, Option<u16>),
    timeout: Duration,
    jobs: Option<std::sync::Arc<crate::jobs::JobService>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr = listener.local_addr()?;
    let grpc_listener = match grpc_port {
        Some(p) => Some(
            tokio::net::TcpListener::bind((host, p))
                .await
                .with_context(|| format!("binding {host}:{p} (--grpc-port)"))?,
        ),
        None => None,
    };
    let plan = state.models.plan_start()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = api::router(state.clone());
    let timeouts = state.config.timeouts;
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let grpc_server = grpc_listener.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!("gRPC (and the HTTP API) also on {a} (--grpc-port)");
        }
        tokio::spawn(api::server::serve(l, app.clone(), timeouts, stopped()))
    });
    let server = tokio::spawn(api::server::serve(listener, app, timeouts, stopped()));
    // Probes answer while the models load (live 200, ready 503), and requests for a model
    // wait for its load; the address is printed once every model serves.
    let loaded = tokio::select! {
        loaded = state.models.start(plan) => loaded.context("loading the models"),
        signal = wait_for_signal() => Err(anyhow::anyhow!("{}: stopped while loading the models", signal?)),
    };
    // Batches and jobs resume once their models serve.
    let loaded = match (loaded, &jobs) {
        (Ok(()), Some(jobs)) => {
            let executor = std::sync::Arc::new(api::run::ApiExecutor(state.clone()));
            jobs.start(executor)
                .await
                .context("resuming batches and jobs")
        }
        (loaded, _) => loaded,
    };
    if let Err(e) = loaded {
        state.models.shutdown(Instant::now());
        let _ = stop_tx.send(true);
        return Err(e);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "sluice listening on http://{addr}")?;
        out.flush()?;
    }
    let signal = wait_for_signal().await?;
    tracing::info!(
        "{signal}: shutting down, in-flight requests have {:.0?} to finish",
        timeout
    );
    state
        .shutting_down
        .store(true, std::sync::atomic::Ordering::Release);
    state.models.shutdown(Instant::now() + timeout);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + timeout + SHUTDOWN_GRACE;
    let server = async move {
        let main = server.await;
        if let Some(g) = grpc_server {
            g.await?;
        }
        main
    };
    match tokio::time::timeout_at(deadline, server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("server task failed: {e}"),
        Err(_) => tracing::warn!("connections still open after the shutdown timeout; closing"),
    }
    // WebSocket sessions close once their requests have ended (they got an error event at
    // the deadline at the latest).
    while state
        .open_sockets
        .load(std::sync::atomic::Ordering::Acquire)
        > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    tokio::signal::ctrl_c()
        .await
        .context("installing the Ctrl-C handler")?;
    Ok("Ctrl-C")
}
