//! `sluice bench serve` and `bench compare` end to end, as the command line runs them,
//! against the scripted server.

use serde_json::Value;

use super::server::start_server;

fn cli_run(args: &[&str]) -> anyhow::Result<()> {
    use clap::Parser;
    let cli = sluice::cli::Cli::try_parse_from(args)?;
    match cli.command {
        sluice::cli::Command::Bench(cmd) => sluice::bench::run(cmd),
        other => anyhow::bail!("not a bench command: {other:?}"),
    }
}

#[test]
fn serve_writes_results_and_compare_reads_them() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = rt.block_on(start_server());
    let dir = std::env::temp_dir().join(format!("sluice-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dataset = dir.join("prompts.jsonl");
    std::fs::write(
        &dataset,
        "{\"prompt\": \"fast\", \"max_tokens\": 3}\n\n{\"prompt\": \"ok\"}\n",
    )
    .unwrap();
    let base_url = format!("http://{addr}/v1");
    let out = |name: &str| dir.join(name).to_string_lossy().into_owned();
    for (transport, label) in [("http", "over-sse"), ("ws", "over-ws")] {
        cli_run(&[
            "sluice",
            "bench",
            "serve",
            "--base-url",
            &base_url,
            "--model",
            "m",
            "--workload",
            "jsonl",
            "--dataset",
            &dataset.to_string_lossy(),
            "--output-len",
            "4",
            "--concurrency",
            "2",
            "--num-requests",
            "6",
            "--transport",
            transport,
            "--api-key",
            "secret",
            "--no-progress",
            "--slo-ttft-ms",
            "100",
            "--label",
            label,
            "--output",
            &out(&format!("{label}.json")),
        ])
        .unwrap();
    }
    let text = std::fs::read_to_string(dir.join("over-sse.json")).unwrap();
    assert!(!text.contains("secret"), "the API key must not be written");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["label"], "over-sse");
    assert_eq!(v["config"]["model"], "m");
    assert_eq!(v["config"]["concurrency"], 2);
    assert_eq!(v["summary"]["num_completed"], 6);
    assert_eq!(v["summary"]["total_output_tokens"], 3 * 3 + 3 * 4);
    // "fast" answers at once, "ok" after 200 ms: half the requests meet a 100 ms TTFT.
    assert_eq!(v["summary"]["goodput"]["num_good"], 3);
    assert_eq!(v["requests"].as_array().unwrap().len(), 6);
    assert!(v["date"].as_str().unwrap().ends_with('Z'));
    assert!(v["machine"]["num_cpus"].as_u64().unwrap() >= 1);

    let table = sluice::bench::compare::compare_files(&[
        dir.join("over-sse.json"),
        dir.join("over-ws.json"),
    ])
    .unwrap();
    assert!(
        table.contains("over-sse") && table.contains("over-ws"),
        "{table}"
    );
    assert!(table.contains("(x1.00)"), "{table}"); // same completions, ratio 1
    assert!(cli_run(&["sluice", "bench", "compare", &out("over-sse.json")]).is_err());
    assert!(cli_run(&[
        "sluice",
        "bench",
        "compare",
        &out("over-sse.json"),
        &out("missing.json")
    ])
    .is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_rejects_bad_arguments() {
    let base = [
        "sluice",
        "bench",
        "serve",
        "--model",
        "m",
        "--base-url",
        "http://127.0.0.1:9",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        cli_run(&a)
    };
    let err = |extra: &[&str]| with(extra).unwrap_err().to_string();
    assert!(err(&["--concurrency", "0"]).contains("--concurrency"));
    assert!(err(&["--request-rate", "0"]).contains("--request-rate"));
    assert!(err(&["--num-requests", "3", "--duration", "2"]).contains("not both"));
    assert!(err(&["--workload", "jsonl"]).contains("--dataset"));
    assert!(
        err(&["--workload", "jsonl", "--dataset", "/nonexistent.jsonl"])
            .contains("/nonexistent.jsonl")
    );
}
