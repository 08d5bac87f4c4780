//! `sluice plan` against measurement on this machine: for the default model on this CPU,
//! the planner's decode rate at 1, 4 and 16 streams against `sluice bench` on a real server,
//! and the concurrency it says fits, run with its recommended flags, without a preemption.
//!
//! Compared like with like: the plan's `decode.per_stream_tok_s` (1 / the predicted decode
//! step of that many sequences) against 1000 / the bench's median ITL (a decode step as the
//! client sees it; steps that also run a prompt are ITL's tail and TTFT, not its median).
//! The machine is shared: other builds can halve its speed between the planner's probe and
//! the bench, so each concurrency gets up to `ATTEMPTS` (plan, bench) pairs and passes when
//! one pair agrees within 25%; a wrong model misses on every pair. Every pair is printed.

mod api_support;

use std::path::Path;
use std::process::Command;

use api_support::{bench_serve, metric, metrics, sluice_bin, Server};
use serde_json::Value;

const INPUT_LEN: usize = 32;
const OUTPUT_LEN: usize = 32;
const ATTEMPTS: usize = 3;
const TOLERANCE: f64 = 0.25;

/// The two tests measure: never at the same time.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `sluice plan --json` for the default model on this CPU (2 threads, as the server).
fn plan(extra: &[&str]) -> Value {
    let out = Command::new(sluice_bin())
        .args(["plan", "--json", "--threads", "2", "--probe-reps", "3"])
        .args(["--input-len", &INPUT_LEN.to_string()])
        .args(["--output-len", &OUTPUT_LEN.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running sluice plan");
    assert!(
        out.status.success(),
        "sluice plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("plan --json is JSON")
}

/// `sluice bench serve` against `server` at `concurrency`; its result file's summary.
fn bench(server: &Server, concurrency: usize, num_requests: usize, dir: &Path) -> Value {
    let out = dir.join(format!("bench-{concurrency}.json"));
    let status = bench_serve(&server.url, &server.model, &out)
        .args(["--input-len", &INPUT_LEN.to_string()])
        .args(["--output-len", &OUTPUT_LEN.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--num-requests", &num_requests.to_string()])
        .args(["--warmup-requests", "1", "--client-threads", "1"])
        .env("RUST_LOG", "warn")
        .status()
        .expect("running sluice bench");
    assert!(status.success(), "sluice bench failed");
    let text = std::fs::read_to_string(&out).expect("the bench's result file");
    let v: Value = serde_json::from_str(&text).expect("result JSON");
    v["summary"].clone()
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for k in path {
        v = &v[*k];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v}"))
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-plan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn predicted_decode_rate_matches_the_bench_at_1_4_and_16_streams() {
    let _one_at_a_time = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir().join("rates");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let server = Server::start(&[]);
    let mut report = Vec::new();
    for concurrency in [1usize, 4, 16] {
        let mut within = false;
        for attempt in 1..=ATTEMPTS {
            let p = plan(&["--concurrency", &concurrency.to_string()]);
            assert_eq!(p["version"], 1);
            assert_eq!(p["decode"]["batch"], concurrency);
            let predicted = f(&p, &["decode", "per_stream_tok_s"]);
            let s = bench(&server, concurrency, concurrency.max(4), &dir);
            assert_eq!(s["num_failed"], 0, "{s}");
            let measured = 1000.0 / f(&s, &["itl_ms", "median"]);
            let ratio = predicted / measured;
            let line = format!(
                "{concurrency} streams, try {attempt}: predicted {predicted:.2} tok/s per \
                 stream ({:.1} in all), measured {measured:.2} ({:.1} in all; median ITL \
                 {:.1} ms), ratio {ratio:.2}; TTFT predicted {:.0} ms, measured mean {:.0} ms",
                predicted * concurrency as f64,
                measured * concurrency as f64,
                f(&s, &["itl_ms", "median"]),
                f(&p, &["ttft", "burst_ms"]),
                f(&s, &["ttft_ms", "mean"]),
            );
            eprintln!("{line}");
            report.push(line);
            if (ratio - 1.0).abs() <= TOLERANCE {
                within = true;
                break;
            }
        }
        assert!(
            within,
            "at {concurrency} streams no (plan, bench) pair agreed within {:.0}%:\n{}",
            TOLERANCE * 100.0,
            report.join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_concurrency_that_fits_runs_without_preemption() {
    let _one_at_a_time = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir().join("fits");
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Memory for the weights and a few megabytes more: a handful of sequences fit, so the
    // recommended cache is small and every one of its blocks is needed.
    let weights = f(&plan(&["--concurrency", "1"]), &["model", "weights_bytes"]) as u64;
    let memory = (weights + 20_000_000).to_string();
    let p = plan(&["--concurrency", "16", "--memory", &memory]);
    let fits = p["memory"]["max_concurrency"]
        .as_u64()
        .expect("max_concurrency") as usize;
    assert!((2..16).contains(&fits), "expected a handful to fit: {p}");
    assert_eq!(p["flags"]["max_num_seqs"], fits);
    let blocks = fits as u64
        * p["memory"]["blocks_per_seq"]
            .as_u64()
            .expect("blocks_per_seq");
    let kv = p["flags"]["kv_cache_memory"]
        .as_u64()
        .expect("kv_cache_memory");
    assert_eq!(
        kv,
        blocks * p["memory"]["bytes_per_block"].as_u64().expect("bytes")
    );
    let flags: Vec<String> = [
        "kv_cache_memory",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
    ]
    .iter()
    .flat_map(|k| {
        [
            format!("--{}", k.replace('_', "-")),
            p["flags"][k].to_string(),
        ]
    })
    .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start(&flags);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let before = metric(
        &rt.block_on(metrics(&server)),
        "vllm:generation_tokens_total",
    );
    let s = bench(&server, fits, 2 * fits, &dir);
    assert_eq!(s["num_failed"], 0, "{s}");
    assert_eq!(s["num_completed"], 2 * fits, "{s}");
    let text = rt.block_on(metrics(&server));
    assert!(text.contains("vllm:num_preemptions_total"), "{text}");
    let preemptions = metric(&text, "vllm:num_preemptions_total");
    let generated = metric(&text, "vllm:generation_tokens_total") - before;
    eprintln!(
        "{fits} streams in {blocks} blocks ({kv} bytes): {preemptions} preemptions, \
         {generated} tokens generated"
    );
    assert_eq!(preemptions, 0.0, "the planned concurrency was preempted");
    // Warm-up and measured requests, every one to its full length.
    assert_eq!(generated, ((2 * fits + 1) * OUTPUT_LEN) as f64);
    let _ = std::fs::remove_dir_all(&dir);
}
