//! `sluice bench soak`: mixed load against a running server for a given time, then the
//! reliability verdict.
//!
//! Workers loop until the deadline, each turn picking one action: a short non-streaming
//! request, a stream read to its end, a stream dropped after a few chunks (a disconnect), a
//! bad request, a burst over the waiting cap, or (with `--faults`, against a server started
//! with `--enable-fault-injection`) a
//! request with an injected fault. At the end, once the server is idle:
//!
//! * no 5xx except the injected faults' (and no transport error but the disconnects we made);
//! * no leaked block: `sluice:kv_accounting_errors_total` is 0 and the KV usage gauge is 0;
//! * RSS flat after warm-up (with `--pid`): the last sample at most `--max-rss-growth` above
//!   the sample at the end of warm-up (the first fifth of the run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use super::BenchError;

#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// How long to run: seconds, or a number with s, m or h (`10m`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Bearer token.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The server's process id, to sample its RSS from /proc.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Also send requests with injected faults (the server must run with
    /// `--enable-fault-injection`).
    #[arg(long)]
    pub faults: bool,
    /// Most RSS growth allowed after warm-up, in MiB.
    #[arg(long, default_value_t = 64.0)]
    pub max_rss_growth: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration `{s}`"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in `{s}` (s, m or h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("bad duration `{s}`"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What happened, by kind; the verdict reads these.
#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    refused_429: AtomicU64,
    client_errors: AtomicU64,
    disconnects: AtomicU64,
    injected: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub ok: u64,
    pub refused_429: u64,
    pub client_errors: u64,
    pub disconnects: u64,
    pub injected_faults: u64,
    pub unexpected_5xx: u64,
    pub transport_errors: u64,
    pub kv_accounting_errors: Option<f64>,
    pub kv_usage_after: Option<f64>,
    /// (seconds since start, RSS in MiB)
    pub rss_mib: Vec<(f64, f64)>,
    pub rss_growth_after_warmup_mib: Option<f64>,
    pub failures: Vec<String>,
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Ctx {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    faults: bool,
    counters: Counters,
}

impl Ctx {
    fn post(&self, path: &str, body: String) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        r
    }

    fn count_status(&self, status: u16, injected: bool) {
        let c = &self.counters;
        let counter = match status {
            200..=299 => &c.ok,
            429 => &c.refused_429,
            500..=599 if injected => &c.injected,
            500..=599 => &c.server_errors,
            _ => &c.client_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Once upon a time",
];

/// A request body: completion or chat, streaming or not, a few tokens.
fn body(rng: &mut ChaCha8Rng, stream: bool, prompt: &str) -> (&'static str, String) {
    let max_tokens = rng.random_range(1..=24);
    if rng.random_bool(0.5) {
        let b = json!({"prompt": prompt, "max_tokens": max_tokens, "stream": stream,
                       "temperature": rng.random_range(0.0..1.2)});
        ("/v1/completions", b.to_string())
    } else {
        let b = json!({"messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "stream": stream});
        ("/v1/chat/completions", b.to_string())
    }
}

/// Reads a stream to its end (or `limit` chunks, then drops it). A stream's in-band error
/// counts as a 5xx (or an injected fault).
async fn read_stream(ctx: &Ctx, resp: reqwest::Response, limit: Option<usize>, injected: bool) {
    let mut chunks = resp.bytes_stream();
    let mut text = String::new();
    let mut n = 0;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                ctx.counters
                    .transport_errors
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        n += 1;
        if limit.is_some_and(|l| n >= l) {
            ctx.counters.disconnects.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let errored = text.contains("data: {\"error\"");
    ctx.count_status(if errored { 500 } else { 200 }, injected);
}

async fn send(
    ctx: &Ctx,
    req: reqwest::RequestBuilder,
    stream: Option<Option<usize>>,
    injected: bool,
) {
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match stream {
                Some(limit) if status == 200 => read_stream(ctx, resp, limit, injected).await,
                _ => {
                    let _ = resp.bytes().await;
                    ctx.count_status(status, injected);
                }
            }
        }
        Err(_) => {
            ctx.counters
                .transport_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

const BAD_BODIES: [&str; 6] = [
    r#"{"prompt": "x", "top_p": 2}"#,
    r#"{"prompt": "x", "max_tokens": "many"}"#,
    r#"{"messages": []}"#,
    r#"{"prompt": ["#,
    r#"{"prompt": "x", "max_tokens": 100000}"#,
    r#"{"prompt": [999999999]}"#,
];

/// Per-request faults only: an injected panic fails every request of its step, which the
/// soak could not tell from a real failure (tests/fault_isolation.rs covers panics).
const FAULTS: [&str; 5] = ["nan", "inf", "token", "detok", "stop"];

async fn one_turn(ctx: &Ctx, rng: &mut ChaCha8Rng) {
    let prompt = PROMPTS[rng.random_range(0..PROMPTS.len())];
    let roll = rng.random_range(0..100);
    match roll {
        0..=34 => {
            let (path, b) = body(rng, false, prompt);
            send(ctx, ctx.post(path, b), None, false).await;
        }
        35..=59 => {
            let (path, b) = body(rng, true, prompt);
            send(ctx, ctx.post(path, b), Some(None), false).await;
        }
        60..=71 => {
            let (path, b) = body(rng, true, prompt);
            let after = rng.random_range(1..4);
            send(ctx, ctx.post(path, b), Some(Some(after)), false).await;
        }
        72..=85 => {
            let b = BAD_BODIES[rng.random_range(0..BAD_BODIES.len())];
            let path = if rng.random_bool(0.9) {
                "/v1/completions"
            } else {
                "/v1/nowhere"
            };
            send(ctx, ctx.post(path, b.to_string()), None, false).await;
        }
        86..=91 => {
            // A burst: far more at once than the server runs or queues.
            let bodies: Vec<_> = (0..24).map(|_| body(rng, false, prompt)).collect();
            let reqs = bodies
                .into_iter()
                .map(|(path, b)| send(ctx, ctx.post(path, b), None, false));
            futures::future::join_all(reqs).await;
        }
        _ if ctx.faults => {
            let fault = FAULTS[rng.random_range(0..FAULTS.len())];
            let p = format!("{prompt} sluice-fault:{fault}@1");
            let stream = rng.random_bool(0.5);
            let b = json!({"prompt": p, "max_tokens": 4, "stream": stream}).to_string();
            send(
                ctx,
                ctx.post("/v1/completions", b),
                stream.then_some(None),
                true,
            )
            .await;
        }
        _ => {
            let (path, b) = body(rng, false, prompt);
            send(ctx, ctx.post(path, b), None, false).await;
        }
    }
}

async fn metrics_text(ctx: &Ctx) -> Option<String> {
    let resp = ctx
        .http
        .get(format!("{}/metrics", ctx.url))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

/// A metric's value (summed over its series); `None` when the text has no such metric, so a
/// verdict never passes on a figure it could not read.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut values = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .peekable();
    values.peek()?;
    values.sum()
}

/// Nothing running and nothing waiting. The engine publishes these zeros only after its idle
/// accounting check, so the error counter read beside them includes that check.
fn is_idle(text: &str) -> bool {
    metric(text, "sluice:num_requests_running") == Some(0.0)
        && metric(text, "sluice:num_requests_waiting") == Some(0.0)
}

pub fn soak(args: SoakArgs) -> Result<SoakReport, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .map_err(|e| BenchError::Runtime(e.to_string()))?;
    runtime.block_on(run(args))
}

async fn run(args: SoakArgs) -> Result<SoakReport, BenchError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| BenchError::Runtime(e.to_string()))?;
    let ctx = Arc::new(Ctx {
        http,
        url: args
            .url
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string(),
        api_key: args.api_key.clone(),
        faults: args.faults,
        counters: Counters::default(),
    });
    if metrics_text(&ctx).await.is_none() {
        return Err(BenchError::Connect {
            url: ctx.url.clone(),
            message: "no /metrics".into(),
        });
    }
    let start = Instant::now();
    let deadline = start + args.duration;
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|i| {
            let ctx = ctx.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(args.seed.wrapping_add(i as u64));
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    one_turn(&ctx, &mut rng).await;
                }
            })
        })
        .collect();
    let mut rss = Vec::new();
    let sample_every = (args.duration / 40).clamp(Duration::from_secs(1), Duration::from_secs(15));
    while Instant::now() < deadline {
        if let Some(m) = args.pid.and_then(rss_mib) {
            rss.push((start.elapsed().as_secs_f64(), m));
        }
        tokio::time::sleep(sample_every.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
    for w in workers {
        let _ = w.await;
    }
    // Idle: every block must be free, and the idle accounting check must have passed.
    let idle_deadline = Instant::now() + IDLE_WITHIN;
    let idle_text = loop {
        let text = metrics_text(&ctx).await;
        if text.as_deref().is_some_and(is_idle) || Instant::now() >= idle_deadline {
            break text.filter(|t| is_idle(t));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(m) = args.pid.and_then(rss_mib) {
        rss.push((start.elapsed().as_secs_f64(), m));
    }
    Ok(verdict(
        &args,
        &ctx.counters,
        idle_text.as_deref(),
        rss,
        start.elapsed(),
    ))
}

/// How long the verdict waits for the server to go idle after the load.
const IDLE_WITHIN: Duration = Duration::from_secs(60);

/// `idle_metrics`: the server's metrics once idle, `None` when it did not go idle or its
/// metrics could not be read (itself a failure).
fn verdict(
    args: &SoakArgs,
    c: &Counters,
    idle_metrics: Option<&str>,
    rss: Vec<(f64, f64)>,
    took: Duration,
) -> SoakReport {
    let read = |name| idle_metrics.and_then(|t| metric(t, name));
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let warmup = args.duration.as_secs_f64() / 5.0;
    let growth = rss
        .iter()
        .find(|(t, _)| *t >= warmup)
        .zip(rss.last())
        .map(|((_, at_warmup), (_, last))| last - at_warmup);
    let mut report = SoakReport {
        seconds: took.as_secs_f64(),
        ok: get(&c.ok),
        refused_429: get(&c.refused_429),
        client_errors: get(&c.client_errors),
        disconnects: get(&c.disconnects),
        injected_faults: get(&c.injected),
        unexpected_5xx: get(&c.server_errors),
        transport_errors: get(&c.transport_errors),
        kv_accounting_errors: read("sluice:kv_accounting_errors_total"),
        kv_usage_after: read("sluice:kv_cache_usage_perc"),
        rss_mib: rss,
        rss_growth_after_warmup_mib: growth,
        failures: Vec::new(),
    };
    let f = &mut report.failures;
    if report.unexpected_5xx > 0 {
        f.push(format!("{} unexpected 5xx", report.unexpected_5xx));
    }
    if report.transport_errors > 0 {
        f.push(format!("{} transport errors", report.transport_errors));
    }
    if idle_metrics.is_none() {
        f.push(format!(
            "the server's /metrics did not show it idle within {IDLE_WITHIN:?} (unreadable, or \
             requests still running)"
        ));
    }
    match report.kv_accounting_errors {
        None => f.push("no sluice:kv_accounting_errors_total in /metrics".into()),
        Some(e) if e > 0.0 => f.push(format!("{e} KV accounting errors")),
        Some(_) => {}
    }
    match report.kv_usage_after {
        None => f.push("no sluice:kv_cache_usage_perc in /metrics".into()),
        Some(u) if u > 0.0 => f.push(format!("KV cache {:.1}% used while idle", 100.0 * u)),
        Some(_) => {}
    }
    if report.ok == 0 {
        f.push("no request succeeded".into());
    }
    if args.pid.is_some() && growth.is_none() {
        f.push("--pid was given but its RSS could not be sampled after warm-up".into());
    }
    if let Some(g) = growth.filter(|&g| g > args.max_rss_growth) {
        f.push(format!(
            "RSS grew {g:.1} MiB after warm-up (limit {})",
            args.max_rss_growth
        ));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
